"""Host (Python) time of one eager decode call, ``mamba3_kernels.step(..., backend="triton")``,
measured on a CPU-only machine.

The call is made with CPU tensors of the decode shape (SISO, bf16, batch 16, H=64, P=64,
N=128, S=32, G=1, with D and z, state updated in place), and everything Python does for it runs:
validation (and its memo), dispatch, config lookup, the launch plan and the launch-argument
assembly up to the compiled kernel's launcher. What is stubbed, and why (a CUDA call takes other
branches than CPU tensors would): see tools/host_stubs.py, shared with host_time_scan.py.

    TRITON_INTERPRET=1 python tools/host_time_step.py [--calls 2000] [--repeats 7]
        [--json OUT.json] [--profile]
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
from host_stubs import best_us, force_gpu_plans, install_stubs, run_info  # noqa: E402
from mamba3_kernels.triton_impl import step as tstep  # noqa: E402

import mamba3_kernels  # noqa: E402
from mamba3_kernels import ops, validate  # noqa: E402
from mamba3_kernels.state import Mamba3State  # noqa: E402

SHAPE = dict(batch=16, nheads=64, headdim=64, d_state=128, n_angles=32, ngroups=1)


def make_call(batch: int):
    """The public call's arguments (CPU tensors) and keyword arguments."""
    s = SHAPE
    B, H, P, N, S, G = batch, s["nheads"], s["headdim"], s["d_state"], s["n_angles"], s["ngroups"]
    bf = torch.bfloat16
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    args = (
        rnd(B, G, N, dtype=bf), rnd(B, G, N, dtype=bf), rnd(B, H, P, dtype=bf),
        -rnd(B, H).abs(), rnd(B, H).abs() + 0.01, rnd(B, H),
        rnd(H, N), rnd(H, N), rnd(B, H, S),
        Mamba3State.zeros(B, H, P, N, S, dtype=bf),
    )  # fmt: skip
    kwargs = dict(D=rnd(H), z=rnd(B, H, P, dtype=bf), backend="triton")
    return args, kwargs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=SHAPE["batch"])
    ap.add_argument("--calls", type=int, default=2000, help="calls per repeat")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the public call")
    a = ap.parse_args()

    install_stubs()
    args, kwargs = make_call(a.batch)
    state = args[9]

    def api():
        return mamba3_kernels.step(*args, **kwargs)

    for _ in range(4):  # builds the memos and the plan, then switches it to the CUDA branch
        api()
        force_gpu_plans()
    # The timed calls take the direct-launch branch (the compiled kernel's stubbed run).
    seen = []
    compiled = {id(p): p.launch.compiled for p in tstep._PLANS.values()}
    for p in tstep._PLANS.values():
        if p.launch.compiled is not None:
            _, function, packed, kernel = p.launch.compiled
            p.launch.compiled = (lambda *args: seen.append(len(args)), function, packed, kernel)
    try:
        out, new_state = api()
    finally:
        for p in tstep._PLANS.values():
            p.launch.compiled = compiled[id(p)]
    assert seen, "the call did not reach the direct launch"
    assert all(a is b for a, b in zip(new_state, state, strict=True))
    assert out.shape == (a.batch, SHAPE["nheads"], SHAPE["headdim"])

    # The parts, each called as the public call calls it.
    rest = args[10:]
    vargs = (*args, kwargs["D"], kwargs["z"], *rest)
    problem, inputs = validate.validate_step(*vargs)

    def validation():
        return validate.validate_step(*vargs)

    def dispatch_and_launch():
        return ops.run_step(problem, inputs, inputs.initial_state, "triton")

    backend, configs = mamba3_kernels.dispatch.plan(problem, "triton", "decode")
    cfg = configs.get("step") or tstep.SPEC.default(problem)

    def launcher():
        return tstep.step(problem, inputs, inputs.initial_state, cfg)

    rows = [
        ("mamba3_kernels.step (whole call)", api),
        ("  validate_step", validation),
        ("  run_step (dispatch + launcher)", dispatch_and_launch),
        ("    triton_impl.step.step (launcher)", launcher),
    ]
    results = {
        "what": "host us per call, best of repeats; launch stubbed (see tools/host_stubs.py)",
        "shape": {**SHAPE, "batch": a.batch, "dtype": "bfloat16", "D": True, "z": True},
        **run_info(a.calls, a.repeats),
    }
    print(f"host time per call, best of {a.repeats} x {a.calls} calls (launch stubbed)")
    for name, fn in rows:
        us = best_us(fn, a.calls, a.repeats)
        results["us_per_call"][name.strip()] = us
        print(f"{name:<40} {us:7.2f} us")
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(a.calls):
            api()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
