"""Bundles of the tensors one call passes to a backend."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .state import Mamba3State


class ScanInputs(NamedTuple):
    """The tensors of a ``scan`` (or, with the L axis absent, a ``step``) call, as validated.

    Shapes (docs/spec.md): q, k (B, L, G, N) or (B, L, R, G, N); v, z (B, L, H, P);
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

    def along_tokens(self, token_major, head_major) -> ScanInputs:
        """Apply ``token_major`` to the tensors whose token axis is dim 1 (q, k, v, z, angles) and
        ``head_major`` to those whose token axis is last (adt, dt, trap); absent ones stay None."""

        def tok(x):
            return None if x is None else token_major(x)

        return self._replace(
            q=tok(self.q),
            k=tok(self.k),
            v=tok(self.v),
            z=tok(self.z),
            angles=tok(self.angles),
            adt=head_major(self.adt),
            dt=head_major(self.dt),
            trap=head_major(self.trap),
        )

    def tokens(self, start: int, end: int, initial_state: Mamba3State | None = None) -> ScanInputs:
        """Tokens [start, end) of a scan call (no cu_seqlens), starting from ``initial_state``."""
        sliced = self.along_tokens(lambda x: x[:, start:end], lambda x: x[..., start:end])
        return sliced._replace(initial_state=initial_state, cu_seqlens=None)

    def token(self, t: int) -> ScanInputs:
        """Token t of a scan call in decode-step shapes (the L axis dropped, no state)."""
        picked = self.along_tokens(lambda x: x[:, t], lambda x: x[..., t])
        return picked._replace(initial_state=None, cu_seqlens=None)

    def as_scan(self, initial_state: Mamba3State | None = None) -> ScanInputs:
        """A decode step's inputs as a scan call of one token, starting from ``initial_state``."""
        one = self.along_tokens(lambda x: x.unsqueeze(1), lambda x: x.unsqueeze(-1))
        return one._replace(initial_state=initial_state, cu_seqlens=None)
