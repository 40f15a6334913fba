"""Host (Python) time of one eager training call through the Triton backend, measured on a
CPU-only machine: ``mamba3_kernels.scan(...)`` with inputs that require grad (the forward as
autograd records it) and that plus ``.backward()``.

The Triton kernels run under the interpreter with their bodies stubbed (the interpreter's
``run`` returns at once), so what is timed is everything Python and PyTorch do around them:
validation, dispatch, the launch plan, the backward's recomputed prep and epilogue (PyTorch ops
on tiny CPU tensors: SISO, 64 tokens, 4 heads, N=32, P=16, bf16, with D and mimo_o), the
autograd Functions and the kernel wrappers. Not counted: the GPU launcher's own argument
handling (the interpreter's launcher runs instead; the forward's direct launches skip it on a
GPU, the backward's kernels go through Triton's launcher there, ~5 launches per call).

With ``--ab`` each measurement alternates with one where mamba3_kernels.eager_calls' shortcuts
are off (every autograd Function through ``Function.apply``, every kernel op through torch's
dispatcher), in the same process.

    python tools/host_time_train.py [--repeats 12] [--calls 40] [--ab] [--json OUT.json]
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors reach the Triton backend (set before triton)
os.environ.pop("MAMBA3_KERNELS_CHECK_VALUES", None)

import argparse  # noqa: E402
import datetime  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from host_stubs import report_best_median, run_info  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

import mamba3_kernels  # noqa: E402
from mamba3_kernels import eager_calls  # noqa: E402
from mamba3_kernels.testing import random_inputs  # noqa: E402

SIZES = dict(batch=1, seqlen=64, nheads=4, ngroups=1, d_state=32, headdim=16, n_angles=8)


def _shortcuts(on: bool, saved: dict) -> None:
    """Turn eager_calls' shortcuts on (as shipped) or off (Function.apply, the dispatcher)."""
    if not saved:
        saved.update(needs=eager_calls._needs_op, shapes=dict(eager_calls._SHAPES))
    eager_calls._needs_op = saved["needs"] if on else (lambda: True)
    eager_calls._SHAPES.clear()
    if on:
        eager_calls._SHAPES.update(saved["shapes"])
    else:
        eager_calls._SHAPES.update(dict.fromkeys(saved["shapes"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--calls", type=int, default=40, help="calls per repeat")
    ap.add_argument("--ab", action="store_true", help="alternate with the shortcuts off")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()

    interpreter.InterpretedFunction.run = lambda self, *args, **kwargs: None  # no kernel work
    g = torch.Generator().manual_seed(0)
    x = random_inputs(**SIZES, rank=1, dtype=torch.bfloat16, device="cpu", with_D=True,
                      with_z=False, with_mimo_o=True, generator=g)  # fmt: skip
    fields = [t.requires_grad_() if t is not None else None for t in x[:14]]
    leaves = [t for t in fields if t is not None]

    def forward():
        return mamba3_kernels.scan(*fields, rotary="interleaved", backend="triton")

    grad = torch.randn_like(forward())

    def train_step():
        for t in leaves:
            t.grad = None
        forward().backward(grad)

    for _ in range(5):  # compile the launch plans, fill every memo and the Functions' checks
        train_step()
    saved: dict = {}
    _shortcuts(True, saved)
    modes = (True, False) if a.ab else (True,)
    times = {(name, on): [] for name in ("forward", "fwd+bwd") for on in modes}
    for _ in range(a.repeats):
        for on in modes:
            _shortcuts(on, saved)
            for name, fn, n in (("forward", forward, 5 * a.calls),
                                ("fwd+bwd", train_step, a.calls)):  # fmt: skip
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                times[(name, on)].append((time.perf_counter() - t0) / n * 1e6)
    _shortcuts(True, saved)

    out = run_info(a.calls, a.repeats)
    out["what"] = "host us per eager training call (kernels stubbed); best and median of repeats"
    out["sizes"] = SIZES
    out["date"] = datetime.date.today().isoformat()
    rows = {f"{name} ({'on' if on else 'off'})": v for (name, on), v in times.items()}  # shortcuts
    report_best_median(out, rows, a.json)


if __name__ == "__main__":
    main()
