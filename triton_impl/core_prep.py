"""Differentiable PyTorch prologue and epilogue around the Triton core (used by the backward).

``scan_via_core`` evaluates the whole scan as prep -> core -> epilogue, every piece differentiable
(the core through its own Triton backward), so the backward of the scan is one vector-Jacobian
product of this function:
  * prep: cumulative angles theta (B, L, H, S) (angle_scan.angle_scan, Triton); rank-weighted
    v (B, L, R, H, P); folded trapezoid weights w_t = gamma_t + mu_{t+1} (mu_t = dt_t (1 - lam_t),
    zero past the end of a sequence) and the diagonal weight gamma_t (B, H, L); the initial
    state's previous-input term folded into the initial matrix state
    S0 = ssm0 + mu_first sum_r vr0_r kr0_r^T;
  * bias + rotary + group->head expansion of q, k fused with the core in one autograd node
    (rot_core.rot_core_scan: Triton kernels forward and backward, so the per-head rotated
    q/k never pass through PyTorch elementwise ops or autograd); core: see core_scan;
  * epilogue: silu(z) gate, mimo_o rank sum; the final state (angle, ssm, k, v) (the D skip
    is the core's: core_scan);
Varlen (cu_seqlens) is handled here with per-token sequence ids, never with host syncs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mamba3_kernels.eager_calls import apply_positional
from mamba3_kernels.inputs import ScanInputs
from mamba3_kernels.problem import Problem
from mamba3_kernels.state import Mamba3State

from .angle_scan import angle_scan
from .core_rotary import RotaryConfig
from .mimo_gate import gated, mimo_gate, mimo_v_mix
from .rot_core import rot_core_scan

__all__ = ["scan_via_core", "rotate", "epilogue_reads_y"]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """Rotate the S coordinate pairs of ``x`` (..., N) by the angles whose cos and sin are given
    (..., S) (broadcastable). interleaved: pair j = (2j, 2j + 1); halves: pair j = (j, N/2 + j);
    other coordinates pass unchanged."""
    n, s = x.shape[-1], cos.shape[-1]
    if s == 0:
        return x
    if layout == "interleaved":
        a, b = x[..., 0 : 2 * s : 2], x[..., 1 : 2 * s : 2]
        rot = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
        return torch.cat((rot, x[..., 2 * s :]), dim=-1)
    half = n // 2
    a, b = x[..., :s], x[..., half : half + s]
    parts = (a * cos - b * sin, x[..., s:half], a * sin + b * cos, x[..., half + s :])
    return torch.cat(parts, dim=-1)


def epilogue_reads_y(problem: Problem, inputs: ScanInputs) -> bool:
    """Whether the epilogue's backward reads the core's y: through the z gate, or the mimo_o
    rank sum (else y's values never enter a gradient)."""
    return inputs.z is not None or (problem.mimo and inputs.mimo_o is not None)


class _SavedY(torch.autograd.Function):
    """y_saved in place of the core's y: the values of the first, the gradient to the second."""

    @staticmethod
    def forward(y_core, y_saved):
        return y_saved.view_as(y_saved)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, dy):
        return dy, None


def _per_head(x: torch.Tensor, nheads: int) -> torch.Tensor:
    """(B, L, R, G, N) -> (B, L, R, H, N): head h reads group h // (H / G)."""
    groups = x.shape[3]
    if groups == nheads:
        return x
    return x.repeat_interleave(nheads // groups, dim=3)


def _rotated_tokens(
    k: torch.Tensor, kb: torch.Tensor, theta: torch.Tensor, layout: str
) -> torch.Tensor:
    """Rot(theta)(k + bias) per head for a few tokens (the final state's k).
    k (X, R, G, N), kb (R, H, N), theta (X, H, S) -> (X, R, H, N) fp32."""
    kh = _per_head(k.float().unsqueeze(0), kb.shape[1])[0] + kb
    th = theta.unsqueeze(1)
    return rotate(kh, torch.cos(th), torch.sin(th), layout)


def _token_seq(problem: Problem, cu: torch.Tensor | None, L: int, device) -> dict:
    """Per-token sequence bookkeeping for varlen: seq id, first token, is-last flags."""
    if cu is None:
        return {}
    cu = cu.long()
    tok = torch.arange(L, device=device)
    seq_id = torch.searchsorted(cu[1:], tok, right=True)
    return dict(cu=cu, seq_id=seq_id, bos=cu[:-1][seq_id], last=tok + 1 == cu[1:][seq_id])


def scan_via_core(
    problem: Problem,
    inputs: ScanInputs,
    meta: tuple,
    values: bool = True,
    state: bool = True,
    y_saved: torch.Tensor | None = None,
    rotary: RotaryConfig = RotaryConfig(),
) -> tuple[torch.Tensor, Mamba3State | None]:
    """The scan (docs/spec.md) as differentiable prep -> Triton core -> epilogue.

    inputs: ScanInputs in scan shapes. meta: (chunk, dot_dtype, num_warps, num_stages[, split_n[,
    segment[, fwd_chunk]]]) for the core (see rot_core.rot_core_scan). Returns out
    (B, L, H, P) or (B, L, R, H, P) in v's dtype and the final state (angle, ssm fp32; k, v in
    the inputs' dtypes), per sequence when varlen.
    values=False (for a caller that only takes the vjp): the output and final ssm values may be
    wrong (the core's forward is skipped when the epilogue's backward does not read it); their
    vjp stays exact. state=False: no final state (None; its ~30 small ops are skipped, which a
    backward without a final-state gradient would record for nothing).
    y_saved: the core's y (B, L, R, H, P) as the forward computed it (chunk_fwd_saving_y), used
    in place of the core's forward, which is then skipped (the core's backward still runs).
    rotary: the launch config of the rotary passes and angle scans (core_rotary.RotaryConfig).
    """
    f32 = torch.float32
    q, k, v = inputs.q, inputs.k, inputs.v
    mimo = problem.mimo
    H, R, nseq = problem.nheads, problem.rank, problem.nseq
    L = v.shape[1]
    dev = v.device
    if not mimo:
        q, k = q.unsqueeze(2), k.unsqueeze(2)
    seqs = _token_seq(problem, inputs.cu_seqlens, L, dev)

    dt = inputs.dt.float()
    lam = torch.sigmoid(inputs.trap.float())
    gam = lam * dt  # (B, H, L)
    mu = dt - gam  # dt (1 - lam)
    fold = F.pad(mu[..., 1:], (0, 1))
    if seqs:
        fold = fold * (~seqs["last"]).to(f32)
    w = gam + fold

    init = inputs.initial_state
    # (B, L, H, S) fp32 in [0, 2 pi): a Triton scan along L with a hand-written backward
    theta = angle_scan(inputs.angles, dt, None if init is None else init.angle,
                       inputs.cu_seqlens, nseq, rotary)  # fmt: skip
    if mimo:
        qb, kb = inputs.q_bias.float().transpose(0, 1), inputs.k_bias.float().transpose(0, 1)
    else:
        qb, kb = inputs.q_bias.float().unsqueeze(0), inputs.k_bias.float().unsqueeze(0)
    mv = inputs.mimo_v.float().transpose(0, 1) if mimo and inputs.mimo_v is not None else None
    if mv is not None:
        vr = mimo_v_mix(v, inputs.mimo_v)  # its backward one Triton pass (mimo_gate)
    else:
        # SISO: the core reads v in its own dtype (it upcasts in registers): no fp32 copy
        vr = v.unsqueeze(2) if not mimo and v.dtype != torch.float64 else v.float().unsqueeze(2)
        if R > 1:
            vr = vr.expand(-1, -1, R, -1, -1)

    s0 = None
    if init is not None:
        v0 = init.v.float().unsqueeze(1)  # (nseq, 1, H, P)
        vr0 = v0 * mv if mv is not None else v0
        if seqs:
            first = seqs["cu"][:-1].clamp(max=max(L - 1, 0))
            mu0 = mu[0][:, first].transpose(0, 1) if L > 0 else mu.new_zeros(nseq, H)
            mu0 = mu0 * (seqs["cu"][1:] > seqs["cu"][:-1]).to(f32)[:, None]
        else:
            mu0 = mu[:, :, 0] if L > 0 else mu.new_zeros(nseq, H)
        prev = torch.einsum("bh,brhp,brhn->bhpn", mu0, vr0.expand(-1, R, -1, -1), init.k.float())
        s0 = init.ssm.float() + prev

    dot_dtype = problem.dtype
    need_y = y_saved is None and (values or epilogue_reads_y(problem, inputs))
    # bias + rotary + group->head expansion run inside the fused node: the per-head rotated
    # q/k exist only as the core's dot operands, never as autograd tensors. The D skip runs
    # inside the core too (its gradients join the core's dv in the backward kernel).
    D = inputs.D.float() if inputs.D is not None else None
    y, sf = rot_core_scan(q, k, qb, kb, theta, vr, inputs.adt.float(), w, gam, s0,
                          inputs.cu_seqlens, problem.rotary == "halves",
                          (meta[0], dot_dtype, meta[2], meta[3], nseq, *meta[4:7]),
                          need_y, D, rotary)  # fmt: skip
    if y_saved is not None:
        y = apply_positional(_SavedY, y, y_saved)

    # ---- epilogue -------------------------------------------------------------------------
    if (mimo and inputs.mimo_o is not None) or (not mimo and inputs.z is not None):
        # gate and rank sum in one node, its backward one Triton pass (mimo_gate)
        mo = inputs.mimo_o if mimo else None
        out = mimo_gate(y, inputs.z, inputs.mimo_z if mimo else None, mo, v.dtype, values)
    else:  # MIMO without mimo_o (the rank axis is returned), or SISO without z
        y = gated(y, inputs.z, inputs.mimo_z if mimo else None)
        out = (y if mimo else y.squeeze(2)).to(v.dtype)
    if not state:
        return out, None

    # ---- final state ----------------------------------------------------------------------
    if seqs:
        last = (seqs["cu"][1:] - 1).clamp(min=0)
        angle, v_last = theta[0, last], v[0, last]
        k_last = _rotated_tokens(k[0, last], kb, theta[0, last], problem.rotary)
        # an empty sequence keeps its initial state (zeros without one)
        empty = (seqs["cu"][1:] == seqs["cu"][:-1])[:, None, None]
        if init is not None:
            angle = torch.where(empty, init.angle.float(), angle)
            k_last = torch.where(empty[..., None], init.k.float(), k_last)
            v_last = torch.where(empty, init.v.to(v.dtype), v_last)
        else:
            angle = torch.where(empty, 0.0, angle)
            k_last = torch.where(empty[..., None], 0.0, k_last)
            v_last = torch.where(empty, 0.0, v_last)
    else:
        angle, v_last = theta[:, -1], v[:, -1]
        k_last = _rotated_tokens(k[:, -1], kb, theta[:, -1], problem.rotary)
    state = Mamba3State(angle=angle, ssm=sf, k=k_last.to(inputs.k.dtype), v=v_last)
    return out, state
