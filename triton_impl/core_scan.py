"""The core of the chunked scan in Triton: the forward kernel, the forward and backward launches
(core_fwd, core_bwd; the backward kernel is core_bwd_kernel's) and their custom ops.

The core is chunked linear attention with a scalar per-token decay, folded trapezoid weights and
a diagonal correction, plus a matrix state in and out. Per (sequence, head), over rows i, j (a
MIMO token holds R rows, row = token * R + rank; SISO has R = 1) with token t(i):

    y_i     = sum_{t(j) < t(i)} exp(C_t(i) - C_t(j)) w_t(j) (qr_i . kr_j) vr_j
            + sum_{t(j) = t(i)} gamma_t(j) (qr_i . kr_j) vr_j
            + exp(C_t(i)) S0 qr_i
    S_final = exp(C_last) S0 + sum_j exp(C_last - C_t(j)) w_t(j) vr_j kr_j^T

with C the inclusive cumulative log-decay (sum of adt) from the sequence start, plus, when a
skip D (H,) is given, y_i += D_h vr_i (its gradients: D_h dy_i into dvr, sum dy . vr into dD).
Every decay is formed from a difference of cumulative log-decays inside one chunk, never as a
ratio.

Backward runs two sweeps over the chunks in one launch, each program walking one (sequence, head):
  * forward sweep (recomputes the state chunk by chunk): dqr, and qr . dqr per row, and
    <dS_final, S_final>;
  * reverse sweep (carries dS from the end): dkr, dvr, dw, dgamma, kr . dkr per row, and dS0.
The two sweeps are independent, so they run side by side. The decay gradient needs no state in
the reverse sweep: the function depends on C only through exp(C_i) qr_i, exp(-C_j) kr_j and
exp(C_last) in S_final, hence dC_i = qr_i . dqr_i - kr_i . dkr_i, plus <dS_final, S_final> at the
last token; d adt is the reverse cumulative sum of dC over the sequence (done in PyTorch).

Accuracy of that sum with 16-bit dot operands. Every (query i, key j) pair term P_ij enters dC
twice, +P_ij through qr_i . dqr_i and -P_ij through kr_j . dkr_j, and d adt_t keeps only the pairs
that straddle t (j < t <= i): the rest cancel in the reverse cumulative sum, but only as far as
the two copies of P_ij were computed from the same operands. Within a chunk they are (one
rounded score matrix serves dqr and dkr). Across chunks dqr reads the state S (sums of rounded
v exp(c_last - c) w times kr) and dkr reads dS (sums of rounded dy exp(c) times qr): both sweeps
therefore use those same rounded factors on the row side, and S and dS enter their dots split
into a rounded high part and a rounded remainder (two 16-bit dots, about fp32 accuracy). With a
single rounded S / dS the two copies differed by ~2^-9 relative, and that error accumulated over
the sequence instead of cancelling (bf16 d adt 10x less accurate at 4096 tokens). The rotary
backward's dtheta (whose reverse sum gives the angle part of d dt) relies on the same property.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from mamba3_kernels.eager_calls import eager_custom_op

from .core_bwd_kernel import _core_bwd_kernel
from .core_segments import (
    _contrib_kernel,
    _pass_kernel,
    bwd_segment_len,
    fwd_segment_len,
    segment_states,
)
from .core_tiles import _exact_v, _load_chunk, _rnd, _seq_bounds, _state_step
from .fast_math import _exp
from .launch import interpreting, run_kernel

__all__ = ["core_fwd", "core_bwd", "operand_dtype"]

_MIN_DOT = 16


@triton.jit
def _core_fwd_kernel(
    qr_ptr, kr_ptr, vr_ptr, adt_ptr, w_ptr, g_ptr, s0_ptr, cu_ptr, D_ptr, y_ptr, sf_ptr,
    sin_ptr, L, H, NSEG, SEG,
    N: tl.constexpr, P: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
    VARLEN: tl.constexpr, HAS_S0: tl.constexpr, HAS_SF: tl.constexpr, HAS_D: tl.constexpr,
    DOTK: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr,
    SEGMENTED: tl.constexpr,
):  # fmt: skip
    """y (B, L, R, H, P) in y_ptr's dtype (with HAS_D: plus the skip D[h] vr) and S_final
    (nseq, H, P, N) fp32; one program per (seq, head), or with SEGMENTED per (seq, head,
    segment of SEG tokens), each starting from its segment's entering state (sin_ptr,
    (nseq, H, NSEG, P, N) fp32 from core_segments; the last segment writes S_final)."""
    pid = tl.program_id(0)
    seg = 0
    if SEGMENTED:
        seg = pid % NSEG
        pid = pid // NSEG
    seq = pid // H
    h = pid % H
    bos, seqlen, coef_base = _seq_bounds(cu_ptr, seq, h, L, H, VARLEN)
    nn = tl.arange(0, N)
    pp = tl.arange(0, P)
    CR: tl.constexpr = C * R
    t_loc = tl.arange(0, CR) // R
    causal = t_loc[:, None] > t_loc[None, :]
    diag = t_loc[:, None] == t_loc[None, :]
    st_off = (seq.to(tl.int64) * H + h) * P * N + pp[:, None] * N + nn[None, :]
    lo = 0
    hi = seqlen
    if SEGMENTED:
        lo = seg * SEG
        hi = tl.minimum(seqlen, lo + SEG)
        seg_off = ((seq.to(tl.int64) * H + h) * NSEG + seg) * P * N
        st = tl.load(sin_ptr + seg_off + pp[:, None] * N + nn[None, :])
    elif HAS_S0:
        st = tl.load(s0_ptr + st_off).to(tl.float32)
    else:
        st = tl.zeros((P, N), dtype=tl.float32)
    for c0 in range(lo, hi, C):
        c, c_last, w, gm, q, k, v, valid, row, _t = _load_chunk(
            qr_ptr, kr_ptr, vr_ptr, adt_ptr, w_ptr, g_ptr, bos, seqlen, coef_base, c0, h, H,
            N, P, R, C, DOTK, UPCAST,
        )  # fmt: skip
        a = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        dec = _exp(tl.minimum(c[:, None] - c[None, :], 0.0), FAST)
        m = tl.where(causal, dec * w[None, :], tl.where(diag, gm[None, :], 0.0))
        y = tl.dot(q, tl.trans(_rnd(st, DOTK, UPCAST)), input_precision=DOT_PREC)
        y = y * _exp(c, FAST)[:, None]
        y = tl.dot(_rnd(a * m, DOTK, UPCAST), v, y, input_precision=DOT_PREC)
        st = _state_step(st, k, v, c, c_last, w, DOTK, DOT_PREC, UPCAST, FAST)
        if HAS_D:
            y += tl.load(D_ptr + h) * _exact_v(vr_ptr, row, valid, v, P, DOTK)
        y_out = y.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + row[:, None] * P + pp[None, :], y_out, mask=valid[:, None])
    if HAS_SF:
        if seg == NSEG - 1:  # (unsegmented: seg = 0, NSEG = 1)
            tl.store(sf_ptr + st_off, st)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

_DOTK = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 0}


def _consts(R: int, N: int, P: int, chunk: int, varlen: bool, dot_dtype: torch.dtype) -> dict:
    interp = interpreting()
    fp32 = dot_dtype in (torch.float32, torch.float64)
    return dict(
        N=N,
        P=P,
        R=R,
        C=chunk,
        VARLEN=varlen,
        DOTK=_DOTK[dot_dtype],
        DOT_PREC="ieee" if fp32 or interp else "tf32",
        UPCAST=interp and not fp32,
        FAST=not interp,
    )


def core_fwd(qr, kr, vr, adt, w, gam, s0, cu_seqlens, meta, D=None, states=None):
    """Core forward. qr, kr (B, L, R, H, N), vr (B, L, R, H, P) (fp32 or the dot dtype);
    adt, w, gam (B, H, L) fp32; s0 (nseq, H, P, N) fp32 or None; cu_seqlens (nseq+1,) int32 or
    None; D (H,) fp32 or None (the skip: y += D[h] vr). meta = (chunk, dot_dtype, num_warps,
    num_stages, nseq[, segment]) (segment: tokens per segment of the walks, 0 chosen for the
    device, core_segments.segment_len; ignored with cu_seqlens). Returns y (B, L, R, H, P) in
    operand_dtype(vr.dtype) and S_final (nseq, H, P, N) fp32.

    states = (chunk, segment), for a forward whose backward will read its segment states: the
    walks take that many tokens per segment (the backward's, core_segments.bwd_segment_len),
    and the states entering the segments are computed on chunks of that many tokens (the
    backward's), which makes them the ones the backward would compute itself (the same rounded
    operands: see the module docstring). They are then a third result, (nseq, H, nseg, P, N)
    fp32, or an empty (0,) tensor when the call has no segments (varlen, or one segment)."""
    chunk, dot_dtype, num_warps, num_stages, nseq = meta[:5]
    segment = meta[5] if len(meta) > 5 else 0
    B, L, R, H, N = qr.shape
    P = vr.shape[-1]
    # y only feeds the epilogue (z gate, mimo_o rank sum) and comes back through it as dy, which
    # every core backward product rounds to the dot dtype anyway: in 16 bits it halves the
    # bytes of y, of the gate backward's dy and of the two sweeps' dy reads (MIMO R=4: ~1 GB
    # each at 16K tokens)
    y = torch.empty((B, L, R, H, P), dtype=operand_dtype(vr.dtype), device=qr.device)
    sf = torch.empty((nseq, H, P, N), dtype=torch.float32, device=qr.device)
    kept = qr.new_empty((0,), dtype=torch.float32)
    result = (y, sf) if states is None else (y, sf, kept)
    if L == 0:
        sf.copy_(s0 if s0 is not None else torch.zeros_like(sf))
        return result
    dummy = adt
    consts = _consts(R, N, P, chunk, cu_seqlens is not None, dot_dtype)
    seg, state_consts = L, consts
    if cu_seqlens is None and states is not None:
        seg = states[1]
        state_consts = _consts(R, N, P, states[0], False, dot_dtype)
    elif cu_seqlens is None:
        seg = fwd_segment_len(L, nseq, H, chunk, num_warps, segment, qr.device)
    s_in, nseg = dummy, 1
    if seg < L:
        s_in, _, nseg = segment_states(qr, kr, vr, adt, w, gam, s0, None, None, state_consts,
                                       nseq, seg, num_warps, 1)  # fmt: skip
        result = (y, sf) if states is None else (y, sf, s_in)
    run_kernel(
        _core_fwd_kernel, (nseq * H * nseg,), qr, kr, vr, adt, w, gam,
        s0 if s0 is not None else dummy,
        cu_seqlens if cu_seqlens is not None else dummy,
        D if D is not None else dummy,
        y, sf, s_in, L, H, nseg, seg,
        HAS_S0=s0 is not None, HAS_SF=True, HAS_D=D is not None, SEGMENTED=nseg > 1,
        **consts, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return result


def core_bwd(qr, kr, vr, adt, w, gam, s0, cu_seqlens, meta, dy, dsf, D=None, rotary=None,
             s_in=None):  # fmt: skip
    """Core backward: gradients of (qr, kr, vr, adt, w, gam, s0, D) given dy (B, L, R, H, P)
    (fp32 or 16-bit) and dsf (nseq, H, P, N) or None. All gradients fp32 but vr's, which is in
    vr's dtype when split_n = 1 (stored once, no fp32 copy to cast; with the column split its
    partial sums add up in fp32); D's (H,) is an empty (0,) tensor when D is None.
    rotary: (S, halves) of qr and kr's rotation, or None. Given (with split_n = 1), the kernel
    also returns d theta (B, L, H, S) fp32, the gradient of the cumulative angles through qr
    and kr (summed over ranks), and dqr, dkr in operand_dtype(qr.dtype) (d theta then needs
    them no more); else d theta is an empty (0,) tensor.
    meta = (chunk, dot_dtype, num_warps, num_stages, nseq[, split_n[, segment]]): split_n
    programs per sweep and head, each owning N / split_n state columns (their partial sums over
    N are added atomically, so the result's rounding may differ from run to run); segment:
    tokens per segment of the sweeps (0: chosen for the device, core_segments.segment_len;
    ignored with cu_seqlens). s_in: the segment states the core forward kept for this backward
    (core_fwd's states, on this call's chunk and segments), or None (or empty: computed here)."""
    chunk, dot_dtype, num_warps, num_stages, nseq = meta[:5]
    split_n = meta[5] if len(meta) > 5 else 1
    segment = meta[6] if len(meta) > 6 else 0
    B, L, R, H, N = qr.shape
    P = vr.shape[-1]
    if N % split_n or N // split_n < _MIN_DOT:
        raise ValueError(f"split_n={split_n} must divide N={N} into blocks of >= {_MIN_DOT}")
    dev = qr.device
    f32 = torch.float32
    dth = rotary is not None
    if dth and split_n != 1:
        raise ValueError("d theta in the core backward needs split_n=1 (whole rows of pairs)")
    S, halves = rotary if dth else (0, False)
    summed = torch.zeros if split_n > 1 else torch.empty  # outputs that add partial sums
    dq_dtype = operand_dtype(qr.dtype) if dth else f32
    dq = torch.empty((B, L, R, H, N), dtype=dq_dtype, device=dev)
    dk = torch.empty((B, L, R, H, N), dtype=dq_dtype, device=dev)
    # both sweeps add into d theta (the forward the q part, the reverse the k part)
    dtheta = torch.zeros((B, L, H, S) if dth else (0,), dtype=f32, device=dev)
    dv = summed((B, L, R, H, P), dtype=_dv_dtype(vr.dtype, split_n), device=dev)
    rows = summed((4, B, H, L, R), dtype=f32, device=dev)  # qdq, kdk, dw, dg per row
    ds0 = torch.empty((nseq, H, P, N), dtype=f32, device=dev)
    sfdot = torch.zeros((nseq, H), dtype=f32, device=dev)
    dD = torch.zeros((H if D is not None else 0,), dtype=f32, device=dev)
    if L == 0:
        ds0.copy_(dsf if dsf is not None else torch.zeros_like(ds0))
        rows.zero_()
    else:
        dummy = adt
        consts = _consts(R, N, P, chunk, cu_seqlens is not None, dot_dtype)
        dy = dy.contiguous()
        dsf = dsf.contiguous() if dsf is not None else None
        seg = L
        if cu_seqlens is None:
            seg = bwd_segment_len(L, nseq, H, split_n, chunk, num_warps, segment, dev)
        ds_out = dummy
        nseg = 1
        if seg < L:
            nseg = -(-L // seg)
            kept = s_in if s_in is not None and s_in.dim() == 5 and s_in.shape[2] == nseg else None
            s_in, ds_out, nseg = segment_states(qr, kr, vr, adt, w, gam, s0, dsf, dy, consts,
                                                nseq, seg, num_warps, split_n, kept)  # fmt: skip
        else:
            s_in = dummy
        run_kernel(
            _core_bwd_kernel, (nseq * H * nseg, 2, split_n), qr, kr, vr, adt, w, gam,
            s0 if s0 is not None else dummy,
            cu_seqlens if cu_seqlens is not None else dummy,
            D if D is not None else dummy,
            dy,
            dsf if dsf is not None else dummy,
            dq, dk, dv, rows[2], rows[3], rows[0], rows[1], ds0, sfdot,
            dD if D is not None else dummy,
            s_in, ds_out, dtheta if dth else dummy, L, H, nseg, seg,
            HAS_S0=s0 is not None, HAS_DSF=dsf is not None, HAS_D=D is not None, NS=split_n,
            SEGMENTED=nseg > 1, DTH=dth, S=max(S, 1), HALVES=halves, **consts,
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
    qdq, kdk, dw, dg = rows
    # dC per token (sum over rank rows), plus <dS_final, S_final> at each sequence's last token;
    # d adt is its reverse cumulative sum within each sequence.
    dc = (qdq - kdk).sum(-1)  # (B, H, L)
    dadt = _segment_reverse_cumsum(dc, sfdot, cu_seqlens, nseq)
    return dq, dk, dv, dadt, dw.sum(-1), dg.sum(-1), ds0, dD, dtheta


def operand_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of a tensor that only feeds the core's dot products (MIMO's vr, the core
    forward's y and so its gradient dy): ``dtype`` itself when 16-bit, else fp32. The dots
    round such operands to the 16-bit dtype anyway, so storing them wider only moves bytes."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def _dv_dtype(vr_dtype: torch.dtype, split_n: int) -> torch.dtype:
    """dtype of the core backward's dv (see core_bwd)."""
    return vr_dtype if split_n == 1 else torch.float32


def _segment_reverse_cumsum(dc, sfdot, cu_seqlens, nseq):
    """sum_{s >= t, same sequence} dc_s + sfdot of t's sequence. dc (B, H, L), sfdot (nseq, H)."""
    B, H, L = dc.shape
    if L == 0:
        return dc
    x = dc.double()
    if cu_seqlens is None:
        x[:, :, -1] += sfdot.double()
        return x.flip(-1).cumsum(-1).flip(-1).float()
    cu = cu_seqlens.long()
    last = (cu[1:] - 1).clamp(min=0)
    nonempty = (cu[1:] > cu[:-1]).double()
    x[0].index_add_(1, last, (sfdot.double() * nonempty[:, None]).transpose(0, 1))
    # suffix sums over the whole axis, minus the suffix after each token's sequence end
    suf = torch.cat((x.flip(-1).cumsum(-1).flip(-1), x.new_zeros(B, H, 1)), dim=-1)
    tok = torch.arange(L, device=dc.device)
    seq_id = torch.searchsorted(cu[1:], tok, right=True)
    eos = cu[1:][seq_id]
    return (suf[:, :, :L] - suf[:, :, eos]).float()


# The core as custom ops: functorch transforms (torch.func.vjp, used by the backward because it
# runs inside another op's kernel) unwrap their tensors before an op's kernel runs, which a Triton
# launch needs (it reads raw storage). Their autograd node is rot_core's _RotCore.
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@eager_custom_op("mamba3_triton::core_fwd")
def _core_fwd_op(
    qr: Tensor,
    kr: Tensor,
    vr: Tensor,
    adt: Tensor,
    w: Tensor,
    gam: Tensor,
    s0: Tensor | None,
    cu_seqlens: Tensor | None,
    chunk: int,
    dot_dtype: str,
    num_warps: int,
    num_stages: int,
    nseq: int,
    D: Tensor | None = None,
    segment: int = 0,
    state_chunk: int = 0,
    state_segment: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """core_fwd: (y, S_final, the segment states kept for the backward), the last an empty
    tensor unless state_chunk > 0 (core_fwd's states=(state_chunk, state_segment))."""
    meta = (chunk, _DTYPES[dot_dtype], num_warps, num_stages, nseq, segment)
    if state_chunk > 0:
        return core_fwd(qr, kr, vr, adt, w, gam, s0, cu_seqlens, meta, D,
                        states=(state_chunk, state_segment))  # fmt: skip
    y, sf = core_fwd(qr, kr, vr, adt, w, gam, s0, cu_seqlens, meta, D)
    return y, sf, qr.new_empty((0,), dtype=torch.float32)


@_core_fwd_op.register_fake
def _core_fwd_fake(qr, kr, vr, adt, w, gam, s0, cu_seqlens, chunk, dot_dtype, nw, ns, nseq,
                   D=None, segment=0, state_chunk=0, state_segment=0):  # fmt: skip
    B, L, R, H, N = qr.shape
    P = vr.shape[-1]
    f32 = torch.float32
    y = qr.new_empty((B, L, R, H, P), dtype=operand_dtype(vr.dtype))
    kept = cu_seqlens is None and state_chunk > 0 and 0 < state_segment < L
    states = (nseq, H, -(-L // state_segment), P, N) if kept else (0,)
    return y, qr.new_empty((nseq, H, P, N), dtype=f32), qr.new_empty(states, dtype=f32)


@eager_custom_op("mamba3_triton::core_bwd")
def _core_bwd_op(
    dy: Tensor,
    dsf: Tensor | None,
    qr: Tensor,
    kr: Tensor,
    vr: Tensor,
    adt: Tensor,
    w: Tensor,
    gam: Tensor,
    s0: Tensor | None,
    cu_seqlens: Tensor | None,
    chunk: int,
    dot_dtype: str,
    num_warps: int,
    num_stages: int,
    nseq: int,
    split_n: int = 1,
    D: Tensor | None = None,
    segment: int = 0,
    n_angles: int = 0,
    halves: bool = False,
    s_in: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """core_bwd; n_angles > 0 passes rotary=(n_angles, halves) (d theta in the kernel); s_in:
    the segment states the core forward kept (core_bwd's s_in)."""
    meta = (chunk, _DTYPES[dot_dtype], num_warps, num_stages, nseq, split_n, segment)
    rotary = (n_angles, halves) if n_angles > 0 else None
    return core_bwd(qr, kr, vr, adt, w, gam, s0, cu_seqlens, meta, dy, dsf, D, rotary, s_in)


@_core_bwd_op.register_fake
def _core_bwd_fake(dy, dsf, qr, kr, vr, adt, w, gam, s0, cu_seqlens, chunk, dot_dtype, num_warps,
                   num_stages, nseq, split_n=1, D=None, segment=0, n_angles=0, halves=False,
                   s_in=None):  # fmt: skip
    B, L, R, H, N = qr.shape
    P = vr.shape[-1]
    f32 = torch.float32
    e = qr.new_empty
    dv_dtype = _dv_dtype(vr.dtype, split_n)
    dq_dtype = operand_dtype(qr.dtype) if n_angles > 0 else f32
    dth_shape = (B, L, H, n_angles) if n_angles > 0 else (0,)
    return (e(qr.shape, dtype=dq_dtype), e(qr.shape, dtype=dq_dtype), e(vr.shape, dtype=dv_dtype),
            e(adt.shape, dtype=f32), e(adt.shape, dtype=f32), e(adt.shape, dtype=f32),
            e((nseq, H, P, N), dtype=f32), e((H if D is not None else 0,), dtype=f32),
            e(dth_shape, dtype=f32))  # fmt: skip


def compile_kernels(
    R: int,
    N: int,
    P: int,
    chunk: int,
    dot_dtype: torch.dtype = torch.bfloat16,
    varlen: bool = False,
    num_warps: int = 8,
    num_stages: int = 1,
    target=None,
    split_n: int = 1,
    has_d: bool = False,
    segmented: bool = False,
    fwd_chunk: int = 0,
    dtheta: tuple[int, bool] | None = None,
) -> dict:
    """Compile the core's forward and backward kernels ahead of time (no GPU needed) for
    ``target`` (a ``triton.backends.compiler.GPUTarget``; default sm_90), as a launch with an
    initial state and a final-state gradient would specialise them (with ``has_d``: the D skip
    too, vr, y and dy in the dot dtype as the backward passes them, SISO's v and MIMO's 16-bit
    rank-weighted v alike; with ``segmented``: the
    backward's segment kernels, core_segments, and its segmented sweeps; fwd_chunk: the
    forward kernel's chunk, 0: ``chunk``; dtheta: (S, halves), the backward that also gives
    the rotary backward's d theta, with dq, dk in the dot dtype). Returns {name: compiled}."""
    from triton.backends.compiler import GPUTarget

    target = target or GPUTarget("cuda", 90, 64)
    prec = "ieee" if dot_dtype == torch.float32 else "tf32"
    consts = dict(N=N, P=P, R=R, C=chunk, VARLEN=varlen, DOTK=_DOTK[dot_dtype], DOT_PREC=prec,
                  UPCAST=False, FAST=True, HAS_D=has_d)  # fmt: skip
    io = {torch.bfloat16: "*bf16", torch.float16: "*fp16"}.get(dot_dtype, "*fp32")
    types = {"cu_ptr": "*i32"}
    if has_d:
        types.update(vr_ptr=io, dy_ptr=io, y_ptr=io)
        if split_n == 1:
            types.update(dv_ptr=io)  # (core_bwd stores dv in vr's dtype then)
    if dtheta is not None:
        types.update(dq_ptr=io, dk_ptr=io)
    S, halves = dtheta if dtheta is not None else (1, False)
    out = {}
    # (name, kernel, its constexprs)
    kernels = [
        ("core_fwd", _core_fwd_kernel,
         dict(consts, C=fwd_chunk or chunk, HAS_S0=True, HAS_SF=True, SEGMENTED=segmented)),
        ("core_bwd", _core_bwd_kernel,
         dict(consts, HAS_S0=True, HAS_DSF=True, NS=split_n, SEGMENTED=segmented,
              DTH=dtheta is not None, S=S, HALVES=halves)),
    ]  # fmt: skip
    if segmented:
        shared = {k: v for k, v in consts.items() if k not in ("VARLEN", "HAS_D")}
        pass_c = dict(PN=P * N, BLOCK=min(P * N, 1024), HAS_S0=True, HAS_DSF=True)
        # (FIRST=1: the reverse sweeps only, for a backward given the forward's states)
        kernels += [("segment_contrib", _contrib_kernel, dict(shared, NS=split_n, FIRST=0)),
                    ("segment_contrib_reverse", _contrib_kernel,
                     dict(shared, NS=split_n, FIRST=1)),
                    ("segment_pass", _pass_kernel, dict(pass_c, FIRST=0)),
                    ("segment_pass_reverse", _pass_kernel, dict(pass_c, FIRST=1))]  # fmt: skip
    for name, fn, c in kernels:
        sig = {}
        for arg in fn.arg_names:
            if arg in c:
                sig[arg] = "constexpr"
            elif arg in ("L", "H", "NSEG", "SEG"):
                sig[arg] = "i32"
            else:
                sig[arg] = types.get(arg, "*fp32")
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=c)
        opts = {"num_warps": num_warps, "num_stages": num_stages}
        out[name] = triton.compile(src, target=target, options=opts)
    return out
