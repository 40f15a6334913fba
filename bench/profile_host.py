"""cProfile of the public eager calls on a CUDA machine: ``mamba3_kernels.step`` (SISO decode,
batch 16, state updated in place) and ``mamba3_kernels.scan`` under no_grad (SISO (1, 2048)),
with the GPU kept busy by a sleep kernel so that the calls only enqueue. Prints the host time
per call and the functions with the most own time.

    python bench/profile_host.py [--calls 2000] [--top 30]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import mamba3_kernels
from mamba3_kernels.testing import random_inputs


def _host_us(fn, calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        torch.cuda._sleep(200_000_000)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return best


def _profile(name: str, fn, calls: int, top: int) -> None:
    print(f"== {name}: {_host_us(fn, calls):.1f} us per call (best of 3 x {calls})")
    prof = cProfile.Profile()
    torch.cuda._sleep(400_000_000)
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    inp = random_inputs(
        batch=16, dtype=torch.bfloat16, device="cuda", step=True, nheads=64, ngroups=1,
        d_state=128, headdim=64, n_angles=32, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    state = inp.initial_state.clone()
    step_args = (inp.q, inp.k, inp.v, inp.adt, inp.dt, inp.trap, inp.q_bias, inp.k_bias,
                 inp.angles, state)  # fmt: skip

    def step():
        return mamba3_kernels.step(*step_args, D=inp.D, z=inp.z, backend="triton")

    _profile("step, SISO batch 16", step, args.calls, args.top)
    raw = random_inputs(
        batch=1, seqlen=2048, dtype=torch.bfloat16, device="cuda", nheads=64, ngroups=1,
        d_state=128, headdim=64, n_angles=32, generator=torch.Generator().manual_seed(1),
    )  # fmt: skip

    def scan():
        with torch.no_grad():
            return mamba3_kernels.scan(*raw[:9], D=raw.D, z=raw.z, backend="triton")

    _profile("scan, SISO (1, 2048)", scan, args.calls // 4, args.top)


if __name__ == "__main__":
    main()
