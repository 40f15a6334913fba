"""``python -m mamba3_kernels [info]``: the backends available here and auto's picks.

``--help`` also lists the package's other command-line tools, each its own module.
"""

from __future__ import annotations

import argparse
import sys

# Every command of the package: ``info`` runs here, the others are ``python -m mamba3_kernels.<x>``.
COMMANDS = {
    "info": "versions, the backends available here (or why not), auto's picks",
    "check": "cross-check every backend here against the float64 reference",
    "bench": "time prefill and decode per backend next to peer kernels",
    "demo": "prefill and decode of a small Mamba-3 layer through every backend here",
    "autotune": "tune the kernels' tile configs for this GPU (needs the [tune] extra)",
}


def _epilog() -> str:
    width = max(len(name) for name in COMMANDS) + len("python -m mamba3_kernels.")
    lines = ["commands (each takes --help):"]
    for name, what in COMMANDS.items():
        cmd = "python -m mamba3_kernels" + (" info" if name == "info" else f".{name}")
        lines.append(f"  {cmd:<{width}}  {what}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mamba3_kernels",
        description="Kernels, dispatcher and autotuner for the Mamba-3 scan. "
        "Without a command (or with 'info'): print what runs here.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "command", nargs="?", default="info", metavar="info", help="the only command of this module"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in COMMANDS and args.command != "info":
        print(
            f"{args.command} is its own module: python -m mamba3_kernels.{args.command}",
            file=sys.stderr,
        )
        return 2
    if args.command != "info":
        parser.error(f"unknown command {args.command!r} (commands: {', '.join(COMMANDS)})")

    from .info import print_info

    print_info()
    return 0


if __name__ == "__main__":
    sys.exit(main())
