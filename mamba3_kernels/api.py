"""The public calls: ``scan`` (prefill, differentiable) and ``step`` (one decode step)."""

from __future__ import annotations

import torch

from . import pool as pool_slots
from .dispatch import plan
from .inputs import ScanInputs
from .ops import scan_args, scan_autograd, scan_eager, step_args
from .schema import grad_tensors
from .state import Mamba3State
from .validate import _validate, check_scan_pool


def scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    adt: torch.Tensor,
    dt: torch.Tensor,
    trap: torch.Tensor,
    q_bias: torch.Tensor,
    k_bias: torch.Tensor,
    angles: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    mimo_v: torch.Tensor | None = None,
    mimo_z: torch.Tensor | None = None,
    mimo_o: torch.Tensor | None = None,
    initial_state: Mamba3State | None = None,
    return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    rotary: str | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    state_indices: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, Mamba3State]:
    """The Mamba-3 scan over a sequence (docs/spec.md).

    Shapes: q, k (B, L, G, N) SISO or (B, L, R, G, N) MIMO; v, z (B, L, H, P); adt, dt, trap
    (B, H, L); q_bias, k_bias (H, N) or (H, R, N); angles (B, L, H, S); D (H,); mimo_v, mimo_z,
    mimo_o (H, R, P); initial_state a Mamba3State (per sequence with cu_seqlens (nseq + 1,) int32).

    Returns out (B, L, H, P) — (B, L, R, H, P) for MIMO without mimo_o — and, when
    ``return_final_state``, the final Mamba3State. ``rotary`` is "interleaved" (SISO default) or
    "halves" (MIMO default). ``backend`` is "auto", "reference", "triton", "tilelang" or "cute".
    Differentiable in every floating input, the initial state included.

    ``state_indices`` (nseq,) int32/int64 (chunked prefill from a server's pool): then
    ``initial_state`` is a pool of slots (leading axis any size); sequence b starts from slot
    ``state_indices[b]`` and its final state is written back into that slot in place (whether or
    not ``return_final_state``, which then returns the pool). A negative index is a padding
    sequence: it starts from zeros and writes nothing. Not differentiable.
    """
    # validate_scan's body, called directly (one Python call level of this many arguments fewer).
    tensors = (q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o)
    if state_indices is not None:
        return _scan_from_slots(tensors, initial_state, state_indices, return_final_state,
                                cu_seqlens, rotary, chunk_size, backend)  # fmt: skip
    problem, inputs = _validate(
        False, tensors, initial_state, return_final_state, cu_seqlens, rotary, chunk_size
    )
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        out, *final = torch.ops.mamba3.scan(*scan_args(problem, inputs, backend))
    elif _needs_grad(inputs):
        # Eager with autograd: the op's autograd without its dispatch (ops.scan_autograd).
        out, *final = scan_autograd(problem, inputs, backend)
    else:
        # Eager without autograd: skip the op's Python dispatch (tens of microseconds) and its
        # empty placeholders for an absent final state.
        out, final_state = scan_eager(problem, inputs, backend)
        return (out, final_state) if return_final_state else out
    return (out, Mamba3State(*final)) if return_final_state else out


def _scan_from_slots(tensors, pool, state_indices, return_final_state, cu_seqlens, rotary,
                     chunk_size, backend):  # fmt: skip
    """scan with ``state_indices``: gather the slots, scan, write the final states back."""
    problem, inputs = _validate(False, tensors, None, True, cu_seqlens, rotary, chunk_size)
    if pool is None:
        raise TypeError(
            "initial_state: expected the pool (a Mamba3State of slots) with state_indices, "
            "got None"
        )
    if _needs_grad(inputs):
        raise RuntimeError(
            "scan with state_indices updates the pool in place and is not differentiable; "
            "for training pass the slots' state as initial_state (mamba3_kernels.pool.gather)"
        )
    pool = check_scan_pool(problem, pool, state_indices, inputs.q.device)
    # The scan starts from a wide copy of the slots (a pool may keep its ssm in 16 bits).
    wide = None if pool.ssm.dtype == torch.float64 else torch.float32
    start = pool_slots.gather(pool, state_indices, ssm_dtype=wide)
    out, final = scan(*tensors, initial_state=start, return_final_state=True,
                      cu_seqlens=cu_seqlens, rotary=rotary, chunk_size=chunk_size,
                      backend=backend)  # fmt: skip
    pool_slots.scatter(pool, state_indices, final)
    return (out, pool) if return_final_state else out


def _needs_grad(inputs: ScanInputs) -> bool:
    """Whether autograd must record this call (grad mode on and some input requires grad)."""
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in grad_tensors(inputs))


def step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    adt: torch.Tensor,
    dt: torch.Tensor,
    trap: torch.Tensor,
    q_bias: torch.Tensor,
    k_bias: torch.Tensor,
    angles: torch.Tensor,
    state: Mamba3State,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    mimo_v: torch.Tensor | None = None,
    mimo_z: torch.Tensor | None = None,
    mimo_o: torch.Tensor | None = None,
    rotary: str | None = None,
    inplace: bool = True,
    backend: str = "auto",
    state_indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Mamba3State]:
    """One decode step from ``state``: the recurrence for L = 1.

    Shapes: q, k (B, G, N) or (B, R, G, N); v, z (B, H, P); adt, dt, trap (B, H); angles (B, H, S);
    state a Mamba3State (angle (B, H, S) fp32, ssm (B, H, P, N) fp32, k (B, R, H, N), v (B, H, P);
    contiguous when ``inplace``); ssm may be bf16 / fp16 (computed in fp32, stored rounded).
    Returns (out (B, H, P) or (B, R, H, P), state): with ``inplace`` the given state is updated
    and returned, else a new one (contiguous copies).

    ``state_indices`` (B,) int32/int64: ``state`` is then a pool of slots (leading axis any
    size, not B) and row b reads and updates slot ``state_indices[b]`` in place, so a server
    keeps one pool and batches whichever sequences are live; a negative index is a padding row
    (nothing read or written, out zero). Slots must be distinct and < the pool size (checked
    on CPU, and on GPU under MAMBA3_KERNELS_CHECK_VALUES=1).
    """
    if not inplace:
        # The copies are ours: contiguous, whatever the given state's layout.
        state = (
            Mamba3State(*(t.clone(memory_format=torch.contiguous_format) for t in state))
            if isinstance(state, tuple)
            else state
        )
    # validate_step's body, called directly: each Python call level of this many arguments costs
    # ~0.5 us, and a decode step's host time is the budget here.
    tensors = (q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o)
    problem, inputs = _validate(
        True, tensors, state, True, None, rotary, None, state_indices=state_indices
    )
    state = inputs.initial_state
    if torch.compiler.is_compiling():
        out = torch.ops.mamba3.step(*step_args(problem, inputs, backend, state_indices))
    else:  # eager: skip the op's Python dispatch, which costs tens of microseconds per call
        chosen, configs = plan(problem, backend, "decode")  # run_step's body
        if state_indices is None:
            out = chosen.step(problem, inputs, state, configs)
        else:
            out = chosen.step(problem, inputs, state, configs, state_indices=state_indices)
    return out, state
