"""The step recurrence of docs/spec.md, one token at a time (the literal definition)."""

from __future__ import annotations

import torch

from ..inputs import ScanInputs
from ..state import Mamba3State
from .common import epilogue, final_state, prepare


def _outer(vr: torch.Tensor, kr: torch.Tensor) -> torch.Tensor:
    """sum_r vr_r kr_r^T: (B, R, H, P), (B, R, H, N) -> (B, H, P, N)."""
    return torch.einsum("brhp,brhn->bhpn", vr, kr)


def recurrent_scan(inputs: ScanInputs, rotary: str) -> tuple[torch.Tensor, Mamba3State]:
    """Loop over t of the SPEC recurrence for one non-varlen call.

    Returns out (B, L, H, P) or (B, L, R, H, P) in v's dtype, and the final state.
    """
    p = prepare(inputs, rotary)
    hs = p.ssm0  # (B, H, P, N)
    prev = _outer(p.vr0, p.kr0)  # the previous-input term of step 1
    ys = []
    for t in range(p.seqlen):
        cur = _outer(p.vr[:, t], p.kr[:, t])
        a = p.alpha[:, t, :, None, None]
        b = p.beta[:, t, :, None, None]
        g = p.gamma[:, t, :, None, None]
        hs = a * hs + b * prev + g * cur
        ys.append(torch.einsum("bhpn,brhn->brhp", hs, p.qr[:, t]))
        prev = cur
    if ys:
        y = torch.stack(ys, dim=1)
    else:
        y = p.vr.new_zeros(p.vr.shape)  # (B, 0, R, H, P)
    return epilogue(p, y), final_state(p, inputs, hs)
