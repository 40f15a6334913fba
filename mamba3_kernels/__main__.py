"""``python -m mamba3_kernels info``: the backends available here and auto's picks."""

import sys

from .info import print_info


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in ([], ["info"]):
        print_info()
        return 0
    print(f"unknown command {argv[0]!r}; usage: python -m mamba3_kernels info", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
