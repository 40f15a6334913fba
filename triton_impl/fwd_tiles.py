"""Triton building blocks shared by the chunked forward kernels (chunk_fwd_kernel, chunk_fwd_split,
chunk_fwd_blocks; the rotary pass, core_rotary, takes their pair loads and stores).

Tiles of q, k and the state are kept as two (rows, N/2) halves lo, hi: the two members of each
rotary pair. When only the first N/4 pairs can rotate (S <= N/4), their members are zipped
(alternate columns) with the pass-through columns, so the trig runs on N/4 pairs while the dots
keep whole N/2-wide operands. Angles are only ever handled per pair, never per column.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl
from triton.language.extra import libdevice

from .fast_math import _exp, _sigmoid
from .l2_prefetch import _prefetch_lines

_TWO_PI = tl.constexpr(2.0 * math.pi)
_PI = tl.constexpr(math.pi)


@triton.jit
def _cos_sin(th, live, FAST: tl.constexpr):
    """cos and sin of ``th``; where ``live`` is False, exactly 1 and 0 (pass-through columns).
    FAST: reduce to [-pi, pi] and use the hardware approximations (absolute error ~1e-6);
    else the accurate library functions (the interpreter has no libdevice)."""
    if FAST:
        red = th - _TWO_PI * tl.floor(th / _TWO_PI + 0.5)
        cos = libdevice.fast_cosf(red)
        sin = libdevice.fast_sinf(red)
    else:
        cos = tl.cos(th)
        sin = tl.sin(th)
    return tl.where(live, cos, 1.0), tl.where(live, sin, 0.0)


@triton.jit
def _op(x, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """A dot operand: rounded to the dot dtype; under the interpreter (whose 16-bit float dots
    are unreliable) rounded and then multiplied in fp32, which gives the same products."""
    if UPCAST:
        return x.to(DOT_DTYPE).to(tl.float32)
    else:
        return x.to(DOT_DTYPE)


@triton.jit
def _load_rot(ptr, row_off, rmask, NH: tl.constexpr, SA: tl.constexpr, HALVES: tl.constexpr):
    """Load the first SA rotary pairs of rows of N = 2*NH values, as their two members a, b.

    row_off: (M, 1) element offsets of the rows; rmask: (M, 1) row mask. Returns a, b (M, SA):
    halves: columns [0, SA) and [NH, NH + SA); interleaved: even and odd columns of [0, 2*SA).
    Both loads stay contiguous along the row; the interleaved split happens in registers.
    """
    j = tl.arange(0, SA)
    if HALVES:
        a = tl.load(ptr + row_off + j[None, :], mask=rmask, other=0.0)
        b = tl.load(ptr + row_off + NH + j[None, :], mask=rmask, other=0.0)
    else:
        jn = tl.arange(0, 2 * SA)
        x = tl.load(ptr + row_off + jn[None, :], mask=rmask, other=0.0)
        a, b = tl.split(tl.reshape(x, (x.shape[0], SA, 2)))
    return a, b


@triton.jit
def _pass_cols(NH: tl.constexpr, SA: tl.constexpr, HALVES: tl.constexpr):
    """Column indices (two contiguous runs of NH - SA) of the pairs past SA, which never rotate.
    Both layouts keep them contiguous: halves [SA, NH) and [NH + SA, N); interleaved
    [2*SA, NH + SA) and [NH + SA, N). Any split works as long as q, k and the state agree."""
    j = tl.arange(0, NH - SA)
    if HALVES:
        return SA + j, NH + SA + j
    else:
        return 2 * SA + j, NH + SA + j


@triton.jit
def _load_pass(ptr, row_off, rmask, NH: tl.constexpr, SA: tl.constexpr, HALVES: tl.constexpr):
    """Load the pass-through columns of rows (see _pass_cols) as two (M, NH - SA) tiles."""
    ce, cf = _pass_cols(NH, SA, HALVES)
    e = tl.load(ptr + row_off + ce[None, :], mask=rmask, other=0.0)
    f = tl.load(ptr + row_off + cf[None, :], mask=rmask, other=0.0)
    return e, f


@triton.jit
def _zip(a, e):
    """(M, K), (M, K) -> (M, 2K) with a in the even columns and e in the odd ones."""
    return tl.reshape(tl.join(a, e), (a.shape[0], 2 * a.shape[1]))


@triton.jit
def _unzip(x):
    """Inverse of _zip."""
    return tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))


@triton.jit
def _load_lohi(ptr, row_off, rmask, NH: tl.constexpr, SA: tl.constexpr, HALVES: tl.constexpr):
    """Load rows of N values as two (M, NH) tiles lo, hi: the two members of the rotated pairs
    zipped with the pass-through columns (column 2j of lo/hi is member a/b of pair j < SA,
    column 2j + 1 is pass-through column j of run e/f), so the rotation acts on whole tiles
    while the trig is computed for SA pairs only. Without pass-through pairs (SA == NH):
    lo, hi are the pair members a, b."""
    a, b = _load_rot(ptr, row_off, rmask, NH, SA, HALVES)
    if SA < NH:
        e, f = _load_pass(ptr, row_off, rmask, NH, SA, HALVES)
        return _zip(a, e), _zip(b, f)
    else:
        return a, b


@triton.jit
def _store_lohi(
    ptr, row_off, lo, hi, rmask, NH: tl.constexpr, SA: tl.constexpr, HALVES: tl.constexpr
):
    """Inverse of _load_lohi."""
    if SA < NH:
        a, e = _unzip(lo)
        b, f = _unzip(hi)
        _store_rot(ptr, row_off, a, b, rmask, NH, SA, HALVES)
        _store_pass(ptr, row_off, e, f, rmask, NH, SA, HALVES)
    else:
        _store_rot(ptr, row_off, lo, hi, rmask, NH, SA, HALVES)


@triton.jit
def _store_rot(ptr, row_off, a, b, rmask, NH: tl.constexpr, SA: tl.constexpr, HALVES: tl.constexpr):
    """Inverse of _load_rot: store a, b (M, SA) into rows of N values."""
    j = tl.arange(0, SA)
    if HALVES:
        tl.store(ptr + row_off + j[None, :], a, mask=rmask)
        tl.store(ptr + row_off + NH + j[None, :], b, mask=rmask)
    else:
        jn = tl.arange(0, 2 * SA)
        x = tl.reshape(tl.join(a, b), (a.shape[0], 2 * SA))
        tl.store(ptr + row_off + jn[None, :], x, mask=rmask)


@triton.jit
def _store_pass(
    ptr, row_off, e, f, rmask, NH: tl.constexpr, SA: tl.constexpr, HALVES: tl.constexpr
):
    """Inverse of _load_pass."""
    ce, cf = _pass_cols(NH, SA, HALVES)
    tl.store(ptr + row_off + ce[None, :], e, mask=rmask)
    tl.store(ptr + row_off + cf[None, :], f, mask=rmask)


@triton.jit
def _rows_of_tokens(x, R: tl.constexpr):
    """(C, K) per-token values as (C*R, K) rows (row = token * R + rank): each token's values
    repeated for its R rank rows."""
    C: tl.constexpr = x.shape[0]
    K: tl.constexpr = x.shape[1]
    return tl.reshape(tl.broadcast_to(x[:, None, :], (C, R, K)), (C * R, K))


@triton.jit
def _rot_cos_sin(th, rot, PASS: tl.constexpr, FAST: tl.constexpr):
    """cos/sin tiles (rows, SA) of angles th for the rotated pairs (rot: (SA,) pairs with a
    nonzero rate), zipped with the pass-through constants 1 and 0 when PASS (see _load_lohi)."""
    cos, sin = _cos_sin(th, rot[None, :], FAST)
    if PASS:
        cos = _zip(cos, tl.full(cos.shape, 1.0, tl.float32))
        sin = _zip(sin, tl.zeros(sin.shape, tl.float32))
    return cos, sin


@triton.jit
def _trap_weights(dt_ptr, trap_ptr, coef_base, t, valid, seqlen, FAST: tl.constexpr):
    """Trapezoid weights of rows at tokens t (rows,) of one sequence (valid: t < seqlen): dt,
    gamma = lam * dt and the folded weight w = gamma + mu_{t+1}, mu_t = dt_t (1 - lam_t), zero
    past the end of the sequence."""
    dt_row = tl.load(dt_ptr + coef_base + t, mask=valid, other=0.0).to(tl.float32)
    tr_row = tl.load(trap_ptr + coef_base + t, mask=valid, other=0.0).to(tl.float32)
    gamma = _sigmoid(tr_row, FAST) * dt_row
    nxt = valid & (t + 1 < seqlen)
    dt_n = tl.load(dt_ptr + coef_base + t + 1, mask=nxt, other=0.0).to(tl.float32)
    tr_n = tl.load(trap_ptr + coef_base + t + 1, mask=nxt, other=0.0).to(tl.float32)
    w = gamma + dt_n * (1.0 - _sigmoid(tr_n, FAST))
    return dt_row, gamma, w


@triton.jit
def _chunk_coefs(
    adt_ptr, dt_ptr, trap_ptr, coef_base, t, valid, first_rank, seqlen, FAST: tl.constexpr
):
    """Per-row coefficients of one chunk. t: (rows,) token index in the sequence (every rank row
    of a token repeats it); valid: t < seqlen; first_rank: the rows that carry a token's decay.

    Returns c (rows,) cumulative log-decay from the chunk start, c_last (scalar) the chunk's
    whole log-decay, and dt, gamma, w (rows,) as _trap_weights.
    """
    a_row = tl.load(adt_ptr + coef_base + t, mask=valid & first_rank, other=0.0)
    a_row = a_row.to(tl.float32)
    c = tl.cumsum(a_row, axis=0)
    c_last = tl.sum(a_row, axis=0)
    dt_row, gamma, w = _trap_weights(dt_ptr, trap_ptr, coef_base, t, valid, seqlen, FAST)
    return c, c_last, dt_row, gamma, w


@triton.jit
def _chunk_rates(
    ang_ptr, tok, h, H, S: tl.constexpr, jr, rot, valid, first_rank, dt_row, FAST: tl.constexpr
):
    """Angle increments pi * tanh(angles) * dt (rows, SA) of one chunk: zero for pairs past S and
    for every rank row but a token's first, so a cumsum over rows gives per-token angles."""
    ang = tl.load(
        ang_ptr + (tok[:, None] * H + h) * S + jr[None, :],
        mask=(valid & first_rank)[:, None] & rot[None, :],
        other=0.0,
    ).to(tl.float32)
    # tanh(x) = 2 sigmoid(2x) - 1
    return _PI * (2.0 * _sigmoid(2.0 * ang, FAST) - 1.0) * dt_row[:, None]


@triton.jit
def _chunk_angles(
    ang_ptr,
    dt_ptr,
    coef_base,
    tok_base,
    c0,
    theta,
    tok,
    valid,
    first_rank,
    dt_row,
    seqlen,
    h,
    H,
    S: tl.constexpr,
    jr,
    rot,
    R: tl.constexpr,
    C: tl.constexpr,
    FAST: tl.constexpr,
):
    """Angles of one chunk (tokens c0 .. c0 + C of a sequence whose first token has global index
    tok_base): theta (SA,), the angle before the chunk, plus the running sum of the rates.

    Returns th (C*R, SA) per row, th_t (C, SA) per token (th itself when R == 1) and the chunk's
    rate sum (SA,). MIMO computes per token and repeats each token's row for its rank rows (the
    rank rows share the token's angle): a quarter of the loads, sigmoids and scan at R=4
    (measured -15 % for the segment-state kernel). tok, valid, first_rank, dt_row: per row, as
    _chunk_rates takes them (used when R == 1)."""
    if R > 1:
        tt = c0 + tl.arange(0, C)
        vt = tt < seqlen
        dt_t = tl.load(dt_ptr + coef_base + tt, mask=vt, other=0.0).to(tl.float32)
        rate = _chunk_rates(ang_ptr, tok_base + tt, h, H, S, jr, rot, vt, vt, dt_t, FAST)
        th_t = theta[None, :] + tl.cumsum(rate, axis=0)
        th = _rows_of_tokens(th_t, R)
    else:
        rate = _chunk_rates(ang_ptr, tok, h, H, S, jr, rot, valid, first_rank, dt_row, FAST)
        th = theta[None, :] + tl.cumsum(rate, axis=0)
        th_t = th
    return th, th_t, tl.sum(rate, axis=0)


@triton.jit
def _prefetch_chunk(
    adt_ptr,
    dt_ptr,
    trap_ptr,
    ang_ptr,
    v_ptr,
    z_ptr,
    coef_base,
    tok_base,
    c0,
    seqlen,
    h,
    H,
    p0,
    P: tl.constexpr,
    S: tl.constexpr,
    SA: tl.constexpr,
    C: tl.constexpr,
    BP: tl.constexpr,
    HAS_Z: tl.constexpr,
):
    """L2 prefetch of what a later chunk (tokens c0 .. c0 + C of a sequence whose first token
    has global index tok_base) streams from memory: its log-decay, dt and trap values (one row
    of C per (sequence, head) at coef_base), its angle rows and its v (and z) rows at columns
    p0 .. p0 + BP. q and k are not fetched: shared by the heads of a group, they are L2 hits."""
    tt = c0 + tl.arange(0, C)
    vt = tt < seqlen
    tok = tok_base + tt
    row = tl.zeros((1,), dtype=tl.int64) + coef_base + c0  # the chunk's coefficients, one row
    left = seqlen - c0  # tokens of the sequence from c0 on (none: nothing fetched)
    _prefetch_lines(adt_ptr, row, row >= 0, left, C)
    _prefetch_lines(dt_ptr, row, row >= 0, left, C)
    _prefetch_lines(trap_ptr, row, row >= 0, left, C)
    _prefetch_lines(ang_ptr, (tok * H + h) * S, vt, S, SA)
    vw = tl.minimum(P - p0, BP)  # columns of this P-block inside P
    _prefetch_lines(v_ptr, (tok * H + h) * P + p0, vt, vw, BP)
    if HAS_Z:
        _prefetch_lines(z_ptr, (tok * H + h) * P + p0, vt, vw, BP)


@triton.jit
def _v_rows(
    v_ptr,
    tok_base,
    c0,
    tok,
    mrow,
    seqlen,
    h,
    H,
    pp,
    mpr,
    P: tl.constexpr,
    R: tl.constexpr,
    C: tl.constexpr,
):
    """v (B, L, H, P) at one chunk's rows, columns pp, as (C*R, BP) fp32 (before any rank
    weights): tokens c0 .. c0 + C of the sequence whose first token is tok_base. MIMO loads
    each token once and repeats it for its rank rows (a quarter of the loads at R=4; the
    segment-state kernel's sm_90 build lost its spill stack). tok, mrow: per row (used when
    R == 1)."""
    if R > 1:
        tt = c0 + tl.arange(0, C)
        x = tl.load(v_ptr + ((tok_base + tt)[:, None] * H + h) * P + pp[None, :],
                    mask=(tt < seqlen)[:, None] & mpr, other=0.0)  # fmt: skip
        return _rows_of_tokens(x.to(tl.float32), R)
    else:
        x = tl.load(v_ptr + (tok[:, None] * H + h) * P + pp[None, :], mask=mrow & mpr, other=0.0)
        return x.to(tl.float32)


@triton.jit
def _rotated_operand(
    ptr,
    row_off,
    rmask,
    b_lo,
    b_hi,
    cos,
    sin,
    NH: tl.constexpr,
    SA: tl.constexpr,
    HALVES: tl.constexpr,
    DD: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Rows of q or k (row_off: (M, 1) offsets) plus their bias tiles, rotated by (cos, sin) and
    rounded to the dot dtype DD: the (lo, hi) dot operands."""
    x_lo, x_hi = _load_lohi(ptr, row_off, rmask, NH, SA, HALVES)
    x_lo = x_lo.to(tl.float32) + b_lo
    x_hi = x_hi.to(tl.float32) + b_hi
    return _op(x_lo * cos - x_hi * sin, DD, UPCAST), _op(x_lo * sin + x_hi * cos, DD, UPCAST)


@triton.jit
def _qk_scores(q_lo, q_hi, k_lo, k_hi, DOT_PREC: tl.constexpr):
    """Qr Kr^T (rows_q, rows_k) fp32 from the (lo, hi) operand halves."""
    scores = tl.dot(q_lo, tl.trans(k_lo), input_precision=DOT_PREC)
    return tl.dot(q_hi, tl.trans(k_hi), scores, input_precision=DOT_PREC)


@triton.jit
def _intra_scores(
    q_lo, q_hi, k_lo, k_hi, t, c, w, gamma, DOT_PREC: tl.constexpr, FAST: tl.constexpr
):
    """Masked intra-chunk scores (rows, rows): (Qr Kr^T) * M with M[i, j] = exp(c_i - c_j) w_j
    for t_i > t_j, gamma_j on the same token, 0 above (t: (rows,) token of each row).

    Entries above the diagonal are set to 0 with a select, not multiplied by 0: a NaN or Inf
    in a later token's k would otherwise give NaN scores (0 * NaN) for earlier rows."""
    scores = _qk_scores(q_lo, q_hi, k_lo, k_hi, DOT_PREC)
    causal = t[:, None] > t[None, :]
    same = t[:, None] == t[None, :]
    dec = _exp(tl.minimum(c[:, None] - c[None, :], 0.0), FAST)
    m = tl.where(causal, dec * w[None, :], gamma[None, :])  # (only its causal | same part is kept)
    return tl.where(causal | same, scores * m, 0.0)


@triton.jit
def _finish_rows(
    y,
    vr,
    D_ptr,
    z_ptr,
    mz_ptr,
    mo_ptr,
    out_ptr,
    h,
    H,
    pp,
    P: tl.constexpr,
    bos,
    c0,
    seqlen,
    t,
    r_idx,
    R: tl.constexpr,
    C: tl.constexpr,
    BP: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_MZ: tl.constexpr,
    HAS_MO: tl.constexpr,
    FAST: tl.constexpr,
    ys_ptr=None,
    SAVE_Y: tl.constexpr = False,
):
    """Epilogue of a chunk's output rows y (C*R, BP) fp32: D skip, z gate, rank mix, store.

    vr: the rows' (rank-weighted) v; t: (C*R,) token of each row in its sequence; bos: global
    index of the sequence's first token; c0: the chunk's first token. SAVE_Y: y after the D
    skip, before the gate, also goes to ys_ptr ((B, L, R, H, P) in its dtype), which is the
    core's y that the backward's epilogue reads (it then need not recompute it).
    """
    tok = bos + t
    mrow = (t < seqlen)[:, None]
    mpr = (pp < P)[None, :]
    rank_par = (h * R + r_idx[:, None]) * P + pp[None, :]  # MIMO: (H, R, P) rank weights
    y_off = ((tok[:, None] * R + r_idx[:, None]) * H + h) * P + pp[None, :]
    if HAS_D:
        y += tl.load(D_ptr + h).to(tl.float32) * vr
    if SAVE_Y:
        tl.store(ys_ptr + y_off, y.to(ys_ptr.dtype.element_ty), mask=mrow & mpr)
    if HAS_Z:
        zz = tl.load(z_ptr + (tok[:, None] * H + h) * P + pp[None, :], mask=mrow & mpr, other=0.0)
        zz = zz.to(tl.float32)
        if HAS_MZ:
            zz = zz * tl.load(mz_ptr + rank_par, mask=mpr, other=0.0)
        y = y * zz * _sigmoid(zz, FAST)
    io_dtype = out_ptr.dtype.element_ty
    if HAS_MO:
        y = y * tl.load(mo_ptr + rank_par, mask=mpr, other=0.0)
        o = tl.sum(tl.reshape(y, (C, R, BP)), axis=1)
        tt = c0 + tl.arange(0, C)
        o_off = ((bos + tt)[:, None] * H + h) * P + pp[None, :]
        tl.store(out_ptr + o_off, o.to(io_dtype), mask=(tt < seqlen)[:, None] & mpr)
    else:
        tl.store(out_ptr + y_off, y.to(io_dtype), mask=mrow & mpr)


@triton.jit
def _store_final_kv(
    k_ptr,
    kb_ptr,
    k0_ptr,
    k1_ptr,
    v_ptr,
    v0_ptr,
    v1_ptr,
    seq,
    h,
    H,
    G,
    pp,
    bos,
    seqlen,
    theta,
    jr,
    rot,
    WITH_K,
    P: tl.constexpr,
    NH: tl.constexpr,
    SA: tl.constexpr,
    R: tl.constexpr,
    HALVES: tl.constexpr,
    FAST: tl.constexpr,
    HAS_INIT: tl.constexpr,
):
    """The final state's (k, v): the raw v of the last token (columns pp) and, where WITH_K, the
    rotated (by the final angle theta (SA,)), biased k of the last token, one row per rank. An
    empty sequence keeps its initial (k, v), or zeros without an initial state."""
    sh = seq.to(tl.int64) * H + h
    g = h // (H // G)
    has_tok = seqlen > 0
    last = bos + seqlen - 1
    # (masks built from vectors: the interpreter mis-types scalar & vector masks)
    v_last = tl.load(v_ptr + (last * H + h) * P + pp, mask=(pp < P) & (pp * 0 < seqlen), other=0.0)
    if HAS_INIT:
        v_init = tl.load(v0_ptr + sh * P + pp, mask=(pp < P) & (pp * 0 == seqlen), other=0.0)
        v_last = tl.where(has_tok, v_last.to(tl.float32), v_init.to(tl.float32))
    tl.store(v1_ptr + sh * P + pp, v_last.to(v1_ptr.dtype.element_ty), mask=pp < P)
    if WITH_K:
        PASS: tl.constexpr = SA < NH
        rr = tl.arange(0, R)[:, None]
        fcos, fsin = _rot_cos_sin(theta[None, :], rot, PASS, FAST)
        mk = rr * 0 < seqlen
        b_lo, b_hi = _load_lohi(kb_ptr, (h * R + rr) * (2 * NH), rr >= 0, NH, SA, HALVES)
        x_lo, x_hi = _load_lohi(k_ptr, ((last * R + rr) * G + g) * (2 * NH), mk, NH, SA, HALVES)
        x_lo = x_lo.to(tl.float32) + b_lo
        x_hi = x_hi.to(tl.float32) + b_hi
        f_lo = x_lo * fcos - x_hi * fsin
        f_hi = x_lo * fsin + x_hi * fcos
        k_out = ((seq.to(tl.int64) * R + rr) * H + h) * (2 * NH)
        if HAS_INIT:
            i_lo, i_hi = _load_lohi(k0_ptr, k_out, rr >= 0, NH, SA, HALVES)
            f_lo = tl.where(has_tok, f_lo, i_lo.to(tl.float32))
            f_hi = tl.where(has_tok, f_hi, i_hi.to(tl.float32))
        else:
            f_lo = tl.where(has_tok, f_lo, 0.0)
            f_hi = tl.where(has_tok, f_hi, 0.0)
        kdt = k1_ptr.dtype.element_ty
        _store_lohi(k1_ptr, k_out, f_lo.to(kdt), f_hi.to(kdt), rr >= 0, NH, SA, HALVES)


@triton.jit
def _initial_ssm(
    s0_ptr,
    k0_ptr,
    v0_ptr,
    mv_ptr,
    dt_ptr,
    trap_ptr,
    coef_base,
    has_tok,
    seq,
    h,
    H,
    pp,
    P: tl.constexpr,
    N: tl.constexpr,
    NH: tl.constexpr,
    SA: tl.constexpr,
    R: tl.constexpr,
    HALVES: tl.constexpr,
    HAS_MV: tl.constexpr,
    FAST: tl.constexpr,
):
    """The initial state's ssm rows pp of (sequence seq, head h) as fp32 (lo, hi) tiles (see
    _load_lohi), plus the previous-input term of token 0: mu_0 * sum_r (v0 * mimo_v_r) k0_r^T
    (k0 is stored rotated). coef_base: the (sequence, head) offset of dt/trap; has_tok: the
    sequence has a token 0."""
    sh = seq.to(tl.int64) * H + h
    lo, hi = _load_lohi(s0_ptr, (sh * P + pp[:, None]) * N, (pp < P)[:, None], NH, SA, HALVES)
    lo = lo.to(tl.float32)
    hi = hi.to(tl.float32)
    dt0 = tl.load(dt_ptr + coef_base, mask=has_tok, other=0.0).to(tl.float32)
    tr0 = tl.load(trap_ptr + coef_base, mask=has_tok, other=0.0).to(tl.float32)
    mu0 = dt0 * (1.0 - _sigmoid(tr0, FAST))
    v0 = tl.load(v0_ptr + sh * P + pp, mask=pp < P, other=0.0).to(tl.float32)
    for r in tl.static_range(R):
        vr0 = v0 * mu0
        if HAS_MV:
            vr0 = vr0 * tl.load(mv_ptr + (h * R + r) * P + pp, mask=pp < P, other=0.0)
        k_row = tl.zeros((1, 1), dtype=tl.int64) + ((seq.to(tl.int64) * R + r) * H + h) * N
        k0_lo, k0_hi = _load_lohi(k0_ptr, k_row, k_row >= 0, NH, SA, HALVES)
        lo += vr0[:, None] * k0_lo.to(tl.float32)
        hi += vr0[:, None] * k0_hi.to(tl.float32)
    return lo, hi
