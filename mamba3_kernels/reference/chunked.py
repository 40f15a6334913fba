"""The chunked matrix form of docs/spec.md: masked matrix products within a chunk, state between.

Within a chunk, input s reaches output t >= s with weight exp(c_t - c_s) * w_s, where c is the
cumulative log-decay inside the chunk and w_s = gamma_s + dt_{s+1} (1 - lam_{s+1}) folds the
trapezoid's "previous input" term of step s + 1 into input s (its alpha_{s+1} is already part of
exp(c_t - c_s)). At t = s only gamma_s applies, so the folded part is subtracted on the diagonal.

The state carried between chunks is the folded state: Hs at the chunk end plus the not yet
applied dt_{s+1} (1 - lam_{s+1}) term of the chunk's last input. At the sequence end that term is
zero (there is no next step), so the last carried state is the true Hs_L.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..inputs import ScanInputs
from ..state import Mamba3State
from .common import Prepared, epilogue, final_state, prepare

# Per-token log-decays are floored here before their running sum: exp of anything below it is
# zero in fp32 and fp64 alike, so no product changes, and the sum cannot overflow.
MIN_LOG_DECAY = -1e4


def _poisoned(p: Prepared) -> torch.Tensor | None:
    """(B, L, H) True from the first token of a (sequence, head) whose per-token inputs are not
    all finite, or None when every token is. The recurrence is causal: such a token may reach
    only its own and later outputs, so the chunked form runs on the clean tokens and marks
    those outputs NaN afterwards (multiplying a masked-out inf by zero would reach back)."""
    per_token = [p.qr.isfinite().all(-1).all(2), p.kr.isfinite().all(-1).all(2),
                 p.vr.isfinite().all(-1).all(2), p.adt.isfinite(), p.dt.isfinite(),
                 p.lam.isfinite(), p.theta.isfinite().all(-1)]  # fmt: skip
    if p.zr is not None:
        per_token.append(p.zr.isfinite().all(-1).all(2))
    bad = ~torch.stack(per_token).all(0)
    if not bad.any():
        return None
    return bad.cummax(dim=1).values


def _cleaned(p: Prepared, poisoned: torch.Tensor) -> Prepared:
    """``p`` with every per-token quantity of the poisoned tokens zeroed (their outputs are
    overwritten; earlier ones never read them)."""

    def zero(x, expand):
        return None if x is None else x.masked_fill(expand(poisoned), 0)

    rank_axis = lambda m: m[:, :, None, :, None]  # noqa: E731  (B, L, R, H, X)
    last_axis = lambda m: m[..., None]  # noqa: E731  (B, L, H, S)
    return dataclasses.replace(
        p, qr=zero(p.qr, rank_axis), kr=zero(p.kr, rank_axis), vr=zero(p.vr, rank_axis),
        zr=zero(p.zr, rank_axis), adt=zero(p.adt, lambda m: m), dt=zero(p.dt, lambda m: m),
        lam=zero(p.lam, lambda m: m), alpha=zero(p.alpha, lambda m: m),
        beta=zero(p.beta, lambda m: m), gamma=zero(p.gamma, lambda m: m),
        theta=zero(p.theta, last_axis),
    )  # fmt: skip


def _pad_chunks(x: torch.Tensor, nchunks: int, chunk: int) -> torch.Tensor:
    """(B, L, ...) -> (B, nchunks, chunk, ...), zero-padding the L axis at the end."""
    pad = nchunks * chunk - x.shape[1]
    if pad:
        x = torch.cat((x, x.new_zeros((x.shape[0], pad, *x.shape[2:]))), dim=1)
    return x.unflatten(1, (nchunks, chunk))


def chunked_scan(
    inputs: ScanInputs, rotary: str, chunk_size: int
) -> tuple[torch.Tensor, Mamba3State]:
    """Chunked evaluation of one non-varlen call; same function as ``recurrent_scan``.

    Returns out (B, L, H, P) or (B, L, R, H, P) in v's dtype, and the final state.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    p = prepare(inputs, rotary)
    seqlen = p.seqlen
    if seqlen == 0:
        return epilogue(p, p.vr.new_zeros(p.vr.shape)), final_state(p, inputs, p.ssm0)
    poisoned = _poisoned(p)
    if poisoned is not None:
        p = _cleaned(p, poisoned)

    # folded trapezoid weight: f_s = dt_{s+1} (1 - lam_{s+1}), zero past the sequence end
    nxt = p.dt * (1 - p.lam)  # (B, L, H)
    fold = F.pad(nxt[:, 1:], (0, 0, 0, 1))
    w = p.gamma + fold

    chunk = min(chunk_size, seqlen)
    nc = -(-seqlen // chunk)
    # Padded steps have adt = 0 and w = 0: they neither decay nor add to the state.
    qr, kr, vr = (_pad_chunks(x, nc, chunk) for x in (p.qr, p.kr, p.vr))  # (B, nc, C, R, H, X)
    adt, w, fold = (_pad_chunks(x, nc, chunk) for x in (p.adt, w, fold))  # (B, nc, C, H)
    # inclusive cumulative log-decay inside each chunk
    c = torch.cumsum(adt.clamp(min=MIN_LOG_DECAY), dim=2)

    # decay[b, j, h, t, s] = exp(c_t - c_s) for s <= t, from differences (never a ratio)
    ct = c.permute(0, 1, 3, 2)  # (B, nc, H, C)
    diff = ct.unsqueeze(-1) - ct.unsqueeze(-2)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=c.device).tril()
    decay = torch.exp(diff.masked_fill(~causal, float("-inf")))
    eye = torch.eye(chunk, dtype=c.dtype, device=c.device)
    mix = decay * w.permute(0, 1, 3, 2).unsqueeze(-2) - eye * fold.permute(0, 1, 3, 2).unsqueeze(-1)

    # intra-chunk: every pair of ranks (r for the output, u for the input)
    scores = torch.einsum("bjtrhn,bjsuhn->bjhtrsu", qr, kr)
    scores = scores * mix[:, :, :, :, None, :, None]
    y = torch.einsum("bjhtrsu,bjsuhp->bjtrhp", scores, vr)

    # each chunk's own contribution to the folded state at its end
    to_end = torch.exp(c[:, :, -1:] - c) * w  # (B, nc, C, H)
    d_state = torch.einsum("bjsh,bjsuhp,bjsuhn->bjhpn", to_end, vr, kr)
    chunk_decay = torch.exp(c[:, :, -1])  # (B, nc, H)

    # the initial state's previous-input term enters with weight dt_1 (1 - lam_1)
    h = p.ssm0 + nxt[:, 0, :, None, None] * torch.einsum("brhp,brhn->bhpn", p.vr0, p.kr0)
    starts = []
    for j in range(nc):
        starts.append(h)
        h = chunk_decay[:, j, :, None, None] * h + d_state[:, j]
    h_in = torch.stack(starts, dim=1)  # (B, nc, H, P, N)
    y = y + torch.exp(c)[:, :, :, None, :, None] * torch.einsum("bjhpn,bjtrhn->bjtrhp", h_in, qr)

    y = y.flatten(1, 2)[:, :seqlen]
    out, state = epilogue(p, y), final_state(p, inputs, h)
    if poisoned is not None:
        nan = float("nan")
        mask = poisoned[..., None] if out.dim() == 4 else poisoned[:, :, None, :, None]
        out = out.masked_fill(mask, nan)
        last = poisoned[:, -1]  # (B, H)
        state = Mamba3State(state.angle.masked_fill(last[..., None], nan),
                            state.ssm.masked_fill(last[..., None, None], nan),
                            state.k.masked_fill(last[:, None, :, None], nan), state.v)  # fmt: skip
    return out, state
