"""The elementwise stages around the TileLang chunk kernel, in plain PyTorch.

``prepare`` turns one fixed-length scan call into the operands of the chunk kernel (docs/spec.md,
section 6), in a head-major row layout: for every (sequence, head) pair ``bh = b * H + h`` the
kernel sees ``nrows = Lp * R`` rows, row ``t * R + r`` holding token t, rank r (Lp is L padded
to a whole number of chunks). Per row it gets

    q, k  the rotated and biased query and key (N wide, in the inputs' 16-bit dtype),
    v     the rank-weighted value mimo_v_r * v_t (P wide, same dtype),
    cum   the cumulative log-decay of the row's token from its chunk's start (inclusive, fp32),
    w     the folded trapezoid weight gamma_t + dt_{t+1} (1 - lam_{t+1}) (fp32),
    g     the diagonal weight gamma_t (fp32),

and per pair the fp32 state entering the first chunk, ssm0 + dt_1 (1 - lam_1) u_0. Padded tokens
have zero q, k, v and weights and no decay, so they change neither outputs nor the state.

``finish`` applies the output stage (D skip, z gate, mimo_o rank sum) to the kernel's y and
assembles the final state. Everything here is computed in fp32 (the rotary angles' running sum in
float64, reduced modulo 2 pi), whatever the input dtype.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mamba3_kernels.inputs import ScanInputs
from mamba3_kernels.problem import Problem
from mamba3_kernels.state import Mamba3State

_TWO_PI = 2.0 * math.pi


class Prepared(NamedTuple):
    """Operands of the chunk kernel (see the module docstring) and what ``finish`` needs.

    q, k (B*H, nrows, N) and v (B*H, nrows, P) in the compute dtype; cum, w, g (B*H, nrows)
    fp32; h0 (B*H, P, N) fp32; vr (B, L, R, H, P) fp32 (for the D skip); theta_last (B, H, S)
    fp32; k_last (B, R, H, N) in k's dtype. chunk: tokens per chunk, padded_len: Lp.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cum: torch.Tensor
    w: torch.Tensor
    g: torch.Tensor
    h0: torch.Tensor
    vr: torch.Tensor
    theta_last: torch.Tensor
    k_last: torch.Tensor
    chunk: int
    padded_len: int


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str):
    """Rotate the S coordinate pairs of x (..., N) by angles given as cos, sin (..., S).

    interleaved: pair j is (2j, 2j + 1); halves: pair j is (j, N/2 + j). Coordinates in no pair
    are copied. A pair (a, b) becomes (a cos - b sin, a sin + b cos).
    """
    n, s = x.shape[-1], cos.shape[-1]
    if s == 0:
        return x
    out = x.clone()
    if layout == "interleaved":
        a, b = x[..., 0 : 2 * s : 2], x[..., 1 : 2 * s : 2]
        out[..., 0 : 2 * s : 2] = a * cos - b * sin
        out[..., 1 : 2 * s : 2] = a * sin + b * cos
    elif layout == "halves":
        half = n // 2
        a, b = x[..., :s], x[..., half : half + s]
        out[..., :s] = a * cos - b * sin
        out[..., half : half + s] = a * sin + b * cos
    else:
        raise ValueError(f"unknown rotary layout {layout!r}")
    return out


def _rank_first_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """(B, H, Lp) per-token values -> (B*H, Lp*R): each token's value on its R rows."""
    b, h, lp = x.shape
    return x.unsqueeze(-1).expand(b, h, lp, rows).reshape(b * h, lp * rows)


def _pad_tokens(x: torch.Tensor, padded: int) -> torch.Tensor:
    """Zero-pad the last (token) axis of (B, H, L) to ``padded``."""
    return F.pad(x, (0, padded - x.shape[-1]))


def prepare(problem: Problem, inputs: ScanInputs, chunk: int) -> Prepared:
    """The kernel operands of one fixed-length (not varlen) call with L >= 1."""
    B, L, H, P = inputs.v.shape
    R, N, G = problem.rank, problem.d_state, problem.ngroups
    dtype = inputs.v.dtype
    device = inputs.v.device
    nchunks = -(-L // chunk)
    Lp = nchunks * chunk
    f32 = torch.float32

    # Per-token coefficients (B, H, L).
    dt = inputs.dt.to(f32)
    lam = torch.sigmoid(inputs.trap.to(f32))
    gamma = lam * dt
    nxt = dt * (1.0 - lam)  # weight of token t's input at step t + 1, before its decay
    fold = F.pad(nxt[..., 1:], (0, 1))  # zero after the last token
    w = gamma + fold
    adt = _pad_tokens(inputs.adt.to(f32), Lp)
    cum = adt.view(B, H, nchunks, chunk).cumsum(-1).view(B, H, Lp)

    # Rotary angles: the running sum in float64, reduced modulo 2 pi, then fp32.
    inc = math.pi * torch.tanh(inputs.angles.to(torch.float64))
    inc = inc * inputs.dt.to(torch.float64).transpose(1, 2).unsqueeze(-1)  # (B, L, H, S)
    theta = inc.cumsum(dim=1)
    if inputs.initial_state is not None:
        theta = theta + inputs.initial_state.angle.to(torch.float64).unsqueeze(1)
    theta = torch.remainder(theta, _TWO_PI).to(f32)
    theta_last = theta[:, -1].contiguous()
    th = theta.permute(0, 2, 1, 3).unsqueeze(3)  # (B, H, L, 1, S)
    cos, sin = torch.cos(th), torch.sin(th)

    # q, k per head, biased and rotated: (B, H, L, R, N).
    def per_head(x, bias):
        x = x if problem.mimo else x.unsqueeze(2)  # (B, L, R, G, N)
        x = x.permute(0, 3, 1, 2, 4).to(f32)  # (B, G, L, R, N)
        if H != G:
            x = x.repeat_interleave(H // G, dim=1)
        bias = bias.to(f32)
        bias = bias if problem.mimo else bias.unsqueeze(1)  # (H, R, N)
        return rotate_pairs(x + bias[None, :, None], cos, sin, problem.rotary)

    qr = per_head(inputs.q, inputs.q_bias)
    kr = per_head(inputs.k, inputs.k_bias)
    k_last = kr[:, :, -1].transpose(1, 2).to(inputs.k.dtype).contiguous()  # (B, R, H, N)

    # Rank-weighted values.
    v32 = inputs.v.to(f32)
    mimo_v = inputs.mimo_v.to(f32).transpose(0, 1) if inputs.mimo_v is not None else None
    vr = (
        v32.unsqueeze(2) * mimo_v if mimo_v is not None else v32.unsqueeze(2).expand(B, L, R, H, P)
    )  # (B, L, R, H, P)

    def rows(x, width):  # (B, H, L, R, X) -> zero-padded (B*H, Lp*R, X) in the compute dtype
        out = torch.zeros(B, H, Lp, R, width, dtype=dtype, device=device)
        out[:, :, :L] = x
        return out.view(B * H, Lp * R, width)

    q_rows = rows(qr, N)
    k_rows = rows(kr, N)
    v_rows = rows(vr.permute(0, 3, 1, 2, 4), P)
    del qr, kr

    # The state entering the first chunk (folded): ssm0 + dt_1 (1 - lam_1) sum_r vr0_r kr0_r^T.
    state = inputs.initial_state
    if state is not None:
        v0 = state.v.to(f32).unsqueeze(1)  # (B, 1, H, P)
        vr0 = v0 * mimo_v if mimo_v is not None else v0.expand(B, R, H, P)
        u0 = torch.einsum("brhp,brhn->bhpn", vr0, state.k.to(f32))
        h0 = state.ssm.to(f32) + nxt[..., 0, None, None] * u0
    else:
        h0 = torch.zeros(B, H, P, N, dtype=f32, device=device)

    return Prepared(
        q=q_rows,
        k=k_rows,
        v=v_rows,
        cum=_rank_first_rows(cum, R).contiguous(),
        w=_rank_first_rows(_pad_tokens(w, Lp), R).contiguous(),
        g=_rank_first_rows(_pad_tokens(gamma, Lp), R).contiguous(),
        h0=h0.reshape(B * H, P, N).contiguous(),
        vr=vr,
        theta_last=theta_last,
        k_last=k_last,
        chunk=chunk,
        padded_len=Lp,
    )


def finish(
    problem: Problem, inputs: ScanInputs, prep: Prepared, y: torch.Tensor, h_final: torch.Tensor
) -> tuple[torch.Tensor, Mamba3State | None]:
    """Output stage and final state from the kernel's y (B*H, nrows, P) and h (B*H, P, N)."""
    B, L, H, P = inputs.v.shape
    R, N = problem.rank, problem.d_state
    f32 = torch.float32
    yr = y.view(B, H, prep.padded_len, R, P)[:, :, :L].permute(0, 2, 3, 1, 4)  # (B, L, R, H, P)
    if inputs.D is not None:
        yr = yr + inputs.D.to(f32)[:, None] * prep.vr
    if inputs.z is not None:
        z = inputs.z.to(f32).unsqueeze(2)  # (B, L, 1, H, P)
        if problem.mimo and inputs.mimo_z is not None:
            z = z * inputs.mimo_z.to(f32).transpose(0, 1)
        yr = yr * F.silu(z)
    if problem.mimo and inputs.mimo_o is not None:
        out = (yr * inputs.mimo_o.to(f32).transpose(0, 1)).sum(dim=2)
    elif not problem.mimo:
        out = yr.squeeze(2)
    else:
        out = yr
    out = out.to(inputs.v.dtype).contiguous()
    if not problem.return_final_state:
        return out, None
    final = Mamba3State(
        angle=prep.theta_last,
        ssm=h_final.view(B, H, P, N),
        k=prep.k_last,
        v=inputs.v[:, -1].clone(),
    )
    return out, final


def empty_call(problem: Problem, inputs: ScanInputs) -> tuple[torch.Tensor, Mamba3State | None]:
    """A call over zero tokens: an empty output, and the initial state (or zeros) as the final."""
    B, _, H, P = inputs.v.shape
    shape = (B, 0, problem.rank, H, P) if problem.mimo and not problem.has_mimo_o else (B, 0, H, P)
    out = inputs.v.new_zeros(shape)
    if not problem.return_final_state:
        return out, None
    state = inputs.initial_state
    if state is not None:
        final = Mamba3State(
            angle=state.angle.to(torch.float32).clone(),
            ssm=state.ssm.to(torch.float32).clone(),
            k=state.k.to(inputs.k.dtype).clone(),
            v=state.v.to(inputs.v.dtype).clone(),
        )
    else:
        final = Mamba3State.zeros(
            B, H, P, problem.d_state, problem.n_angles, problem.rank,
            dtype=inputs.v.dtype, device=inputs.v.device,
        )  # fmt: skip
    return out, final
