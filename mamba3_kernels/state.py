"""The recurrent state carried between calls: ``Mamba3State(angle, ssm, k, v)``."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Mamba3State(NamedTuple):
    """State of a Mamba-3 scan after its last token (per sequence when varlen).

    Fields (B = batch, or number of sequences with ``cu_seqlens``):
      angle: (B, H, S) fp32, cumulative rotary angle theta_L.
      ssm:   (B, H, P, N) fp32 (bf16 or fp16 to halve a decode pool's memory), the matrix
             state Hs_L.
      k:     (B, R, H, N), rotated and biased k of the last token (R = 1 for SISO).
      v:     (B, H, P), raw v of the last token.
    """

    angle: torch.Tensor
    ssm: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    @staticmethod
    def zeros(
        batch: int,
        nheads: int,
        headdim: int,
        d_state: int,
        n_angles: int,
        rank: int = 1,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        state_dtype: torch.dtype = torch.float32,
    ) -> Mamba3State:
        """Allocate a zero state (``batch``: sequences, or slots of a decode pool).

        ``dtype`` is the k/v dtype (the inputs' dtype); ``state_dtype`` the ssm state's (fp32,
        bf16, fp16; fp64 for reference checks). The angle stays fp32 (fp64 with an fp64 state):
        a rounded angle would drift step after step.
        """
        angle_dtype = torch.float64 if state_dtype == torch.float64 else torch.float32
        return Mamba3State(
            angle=torch.zeros(batch, nheads, n_angles, dtype=angle_dtype, device=device),
            ssm=torch.zeros(batch, nheads, headdim, d_state, dtype=state_dtype, device=device),
            k=torch.zeros(batch, rank, nheads, d_state, dtype=dtype, device=device),
            v=torch.zeros(batch, nheads, headdim, dtype=dtype, device=device),
        )

    def clone(self) -> Mamba3State:
        return Mamba3State(*(t.clone() for t in self))
