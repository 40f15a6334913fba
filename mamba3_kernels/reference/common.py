"""Preparation shared by both reference forms: upcast, layout normalisation, rotary, epilogue.

Both the step recurrence and the chunked form start from the same :class:`Prepared` bundle, so
the only thing that differs between them is how the state-space part ``y = Hs qr`` is summed.
Internally SISO is treated as MIMO with one rank (mimo_v = mimo_z = 1, no mimo_o), and q/k
groups are expanded to value heads, so every per-token tensor has the layout (B, L, R, H, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..inputs import ScanInputs
from ..state import Mamba3State

ROTARY_LAYOUTS = ("interleaved", "halves")


def compute_dtype(inputs: ScanInputs) -> torch.dtype:
    """float64 when the inputs are float64 (the truth for checks), else float32 (fp32 state)."""
    return torch.float64 if inputs.q.dtype == torch.float64 else torch.float32


def default_rotary(inputs: ScanInputs, rotary: str | None, step: bool = False) -> str:
    """The rotary layout to use: the given one, else the public layer's default for SISO/MIMO."""
    if rotary is not None:
        if rotary not in ROTARY_LAYOUTS:
            raise ValueError(f"rotary must be one of {ROTARY_LAYOUTS}, got {rotary!r}")
        return rotary
    mimo = inputs.q.dim() == (4 if step else 5)
    return "halves" if mimo else "interleaved"


def rotate(x: torch.Tensor, theta: torch.Tensor, layout: str) -> torch.Tensor:
    """Rotate S coordinate pairs of ``x`` (..., N) by ``theta`` (..., S) (broadcastable).

    interleaved: pair j is (2j, 2j + 1); halves: pair j is (j, N/2 + j); j < S. Coordinates in
    no pair pass unchanged. Each pair (a, b) becomes (a cos - b sin, a sin + b cos).
    """
    n, s = x.shape[-1], theta.shape[-1]
    if s == 0:
        return x
    cos, sin = torch.cos(theta), torch.sin(theta)
    if layout == "interleaved":
        if 2 * s > n:
            raise ValueError(f"interleaved rotary needs 2*S <= N (S={s}, N={n})")
        pairs = x[..., : 2 * s].unflatten(-1, (s, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        rot = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
        return torch.cat((rot, x[..., 2 * s :]), dim=-1)
    if layout == "halves":
        half = n // 2
        if n % 2 or s > half:
            raise ValueError(f"halves rotary needs N even and S <= N/2 (S={s}, N={n})")
        a, b = x[..., :s], x[..., half : half + s]
        return torch.cat(
            (a * cos - b * sin, x[..., s:half], a * sin + b * cos, x[..., half + s :]), dim=-1
        )
    raise ValueError(f"unknown rotary layout {layout!r}")


@dataclass
class Prepared:
    """Per-token quantities of one (non-varlen) call, in the compute dtype.

    Shapes: qr, kr (B, L, R, H, N); vr, zr (B, L, R, H, P); adt, dt, lam, alpha, beta, gamma
    (B, L, H); theta (B, L, H, S). Initial state: theta0 (B, H, S), ssm0 (B, H, P, N),
    kr0 (B, R, H, N), vr0 (B, R, H, P) (zeros when no initial state was given).
    D (H,) or None; mimo_o (R, H, P) or None; siso: drop the rank axis of the output.
    """

    qr: torch.Tensor
    kr: torch.Tensor
    vr: torch.Tensor
    zr: torch.Tensor | None
    adt: torch.Tensor
    dt: torch.Tensor
    lam: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    gamma: torch.Tensor
    theta: torch.Tensor
    theta0: torch.Tensor
    ssm0: torch.Tensor
    kr0: torch.Tensor
    vr0: torch.Tensor
    D: torch.Tensor | None
    mimo_o: torch.Tensor | None
    siso: bool
    out_dtype: torch.dtype

    @property
    def seqlen(self) -> int:
        return self.qr.shape[1]


def _rank_first(p: torch.Tensor) -> torch.Tensor:
    """(H, R, X) parameter -> (R, H, X), the internal per-rank layout."""
    return p.transpose(0, 1)


def _rank_weighted(x: torch.Tensor, weight: torch.Tensor | None, rank: int) -> torch.Tensor:
    """(B, L, H, P) -> (B, L, R, H, P): x * weight_r, or x repeated R times without weights."""
    x = x.unsqueeze(2)
    if weight is None:
        return x.expand(-1, -1, rank, -1, -1)
    return x * weight


def prepare(inputs: ScanInputs, rotary: str) -> Prepared:
    """Upcast and normalise one non-varlen scan call (scan shapes, see ScanInputs)."""
    cd = compute_dtype(inputs)
    q, k, v = inputs.q, inputs.k, inputs.v
    mimo = q.dim() == 5
    if not mimo:  # SISO is MIMO with one rank and unit rank weights
        q, k = q.unsqueeze(2), k.unsqueeze(2)
    bsz, seqlen, rank, ngroups, _ = q.shape
    nheads, headdim = v.shape[2], v.shape[3]
    if nheads % ngroups:
        raise ValueError(f"H={nheads} is not a multiple of G={ngroups}")
    rep = nheads // ngroups

    # head h reads group h // (H/G)
    q = q.to(cd).repeat_interleave(rep, dim=3)
    k = k.to(cd).repeat_interleave(rep, dim=3)
    q_bias = inputs.q_bias.to(cd)
    k_bias = inputs.k_bias.to(cd)
    if mimo:
        q_bias, k_bias = _rank_first(q_bias), _rank_first(k_bias)  # (R, H, N)
    else:
        q_bias, k_bias = q_bias.unsqueeze(0), k_bias.unsqueeze(0)  # (1, H, N)

    adt = inputs.adt.to(cd).transpose(1, 2)  # (B, L, H)
    dt = inputs.dt.to(cd).transpose(1, 2)
    lam = torch.sigmoid(inputs.trap.to(cd)).transpose(1, 2)
    alpha = torch.exp(adt)
    beta = (1 - lam) * dt * alpha
    gamma = lam * dt

    state = inputs.initial_state
    nangles = inputs.angles.shape[-1]
    if state is not None:
        theta0 = state.angle.to(cd)
    else:
        theta0 = torch.zeros(bsz, nheads, nangles, dtype=cd, device=v.device)
    # The angles are summed in float64 and kept modulo 2 pi: the rotation stays accurate at any
    # length, and a stored angle state never grows (decode continues from it step after step).
    inc = math.pi * torch.tanh(inputs.angles.double()) * dt.double().unsqueeze(-1)  # (B,L,H,S)
    theta = theta0.double().unsqueeze(1) + torch.cumsum(inc, dim=1)
    theta = torch.remainder(theta, 2 * math.pi).to(cd)

    rot = theta.unsqueeze(2)  # broadcast over the rank axis
    qr = rotate(q + q_bias, rot, rotary)
    kr = rotate(k + k_bias, rot, rotary)

    # SISO, or a MIMO call without mimo_v / mimo_z: unit rank weights (a plain broadcast)
    mimo_v = _rank_first(inputs.mimo_v.to(cd)) if mimo and inputs.mimo_v is not None else None
    mimo_z = _rank_first(inputs.mimo_z.to(cd)) if mimo and inputs.mimo_z is not None else None
    vr = _rank_weighted(v.to(cd), mimo_v, rank)
    zr = _rank_weighted(inputs.z.to(cd), mimo_z, rank) if inputs.z is not None else None

    if state is not None:
        ssm0 = state.ssm.to(cd)
        kr0 = state.k.to(cd)  # already rotated and biased
        v0 = state.v.to(cd)
        vr0 = _rank_weighted(v0.unsqueeze(1), mimo_v, rank).squeeze(1)
    else:
        ssm0 = torch.zeros(bsz, nheads, headdim, q.shape[-1], dtype=cd, device=v.device)
        kr0 = torch.zeros(bsz, rank, nheads, q.shape[-1], dtype=cd, device=v.device)
        vr0 = torch.zeros(bsz, rank, nheads, headdim, dtype=cd, device=v.device)

    mimo_o = None
    if mimo and inputs.mimo_o is not None:
        mimo_o = _rank_first(inputs.mimo_o.to(cd))
    return Prepared(
        qr=qr,
        kr=kr,
        vr=vr,
        zr=zr,
        adt=adt,
        dt=dt,
        lam=lam,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        theta=theta,
        theta0=theta0,
        ssm0=ssm0,
        kr0=kr0,
        vr0=vr0,
        D=inputs.D.to(cd) if inputs.D is not None else None,
        mimo_o=mimo_o,
        siso=not mimo,
        out_dtype=inputs.v.dtype,
    )


def epilogue(prep: Prepared, y: torch.Tensor) -> torch.Tensor:
    """From y = Hs qr (B, L, R, H, P) to the output: D skip, silu gate, mimo_o rank sum.

    Returns (B, L, H, P) for SISO or MIMO with mimo_o, else (B, L, R, H, P); in v's dtype.
    """
    if prep.D is not None:
        y = y + prep.D.unsqueeze(-1) * prep.vr
    if prep.zr is not None:
        y = y * F.silu(prep.zr)
    if prep.mimo_o is not None:
        out = (y * prep.mimo_o).sum(dim=2)
    elif prep.siso:
        out = y.squeeze(2)
    else:
        out = y
    return out.to(prep.out_dtype)


def final_state(prep: Prepared, inputs: ScanInputs, ssm: torch.Tensor) -> Mamba3State:
    """(theta_L, Hs_L, kr_L, v_L) given Hs_L; an empty sequence returns its initial state.

    angle/ssm stay in the compute dtype; k/v are stored in the inputs' k/v dtype.
    """
    state = inputs.initial_state
    if prep.seqlen > 0:
        angle = prep.theta[:, -1]
        k_last = prep.kr[:, -1].to(inputs.k.dtype)
        v_last = inputs.v[:, -1]
    else:
        angle = prep.theta0
        if state is not None:
            k_last, v_last = state.k.to(inputs.k.dtype), state.v.to(inputs.v.dtype)
        else:
            k_last = prep.kr0.to(inputs.k.dtype)
            v_last = torch.zeros_like(prep.vr0[:, 0], dtype=inputs.v.dtype)
    return Mamba3State(angle=angle, ssm=ssm, k=k_last, v=v_last)
