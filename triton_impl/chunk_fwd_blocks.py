"""Block-parallel output kernel of the chunk-parallel prefill forward (the `split=2` variant of
chunk_fwd; fixed-length batches only).

chunk_fwd_split's first two steps give the state F_s entering every segment of T tokens (in the
segment's rotary frame) and, with ``frames``, each token's angle and log-decay counted from
its segment's start and its trapezoid weights. With those, no output needs a state carried
from chunk to chunk: one program owns one block of C tokens (C*R rows, as a MIMO chunk) and
computes

    y = exp(c) * (Qr~ F_s^T)                                    (the state entering the segment)
      + ((Qr~ Kr~^T) * M) V                                     (its own block, as one chunk)
      + sum over the segment's earlier blocks b of ((Qr~ Kr~_b^T) * exp(c - c_b) w_b) V_b

where Qr~, Kr~ are q, k rotated by the angle since the segment start and c is the log-decay
since the segment start. Every block of every segment runs at once (grid axis 0), each
program's dots have C*R rows, and the state is only ever read, as a dot operand in v's dtype,
so the fp32 state never lives in registers (chunk_fwd_kernel's walk spills there, most of all
for MIMO, whose chunks hold R rows per token and so few tokens). The price is quadratic work
inside a segment (block b reads b earlier key blocks): T / C is the knob between that and the
state traffic of shorter segments.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mamba3_kernels.problem import Problem

from .chunk_fwd_split import compile_ahead
from .fast_math import _exp
from .fwd_tiles import (
    _finish_rows,
    _intra_scores,
    _load_lohi,
    _op,
    _qk_scores,
    _rot_cos_sin,
    _rotated_operand,
    _v_rows,
)
from .launch import Launch
from .launch import cdiv as _cdiv

__all__ = ["block_launch"]


@triton.jit
def _block_rows(
    x_ptr,
    xb_ptr,
    bias_row,
    v_ptr,
    mv_ptr,
    th_ptr,
    cs_ptr,
    gm_ptr,
    wt_ptr,
    coef_base,
    bos,
    t0,
    t,
    valid,
    seqlen,
    h,
    H,
    g,
    G,
    pp,
    r_idx,
    jr,
    rot,
    P: tl.constexpr,
    N: tl.constexpr,
    S: tl.constexpr,
    R: tl.constexpr,
    SA: tl.constexpr,
    HALVES: tl.constexpr,
    HAS_MV: tl.constexpr,
    DD: tl.constexpr,
    UPCAST: tl.constexpr,
    FAST: tl.constexpr,
):
    """One block's rows at tokens t (rows,) of a sequence of seqlen tokens (t0: the block's
    first token): x (q or k, plus its bias rows bias_row of xb) rotated by the segment-local
    angle, as (lo, hi) dot operands; the rank-weighted v (rows, BP) fp32; the segment-local
    log-decay c, gamma and w (rows,), all from the frames of chunk_fwd_split's segment-state
    kernel. Also returns (cos, sin). The bias is re-read per block (cache hits): held across the
    key loop, its broadcast tiles would take registers the loop's tiles need."""
    NH: tl.constexpr = N // 2
    PASS: tl.constexpr = SA < NH
    fr = coef_base + t  # (sequence, head, token) row of the frame tensors
    th = tl.load(th_ptr + fr[:, None] * S + jr[None, :], mask=valid[:, None] & rot[None, :],
                 other=0.0)  # fmt: skip
    cos, sin = _rot_cos_sin(th, rot, PASS, FAST)
    tok = bos + t
    mrow = valid[:, None]
    qk_row = ((tok[:, None] * R + r_idx[:, None]) * G + g) * N
    b_lo, b_hi = _load_lohi(xb_ptr, bias_row, bias_row >= 0, NH, SA, HALVES)
    x_lo, x_hi = _rotated_operand(
        x_ptr, qk_row, mrow, b_lo, b_hi, cos, sin, NH, SA, HALVES, DD, UPCAST
    )
    mpr = (pp < P)[None, :]
    vr = _v_rows(v_ptr, bos, t0, tok, mrow, seqlen, h, H, pp, mpr, P, R, t.shape[0] // R)
    if HAS_MV:
        vr = vr * tl.load(mv_ptr + (h * R + r_idx[:, None]) * P + pp[None, :], mask=mpr, other=0.0)
    c = tl.load(cs_ptr + fr, mask=valid, other=0.0)
    gamma = tl.load(gm_ptr + fr, mask=valid, other=0.0)
    w = tl.load(wt_ptr + fr, mask=valid, other=0.0)
    return x_lo, x_hi, vr, c, gamma, w, cos, sin


@triton.jit
def _block_out_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    qb_ptr,
    kb_ptr,
    D_ptr,
    z_ptr,
    mv_ptr,
    mz_ptr,
    mo_ptr,
    fst_ptr,
    th_ptr,
    cs_ptr,
    gm_ptr,
    wt_ptr,
    out_ptr,
    ys_ptr,
    L,
    H,
    G,
    NSEG,
    P: tl.constexpr,
    N: tl.constexpr,
    S: tl.constexpr,
    SA: tl.constexpr,
    R: tl.constexpr,
    C: tl.constexpr,
    T: tl.constexpr,
    BP: tl.constexpr,
    HALVES: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_MV: tl.constexpr,
    HAS_MZ: tl.constexpr,
    HAS_MO: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    FAST: tl.constexpr,
    SAVE_Y: tl.constexpr,
):
    CR: tl.constexpr = C * R
    NH: tl.constexpr = N // 2
    pid_b = tl.program_id(0)  # block of C tokens in the sequence
    pid_sh = tl.program_id(1)
    pid_p = tl.program_id(2)
    seq = pid_sh // H
    h = pid_sh % H
    g = h // (H // G)
    dd: tl.constexpr = v_ptr.dtype.element_ty
    seqlen = L + 0 * seq  # a tensor (the interpreter passes L as an int)
    coef_base = pid_sh.to(tl.int64) * L
    bos = seq.to(tl.int64) * L
    seg = (pid_b * C) // T
    seg_start = seg * T
    b0 = pid_b * C  # first token of this block
    rows = tl.arange(0, CR)
    t_loc = rows // R
    r_idx = rows % R
    jr = tl.arange(0, SA)
    rot = jr < S
    pp = pid_p * BP + tl.arange(0, BP)
    mp = (pp < P)[:, None]
    if R == 1:
        bias_row = tl.zeros((1, 1), dtype=tl.int32) + h * N
    else:
        bias_row = (h * R + r_idx[:, None]) * N

    # ---- this block: q and its own keys share the angles ----------------------------------
    t = b0 + t_loc
    valid = t < seqlen
    k_lo, k_hi, vr, c, gamma, w, cos, sin = _block_rows(
        k_ptr, kb_ptr, bias_row, v_ptr, mv_ptr, th_ptr, cs_ptr, gm_ptr, wt_ptr, coef_base, bos, b0,
        t, valid, seqlen, h, H, g, G, pp, r_idx, jr, rot, P, N, S, R, SA, HALVES, HAS_MV, dd,
        UPCAST, FAST,
    )  # fmt: skip
    qk_row = (((bos + t)[:, None] * R + r_idx[:, None]) * G + g) * N
    qb_lo, qb_hi = _load_lohi(qb_ptr, bias_row, bias_row >= 0, NH, SA, HALVES)
    q_lo, q_hi = _rotated_operand(
        q_ptr, qk_row, valid[:, None], qb_lo, qb_hi, cos, sin, NH, SA, HALVES, dd, UPCAST
    )
    # ---- the state entering the segment (stored in v's dtype for 16-bit inputs) -------------
    fi = pid_sh.to(tl.int64) * NSEG + seg
    f_lo, f_hi = _load_lohi(fst_ptr, (fi * P + pp[:, None]) * N, mp, NH, SA, HALVES)
    y = tl.dot(q_lo, tl.trans(_op(f_lo, dd, UPCAST)), input_precision=DOT_PREC)
    y = tl.dot(q_hi, tl.trans(_op(f_hi, dd, UPCAST)), y, input_precision=DOT_PREC)
    y = y * _exp(c, FAST)[:, None]
    if HAS_D:
        # Here rather than in the epilogue, so that v's tile is dead during the key loop.
        y += tl.load(D_ptr + h).to(tl.float32) * vr
    scores = _intra_scores(q_lo, q_hi, k_lo, k_hi, t, c, w, gamma, DOT_PREC, FAST)
    y = tl.dot(_op(scores, dd, UPCAST), _op(vr, dd, UPCAST), y, input_precision=DOT_PREC)
    # ---- the segment's earlier blocks: every key token is before every query token --------
    for kb0 in range(seg_start, b0, C):
        tk = kb0 + t_loc
        kk_lo, kk_hi, vk, ck, _, wk, _, _ = _block_rows(
            k_ptr, kb_ptr, bias_row, v_ptr, mv_ptr, th_ptr, cs_ptr, gm_ptr, wt_ptr, coef_base,
            bos, kb0, tk, tk < seqlen, seqlen, h, H, g, G, pp, r_idx, jr, rot, P, N, S, R, SA,
            HALVES, HAS_MV, dd, UPCAST, FAST,
        )  # fmt: skip
        sk = _qk_scores(q_lo, q_hi, kk_lo, kk_hi, DOT_PREC)
        sk = sk * (_exp(tl.minimum(c[:, None] - ck[None, :], 0.0), FAST) * wk[None, :])
        y = tl.dot(_op(sk, dd, UPCAST), _op(vk, dd, UPCAST), y, input_precision=DOT_PREC)
    # HAS_D off: the skip was added before the key loop (y stands in for the unread vr).
    _finish_rows(
        y, y, D_ptr, z_ptr, mz_ptr, mo_ptr, out_ptr, h, H, pp, P, bos, b0, seqlen, t, r_idx, R,
        C, BP, False, HAS_Z, HAS_MZ, HAS_MO, FAST, ys_ptr, SAVE_Y,
    )  # fmt: skip


_KERNEL_CONSTS = ("P", "N", "S", "SA", "R", "C", "T", "BP", "HALVES", "HAS_D", "HAS_Z",
                  "HAS_MV", "HAS_MZ", "HAS_MO", "DOT_PREC", "UPCAST", "FAST", "SAVE_Y")  # fmt: skip


def kernel_constexprs(consts: dict) -> dict:
    """The block kernel's compile-time arguments out of chunk_fwd_kernel._constexprs."""
    return {n: consts[n] for n in _KERNEL_CONSTS}


def block_launch(
    problem: Problem, consts: dict, launch: dict, slot: dict[str, int], nseg: int
) -> Launch:
    """Step 3 of the split=2 forward as one launch: writes out ((B, L, H, P), or
    (B, L, R, H, P) for MIMO without mimo_o) from the segment states fst (B*H, nseg, P, N) and
    the frames th (B*H, L, S), cs, gm, wt (B*H, L) of
    chunk_fwd_split.segment_launches(frames=True).

    consts: chunk_fwd_kernel._constexprs (C tokens per block, T per segment); launch:
    num_warps/num_stages; slot: the index of each argument in the call's argument table
    (chunk_fwd._TABLE names; absent tensors' entries hold a stand-in that is never read)."""
    L, H, G = problem.seqlen, problem.nheads, problem.ngroups
    kc = kernel_constexprs(consts)
    names = ("q", "k", "v", "q_bias", "k_bias", "D", "z", "mimo_v", "mimo_z", "mimo_o", "fst",
             "th", "cs", "gm", "wt", "out", "ys")  # fmt: skip
    grid = (_cdiv(L, kc["C"]), problem.batch * H, _cdiv(problem.headdim, kc["BP"]))
    return Launch(_block_out_kernel, grid, [slot[n] for n in names], (L, H, G, nseg), kc, launch)


def compile_kernel(problem: Problem, consts: dict, options: dict, target):
    """Compile the block kernel ahead of time (no GPU needed) for ``target``; consts as
    block_launch. Returns the compiled kernel (``asm`` holds ptx/cubin)."""
    io_ptrs = {"q_ptr", "k_ptr", "v_ptr", "z_ptr", "out_ptr", "fst_ptr", "ys_ptr"}
    return compile_ahead(
        _block_out_kernel, problem, kernel_constexprs(consts), options, target, io_ptrs
    )
