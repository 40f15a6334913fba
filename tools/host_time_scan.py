"""Host (Python) time of one eager inference prefill call,
``with torch.no_grad(): mamba3_kernels.scan(..., backend="triton")``, measured on a CPU-only
machine.

The calls are made with CPU tensors of the prefill shapes (bf16, H=64, P=64, N=128, S=32, G=1,
with D and z; MIMO R=4 with mimo_v, mimo_z and mimo_o; optionally from an initial state and
returning the final state), and everything Python does for them runs: validation (and its
memo), dispatch, config lookup, the launch plan, the allocations and the launch-argument
assembly up to the compiled kernels' launcher (three launches per call at these lengths: the
chunk-parallel forward). What is stubbed, and why (a CUDA call takes other branches than CPU
tensors would): see tools/host_stubs.py, shared with host_time_step.py; here the CPU allocator
is also told to keep freed blocks, as the CUDA caching allocator does (the MIMO (8, 2048) call's
buffers are hundreds of MB, which glibc would otherwise map and unmap on every call).

    TRITON_INTERPRET=1 python tools/host_time_scan.py [--calls 500] [--repeats 7]
        [--cases siso-1x2048,...] [--json OUT.json] [--profile CASE]
"""

from __future__ import annotations

import os

# The Triton backend accepts CPU tensors only under its interpreter (set before triton loads).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("MAMBA3_KERNELS_CHECK_VALUES", None)  # value checks off, as in a default GPU call

import argparse  # noqa: E402
import cProfile  # noqa: E402
import json  # noqa: E402
import pstats  # noqa: E402

import torch  # noqa: E402
from host_stubs import (  # noqa: E402
    best_us,
    cache_cpu_allocations,
    force_gpu_plans,
    install_stubs,
    run_info,
)
from mamba3_kernels.triton_impl import chunk_fwd as cf  # noqa: E402

import mamba3_kernels  # noqa: E402
from mamba3_kernels import dispatch, validate  # noqa: E402
from mamba3_kernels.testing import random_inputs  # noqa: E402

SHAPE = dict(nheads=64, headdim=64, d_state=128, n_angles=32, ngroups=1)
# name: (batch, seqlen, rank, from an initial state and returning the final one)
CASES = {
    "siso-1x2048": (1, 2048, 1, False),
    "siso-1x2048-state": (1, 2048, 1, True),
    "siso-1x512": (1, 512, 1, False),
    "mimo4-8x2048": (8, 2048, 4, False),
    "mimo4-8x2048-state": (8, 2048, 4, True),
}


def make_call(batch: int, seqlen: int, rank: int, state: bool):
    """The public call's inputs (CPU tensors) and keyword arguments."""
    x = random_inputs(
        batch=batch, seqlen=seqlen, rank=rank, dtype=torch.bfloat16, with_initial_state=state,
        generator=torch.Generator().manual_seed(0), **SHAPE,
    )  # fmt: skip
    kwargs = dict(D=x.D, z=x.z, mimo_v=x.mimo_v, mimo_z=x.mimo_z, mimo_o=x.mimo_o,
                  initial_state=x.initial_state, return_final_state=state,
                  backend="triton")  # fmt: skip
    return x, kwargs


def launches_reached(call) -> int:
    """Run ``call`` once with every compiled launch recorded; the number of direct launches."""
    seen = []
    saved = {}
    for plan in cf._PLANS.values():
        for ln in plan.launches:
            if ln.compiled is not None:
                saved[id(ln)] = ln.compiled
                _, function, packed, kernel = ln.compiled
                ln.compiled = (lambda *args: seen.append(len(args)), function, packed, kernel)
    try:
        call()
    finally:
        for plan in cf._PLANS.values():
            for ln in plan.launches:
                if id(ln) in saved:
                    ln.compiled = saved[id(ln)]
    return len(seen)


def time_case(name: str, calls: int, repeats: int, profile: bool) -> dict[str, float]:
    """Time one case's public call and its parts; returns {part: us per call}."""
    batch, seqlen, rank, state = CASES[name]
    x, kwargs = make_call(batch, seqlen, rank, state)

    def api():
        return mamba3_kernels.scan(*x[:9], **kwargs)

    with torch.no_grad():
        for _ in range(4):  # builds the memos and the plan, then switches it to the CUDA branch
            api()
            force_gpu_plans()
        n = launches_reached(api)
        assert n == 3, f"{name}: the call made {n} direct launches, not 3"
        res = api()
        out = res[0] if state else res
        assert out.shape == (batch, seqlen, SHAPE["nheads"], SHAPE["headdim"]), out.shape

        vargs = (*x[:9], x.D, x.z, x.mimo_v, x.mimo_z, x.mimo_o, x.initial_state, state)
        problem, inputs = validate.validate_scan(*vargs)
        backend, configs = dispatch.plan(problem, "triton", "inference")
        config = configs.get(cf.SPEC.name) or cf.SPEC.default(problem)

        def validation():
            return validate.validate_scan(*vargs)

        def backend_scan():
            return backend.scan(problem, inputs, configs)

        def launcher():
            return cf.chunk_fwd(problem, inputs, config)

        rows = [
            ("mamba3_kernels.scan (whole call)", api),
            ("  validate_scan", validation),
            ("  TritonBackend.scan (config + launcher)", backend_scan),
            ("    chunk_fwd (launcher)", launcher),
        ]
        results = {}
        for label, fn in rows:
            results[label.strip()] = best_us(fn, calls, repeats)
        if profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(calls):
                api()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    return {label: results[label.strip()] for label, _ in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=500, help="calls per repeat")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--profile", help="print a cProfile of this case's public call")
    a = ap.parse_args()
    cases = [c for c in a.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"--cases: unknown {unknown}; choose from {list(CASES)}")

    cache_cpu_allocations()
    install_stubs()
    results = {
        "what": "host us per call, best of repeats; launch stubbed (see tools/host_stubs.py)",
        "shape": {**SHAPE, "dtype": "bfloat16", "D": True, "z": True},
        "cases": {
            c: dict(zip(("batch", "seqlen", "rank", "state"), CASES[c], strict=True)) for c in cases
        },  # fmt: skip
        **run_info(a.calls, a.repeats),
    }
    print(f"host time per call, us, best of {a.repeats} x {a.calls} calls (launches stubbed)")
    for case in cases:
        parts = time_case(case, a.calls, a.repeats, a.profile == case)
        results["us_per_call"][case] = {k.strip(): v for k, v in parts.items()}
        print(case)
        for label, us in parts.items():
            print(f"  {label:<44} {us:8.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
