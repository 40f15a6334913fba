"""A state pool's slots: gathered into a per-sequence state and written back in place.

A server keeps one ``Mamba3State`` pool of slots (leading axis any size) for all its sequences;
``state_indices`` (nseq,) names each sequence's slot, a negative index a padding row (its slot is
not read; it starts from zeros and nothing is written back). ``step`` addresses slots directly in
its kernels; ``scan`` from slots (chunked prefill: each chunk of a long prompt continues its
slot's state and leaves the slot at the chunk's end) gathers, scans and scatters here.
"""

from __future__ import annotations

import torch

from .state import Mamba3State


def gather(pool: Mamba3State, state_indices: torch.Tensor, ssm_dtype=None) -> Mamba3State:
    """The contiguous per-row state of slots ``state_indices``; padding rows are zero.
    ``ssm_dtype``: the ssm field's dtype in the result (default the pool's)."""
    idx = state_indices.long()
    live = idx >= 0
    rows = []
    for t in pool:
        got = t.index_select(0, idx.clamp(min=0))
        rows.append(torch.where(live.view(-1, *([1] * (t.dim() - 1))), got, got.new_zeros(())))
    state = Mamba3State(*rows)
    return state if ssm_dtype is None else state._replace(ssm=state.ssm.to(ssm_dtype))


def scatter(pool: Mamba3State, state_indices: torch.Tensor, state: Mamba3State) -> None:
    """Write the rows of ``state`` into slots ``state_indices`` of ``pool`` in place (cast to
    the pool's dtypes); padding rows (negative index) write nothing."""
    idx = state_indices.long()
    rows = (idx >= 0).nonzero().squeeze(1)
    slots = idx.index_select(0, rows)
    for dst, src in zip(pool, state, strict=True):
        dst.index_copy_(0, slots, src.index_select(0, rows).to(dst.dtype))
