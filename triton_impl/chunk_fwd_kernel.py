"""The walk kernel of the chunked prefill forward (chunk_fwd's family), the compile-time
arguments a (problem, config) gives it and the forward's ahead-of-time build (compile_kernel,
with the chunk-parallel variants' kernels of chunk_fwd_split and chunk_fwd_blocks).

One program owns one (sequence, head, P-block) and walks the sequence chunk by chunk, keeping the
P-block x N fp32 state in registers, so no per-chunk state ever goes to memory. A MIMO chunk of C
tokens is handled as a SISO chunk of C*R rows: row i is token i // R, rank i % R; every row of a
token shares its decay, the causal mask compares tokens (t_q >= t_k), and the diagonal (same
token, every rank pair) takes the weight gamma instead of the folded trapezoid weight.

The rotary transition acts on q, k and the state kept as two (rows, N/2) tiles lo, hi, the two
members of each rotary pair. When S <= N/4 only the first N/4 pairs can rotate: their members are
zipped (alternate columns) with the pass-through columns, and cos/sin are computed for N/4 pairs
and zipped with the constants 1 and 0, so the trig runs on (rows, N/4) only while the dots keep
whole N/2-wide operands (narrower operands made the compiler rebuild them in register layouts
and spill). Angles are only ever handled per pair, never per column.

Per chunk, with c the cumulative log-decay inside the chunk and w_s = gamma_s + mu_{s+1}
(mu_t = dt_t (1 - lam_t), zero past the end of the sequence):
    scores  = (Qr Kr^T) * M,  M[i, j] = exp(c_i - c_j) w_j (t_i > t_j), gamma_j (t_i == t_j), 0
    y       = scores V + exp(c) * (Qr S^T)
    S      <- exp(c_last) S + V^T (Kr * exp(c_last - c) w)
The initial state's (k, v) enter as the previous-input term of token 0: S0 = ssm + mu_0 V0^T K0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mamba3_kernels.problem import Problem

from .chunk_fwd_blocks import compile_kernel as compile_block_kernel
from .chunk_fwd_split import compile_kernels as compile_split_kernels
from .core_tiles import _seq_bounds
from .fast_math import _exp
from .fwd_tiles import (
    _TWO_PI,
    _chunk_angles,
    _chunk_coefs,
    _finish_rows,
    _initial_ssm,
    _intra_scores,
    _load_lohi,
    _op,
    _prefetch_chunk,
    _rot_cos_sin,
    _rotated_operand,
    _store_final_kv,
    _store_lohi,
    _v_rows,
)

__all__ = ["compile_kernel"]

# Every ``config`` here is a chunk_fwd.ChunkFwdConfig (not imported: chunk_fwd imports this module).


def _chunk(problem: Problem, config) -> int:
    """Tokens per chunk: the problem's chunk_size where given, else the config's."""
    return problem.chunk_size if problem.chunk_size is not None else config.chunk_size


def _segment(problem: Problem, config) -> int:
    """Tokens per segment of the chunk-parallel variant."""
    return max(config.segment, _chunk(problem, config))


def _splits(problem: Problem, config) -> bool:
    """Whether ``config`` runs ``problem`` chunk-parallel (varlen and empty calls never do)."""
    return bool(config.split) and not problem.varlen and problem.seqlen > 0


@triton.jit
def _chunk_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    adt_ptr,
    dt_ptr,
    trap_ptr,
    qb_ptr,
    kb_ptr,
    ang_ptr,
    D_ptr,
    z_ptr,
    mv_ptr,
    mz_ptr,
    mo_ptr,
    a0_ptr,
    s0_ptr,
    k0_ptr,
    v0_ptr,
    cu_ptr,
    out_ptr,
    a1_ptr,
    s1_ptr,
    k1_ptr,
    v1_ptr,
    fst_ptr,
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
    BP: tl.constexpr,
    HALVES: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_MV: tl.constexpr,
    HAS_MZ: tl.constexpr,
    HAS_MO: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_FINAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    FAST: tl.constexpr,
    T: tl.constexpr,
    PREFETCH: tl.constexpr,
    SAVE_Y: tl.constexpr,
):
    CR: tl.constexpr = C * R
    NH: tl.constexpr = N // 2
    pid_sh = tl.program_id(0)
    pid_p = tl.program_id(1)
    seq = pid_sh // H
    h = pid_sh % H
    g = h // (H // G)
    bos, seqlen, coef_base = _seq_bounds(cu_ptr, seq, h, L, H, VARLEN)
    io_dtype = v_ptr.dtype.element_ty
    dd: tl.constexpr = io_dtype  # dot operand dtype

    # Pairs [0, SA) rotate (those in [S, SA) with zero rate: cos 1, sin 0); when S <= N/4,
    # SA = N/4 and the other pairs pass through: their cos/sin are the constants 1 and 0 zipped
    # into the tiles (see _load_lohi), so the trig runs on SA pairs only.
    PASS: tl.constexpr = SA < NH
    rows = tl.arange(0, CR)
    t_loc = rows // R  # token of each row inside the chunk
    r_idx = rows % R  # rank of each row
    jr = tl.arange(0, SA)  # rotated pair index
    rot = jr < S  # pairs with a nonzero rate
    pp = pid_p * BP + tl.arange(0, BP)
    mp = (pp < P)[:, None]
    sh = seq.to(tl.int64) * H + h  # (sequence, head) index of state tensors

    # ---- initial state -------------------------------------------------------------------
    seg_start = 0
    seg_end = seqlen
    if T > 0:
        # Segment mode (chunk_fwd_split): tokens [seg_start, seg_end) of a fixed-length
        # sequence, from the state entering the segment in the segment's rotary frame.
        pid_s = tl.program_id(2)
        seg_start = pid_s * T
        seg_end = tl.minimum(seg_start + T, seqlen)
        fi = sh * NSEG + pid_s
        st_lo, st_hi = _load_lohi(fst_ptr, (fi * P + pp[:, None]) * N, mp, NH, SA, HALVES)
        st_lo = st_lo.to(tl.float32)
        st_hi = st_hi.to(tl.float32)
        theta = tl.zeros((SA,), dtype=tl.float32)
    elif HAS_INIT:
        st_lo, st_hi = _initial_ssm(
            s0_ptr, k0_ptr, v0_ptr, mv_ptr, dt_ptr, trap_ptr, coef_base, seqlen > 0, seq, h, H,
            pp, P, N, NH, SA, R, HALVES, HAS_MV, FAST,
        )  # fmt: skip
        theta = tl.load(a0_ptr + sh * S + jr, mask=rot, other=0.0).to(tl.float32)
    else:
        st_lo = tl.zeros((BP, NH), dtype=tl.float32)
        st_hi = tl.zeros((BP, NH), dtype=tl.float32)
        theta = tl.zeros((SA,), dtype=tl.float32)
    # Keep the running angle small so fp32 cos/sin stay accurate at any length.
    theta = theta - _TWO_PI * tl.floor(theta / _TWO_PI)

    first_rank = r_idx == 0
    if R == 1:
        bias_row = tl.zeros((1, 1), dtype=tl.int32) + h * N  # SISO: one bias row
    else:
        bias_row = (h * R + r_idx[:, None]) * N  # MIMO: the rank of a row picks its bias row
    rank_par = (h * R + r_idx[:, None]) * P + pp[None, :]  # MIMO: (H, R, P) rank weights
    mpr = (pp < P)[None, :]
    for c0 in range(seg_start, seg_end, C):
        if PREFETCH > 0:  # the lines of the chunk PREFETCH ahead into L2 (none past the walk)
            _prefetch_chunk(
                adt_ptr, dt_ptr, trap_ptr, ang_ptr, v_ptr, z_ptr, coef_base, bos,
                c0 + PREFETCH * C, seg_end, h, H, pid_p * BP, P, S, SA, C, BP, HAS_Z,
            )  # fmt: skip
        t = c0 + t_loc
        valid = t < seqlen
        tok = bos + t  # global token index (int64)
        mrow = valid[:, None]
        c, c_last, dt_row, gamma, w = _chunk_coefs(
            adt_ptr, dt_ptr, trap_ptr, coef_base, t, valid, first_rank, seqlen, FAST
        )
        # ---- angles: theta per row and pair (zero rate past S) ---------------------------
        th, _, rate_sum = _chunk_angles(
            ang_ptr, dt_ptr, coef_base, bos, c0, theta, tok, valid, first_rank, dt_row, seqlen,
            h, H, S, jr, rot, R, C, FAST,
        )  # fmt: skip
        theta = theta + rate_sum
        theta = theta - _TWO_PI * tl.floor(theta / _TWO_PI)
        cos, sin = _rot_cos_sin(th, rot, PASS, FAST)
        # ---- q, k: bias, rotation, rounding to the dot dtype -----------------------------
        # Biases are re-read each chunk (cache hits): held across the loop, their broadcast
        # (rows, N) tiles would cost registers the dots need.
        qb_lo, qb_hi = _load_lohi(qb_ptr, bias_row, bias_row >= 0, NH, SA, HALVES)
        kb_lo, kb_hi = _load_lohi(kb_ptr, bias_row, bias_row >= 0, NH, SA, HALVES)
        qk_row = ((tok[:, None] * R + r_idx[:, None]) * G + g) * N
        q_lo, q_hi = _rotated_operand(
            q_ptr, qk_row, mrow, qb_lo, qb_hi, cos, sin, NH, SA, HALVES, dd, UPCAST
        )
        k_lo, k_hi = _rotated_operand(
            k_ptr, qk_row, mrow, kb_lo, kb_hi, cos, sin, NH, SA, HALVES, dd, UPCAST
        )
        # ---- v (per rank) ----------------------------------------------------------------
        vr = _v_rows(v_ptr, bos, c0, tok, mrow, seqlen, h, H, pp, mpr, P, R, C)
        if HAS_MV:
            vr = vr * tl.load(mv_ptr + rank_par, mask=mpr, other=0.0)
        scores = _intra_scores(q_lo, q_hi, k_lo, k_hi, t, c, w, gamma, DOT_PREC, FAST)
        # ---- output: state part (decayed from the chunk start) plus intra part -----------
        y = tl.dot(q_lo, tl.trans(_op(st_lo, dd, UPCAST)), input_precision=DOT_PREC)
        y = tl.dot(q_hi, tl.trans(_op(st_hi, dd, UPCAST)), y, input_precision=DOT_PREC)
        y = y * _exp(c, FAST)[:, None]
        y = tl.dot(_op(scores, dd, UPCAST), _op(vr, dd, UPCAST), y, input_precision=DOT_PREC)
        # ---- state update: S <- exp(c_last) S + (V * exp(c_last - c) w)^T Kr ------------
        # (not needed when a segment is one chunk: its successor's state comes from memory)
        if T != C:
            vw = tl.trans(_op(vr * (_exp(c_last - c, FAST) * w)[:, None], dd, UPCAST))
            e_last = _exp(c_last, FAST)
            st_lo = tl.dot(vw, k_lo, st_lo * e_last, input_precision=DOT_PREC)
            st_hi = tl.dot(vw, k_hi, st_hi * e_last, input_precision=DOT_PREC)
        _finish_rows(
            y, vr, D_ptr, z_ptr, mz_ptr, mo_ptr, out_ptr, h, H, pp, P, bos, c0, seqlen, t,
            r_idx, R, C, BP, HAS_D, HAS_Z, HAS_MZ, HAS_MO, FAST, ys_ptr, SAVE_Y,
        )  # fmt: skip

    if HAS_FINAL:
        # ssm: every P-block writes its rows; angle and k: the first P-block.
        _store_lohi(s1_ptr, (sh * P + pp[:, None]) * N, st_lo, st_hi, mp, NH, SA, HALVES)
        if pid_p == 0:
            tl.store(a1_ptr + sh * S + jr, theta, mask=rot)
        _store_final_kv(
            k_ptr, kb_ptr, k0_ptr, k1_ptr, v_ptr, v0_ptr, v1_ptr, seq, h, H, G, pp, bos, seqlen,
            theta, jr, rot, pid_p == 0, P, NH, SA, R, HALVES, FAST, HAS_INIT,
        )  # fmt: skip


def _constexprs(
    problem: Problem,
    config,
    interp: bool,
    has_mv: bool = True,
    has_mz: bool = True,
    save_y: bool = False,
) -> dict:
    """The kernel's compile-time arguments for a problem and config (T: tokens per segment of
    the chunk-parallel variant, 0 when the kernel walks whole sequences; SAVE_Y: the core's y
    also stored for the backward, see chunk_fwd)."""
    fp32 = problem.dtype == torch.float32
    segment = _segment(problem, config) if _splits(problem, config) else 0
    return dict(
        P=problem.headdim,
        N=problem.d_state,
        S=problem.n_angles,
        SA=_rotated_pairs(problem, config),
        R=problem.rank,
        C=_chunk(problem, config),
        BP=config.block_p,
        HALVES=problem.rotary == "halves",
        VARLEN=problem.varlen,
        HAS_D=problem.has_D,
        HAS_Z=problem.has_z,
        HAS_MV=problem.mimo and has_mv,
        HAS_MZ=problem.mimo and problem.has_z and has_mz,
        HAS_MO=problem.mimo and problem.has_mimo_o,
        HAS_INIT=problem.has_initial_state and not segment,
        HAS_FINAL=problem.return_final_state and not segment,
        DOT_PREC="ieee" if fp32 or interp else "tf32",
        UPCAST=interp and not fp32,
        FAST=not interp,
        T=segment,
        PREFETCH=0 if interp else config.prefetch,  # (inline assembly: GPU builds only)
        SAVE_Y=save_y,
    )


def _rotated_pairs(problem: Problem, config) -> int:
    """Pairs that go through the trig (a power of two >= S): with config.split_rot, half of the
    N/2 pairs when S <= N/4, the other half passing through; else all N/2."""
    nh = problem.d_state // 2
    return nh // 2 if config.split_rot and 2 * problem.n_angles <= nh else nh


_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_kernel(problem: Problem, config, target=None, save_y: bool = False):
    """Compile the kernel ahead of time (no GPU needed) for ``target`` (a
    ``triton.backends.compiler.GPUTarget``; default sm_90). Returns the compiled kernel, whose
    ``asm`` dict holds ttir/ttgir/llir/ptx/cubin (with config.split: a dict of the three
    kernels). Used for build checks and resource reports. save_y: the build that also stores
    the core's y for the backward (chunk_fwd's save_y)."""
    from triton.backends.compiler import GPUTarget

    target = target or GPUTarget("cuda", 90, 64)
    io = "*" + _TRITON_DTYPE[problem.dtype]
    ptr_types = dict(
        q_ptr=io, k_ptr=io, v_ptr=io, adt_ptr="*fp32", dt_ptr="*fp32", trap_ptr="*fp32",
        qb_ptr="*fp32", kb_ptr="*fp32", ang_ptr="*fp32", D_ptr="*fp32", z_ptr=io,
        mv_ptr="*fp32", mz_ptr="*fp32", mo_ptr="*fp32", a0_ptr="*fp32", s0_ptr="*fp32",
        k0_ptr=io, v0_ptr=io, cu_ptr="*i32", out_ptr=io, a1_ptr="*fp32", s1_ptr="*fp32",
        k1_ptr=io, v1_ptr=io, fst_ptr="*fp32", ys_ptr=io, L="i32", H="i32", G="i32",
        NSEG="i32",
    )  # fmt: skip
    consts = _constexprs(problem, config, interp=False, save_y=save_y)
    signature = {**ptr_types, **{name: "constexpr" for name in consts}}
    # As the launcher's specialisation does: pointers (torch allocations) and sizes that are
    # multiples of 16 are marked 16-divisible, which lets loads vectorise.
    names = list(signature)
    div16 = [n for n, t in ptr_types.items() if t.startswith("*")]
    div16 += [n for n, val in (("L", problem.seqlen), ("H", problem.nheads)) if val % 16 == 0]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
    src = triton.compiler.ASTSource(
        fn=_chunk_fwd_kernel, signature=signature, constexprs=consts, attrs=attrs
    )
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if config.maxnreg:
        options["maxnreg"] = config.maxnreg
    if _splits(problem, config) and config.split == 2:
        return {
            **compile_split_kernels(problem, consts, options, target, frames=True),
            "_block_out_kernel": compile_block_kernel(problem, consts, options, target),
        }
    kernel = triton.compile(src, target=target, options=options)
    if _splits(problem, config):
        return {
            **compile_split_kernels(problem, consts, options, target),
            "_chunk_fwd_kernel": kernel,
        }
    return kernel
