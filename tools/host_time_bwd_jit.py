"""Host time of the Triton backward (``chunk_bwd``) through Triton's real JIT launch path, on a
machine without a GPU: the kernels compile for sm_90 through a stand-in driver
(tools/jit_standin.py) and their launcher is replaced by a no-op, so everything Python, PyTorch
(on small CPU tensors) and Triton's launch path do per call is timed, the GPU's work is not.

With ``--ab`` each measurement alternates with one where the direct launches are off
(``launch._ENABLED``: every launch through ``kernel[grid](...)``, Triton's argument binder), in
the same process.

    python tools/host_time_bwd_jit.py [--repeats 7] [--calls 50] [--ab] [--json OUT.json]
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # Triton's JIT, not its interpreter (set before triton)

import argparse  # noqa: E402
import datetime  # noqa: E402
import time  # noqa: E402

import jit_standin  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from host_stubs import report_best_median, run_info  # noqa: E402
from triton.compiler.compiler import CompiledKernel  # noqa: E402

SIZES = dict(batch=1, seqlen=64, nheads=4, ngroups=1, d_state=32, headdim=16, n_angles=8)
LAUNCHES = [0]


def _no_launch(*args) -> None:
    LAUNCHES[0] += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=50, help="calls per repeat")
    ap.add_argument("--ab", action="store_true", help="alternate with direct launches off")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()

    jit_standin.install()
    CompiledKernel._init_handles = lambda self: None  # nothing to load: nothing is launched
    CompiledKernel.run = property(lambda self: _no_launch)
    CompiledKernel.function = None
    from mamba3_kernels.triton_impl import chunk_bwd as cb
    from mamba3_kernels.triton_impl import launch as tlaunch

    from mamba3_kernels import validate
    from mamba3_kernels.testing import random_inputs

    tlaunch._direct = lambda args: tlaunch._ENABLED[0] and isinstance(args[0], torch.Tensor)
    tlaunch._current_stream = lambda device: 0
    g = torch.Generator().manual_seed(0)
    x = random_inputs(**SIZES, rank=1, dtype=torch.bfloat16, with_D=True, with_z=False,
                      with_mimo_o=True, generator=g)  # fmt: skip
    problem, inputs = validate.validate_scan(*x[:9], x.D, x.z, x.mimo_v, x.mimo_z, x.mimo_o,
                                             None, False)  # fmt: skip
    config = cb.default_config(problem)
    grad_out = torch.randn(x.v.shape, generator=g).to(x.v.dtype)

    def backward():
        cb.chunk_bwd(problem, inputs, grad_out, None, config)

    t0 = time.perf_counter()
    backward()  # compiles every kernel (sm_90, through the stand-in driver)
    compile_s = time.perf_counter() - t0
    per_call = LAUNCHES[0]
    backward()
    direct = len(tlaunch._CACHE)  # launches keyed for the direct path (all of them, normally)
    modes = (True, False) if a.ab else (True,)
    times: dict[bool, list[float]] = {on: [] for on in modes}
    for _ in range(a.repeats):
        for on in modes:
            tlaunch._ENABLED[0] = on
            backward()
            t0 = time.perf_counter()
            for _ in range(a.calls):
                backward()
            times[on].append((time.perf_counter() - t0) / a.calls * 1e6)
    tlaunch._ENABLED[0] = True

    out = run_info(a.calls, a.repeats)
    out.update(what="host us per chunk_bwd call through Triton's JIT (launcher a no-op)",
               sizes=SIZES, date=datetime.date.today().isoformat(), triton=triton.__version__,
               launches_per_call=per_call, direct_launch_keys=direct,
               first_call_compile_s=round(compile_s, 1))  # fmt: skip
    print(
        f"{per_call} launches per call ({direct} of them direct after the first); first call "
        f"(compiles) {compile_s:.1f} s"
    )
    rows = {f"chunk_bwd (direct {'on' if on else 'off'})": v for on, v in times.items()}
    report_best_median(out, rows, a.json)


if __name__ == "__main__":
    main()
