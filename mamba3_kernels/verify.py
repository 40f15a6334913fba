"""Multi-token verify (speculative decoding): a short draft from each sequence's state, with the
state after every draft token, so the engine keeps the state at the accepted prefix.

``verify`` runs the draft's L tokens as L decode steps on a copy of the states (so it equals
stepping token by token, on any backend that steps) and returns every intermediate state;
``commit`` writes the state at each sequence's accepted prefix back into its slot. The given
state or pool is never modified by ``verify``.
"""

from __future__ import annotations

import torch

from . import pool as pool_slots
from .api import step
from .checks import _check_index_values, _check_indices, _check_values_enabled, _tensor
from .state import Mamba3State
from .validate import _validate, check_scan_pool


def verify(
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
    state_indices: torch.Tensor | None = None,
    rotary: str | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, Mamba3State]:
    """A draft of L tokens per sequence from ``state`` (B sequences), or from slots
    ``state_indices`` (B,) of a pool (a negative index starts from zeros).

    Inputs have scan shapes with L the draft length (q, k (B, L, G, N) or (B, L, R, G, N); v, z
    (B, L, H, P); adt, dt, trap (B, H, L); angles (B, L, H, S)); no varlen: pad short drafts and
    accept fewer tokens. Returns out (B, L, H, P) (or (B, L, R, H, P)) and the states after
    every token, each field with a token axis after the batch: angle (B, L, H, S), ssm
    (B, L, H, P, N) in the state's dtype, k (B, L, R, H, N), v (B, L, H, P). Not
    differentiable.
    """
    tensors = (q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o)
    problem, inputs = _validate(False, tensors, None, False, None, rotary, None)
    if state is None:
        raise TypeError("state: expected a Mamba3State (or a pool with state_indices), got None")
    if state_indices is not None:
        state = check_scan_pool(problem, state, state_indices, q.device)
        current = pool_slots.gather(state, state_indices)
    else:
        _validate(False, tensors, state, False, None, rotary, None)  # the state's checks
        current = Mamba3State(*(t.clone(memory_format=torch.contiguous_format) for t in state))
    outs, states = [], []
    with torch.no_grad():
        for i in range(problem.seqlen):
            x = inputs.along_tokens(lambda t, i=i: t[:, i], lambda t, i=i: t[:, :, i])
            out, current = step(*x[:9], current, *x[9:14], rotary=rotary, inplace=False,
                                backend=backend)  # fmt: skip
            outs.append(out)
            states.append(current)
    fields = zip(*states, strict=True)
    return torch.stack(outs, 1), Mamba3State(*(torch.stack(f, 1) for f in fields))


def commit(
    pool: Mamba3State,
    state_indices: torch.Tensor,
    states: Mamba3State,
    accepted: torch.Tensor,
) -> None:
    """Write into slot ``state_indices[b]`` of ``pool`` the state after ``accepted[b]`` draft
    tokens (``states`` as verify returns them); ``accepted[b] == 0`` (and a negative index)
    leaves the slot as it was. ``accepted`` (B,) integers in [0, L]."""
    B, L = states.ssm.shape[:2]
    if accepted.shape != (B,) or accepted.dtype.is_floating_point:
        raise ValueError(f"accepted: expected (B,) = ({B},) integers, got {accepted.dtype} "
                         f"{tuple(accepted.shape)}")  # fmt: skip
    device = states.ssm.device
    _check_indices(_tensor("state_indices", state_indices), B, device)
    if _check_values_enabled(device.type):  # (a host sync on GPU, as the steps' index checks)
        _check_index_values(state_indices, pool.ssm.shape[0])
        if accepted.min() < 0 or accepted.max() > L:
            raise ValueError(f"accepted: expected values in [0, {L}] (the draft length)")
    accepted = accepted.to(device)
    keep = torch.where(accepted > 0, state_indices.to(device).long(), -1)
    rows = torch.arange(B, device=device)
    at = (accepted.long() - 1).clamp(min=0)
    chosen = Mamba3State(*(t[rows, at] for t in states))
    pool_slots.scatter(pool, keep, chosen)
