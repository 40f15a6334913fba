"""The core's backward kernel (core_scan.core_bwd launches it): two sweeps over the chunks of a
(sequence, head) in one launch, the forward sweep giving dqr, the reverse sweep dkr, dvr and the
weights' gradients, each optionally split over state columns (atomic partial sums) and over
segments of the sequence (core_segments' states), and, for the rotary backward, d theta.

The math, and why both sweeps build their cross-chunk products from the same rounded operands
(the decay and angle gradients are reverse sums whose pair terms must cancel), are in
core_scan's module docstring.
"""

import triton
import triton.language as tl

from .core_tiles import _chunk_rows, _exact_v, _load_cols, _rnd, _seq_bounds, _step
from .fast_math import _exp


@triton.jit
def _dot_split(a, x, acc, DOTK: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ x for an fp32 state x, to about fp32 accuracy with 16-bit dots: x is split into
    a rounded high part and the rounded remainder, two dots (one when the dots are fp32)."""
    hi = _rnd(x, DOTK, UPCAST)
    acc = tl.dot(a, hi, acc, input_precision=DOT_PREC)
    if DOTK != 0:
        lo = _rnd(x - hi.to(tl.float32), DOTK, UPCAST)
        acc = tl.dot(a, lo, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _put(ptrs, x, mask, NS: tl.constexpr):
    """Store x, or add it atomically when NS column blocks each hold a partial sum."""
    if NS == 1:
        tl.store(ptrs, x, mask=mask)
    else:
        tl.atomic_add(ptrs, x, mask=mask, sem="relaxed")


@triton.jit
def _col_sets(n0, NB: tl.constexpr, DTH: tl.constexpr, HALVES: tl.constexpr):
    """The two sets of NB / 2 columns that the sweeps carry every N-wide tile in (q, k, the state
    and its gradient): with DTH the two members of each rotary pair (halves: j and N/2 + j;
    interleaved: 2j and 2j + 1; DTH needs the whole N in one program), so that a row's d theta
    per pair is an elementwise product of the tiles; else the two halves of the program's
    column block [n0, n0 + NB)."""
    j = tl.arange(0, NB // 2)
    if DTH and not HALVES:
        return 2 * j, 2 * j + 1
    else:
        return n0 + j, n0 + NB // 2 + j


@triton.jit
def _rows_dot(a, b, xa, xb):
    """Per row, the dot product over both column sets: sum_n a x + sum_n b x."""
    return tl.sum(a.to(tl.float32) * xa, axis=1) + tl.sum(b.to(tl.float32) * xb, axis=1)


@triton.jit
def _store_grad(ptr, row, valid, ca, cb, ga, gb, xa, xb, dth_ptr, tok_row, tok_valid,
                N: tl.constexpr, S: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
                DTH: tl.constexpr):  # fmt: skip
    """A rotated operand's gradient rows (two column sets ga, gb, stored in ptr's dtype) and, with
    DTH, their d theta per pair: ga, gb and the operand xa, xb are the pair members (a, b), so
    d theta_j = g_b x_a - g_a x_b (pairs j < S). x is the rounded operand the core multiplied,
    as d theta needs (core_rotary). A token's rank rows are summed here, and the sum is added
    into dth_ptr (B, L, H, S) fp32 (zero-initialised; tok_row: the chunk's tokens' offsets
    ((bos + t) H + h), tok_valid their mask), where the other sweep adds the other operand's
    part: two terms per element, so the sum does not depend on their order."""
    mr = valid[:, None]
    ty = ptr.dtype.element_ty
    tl.store(ptr + row[:, None] * N + ca[None, :], ga.to(ty), mask=mr)
    tl.store(ptr + row[:, None] * N + cb[None, :], gb.to(ty), mask=mr)
    if DTH:
        j = tl.arange(0, N // 2)
        dth = gb * xa.to(tl.float32) - ga * xb.to(tl.float32)
        if R > 1:
            dth = tl.sum(tl.reshape(dth, (C, R, N // 2)), axis=1)
        tl.atomic_add(dth_ptr + tok_row[:, None] * S + j[None, :], dth,
                      mask=tok_valid[:, None] & (j < S)[None, :], sem="relaxed")  # fmt: skip


@triton.jit
def _sweep_chunk(
    qr_ptr, kr_ptr, vr_ptr, adt_ptr, w_ptr, g_ptr, dy_ptr, bos, seqlen, coef_base, c0, h, H,
    ca, cb, N: tl.constexpr, P: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
    DOTK: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """What both sweeps read of one chunk: its rows' coefficients (_chunk_rows), q and k as
    their two column sets ca, cb, and v rounded to the dot dtype, and dy in fp32."""
    c, c_last, w, gm, valid, row, _t = _chunk_rows(
        adt_ptr, w_ptr, g_ptr, bos, seqlen, coef_base, c0, h, H, R, C
    )
    q_a = _load_cols(qr_ptr, row, valid, ca, N, DOTK, UPCAST)
    q_b = _load_cols(qr_ptr, row, valid, cb, N, DOTK, UPCAST)
    k_a = _load_cols(kr_ptr, row, valid, ca, N, DOTK, UPCAST)
    k_b = _load_cols(kr_ptr, row, valid, cb, N, DOTK, UPCAST)
    pp = tl.arange(0, P)
    v = _load_cols(vr_ptr, row, valid, pp, P, DOTK, UPCAST)
    dy = tl.load(dy_ptr + row[:, None] * P + pp[None, :], mask=valid[:, None], other=0.0)
    return c, c_last, w, gm, valid, row, q_a, q_b, k_a, k_b, v, dy.to(tl.float32)


@triton.jit
def _core_bwd_kernel(
    qr_ptr, kr_ptr, vr_ptr, adt_ptr, w_ptr, g_ptr, s0_ptr, cu_ptr, D_ptr, dy_ptr, dsf_ptr,
    dq_ptr, dk_ptr, dv_ptr, dw_ptr, dg_ptr, qdq_ptr, kdk_ptr, ds0_ptr, sfdot_ptr, dD_ptr,
    sin_ptr, dsout_ptr, dth_ptr, L, H, NSEG, SEG,
    N: tl.constexpr, P: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
    VARLEN: tl.constexpr, HAS_S0: tl.constexpr, HAS_DSF: tl.constexpr, HAS_D: tl.constexpr,
    DOTK: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, NS: tl.constexpr,
    FAST: tl.constexpr, SEGMENTED: tl.constexpr, DTH: tl.constexpr, S: tl.constexpr,
    HALVES: tl.constexpr,
):  # fmt: skip
    """Gradients of the core; grid (nseq * H, 2, NS): axis 1 picks the forward (0) or reverse
    (1) sweep, axis 2 a block of N / NS state columns. Row outputs (qdq, kdk, dw, dg) are
    (B, H, L, R) fp32 with (L, R) flattened.

    Column blocks: every product over N splits into per-block partial sums, and the outputs
    that sum over N (dv, qdq, kdk, dw, dg, sfdot) are linear in those partials, so with NS > 1
    each program adds its part atomically into zero-initialised buffers; dq and dk columns, the
    state S and its gradient dS are each wholly owned by one program. Inside a program every
    N-wide tile is carried as two column sets (_col_sets): products over N are two dots.

    DTH (NS == 1; S pairs, HALVES their layout): the rotary backward's d theta from dq and dk
    as they are formed (qr, kr are the rotated operands): the forward sweep adds the q part,
    the reverse sweep the k part, each summed over a token's rank rows, into dth (B, L, H, S)
    fp32, which is then the angle scan's whole gradient; dq and dk are stored in their 16-bit
    dtype (dq_ptr's) instead of at the fp32 accuracy d theta needs.

    HAS_D (the forward's skip y += D[h] vr): the reverse sweep's first column block adds
    D[h] dy to dv; the forward sweep sums dy . vr per row over its chunks and adds the total to
    dD[h] atomically (every sequence adds to it): both terms in the reverse sweep measured
    slower (docs/performance.md).

    SEGMENTED (grid axis 0 then holds nseq * H * NSEG programs): each program walks one segment
    of SEG tokens (a multiple of C), its sweep starting from the segment's entering state
    (sin_ptr) or the state gradient at the segment's end (dsout_ptr), both (nseq, H, NSEG, P, N)
    fp32 from core_segments; the last segment gives <dS_final, S_final>, the first dS0.
    Without it (NSEG = 1, SEG unused) the sweeps start from s0 and dS_final."""
    pid = tl.program_id(0)
    seg = 0
    if SEGMENTED:
        seg = pid % NSEG
        pid = pid // NSEG
    sweep = tl.program_id(1)
    NB: tl.constexpr = N // NS
    n0 = tl.program_id(2) * NB
    seq = pid // H
    h = pid % H
    bos, seqlen, coef_base = _seq_bounds(cu_ptr, seq, h, L, H, VARLEN)
    ca, cb = _col_sets(n0, NB, DTH, HALVES)
    pp = tl.arange(0, P)
    CR: tl.constexpr = C * R
    rloc = tl.arange(0, CR)
    t_loc = rloc // R
    tok = tl.arange(0, C)  # the chunk's tokens (d theta is stored per token)
    causal = t_loc[:, None] > t_loc[None, :]
    diag = t_loc[:, None] == t_loc[None, :]
    sh_off = (seq.to(tl.int64) * H + h) * P * N + pp[:, None] * N
    st_a_off = sh_off + ca[None, :]
    st_b_off = sh_off + cb[None, :]
    seg_a_off = ((seq.to(tl.int64) * H + h) * NSEG + seg) * P * N + pp[:, None] * N + ca[None, :]
    seg_b_off = seg_a_off - ca[None, :] + cb[None, :]
    lo = 0
    hi = seqlen
    if SEGMENTED:
        lo = seg * SEG
        hi = tl.minimum(seqlen, lo + SEG)
    if sweep == 0:
        # ---- forward sweep: dqr = (dY Vr^T * M) Kr + exp(c) dY S ------------------------
        if SEGMENTED:
            st_a = tl.load(sin_ptr + seg_a_off)
            st_b = tl.load(sin_ptr + seg_b_off)
        elif HAS_S0:
            st_a = tl.load(s0_ptr + st_a_off).to(tl.float32)
            st_b = tl.load(s0_ptr + st_b_off).to(tl.float32)
        else:
            st_a = tl.zeros((P, NB // 2), dtype=tl.float32)
            st_b = tl.zeros((P, NB // 2), dtype=tl.float32)
        dd_rows = tl.zeros((CR,), dtype=tl.float32)  # per row, sum over chunks of dy . vr
        for c0 in range(lo, hi, C):
            c, c_last, w, gm, valid, row, q_a, q_b, k_a, k_b, v, dy = _sweep_chunk(
                qr_ptr, kr_ptr, vr_ptr, adt_ptr, w_ptr, g_ptr, dy_ptr, bos, seqlen, coef_base, c0,
                h, H, ca, cb, N, P, R, C, DOTK, UPCAST,
            )  # fmt: skip
            d = tl.dot(_rnd(dy, DOTK, UPCAST), tl.trans(v), input_precision=DOT_PREC)
            dec = _exp(tl.minimum(c[:, None] - c[None, :], 0.0), FAST)
            m = tl.where(causal, dec * w[None, :], tl.where(diag, gm[None, :], 0.0))
            # The inter-chunk part with the same operands the reverse sweep's dS is built from
            # (dy exp(c) rounded) against the state split hi + lo: see the module docstring.
            dyc = _rnd(dy * _exp(c, FAST)[:, None], DOTK, UPCAST)
            dm = _rnd(d * m, DOTK, UPCAST)
            zero = tl.zeros((CR, NB // 2), dtype=tl.float32)
            dq_a = tl.dot(dm, k_a, _dot_split(dyc, st_a, zero, DOTK, DOT_PREC, UPCAST),
                          input_precision=DOT_PREC)  # fmt: skip
            dq_b = tl.dot(dm, k_b, _dot_split(dyc, st_b, zero, DOTK, DOT_PREC, UPCAST),
                          input_precision=DOT_PREC)  # fmt: skip
            vw = _rnd(v.to(tl.float32) * (_exp(c_last - c, FAST) * w)[:, None], DOTK, UPCAST)
            st_a = _step(st_a, vw, k_a, c_last, DOT_PREC, FAST)
            st_b = _step(st_b, vw, k_b, c_last, DOT_PREC, FAST)
            trow, tvalid = (bos + c0 + tok) * H + h, c0 + tok < seqlen
            _store_grad(dq_ptr, row, valid, ca, cb, dq_a, dq_b, q_a, q_b, dth_ptr, trow,
                        tvalid, N, S, R, C, DTH)  # fmt: skip
            ridx = coef_base * R + c0 * R + rloc
            _put(qdq_ptr + ridx, _rows_dot(q_a, q_b, dq_a, dq_b), valid, NS)
            if HAS_D:
                dd_rows += tl.sum(dy * _exact_v(vr_ptr, row, valid, v, P, DOTK), axis=1)
        if HAS_D:
            if n0 == 0:
                tl.atomic_add(dD_ptr + h, tl.sum(dd_rows, axis=0), sem="relaxed")
        if HAS_DSF:
            if seg == NSEG - 1:  # st is S_final (unsegmented: seg = 0, NSEG = 1)
                dsf_a = tl.load(dsf_ptr + st_a_off).to(tl.float32)
                dsf_b = tl.load(dsf_ptr + st_b_off).to(tl.float32)
                total = tl.sum(tl.sum(dsf_a * st_a, axis=1), axis=0)
                total += tl.sum(tl.sum(dsf_b * st_b, axis=1), axis=0)
                _put(sfdot_ptr + seq.to(tl.int64) * H + h, total, None, NS)
    else:
        # ---- reverse sweep: carries dS (gradient of the state at the chunk end) ---------
        if SEGMENTED:
            ds_a = tl.load(dsout_ptr + seg_a_off)
            ds_b = tl.load(dsout_ptr + seg_b_off)
        elif HAS_DSF:
            ds_a = tl.load(dsf_ptr + st_a_off).to(tl.float32)
            ds_b = tl.load(dsf_ptr + st_b_off).to(tl.float32)
        else:
            ds_a = tl.zeros((P, NB // 2), dtype=tl.float32)
            ds_b = tl.zeros((P, NB // 2), dtype=tl.float32)
        nch = (hi - lo + C - 1) // C
        d_skip = 0.0
        if HAS_D:
            # D dy into dv once, by the first column block (no branch inside the loop)
            d_skip = tl.load(D_ptr + h) * (n0 == 0).to(tl.float32)
        for jj in range(0, nch):
            c0 = lo + (nch - 1 - jj) * C
            c, c_last, w, gm, valid, row, q_a, q_b, k_a, k_b, v, dy = _sweep_chunk(
                qr_ptr, kr_ptr, vr_ptr, adt_ptr, w_ptr, g_ptr, dy_ptr, bos, seqlen, coef_base, c0,
                h, H, ca, cb, N, P, R, C, DOTK, UPCAST,
            )  # fmt: skip
            dyo = _rnd(dy, DOTK, UPCAST)
            a = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PREC)
            a = tl.dot(q_b, tl.trans(k_b), a, input_precision=DOT_PREC)
            d = tl.dot(dyo, tl.trans(v), input_precision=DOT_PREC)
            e = tl.where(causal, _exp(tl.minimum(c[:, None] - c[None, :], 0.0), FAST), 0.0)
            m = e * w[None, :] + tl.where(diag, gm[None, :], 0.0)
            el = _exp(c_last - c, FAST)
            wl = el * w  # weight of row j in the chunk's state contribution
            kds = tl.dot(k_a, tl.trans(_rnd(ds_a, DOTK, UPCAST)), input_precision=DOT_PREC)
            kds = tl.dot(k_b, tl.trans(_rnd(ds_b, DOTK, UPCAST)), kds, input_precision=DOT_PREC)
            dv = tl.dot(tl.trans(_rnd(a * m, DOTK, UPCAST)), dyo, input_precision=DOT_PREC)
            dv += wl[:, None] * kds
            # the inter-chunk part from the operand the forward sweep's state is built from
            # (v exp(c_last - c) w rounded) against dS split hi + lo: see the module docstring.
            vw = _rnd(v.to(tl.float32) * wl[:, None], DOTK, UPCAST)
            dmt = tl.trans(_rnd(d * m, DOTK, UPCAST))
            zero = tl.zeros((CR, NB // 2), dtype=tl.float32)
            dk_a = tl.dot(dmt, q_a, _dot_split(vw, ds_a, zero, DOTK, DOT_PREC, UPCAST),
                          input_precision=DOT_PREC)  # fmt: skip
            dk_b = tl.dot(dmt, q_b, _dot_split(vw, ds_b, zero, DOTK, DOT_PREC, UPCAST),
                          input_precision=DOT_PREC)  # fmt: skip
            ad = a * d
            dw = tl.sum(e * ad, axis=0) + el * tl.sum(v.to(tl.float32) * kds, 1)
            dg = tl.sum(tl.where(diag, ad, 0.0), axis=0)
            dyc = _rnd(dy * _exp(c, FAST)[:, None], DOTK, UPCAST)
            ds_a = _step(ds_a, dyc, q_a, c_last, DOT_PREC, FAST)
            ds_b = _step(ds_b, dyc, q_b, c_last, DOT_PREC, FAST)
            mr = valid[:, None]
            if HAS_D:
                dv += d_skip * dy
            trow, tvalid = (bos + c0 + tok) * H + h, c0 + tok < seqlen
            _store_grad(dk_ptr, row, valid, ca, cb, dk_a, dk_b, k_a, k_b, dth_ptr, trow,
                        tvalid, N, S, R, C, DTH)  # fmt: skip
            _put(dv_ptr + row[:, None] * P + pp[None, :], dv, mr, NS)
            ridx = coef_base * R + c0 * R + rloc
            _put(dw_ptr + ridx, dw, valid, NS)
            _put(dg_ptr + ridx, dg, valid, NS)
            _put(kdk_ptr + ridx, _rows_dot(k_a, k_b, dk_a, dk_b), valid, NS)
        if seg == 0:
            tl.store(ds0_ptr + st_a_off, ds_a)
            tl.store(ds0_ptr + st_b_off, ds_b)
