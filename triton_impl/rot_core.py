"""Bias + rotary + group->head expansion of q and k, and the core, as one autograd node
(rot_core_scan, core_prep's core): the rotary pass (core_rotary) writes the per-head rotated q/k
in the dot dtype as the core's operands (core_scan), and the backward runs the core's backward
and then the rotary backward, so no per-head tensor goes through a PyTorch elementwise pass or
through autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mamba3_kernels.eager_calls import apply_positional

from .core_rotary import RotaryConfig, _rotary_bwd_op, _rotary_fwd_op
from .core_scan import _core_bwd_op, _core_fwd_op, operand_dtype
from .core_segments import bwd_segment_len

__all__ = ["rot_core_scan"]


def _pair_major(x: Tensor | None, halves: bool, back: bool = False) -> Tensor | None:
    """A state-shaped (..., N) tensor between q's column layout and the core's pair-member
    order (rotary_fwd's pair_major: for the interleaved layout, the even columns then the odd
    ones; the halves layout is that order already); back: the other way."""
    if x is None or halves:
        return x
    n = x.shape[-1]
    if back:
        return torch.stack((x[..., : n // 2], x[..., n // 2 :]), dim=-1).flatten(-2)
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class _RotCore(torch.autograd.Function):
    """rotary prep + core as one autograd node (setup_context style for functorch). Outputs
    y, S_final and the rotated operands (non-differentiable; saved for the core's backward).

    The core sees every N-wide tensor (qr, kr, the states and their gradients) in pair-member
    column order (_pair_major): the dot products over N do not depend on the order, and its
    backward then holds both members of each rotary pair in contiguous columns (its d theta
    needs them side by side; interleaved pairs read as strided columns measured far slower,
    docs/performance.md)."""

    @staticmethod
    def forward(q, k, qb, kb, theta, vr, adt, w, gam, s0, D, cu, halves, need_y, chunk,
                dot_dtype, nw, ns, nseq, split_n, segment, fwd_chunk, knobs):  # fmt: skip
        op_dtype = dot_dtype if dot_dtype in ("bfloat16", "float16") else "float32"
        qr, kr = _rotary_fwd_op(q, k, qb, kb, theta, halves, op_dtype, True, knobs)
        states = qr.new_empty((0,), dtype=torch.float32)  # (segment states kept for backward)
        if need_y:
            state_seg = _shared_segment(qr.shape, cu, nseq, split_n, chunk, nw, segment,
                                        fwd_chunk, qr.device)  # fmt: skip
            y, sf, states = _core_fwd_op(
                qr, kr, vr, adt, w, gam, _pair_major(s0, halves), cu, fwd_chunk, dot_dtype, nw,
                ns, nseq, D, segment, chunk if state_seg else 0, state_seg,
            )  # fmt: skip
            sf = _pair_major(sf, halves, back=True)
        else:
            # Values not wanted (see rot_core_scan): zero-strided zeros, no launch, no memory.
            # y in vr's dtype: the output's cast is then a no-op, and y's gradient reaches the
            # core's backward in the output's dtype (no fp32 copy of it).
            B, L, R, H, N = qr.shape
            zero = torch.zeros(1, dtype=torch.float32, device=q.device)
            y = zero.to(vr.dtype).expand(B, L, R, H, vr.shape[-1])
            sf = zero.expand(nseq, H, vr.shape[-1], N)
        return y, sf, qr, kr, states

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:12], *output[2:5])
        ctx.mark_non_differentiable(*output[2:5])
        # Unused outputs get None, not zero-filled gradients: qr/kr's would be two per-head
        # (B, L, R, H, N) fills per backward, and a zero dS_final is no final-state gradient.
        ctx.set_materialize_grads(False)
        ctx.halves = inputs[12]
        ctx.flags = inputs[14:-2]  # (the backward's; the forward chunk is the recompute's)
        ctx.knobs = inputs[-1]

    @staticmethod
    def backward(ctx, dy, dsf, _dqr, _dkr, _states):
        q, k, qb, kb, theta, vr, adt, w, gam, s0, D, cu, qr, kr, states = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros(vr.shape, dtype=operand_dtype(vr.dtype), device=vr.device)
        *flags, segment = ctx.flags
        # d theta inside the core backward (whole rows of pairs in one program: no column split;
        # with it, and without angles, the rotary backward forms it)
        in_core = flags[-1] == 1 and theta.shape[-1] > 0
        n_angles = theta.shape[-1] if in_core else 0
        hv = ctx.halves
        dqr, dkr, dv, dadt, dw, dg, ds0, dD, dth_core = _core_bwd_op(
            dy.contiguous(), _pair_major(dsf, hv), qr, kr, vr, adt, w, gam, _pair_major(s0, hv),
            cu, *flags, D=D, segment=segment, n_angles=n_angles, halves=True,
            s_in=states if states.numel() else None,
        )  # fmt: skip
        ds0 = _pair_major(ds0, hv, back=True)
        xr_dtype = str(qr.dtype).replace("torch.", "")
        dq, dk, dqb, dkb, dth = _rotary_bwd_op(dqr, dkr, q, k, qb, kb, theta, hv, xr_dtype,
                                               in_core, True, ctx.knobs)  # fmt: skip
        if in_core:
            dth = dth_core
        return (dq.to(q.dtype), dk.to(k.dtype), dqb, dkb, dth, dv.to(vr.dtype),
                dadt.to(adt.dtype), dw.to(w.dtype), dg.to(gam.dtype),
                ds0 if s0 is not None else None, dD if D is not None else None,
                *([None] * 12))  # fmt: skip


def _shared_segment(shape, cu, nseq: int, split_n: int, chunk: int, num_warps: int,
                    segment: int, fwd_chunk: int, device) -> int:  # fmt: skip
    """Tokens per segment of the core backward for this call when the core forward can walk the
    same segments and keep their entering states for it (core_scan.core_fwd's states): a
    segmented (B, L) call whose backward segments are whole forward chunks; else 0."""
    L, H = shape[1], shape[3]
    if cu is not None or L == 0:
        return 0
    seg = bwd_segment_len(L, nseq, H, split_n, chunk, num_warps, segment, device)
    return seg if seg < L and seg % fwd_chunk == 0 else 0


def rot_core_scan(
    q, k, qb, kb, theta, vr, adt, w, gam, s0, cu_seqlens, halves, meta, need_y=True, D=None,
    rotary: RotaryConfig = RotaryConfig(),
):  # fmt: skip
    """Differentiable rotary prep + core: (y (B, L, R, H, P) in core_scan.operand_dtype(vr.dtype),
    S_final (nseq, H, P, N) fp32).

    q, k (B, L, R, G, N) raw (unbiased, unrotated); qb, kb (R, H, N) fp32; theta (B, L, H, S)
    fp32 cumulative angles; the rest as core_scan. meta = (chunk, dot_dtype, num_warps,
    num_stages, nseq[, split_n[, segment[, fwd_chunk]]]) (see core_scan.core_bwd; fwd_chunk: the
    forward's chunk, 0 or absent: chunk); D (H,) fp32 or None: the
    skip y += D[h] vr, inside the core forward and backward. need_y=False skips the core's
    forward: y (in vr's dtype then) and S_final are zeros (not their values) while the backward
    stays exact, which is all a caller that only takes the vector-Jacobian product and whose
    epilogue backward never reads y needs. rotary: the rotary passes' launch config."""
    chunk, dot_dtype, num_warps, num_stages, nseq = meta[:5]
    split_n = meta[5] if len(meta) > 5 else 1
    segment = meta[6] if len(meta) > 6 else 0
    fwd_chunk = (meta[7] if len(meta) > 7 else 0) or chunk
    name = str(dot_dtype).replace("torch.", "")
    if name == "float64":
        name = "float32"
    args = [x.contiguous() if x is not None else None
            for x in (q, k, qb, kb, theta, vr, adt, w, gam, s0, D)]  # fmt: skip
    y, sf, *_ = apply_positional(_RotCore, *args, cu_seqlens, halves, need_y, chunk, name,
                                   num_warps, num_stages, nseq, split_n, segment,
                                   fwd_chunk, rotary.knobs())  # fmt: skip
    return y, sf
