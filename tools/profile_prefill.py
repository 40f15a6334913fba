"""Per-kernel GPU time of one prefill forward call (torch.profiler), for one case and config.

python tools/profile_prefill.py --case siso_1x16384 --config 64,64,4,1,0,1,1
"""

from __future__ import annotations

import argparse

import torch
from bench_triton_prefill import CASES, make_call
from mamba3_kernels.triton_impl import chunk_fwd as cf
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="siso_1x16384", choices=list(CASES))
    ap.add_argument("--config", default=None, help="chunk,block_p,warps,stages[,...] (default)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--plain", action="store_true", help="no torch.profiler (under ncu)")
    args = ap.parse_args()
    rank, batch, seqlen, _ = CASES[args.case]
    problem, inputs = make_call(rank, batch, seqlen)
    config = cf.default_config(problem)
    if args.config:
        config = cf.ChunkFwdConfig(*map(int, args.config.split(",")))
    for _ in range(3):  # compile and warm up
        cf.chunk_fwd(problem, inputs, config)
    torch.cuda.synchronize()
    if args.plain:
        for _ in range(args.reps):
            cf.chunk_fwd(problem, inputs, config)
        torch.cuda.synchronize()
        return
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.reps):
            cf.chunk_fwd(problem, inputs, config)
        torch.cuda.synchronize()
    print(f"{args.case} {config}  (per call, mean of {args.reps})")
    for ev in prof.key_averages():
        if ev.device_time_total > 0:
            print(f"  {ev.key[:60]:60} {ev.device_time_total / args.reps / 1e3:8.4f} ms")


if __name__ == "__main__":
    main()
