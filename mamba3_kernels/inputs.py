"""Bundles of the tensors one call passes to a backend."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .state import Mamba3State


class ScanInputs(NamedTuple):
    """The tensors of a ``scan`` (or, with the L axis absent, a ``step``) call, as validated.

    Shapes (SPEC.md): q, k (B, L, G, N) or (B, L, R, G, N); v, z (B, L, H, P);
    adt, dt, trap (B, H, L); q_bias, k_bias (H, N) or (H, R, N); angles (B, L, H, S);
    D (H,); mimo_v, mimo_z, mimo_o (H, R, P); cu_seqlens (nseq + 1,) int32.
    For a step: q, k (B, G, N) or (B, R, G, N); v, z (B, H, P); adt, dt, trap (B, H);
    angles (B, H, S).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    adt: torch.Tensor
    dt: torch.Tensor
    trap: torch.Tensor
    q_bias: torch.Tensor
    k_bias: torch.Tensor
    angles: torch.Tensor
    D: torch.Tensor | None = None
    z: torch.Tensor | None = None
    mimo_v: torch.Tensor | None = None
    mimo_z: torch.Tensor | None = None
    mimo_o: torch.Tensor | None = None
    initial_state: Mamba3State | None = None
    cu_seqlens: torch.Tensor | None = None
