"""PyTorch ops and their memory traffic in one eager Triton fwd+bwd call, counted on a CPU
machine: the Triton kernels run under the interpreter with their bodies stubbed, and a dispatch
mode records every aten op the call makes (views and allocations aside) with the bytes of its
tensor inputs and outputs. On a GPU each of those ops is a launch and a pass over memory, so the
traffic, in units of one bf16 (B, L, H, P) tensor, scales to a model shape (134 MB at
(1, 16384), H=64, P=64) as a bound on what the glue around the kernels costs.

    python tools/glue_traffic.py [--rank 4] [--z] [--top 12] [--json OUT.json]
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors reach the Triton backend (set before triton)

import argparse  # noqa: E402
import collections  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

import mamba3_kernels  # noqa: E402
from mamba3_kernels.testing import random_inputs  # noqa: E402

SIZES = dict(batch=1, seqlen=64, nheads=4, ngroups=1, d_state=32, headdim=16, n_angles=8)
# ops that move no memory (views, allocations)
_NO_TRAFFIC = ("view", "select", "slice", "unsqueeze", "squeeze", "expand", "transpose", "detach",
               "permute", "alias", "as_strided", "unbind", "t.default", "empty")  # fmt: skip


class _Traffic(TorchDispatchMode):
    """Per (op, calling line of this project): calls and bytes read + written."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()
        self.nbytes: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func).replace("aten.", "")
        here = [f for f in traceback.extract_stack()
                if ("triton_impl" in f.filename or "mamba3_kernels" in f.filename)
                and "testing" not in f.filename]  # fmt: skip
        key = (name, f"{here[-1].filename.rsplit('/', 1)[-1]}:{here[-1].lineno}" if here else
               "autograd engine")  # fmt: skip
        self.calls[key] += 1
        if not any(v in name for v in _NO_TRAFFIC):
            outs = out if isinstance(out, (tuple, list)) else [out]
            tensors = [a for a in [*args, *(kwargs or {}).values(), *outs]
                       if isinstance(a, torch.Tensor)]  # fmt: skip
            self.nbytes[key] += sum(t.numel() * t.element_size() for t in tensors)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank", type=int, default=1, help="1: SISO; 2, 4, 8: MIMO")
    ap.add_argument("--z", action="store_true", help="with the z gate")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()

    interpreter.InterpretedFunction.run = lambda self, *args, **kwargs: None  # no kernel work
    g = torch.Generator().manual_seed(0)
    mimo = a.rank > 1
    x = random_inputs(**SIZES, rank=a.rank, mimo=mimo, dtype=torch.bfloat16, device="cpu",
                      with_D=True, with_z=a.z, with_mimo_o=True, generator=g)  # fmt: skip
    fields = [t.requires_grad_() if t is not None else None for t in x[:14]]
    rotary = "halves" if mimo else "interleaved"

    def forward():
        return mamba3_kernels.scan(*fields, rotary=rotary, backend="triton")

    grad = torch.randn_like(forward())
    for _ in range(2):
        forward().backward(grad)
    with _Traffic() as t:
        forward().backward(grad)
    unit = SIZES["batch"] * SIZES["seqlen"] * SIZES["nheads"] * SIZES["headdim"] * 2
    total = sum(t.nbytes.values()) / unit
    rows = sorted(t.nbytes.items(), key=lambda kv: -kv[1])
    print(f"rank {a.rank}, z {a.z}: {sum(t.calls.values())} aten ops, traffic {total:.1f} x one "
          f"bf16 (B, L, H, P) tensor")  # fmt: skip
    for (name, where), n in rows[: a.top]:
        print(f"  {n / unit:7.1f}  x{t.calls[(name, where)]:<3d} {name:28s} {where}")
    if a.json:
        out = dict(
            date=datetime.date.today().isoformat(), torch=torch.__version__, sizes=SIZES,
            rank=a.rank, z=a.z, aten_ops=sum(t.calls.values()), traffic_units=round(total, 1),
            unit="bytes of one bf16 (B, L, H, P) tensor",
            top=[dict(op=nm, where=wh, calls=t.calls[(nm, wh)], units=round(n / unit, 1))
                 for (nm, wh), n in rows[: a.top]],
        )  # fmt: skip
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
