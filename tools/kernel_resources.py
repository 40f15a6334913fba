"""Registers, stack, shared memory and instruction count of the prefill forward kernels, from
their sm_90 builds: no GPU needed (Triton compiles ahead of time; its bundled cuobjdump reads
the cubins).

The forward kernels are latency-bound at 255 registers (docs/performance.md): a change that takes
registers, stack (spills) or instructions off a kernel is a candidate for the GPU, and this is
how to count that before spending device time. Counts come from the CPU machine's Triton,
which may differ from the GPU machine's.

    python tools/kernel_resources.py [--cases siso_8x2048 mimo4_8x2048] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # real builds, not the interpreter's (set before triton)

import torch  # noqa: E402
import triton  # noqa: E402
from bench_triton_prefill import CASES, SHAPE  # noqa: E402  (the benchmark's cases)
from mamba3_kernels.triton_impl import chunk_fwd as cf  # noqa: E402

from mamba3_kernels.problem import Problem  # noqa: E402

_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SASS_LINE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S")  # "/*0a40*/  FFMA ..." instructions


def cuobjdump() -> str:
    """Path of cuobjdump: Triton's bundled copy, else the one on PATH."""
    import triton.backends.nvidia as nv

    bundled = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    found = bundled if os.path.isfile(bundled) else shutil.which("cuobjdump")
    if found is None:
        raise FileNotFoundError("cuobjdump not found (neither in Triton's wheel nor on PATH)")
    return found


def cubin_resources(cubin: bytes, tool: str) -> dict:
    """{'registers', 'stack', 'shared', 'local', 'instructions'} of a one-kernel cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    m = _RES.search(res)
    if m is None:
        raise ValueError(f"no resource line in cuobjdump's output: {res[-300:]}")
    regs, stack, shared, local = (int(x) for x in m.groups())
    count = sum(1 for line in sass.splitlines() if _SASS_LINE.match(line))
    return dict(registers=regs, stack=stack, shared=shared, local=local, instructions=count)


def case_problem(rank: int, batch: int, seqlen: int) -> Problem:
    """The Problem of a benchmark case on a CUDA device: bf16, with D and z (no initial or final
    state), MIMO with mimo_o; as bench_triton_prefill.make_call validates it."""
    return Problem(
        batch=batch, seqlen=seqlen, rank=rank, nseq=batch, dtype=torch.bfloat16,
        device_type="cuda", mimo=rank > 1, rotary="halves" if rank > 1 else "interleaved",
        has_D=True, has_z=True, has_mimo_o=rank > 1, has_initial_state=False,
        return_final_state=False, varlen=False, **SHAPE,
    )  # fmt: skip


def report(case: str, config: cf.ChunkFwdConfig | None = None) -> dict:
    """Resources of every kernel one forward call of ``case`` launches, with ``config`` (default:
    the heuristic's). Returns {'config': ..., 'kernels': {name: resources}}."""
    problem = case_problem(*CASES[case][:3])
    config = config or cf.default_config(problem)
    built = cf.compile_kernel(problem, config)
    kernels = built if isinstance(built, dict) else {"_chunk_fwd_kernel": built}
    tool = cuobjdump()
    return dict(
        config=config.__dict__,
        kernels={name: cubin_resources(k.asm["cubin"], tool) for name, k in kernels.items()},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = {"triton": triton.__version__, "target": "sm_90", "cases": {}}
    print(f"{'case':14} {'kernel':24} {'regs':>5} {'stack':>6} {'shared':>7} {'instr':>7}")
    for case in args.cases:
        rep = out["cases"][case] = report(case)
        for name, r in rep["kernels"].items():
            print(f"{case:14} {name:24} {r['registers']:5d} {r['stack']:6d} {r['shared']:7d} "
                  f"{r['instructions']:7d}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
