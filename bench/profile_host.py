"""cProfile of the public eager calls on a CUDA machine: ``mamba3_kernels.step`` (SISO decode,
batch 16, state updated in place) and ``mamba3_kernels.scan`` under no_grad (SISO (1, 2048)),
and one eager training call (scan with inputs that require grad, then backward), with the GPU
kept busy by a sleep kernel so that the calls only enqueue (in batches short enough not to fill
CUDA's launch queue). Prints the host time per call and the functions with
the most own time.

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

# Calls enqueued behind one sleep kernel: CUDA's launch queue holds about a thousand launches,
# past which a launch blocks until the GPU drains it (and the host time read would be the
# GPU's). The scan makes three launches per call.
_BATCH = 200


def _timed_batches(fn, calls: int, per_launch: int, prof: cProfile.Profile | None) -> float:
    """Best host time per call (us) over batches of calls, each enqueued behind a sleep kernel
    that outlasts it, so that the calls only enqueue; with ``prof``, profiled."""
    batch = max(1, _BATCH // per_launch)
    best = float("inf")
    for start in range(0, calls, batch):
        n = min(batch, calls - start)
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time, longer than a batch takes
        if prof is not None:
            prof.enable()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - t0
        if prof is not None:
            prof.disable()
        best = min(best, elapsed / n * 1e6)
        torch.cuda.synchronize()
    return best


def _profile(name: str, fn, calls: int, per_launch: int, top: int) -> None:
    fn()
    torch.cuda.synchronize()
    us = _timed_batches(fn, calls, per_launch, None)
    print(f"== {name}: {us:.1f} us per call (best batch of {calls} calls)")
    prof = cProfile.Profile()
    _timed_batches(fn, calls, per_launch, prof)
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

    _profile("step, SISO batch 16", step, args.calls, 1, args.top)
    raw = random_inputs(
        batch=1, seqlen=2048, dtype=torch.bfloat16, device="cuda", nheads=64, ngroups=1,
        d_state=128, headdim=64, n_angles=32, generator=torch.Generator().manual_seed(1),
    )  # fmt: skip

    def scan():
        with torch.no_grad():
            return mamba3_kernels.scan(*raw[:9], D=raw.D, z=raw.z, backend="triton")

    _profile("scan, SISO (1, 2048)", scan, args.calls // 4, 3, args.top)
    leaves = [t.detach().requires_grad_() if t is not None else None for t in raw[:14]]
    grad = torch.randn(raw.v.shape, device="cuda", dtype=raw.v.dtype)

    def train():
        mamba3_kernels.scan(*leaves, backend="triton").backward(grad)

    # ~40 launches per training call (kernels and PyTorch's elementwise ops)
    _profile("scan fwd+bwd, SISO (1, 2048)", train, args.calls // 20, 40, args.top)


if __name__ == "__main__":
    main()
