"""Pure-PyTorch reference of the Mamba-3 scan (any device, float64 capable, differentiable).

``reference_scan`` evaluates docs/spec.md either as the literal step recurrence
(``chunk_size=None``) or in the chunked matrix form; ``reference_step`` is one decode step.
Both compute in float64 when the inputs are float64, else in float32, and go through plain
autograd.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import pool as pool_slots
from ..backend import Backend
from ..inputs import ScanInputs
from ..problem import Problem
from ..state import Mamba3State
from .chunked import chunked_scan
from .common import default_rotary
from .recurrent import recurrent_scan

__all__ = ["ReferenceBackend", "pooled_step", "reference_scan", "reference_step"]


def _one_call(inputs: ScanInputs, rotary: str, chunk_size: int | None):
    if chunk_size is None:
        return recurrent_scan(inputs, rotary)
    return chunked_scan(inputs, rotary, chunk_size)


def _slice_sequence(inputs: ScanInputs, start: int, end: int, i: int) -> ScanInputs:
    """The inputs of sequence i of a packed (cu_seqlens) call, as a batch-1 call."""
    state = inputs.initial_state
    if state is not None:
        state = Mamba3State(*(t[i : i + 1] for t in state))
    return inputs.tokens(start, end, state)


def reference_scan(
    inputs: ScanInputs, rotary: str | None = None, chunk_size: int | None = None
) -> tuple[torch.Tensor, Mamba3State]:
    """The Mamba-3 scan of docs/spec.md.

    inputs: ScanInputs in scan shapes (q, k (B, L, G, N) SISO or (B, L, R, G, N) MIMO, ...).
    rotary: "interleaved" or "halves" (None: interleaved for SISO, halves for MIMO).
    chunk_size: None for the step recurrence, an int for the chunked matrix form (any value
        gives the same function; L need not be a multiple).
    Returns out ((B, L, H, P), or (B, L, R, H, P) for MIMO without mimo_o) in v's dtype, and the
    final state (per sequence with cu_seqlens): angle (nseq, H, S), ssm (nseq, H, P, N) in the
    compute dtype, k (nseq, R, H, N) and v (nseq, H, P) in the inputs' dtypes.
    """
    rotary = default_rotary(inputs, rotary)
    if inputs.cu_seqlens is None:
        return _one_call(inputs, rotary, chunk_size)
    if inputs.q.shape[0] != 1:
        raise ValueError("cu_seqlens needs batch 1")
    bounds = [int(b) for b in inputs.cu_seqlens.tolist()]
    outs, states = [], []
    for i in range(len(bounds) - 1):
        sub = _slice_sequence(inputs, bounds[i], bounds[i + 1], i)
        out, state = _one_call(sub, rotary, chunk_size)
        outs.append(out)
        states.append(state)
    if not outs:  # no sequence at all: nothing to compute
        raise ValueError("cu_seqlens must hold at least one sequence")
    out = torch.cat(outs, dim=1)
    final = Mamba3State(*(torch.cat(fields, dim=0) for fields in zip(*states, strict=True)))
    return out, final


def reference_step(
    inputs: ScanInputs, state: Mamba3State, rotary: str | None = None
) -> tuple[torch.Tensor, Mamba3State]:
    """One decode step from ``state`` (not in place).

    inputs: step shapes (q, k (B, G, N) or (B, R, G, N); v, z (B, H, P); adt, dt, trap (B, H);
        angles (B, H, S)); its initial_state is ignored in favour of ``state``.
    Returns out ((B, H, P), or (B, R, H, P) for MIMO without mimo_o) and the new state.
    """
    rotary = default_rotary(inputs, rotary, step=True)

    scan_inputs = inputs.as_scan(state)
    out, new_state = recurrent_scan(scan_inputs, rotary)
    return out.squeeze(1), new_state


class ReferenceBackend(Backend):
    """The reference as a backend: slow, any device and dtype, differentiable by autograd."""

    def __init__(self) -> None:
        super().__init__(name="reference", priority=0, kernels=[], has_backward=False)

    def scan(
        self, problem: Problem, inputs: ScanInputs, configs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, Mamba3State | None]:
        out, state = reference_scan(inputs, problem.rotary, problem.chunk_size or 64)
        return out, (state if problem.return_final_state else None)

    def step(
        self,
        problem: Problem,
        inputs: ScanInputs,
        state: Mamba3State,
        configs: dict[str, Any] | None = None,
        state_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The step in fp32 (fp64), the state stored back in its own dtypes (a 16-bit ssm state
        rounded); with ``state_indices`` (B,) ``state`` is a pool: gather, step, scatter."""
        if state_indices is None:
            out, new_state = reference_step(inputs, state, problem.rotary)
            for dst, src in zip(state, new_state, strict=True):
                dst.copy_(src)
            return out
        return pooled_step(inputs, state, state_indices, problem.rotary)


def pooled_step(
    inputs: ScanInputs, pool: Mamba3State, state_indices: torch.Tensor, rotary: str | None = None
) -> torch.Tensor:
    """One decode step of batch rows on slots ``state_indices`` (B,) of ``pool`` (slots, ...),
    updated in place; a negative index is a padding row (its slot is not read, nothing is
    written, its out is zero). The definition the kernels' direct addressing is tested against.
    Returns out ((B, H, P) or (B, R, H, P))."""
    live = state_indices >= 0
    out, new_state = reference_step(inputs, pool_slots.gather(pool, state_indices), rotary)
    out = torch.where(live.view(-1, *([1] * (out.dim() - 1))), out, out.new_zeros(()))
    pool_slots.scatter(pool, state_indices, new_state)
    return out
