"""Triton building blocks of the core's kernels (core_scan's forward, core_bwd_kernel's backward,
core_segments' segment-state kernels), in a module of their own so that those modules import
them one way: core_scan -> core_bwd_kernel, core_segments -> core_tiles.

They read one chunk of a (sequence, head)'s rows (coefficients and the dot operands rounded to
the dot dtype) and step a state, or a state gradient, over it: the chunk steps whose rounded
operands the backward's two sweeps and the segment states must share (see core_scan's module
docstring).
"""

import triton
import triton.language as tl

from .fast_math import _exp


@triton.jit
def _rnd(x, DOTK: tl.constexpr, UPCAST: tl.constexpr):
    """A dot operand: rounded to the dot dtype (0 fp32, 1 bf16, 2 fp16); under the interpreter
    (whose 16-bit dots are unreliable) rounded and then kept in fp32."""
    if DOTK == 1:
        y = x.to(tl.bfloat16)
    elif DOTK == 2:
        y = x.to(tl.float16)
    else:
        y = x.to(tl.float32)
    if UPCAST:
        y = y.to(tl.float32)
    return y


@triton.jit
def _seq_bounds(cu_ptr, seq, h, L, H, VARLEN: tl.constexpr):
    """(bos, seqlen, coef_base): first token of the sequence in the flat token axis, its length,
    and the offset of (sequence, head) in the (B, H, L) coefficient tensors."""
    if VARLEN:
        bos = tl.load(cu_ptr + seq).to(tl.int64)
        seqlen = (tl.load(cu_ptr + seq + 1) - tl.load(cu_ptr + seq)).to(tl.int32)
        coef_base = h.to(tl.int64) * L + bos
    else:
        bos = seq.to(tl.int64) * L
        seqlen = L + 0 * seq  # a tensor in both modes (the interpreter passes L as an int)
        coef_base = (seq.to(tl.int64) * H + h) * L
    return bos, seqlen, coef_base


@triton.jit
def _load_chunk(
    qr_ptr, kr_ptr, vr_ptr, adt_ptr, w_ptr, g_ptr, bos, seqlen, coef_base, c0, h, H,
    N: tl.constexpr, P: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
    DOTK: tl.constexpr, UPCAST: tl.constexpr, n0=0, NB: tl.constexpr = None,
):  # fmt: skip
    """Rows of one chunk: per-row cumulative log-decay c, c_last, w, gamma, and the operands
    qr, kr (CR, NB) (columns n0 .. n0 + NB of N; all N when NB is None), vr (CR, P) rounded to
    the dot dtype, plus row validity and offsets."""
    c, c_last, w, gm, valid, row, t_loc = _chunk_rows(
        adt_ptr, w_ptr, g_ptr, bos, seqlen, coef_base, c0, h, H, R, C
    )
    if NB is None:
        nn = tl.arange(0, N)
    else:
        nn = n0 + tl.arange(0, NB)
    q = _load_cols(qr_ptr, row, valid, nn, N, DOTK, UPCAST)
    k = _load_cols(kr_ptr, row, valid, nn, N, DOTK, UPCAST)
    v = _load_cols(vr_ptr, row, valid, tl.arange(0, P), P, DOTK, UPCAST)
    return c, c_last, w, gm, q, k, v, valid, row, t_loc


@triton.jit
def _chunk_rows(adt_ptr, w_ptr, g_ptr, bos, seqlen, coef_base, c0, h, H,
                R: tl.constexpr, C: tl.constexpr):  # fmt: skip
    """Per-row coefficients of one chunk: cumulative log-decay c, c_last, w, gamma, row validity,
    row offsets in the (B, L, R, H, X) tensors and each row's token in the chunk."""
    CR: tl.constexpr = C * R
    rows = tl.arange(0, CR)
    t_loc = rows // R
    first = (rows % R) == 0
    t = c0 + t_loc
    valid = t < seqlen
    # Only the first row of a token carries its log-decay, so the row cumsum is the token cumsum.
    a = tl.load(adt_ptr + coef_base + t, mask=valid & first, other=0.0).to(tl.float32)
    c = tl.cumsum(a, axis=0)
    c_last = tl.sum(a, axis=0)
    w = tl.load(w_ptr + coef_base + t, mask=valid, other=0.0).to(tl.float32)
    gm = tl.load(g_ptr + coef_base + t, mask=valid, other=0.0).to(tl.float32)
    # row offset in the (B, L, R, H, X) tensors: ((bos + t) * R + r) * H + h
    row = ((bos + c0) * R + rows) * H + h
    return c, c_last, w, gm, valid, row, t_loc


@triton.jit
def _load_cols(x_ptr, row, valid, cols, X: tl.constexpr, DOTK: tl.constexpr,
               UPCAST: tl.constexpr):  # fmt: skip
    """Columns ``cols`` of a chunk's rows of X values, rounded to the dot dtype."""
    x = tl.load(x_ptr + row[:, None] * X + cols[None, :], mask=valid[:, None], other=0.0)
    return _rnd(x.to(tl.float32), DOTK, UPCAST)


@triton.jit
def _exact_v(vr_ptr, row, valid, v, P: tl.constexpr, DOTK: tl.constexpr):
    """vr of a chunk's rows in fp32 as given (for the D skip): the dot operand v itself when
    rounding to the dot dtype left it unchanged (vr already in that dtype, or fp32 dots), else
    reloaded."""
    if DOTK == 0:
        exact = True
    elif DOTK == 1:
        exact = vr_ptr.dtype.element_ty == tl.bfloat16
    else:
        exact = vr_ptr.dtype.element_ty == tl.float16
    if exact:
        return v.to(tl.float32)
    else:
        pp = tl.arange(0, P)
        x = tl.load(vr_ptr + row[:, None] * P + pp[None, :], mask=valid[:, None], other=0.0)
        return x.to(tl.float32)


@triton.jit
def _state_step(st, k, v, c, c_last, w, DOTK: tl.constexpr, DOT_PREC: tl.constexpr,
                UPCAST: tl.constexpr, FAST: tl.constexpr):  # fmt: skip
    """The state at a chunk's end from the state at its start: st exp(c_last) + vw^T k, with
    vw = v exp(c_last - c) w rounded to the dot dtype (the row-side operand the backward's two
    sweeps must share: see core_scan's module docstring)."""
    vw = _rnd(v.to(tl.float32) * (_exp(c_last - c, FAST) * w)[:, None], DOTK, UPCAST)
    return _step(st, vw, k, c_last, DOT_PREC, FAST)


@triton.jit
def _step(x, rows_op, cols_op, c_last, DOT_PREC: tl.constexpr, FAST: tl.constexpr):
    """x exp(c_last) + rows_op^T cols_op: a state (or state gradient) over one chunk."""
    return tl.dot(tl.trans(rows_op), cols_op, x * _exp(c_last, FAST), input_precision=DOT_PREC)


@triton.jit
def _dstate_step(ds, q, dy, c, c_last, DOTK: tl.constexpr, DOT_PREC: tl.constexpr,
                 UPCAST: tl.constexpr, FAST: tl.constexpr):  # fmt: skip
    """The state gradient at a chunk's start from the one at its end: ds exp(c_last) + dyc^T q,
    with dyc = dy exp(c) rounded to the dot dtype (dy fp32)."""
    dyc = _rnd(dy * _exp(c, FAST)[:, None], DOTK, UPCAST)
    return _step(ds, dyc, q, c_last, DOT_PREC, FAST)
