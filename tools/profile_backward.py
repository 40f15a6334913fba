"""Run a few forward+backward calls of one benchmark case, for a profiler to attach to
(tools/ncu_backward.sh profiles one of their kernels under Nsight Compute).

python tools/profile_backward.py --batch 1 --seqlen 16384 --rank 1 [--z] [--calls 4]
"""

from __future__ import annotations

import argparse

import torch
from bench_triton_backward import make_call


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--z", action="store_true", help="inputs with the z gate")
    ap.add_argument("--calls", type=int, default=4, help="fwd+bwd calls (the first compile)")
    args = ap.parse_args()
    _, fwdbwd, leaves = make_call(args.batch, args.seqlen, args.rank, args.z)
    for _ in range(args.calls):
        for t in leaves:  # (as do_bench's grad_to_none: no accumulation kernels)
            t.grad = None
        fwdbwd()
    torch.cuda.synchronize()
    print(f"{args.calls} fwd+bwd calls done")


if __name__ == "__main__":
    main()
