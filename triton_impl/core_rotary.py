"""Bias + rotary + group->head expansion of q and k in Triton, and its hand-written backward.

Fused with the core (``rot_core_scan``) so that the per-head rotated q/k exist only as the core's
dot operands (in the dot dtype) and their fp32 gradients only between the core's backward and
the rotary backward: no PyTorch elementwise pass and no autograd ever touches a per-head tensor.

The kernels work on pair members: pair j has columns (a, b) = (j, N/2 + j) (halves) or
(2j, 2j + 1) (interleaved), every row is loaded once as two (tokens, N/2) tiles, and pairs
j >= S are rotated by a zero angle (passed through). Per pair, with x = q + bias (q read from
group h // (H / G)):

    xr_a = x_a cos - x_b sin,         xr_b = x_a sin + x_b cos
    dx_a = dxr_a cos + dxr_b sin,     dx_b = dxr_b cos - dxr_a sin      (rotation by -theta)
    dtheta_j = dxr_b xr_a - dxr_a xr_b                                 (q and k, every rank)

dq/dk are summed over the heads of a group in registers; bias gradients are per-block partial
sums over tokens, reduced in PyTorch; dtheta is written per (rank, token, head, pair).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from mamba3_kernels.eager_calls import apply_positional, eager_custom_op

from .core_scan import _core_bwd_op, _core_fwd_op, operand_dtype
from .core_segments import _multiprocessors, bwd_segment_len
from .core_tiles import _seq_bounds
from .fwd_tiles import _load_rot, _store_rot
from .launch import interpreting, run_kernel

__all__ = ["rotary_fwd", "rotary_bwd", "rot_core_scan", "angle_scan"]

_PI = tl.constexpr(3.141592653589793)
_TWO_PI = tl.constexpr(6.283185307179586)

# Launch choices of these passes, kept switchable so that a benchmark can time the variants on
# one warm machine (bench/bench_triton_backward.py --variants):
#   fast_trig:   hardware cos/sin after range reduction (GPU only; the interpreter keeps the
#                accurate functions) instead of the accurate library functions;
#   angle_step:  tokens per step of the angle scans; angle_warps: their warps;
#   angle_pairs: angle pairs per program of the angle scans (fewer: more programs in flight);
#   angle_programs: the angle scans' walks over a sequence are cut into segments (each then
#                starting from the sums of the segments before it, a separate pass) until there
#                are this many programs per multiprocessor (0: one walk per sequence);
#   angle_stages: software-pipelining depth of the angle scans' walks (1: none; 2 keeps the next
#                step's loads in flight during this one's cumulative sum: no gain measured);
#   (H100, SISO (1, 16384) fwd+bwd: hardware trig 17.3 -> 15.6 ms, 8 pairs per angle program
#   a further -0.8 ms, 256-token steps on 8 warps -0.4 ms. H200: whole 128-byte rows (32 pairs)
#   on 64-token steps, segmented to 16 programs per multiprocessor, then one warp per program
#   (each thread scans its own column in registers, no shared-memory rounds): the angle kernels
#   at SISO (1, 16384) 0.38 -> 0.41 -> 0.285 ms, at (8, 2048) 0.53 -> 0.37; docs/performance.md)
#   bwd_heads:   heads per rotary-backward program (0: the whole group); fewer heads mean more
#                programs, whose dq/dk partial sums over heads are then added atomically;
#   rot_tokens:  tokens per rotary program (its (tokens, N/2) fp32 pair tiles live in
#                registers; in the earlier per-column kernels 32 tokens on 4 warps spilled, 255
#                registers and a 1.9 KB stack in the backward, and 4 tokens took the rotary
#                backward at SISO (1, 16384) on the H100 from 4.65 to 1.46 ms); rot_warps: their
#                warps (2: fwd+bwd 9.59 -> 9.37 ms there). The pair tiles then took the two
#                passes to 0.92 and 0.28 ms (docs/performance.md). On an H200, 8 tokens per program
#                and 512-token angle steps: fwd+bwd 6.55 -> 6.21 ms (docs/performance.md); with
#                d theta from the core (the backward reads 16-bit rows, no q, k), 16 tokens:
#                SISO (1, 16384) 4.91 -> 4.85 ms, MIMO R=4 (8, 2048) 17.08 -> 16.64;
#   rot_bwd_maxnreg: register cap of the rotary backward (0: none). Uncapped it takes all 255
#                on 2 warps (four programs per multiprocessor); at 128 it spills ~350 B of stack
#                but eight programs share a multiprocessor: H200, rotary backward SISO 0.68 ->
#                0.58 ms, MIMO R=4 3.06 -> 2.74 (192 and 96 were slower; docs/performance.md);
#   rot_bwd_stages: software-pipelining depth of the rotary backward's loop over heads (1: none;
#                2 prefetches the next head's 16-bit gradient rows while this one unrotates).
KNOBS = {
    "fast_trig": True, "angle_step": 64, "angle_warps": 1, "angle_pairs": 32, "angle_stages": 1,
    "angle_programs": 16,
    "bwd_heads": 0, "rot_tokens": 16, "rot_warps": 2, "rot_bwd_maxnreg": 128,
    "rot_bwd_stages": 2,
}  # fmt: skip


@triton.jit
def _cos_sin(th, FAST: tl.constexpr):
    """cos, sin of angles in [0, 2 pi). FAST: reduced to [-pi, pi) and the hardware
    approximations (absolute error ~1e-6, as the fused forward uses); else the accurate library
    functions (~10k instructions per kernel)."""
    if FAST:
        red = th - tl.floor(th / _TWO_PI + 0.5) * _TWO_PI
        return libdevice.fast_cosf(red), libdevice.fast_sinf(red)
    else:
        return tl.cos(th), tl.sin(th)


@triton.jit
def _pair_cols(NH: tl.constexpr, HALVES: tl.constexpr):
    """Columns of the two members (a, b) of every pair j < NH: halves (j, NH + j), interleaved
    (2j, 2j + 1). Pairs at or past S are rotated by a zero angle, i.e. passed through."""
    jj = tl.arange(0, NH)
    if HALVES:
        return jj, NH + jj
    else:
        return 2 * jj, 2 * jj + 1


@triton.jit
def _biased_pairs(x_ptr, b_ptr, src, m2, NH: tl.constexpr, HALVES: tl.constexpr):
    """x + bias as the pair members (a, b): two (BT, NH) fp32 tiles; each row loaded once,
    contiguously (the interleaved split happens in registers)."""
    ca, cb = _pair_cols(NH, HALVES)
    xa, xb = _load_rot(x_ptr, src, m2, NH, NH, HALVES)
    xa = xa.to(tl.float32) + tl.load(b_ptr + ca)[None, :]
    xb = xb.to(tl.float32) + tl.load(b_ptr + cb)[None, :]
    return xa, xb


@triton.jit
def _add_pairs(ptr, row_off, a, b, rmask, NH: tl.constexpr, HALVES: tl.constexpr):
    """Atomically add pair tiles a, b (M, NH) into rows of N values (inverse layout of
    _load_rot)."""
    if HALVES:
        j = tl.arange(0, NH)
        tl.atomic_add(ptr + row_off + j[None, :], a, mask=rmask, sem="relaxed")
        tl.atomic_add(ptr + row_off + NH + j[None, :], b, mask=rmask, sem="relaxed")
    else:
        jn = tl.arange(0, 2 * NH)
        x = tl.reshape(tl.join(a, b), (a.shape[0], 2 * NH))
        tl.atomic_add(ptr + row_off + jn[None, :], x, mask=rmask, sem="relaxed")


@triton.jit
def _rot_fwd_kernel(
    q_ptr, k_ptr, qb_ptr, kb_ptr, th_ptr, qr_ptr, kr_ptr, T, H, G,
    N: tl.constexpr, S: tl.constexpr, R: tl.constexpr, BT: tl.constexpr, HALVES: tl.constexpr,
    FAST: tl.constexpr, PAIR_MAJOR: tl.constexpr,
):  # fmt: skip
    """qr, kr (T, R, H, N) = Rot(theta) (q, k (T, R, G, N) + bias (R, H, N)); grid (T/BT, R*H).
    Works on (BT, N/2) tiles of pair members: every value is
    loaded once (no partner gather) and the trig is evaluated per pair. PAIR_MAJOR: qr, kr
    columns in pair-member order (all first members, then all second members: the halves
    layout) whatever q's layout (see _RotCore)."""
    NH: tl.constexpr = N // 2
    pid_t, rh = tl.program_id(0), tl.program_id(1)
    r = rh // H
    h = rh % H
    g = h // (H // G)
    t = (pid_t * BT + tl.arange(0, BT)).to(tl.int64)
    m2 = (t < T)[:, None]
    jj = tl.arange(0, NH)
    src = (((t * R + r) * G + g) * N)[:, None]
    boff = (r * H + h) * N
    th = tl.load(th_ptr + (t * H + h)[:, None] * S + jj[None, :], mask=m2 & (jj < S)[None, :],
                 other=0.0)  # fmt: skip
    c, s = _cos_sin(th, FAST)
    dst = (((t * R + r) * H + h) * N)[:, None]
    xa, xb = _biased_pairs(q_ptr, qb_ptr + boff, src, m2, NH, HALVES)
    ty = qr_ptr.dtype.element_ty
    _store_rot(qr_ptr, dst, (xa * c - xb * s).to(ty), (xa * s + xb * c).to(ty), m2, NH, NH,
               HALVES or PAIR_MAJOR)  # fmt: skip
    xa, xb = _biased_pairs(k_ptr, kb_ptr + boff, src, m2, NH, HALVES)
    _store_rot(kr_ptr, dst, (xa * c - xb * s).to(ty), (xa * s + xb * c).to(ty), m2, NH, NH,
               HALVES or PAIR_MAJOR)  # fmt: skip


@triton.jit
def _grad_pairs(d_ptr, dst, m2, NH: tl.constexpr, HALVES: tl.constexpr):
    """One operand's rotated gradient rows (any float dtype; HALVES: their column layout, the
    operands' (rotary_fwd's pair_major)) as fp32 pair-member tiles ga, gb (BT, NH)."""
    ga, gb = _load_rot(d_ptr, dst, m2, NH, NH, HALVES)
    return ga.to(tl.float32), gb.to(tl.float32)


@triton.jit
def _unrotate(ga, gb, c, s):
    """dx = Rot(-theta) dxr per pair: (dxa, dxb)."""
    return ga * c + gb * s, gb * c - ga * s


@triton.jit
def _dtheta(ga, gb, xa, xb, c, s, XR: tl.constexpr):
    """dtheta = dxr_b xr_a - dxr_a xr_b of one operand (x = its biased rows, ga, gb its rotated
    gradient). xr is rounded as _rot_fwd_kernel stored it (XR: 0 fp32, 1 bf16, 2 fp16): the
    dtheta terms of q and k then come from the very operands the core multiplied, so the two
    members of every (query, key) pair cancel to fp32 rounding in the reverse cumulative sum
    over tokens that turns dtheta into d dt (with the unrounded values they differ by the
    operands' rounding, and that difference accumulates over the sequence)."""
    xra = xa * c - xb * s
    xrb = xa * s + xb * c
    if XR == 1:
        xra = xra.to(tl.bfloat16).to(tl.float32)
        xrb = xrb.to(tl.bfloat16).to(tl.float32)
    elif XR == 2:
        xra = xra.to(tl.float16).to(tl.float32)
        xrb = xrb.to(tl.float16).to(tl.float32)
    return gb * xra - ga * xrb


@triton.jit
def _add4(a0, a1, a2, a3, b0, b1, b2, b3):
    """Combine of a reduction over four tiles at once: their elementwise sums."""
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3


@triton.jit
def _operand_grads(
    d_ptr, x_ptr, xb_ptr, src, dst, m2, c, s,
    NH: tl.constexpr, HALVES: tl.constexpr, XR: tl.constexpr, GIVEN: tl.constexpr,
    PAIR_MAJOR: tl.constexpr,
):  # fmt: skip
    """One operand's (q's or k's) rows of one head: the unrotated gradient pair tiles dxa, dxb
    and d theta's part formed from x + bias rotated (with GIVEN, d theta comes whole from the
    core backward: no part, 0)."""
    ga, gb = _grad_pairs(d_ptr, dst, m2, NH, HALVES or PAIR_MAJOR)
    dxa, dxb = _unrotate(ga, gb, c, s)
    if GIVEN:
        part = 0.0
    else:
        xa, xb = _biased_pairs(x_ptr, xb_ptr, src, m2, NH, HALVES)
        part = _dtheta(ga, gb, xa, xb, c, s, XR)
    return dxa, dxb, part


@triton.jit
def _rot_bwd_kernel(
    dqr_ptr, dkr_ptr, q_ptr, k_ptr, qb_ptr, kb_ptr, th_ptr,
    dq_ptr, dk_ptr, dqb_ptr, dkb_ptr, dth_ptr, T, H, G,
    N: tl.constexpr, S: tl.constexpr, R: tl.constexpr, BT: tl.constexpr, HALVES: tl.constexpr,
    XR: tl.constexpr, FAST: tl.constexpr, HB: tl.constexpr,
    ATOMIC: tl.constexpr, GIVEN: tl.constexpr, PAIR_MAJOR: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Gradients of the rotary prep; grid (T/BT, R*H/HB), each program loops over HB heads of
    one group. dqr, dkr (T, R, H, N) (fp32, or with GIVEN any float) -> dq, dk (T, R, G, N)
    fp32 (ATOMIC: zero-initialised, the programs of a group add their partial sums); dqb, dkb
    (T/BT, R, H, N) partial sums over the block's tokens; dth (R, T, H, S) fp32. GIVEN: the
    core backward formed d theta (core_scan's DTH), so neither q, k, their rotation nor dth is
    touched here. PAIR_MAJOR: dqr, dkr in pair-member column order (rotary_fwd's). The four
    bias column sums of a head share one reduction (its cross-warp exchange and barrier: a
    third of this kernel's stalls when they were four, docs/performance.md)."""
    NH: tl.constexpr = N // 2
    pid_t, rgb = tl.program_id(0), tl.program_id(1)
    HG = H // G
    nhb = HG // HB
    r = rgb // (G * nhb)
    g = (rgb // nhb) % G
    h0 = g * HG + (rgb % nhb) * HB
    t = (pid_t * BT + tl.arange(0, BT)).to(tl.int64)
    m2 = (t < T)[:, None]
    jj = tl.arange(0, NH)
    ca, cb = _pair_cols(NH, HALVES)
    src = (((t * R + r) * G + g) * N)[:, None]
    qa = tl.zeros((BT, NH), dtype=tl.float32)
    qb = tl.zeros((BT, NH), dtype=tl.float32)
    ka = tl.zeros((BT, NH), dtype=tl.float32)
    kb = tl.zeros((BT, NH), dtype=tl.float32)
    for hh in tl.range(0, HB, num_stages=STAGES):
        h = h0 + hh
        boff = (r * H + h) * N
        th = tl.load(th_ptr + (t * H + h)[:, None] * S + jj[None, :],
                     mask=m2 & (jj < S)[None, :], other=0.0)  # fmt: skip
        c, s = _cos_sin(th, FAST)
        dst = (((t * R + r) * H + h) * N)[:, None]
        qxa, qxb, tq = _operand_grads(dqr_ptr, q_ptr, qb_ptr + boff, src, dst, m2, c, s, NH,
                                      HALVES, XR, GIVEN, PAIR_MAJOR)  # fmt: skip
        kxa, kxb, tk = _operand_grads(dkr_ptr, k_ptr, kb_ptr + boff, src, dst, m2, c, s, NH,
                                      HALVES, XR, GIVEN, PAIR_MAJOR)  # fmt: skip
        qa += qxa
        qb += qxb
        ka += kxa
        kb += kxb
        sqa, sqb, ska, skb = tl.reduce((qxa, qxb, kxa, kxb), 0, _add4)
        pb = (pid_t.to(tl.int64) * R * H + r * H + h) * N
        tl.store(dqb_ptr + pb + ca, sqa)
        tl.store(dqb_ptr + pb + cb, sqb)
        tl.store(dkb_ptr + pb + ca, ska)
        tl.store(dkb_ptr + pb + cb, skb)
        if not GIVEN:
            toff = ((r * T + t) * H + h) * S
            tl.store(dth_ptr + toff[:, None] + jj[None, :], tq + tk,
                     mask=m2 & (jj < S)[None, :])  # fmt: skip
    if ATOMIC:
        _add_pairs(dq_ptr, src, qa, qb, m2, NH, HALVES)
        _add_pairs(dk_ptr, src, ka, kb, m2, NH, HALVES)
    else:
        _store_rot(dq_ptr, src, qa, qb, m2, NH, NH, HALVES)
        _store_rot(dk_ptr, src, ka, kb, m2, NH, NH, HALVES)


@triton.jit
def _angle_rate(ang, dt):
    """d theta / d token: pi tanh(angles) dt (tanh through the sigmoid)."""
    return (2.0 * tl.sigmoid(2.0 * ang) - 1.0) * _PI * dt[:, None]


@triton.jit
def _wrap(theta):
    """theta reduced to [0, 2 pi)."""
    return theta - tl.floor(theta / _TWO_PI) * _TWO_PI


@triton.jit
def _angle_segment(pid_seg, seqlen, SEG):
    """(first token, end) of this program's segment of the sequence (SEG tokens each)."""
    lo = pid_seg * SEG
    return lo, tl.minimum(lo + SEG, seqlen)


@triton.jit
def _angle_sums_kernel(
    x_ptr, dt_ptr, sums_ptr, L, H, SEG,
    S: tl.constexpr, SP: tl.constexpr, BL: tl.constexpr, RATE: tl.constexpr,
):  # fmt: skip
    """Per segment of SEG tokens of a (sequence, head): the sum over its tokens of the angle rate
    pi tanh(angles) dt, reduced modulo 2 pi (RATE: the forward's carries), or of x itself (the
    backward's, x = d theta) -> sums (B, H, NSEG - 1, S) fp32. Grid (B H, S / SP, NSEG - 1):
    the forward needs the carries of all but the last segment (RATE: segments 0 .. NSEG - 2),
    the backward of all but the first (segments 1 .. NSEG - 1)."""
    pid = tl.program_id(0)
    seq = pid // H
    h = pid % H
    bos, seqlen, coef_base = _seq_bounds(x_ptr, seq, h, L, H, False)
    g = tl.program_id(2) + (0 if RATE else 1)
    lo, hi = _angle_segment(g, seqlen, SEG)
    jj = tl.program_id(1) * SP + tl.arange(0, SP)
    js = jj < S
    acc = tl.zeros((SP,), dtype=tl.float32)
    for c0 in range(lo, hi, BL):
        t = c0 + tl.arange(0, BL)
        valid = t < hi
        off = ((bos + t) * H + h)[:, None] * S + jj[None, :]
        x = tl.load(x_ptr + off, mask=valid[:, None] & js[None, :], other=0.0)
        if RATE:
            dt = tl.load(dt_ptr + coef_base + t, mask=valid, other=0.0)
            acc = _wrap(acc + tl.sum(_angle_rate(x, dt), axis=0))
        else:
            acc += tl.sum(x, axis=0)
    row = (seq.to(tl.int64) * H + h) * tl.num_programs(2) + tl.program_id(2)
    tl.store(sums_ptr + row * S + jj, acc, mask=js)


@triton.jit
def _angle_fwd_kernel(
    ang_ptr, dt_ptr, a0_ptr, cu_ptr, sums_ptr, th_ptr, L, H, SEG,
    S: tl.constexpr, SP: tl.constexpr, BL: tl.constexpr, VARLEN: tl.constexpr,
    HAS_A0: tl.constexpr, SEGMENTED: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """theta (B, L, H, S) fp32 = angle0 + cumsum over the sequence of pi tanh(angles) dt, reduced
    modulo 2 pi (the running angle is kept in [0, 2 pi), as the fused forward does);
    grid (sequences * H, S / SP, NSEG): one program per (sequence, head, block of SP pairs,
    segment of SEG tokens). SEGMENTED: a segment starts from the carries of the segments before
    it (sums_ptr (B, H, NSEG - 1, S), _angle_sums_kernel); else one segment per sequence."""
    pid = tl.program_id(0)
    seq = pid // H
    h = pid % H
    bos, seqlen, coef_base = _seq_bounds(cu_ptr, seq, h, L, H, VARLEN)
    jj = tl.program_id(1) * SP + tl.arange(0, SP)  # this program's angle pairs
    js = jj < S
    if HAS_A0:
        theta = tl.load(a0_ptr + (seq.to(tl.int64) * H + h) * S + jj, mask=js, other=0.0)
    else:
        theta = tl.zeros((SP,), dtype=tl.float32)
    if SEGMENTED:
        g = tl.program_id(2)
        lo, hi = _angle_segment(g, seqlen, SEG)
        carries = sums_ptr + (seq.to(tl.int64) * H + h) * (tl.num_programs(2) - 1) * S + jj
        for gi in range(0, g):
            theta += tl.load(carries + gi * S, mask=js, other=0.0)
    else:
        lo, hi = 0, seqlen
    theta = _wrap(theta)
    for c0 in tl.range(lo, hi, BL, num_stages=STAGES):
        t = c0 + tl.arange(0, BL)
        valid = t < hi
        m2 = valid[:, None] & js[None, :]
        off = ((bos + t) * H + h)[:, None] * S + jj[None, :]
        ang = tl.load(ang_ptr + off, mask=m2, other=0.0)
        dt = tl.load(dt_ptr + coef_base + t, mask=valid, other=0.0)
        rate = _angle_rate(ang, dt)
        tl.store(th_ptr + off, _wrap(theta[None, :] + tl.cumsum(rate, axis=0)), mask=m2)
        theta = _wrap(theta + tl.sum(rate, axis=0))


@triton.jit
def _angle_bwd_kernel(
    gth_ptr, ang_ptr, dt_ptr, cu_ptr, sums_ptr, dang_ptr, ddt_ptr, da0_ptr, L, H, SEG,
    S: tl.constexpr, SP: tl.constexpr, BL: tl.constexpr, VARLEN: tl.constexpr,
    ATOMIC: tl.constexpr, SEGMENTED: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Backward of the angle scan: with G_t = sum_{s >= t} dtheta_s (reverse cumsum within the
    sequence), d angles_t = G_t pi (1 - tanh^2) dt_t, d dt_t = pi sum_j G_t tanh_t,
    d angle0 = G at the first token. Walks its segment's chunks from the end, starting from the
    sums of d theta over the segments after it (SEGMENTED: sums_ptr (B, H, NSEG - 1, S) holds
    segments 1 .. NSEG - 1); grid as the forward's."""
    pid = tl.program_id(0)
    seq = pid // H
    h = pid % H
    bos, seqlen, coef_base = _seq_bounds(cu_ptr, seq, h, L, H, VARLEN)
    jj = tl.program_id(1) * SP + tl.arange(0, SP)  # this program's angle pairs
    js = jj < S
    carry = tl.zeros((SP,), dtype=tl.float32)  # sum of dtheta after the current chunk
    if SEGMENTED:
        g = tl.program_id(2)
        lo, hi = _angle_segment(g, seqlen, SEG)
        nseg = tl.num_programs(2)
        later = sums_ptr + (seq.to(tl.int64) * H + h) * (nseg - 1) * S + jj
        for gi in range(g + 1, nseg):
            carry += tl.load(later + (gi - 1) * S, mask=js, other=0.0)
    else:
        g = 0
        lo, hi = 0, seqlen
    nch = (hi - lo + BL - 1) // BL
    for i in tl.range(0, nch, num_stages=STAGES):
        c0 = lo + (nch - 1 - i) * BL
        t = c0 + tl.arange(0, BL)
        valid = t < hi
        m2 = valid[:, None] & js[None, :]
        off = ((bos + t) * H + h)[:, None] * S + jj[None, :]
        g_th = tl.load(gth_ptr + off, mask=m2, other=0.0)
        tot = tl.sum(g_th, axis=0)
        rc = carry[None, :] + tot[None, :] - tl.cumsum(g_th, axis=0) + g_th
        carry = carry + tot
        ang = tl.load(ang_ptr + off, mask=m2, other=0.0)
        dt = tl.load(dt_ptr + coef_base + t, mask=valid, other=0.0)
        th = 2.0 * tl.sigmoid(2.0 * ang) - 1.0
        tl.store(dang_ptr + off, rc * ((1.0 - th * th) * _PI) * dt[:, None], mask=m2)
        ddt = tl.sum(rc * th, axis=1) * _PI
        if ATOMIC:  # the pair blocks of one (sequence, head) share d dt (zero-initialised)
            tl.atomic_add(ddt_ptr + coef_base + t, ddt, mask=valid, sem="relaxed")
        else:
            tl.store(ddt_ptr + coef_base + t, ddt, mask=valid)
    if g == 0:
        tl.store(da0_ptr + (seq.to(tl.int64) * H + h) * S + jj, carry, mask=js)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _fast_trig() -> bool:
    return KNOBS["fast_trig"] and not interpreting()


def rotary_fwd(q, k, qb, kb, theta, halves: bool, out_dtype: torch.dtype, pair_major=False):
    """q, k (B, L, R, G, N) any float; qb, kb (R, H, N) fp32; theta (B, L, H, S) fp32.
    Returns qr, kr (B, L, R, H, N) in out_dtype; with pair_major their columns in pair-member
    order (the halves layout) whatever q's layout."""
    B, L, R, G, N = q.shape
    H, S = qb.shape[1], theta.shape[-1]
    qr = torch.empty((B, L, R, H, N), dtype=out_dtype, device=q.device)
    kr = torch.empty_like(qr)
    T = B * L
    if T > 0:
        bt = KNOBS["rot_tokens"]
        run_kernel(
            _rot_fwd_kernel, (triton.cdiv(T, bt), R * H),
            q, k, qb, kb, theta, qr, kr, T, H, G, N=N, S=S, R=R, BT=bt, HALVES=halves,
            FAST=_fast_trig(), PAIR_MAJOR=pair_major,
            num_warps=KNOBS["rot_warps"],
        )  # fmt: skip
    return qr, kr


_XR = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def rotary_bwd(dqr, dkr, q, k, qb, kb, theta, halves: bool, xr_dtype=torch.float32,
               dtheta_given=False, pair_major=False):  # fmt: skip
    """Backward of rotary_fwd: dqr, dkr (B, L, R, H, N) fp32 -> dq, dk (B, L, R, G, N) fp32,
    dqb, dkb (R, H, N) fp32, dtheta (B, L, H, S) fp32. xr_dtype: the out_dtype rotary_fwd gave
    the core (dtheta reads the rotated values rounded to it). dtheta_given: the core backward
    formed d theta (core_scan.core_bwd with rotary), so it is not computed here (an empty (0,)
    tensor is returned in its place) and dqr, dkr may be 16-bit. pair_major: dqr, dkr in
    rotary_fwd's pair-member column order."""
    B, L, R, G, N = q.shape
    H, S = qb.shape[1], theta.shape[-1]
    T = B * L
    f32 = torch.float32
    dev = q.device
    HG = H // G
    hb = math.gcd(KNOBS["bwd_heads"] or HG, HG)  # heads per program, a divisor of HG
    alloc = torch.zeros if hb < HG else torch.empty
    dq = alloc((B, L, R, G, N), dtype=f32, device=dev)
    dk = alloc((B, L, R, G, N), dtype=f32, device=dev)
    bt = _bwd_tokens(T, R * H // hb, dev)
    nblk = triton.cdiv(T, bt)
    # per-block bias partial sums: every (block, rank, head) row is written (masked tokens add 0)
    pq = torch.empty((nblk, R, H, N), dtype=f32, device=dev)
    pk = torch.empty_like(pq)
    dth = torch.empty((0,) if dtheta_given else (R, B, L, H, S), dtype=f32, device=dev)
    if T > 0:
        run_kernel(
            _rot_bwd_kernel, (nblk, R * H // hb),
            dqr, dkr, q, k, qb, kb, theta, dq, dk, pq, pk, dth if not dtheta_given else dq,
            T, H, G,
            N=N, S=S, R=R, BT=bt, HALVES=halves, XR=_XR[xr_dtype], FAST=_fast_trig(),
            HB=hb, ATOMIC=hb < HG, GIVEN=dtheta_given,
            PAIR_MAJOR=pair_major, STAGES=KNOBS["rot_bwd_stages"],
            num_warps=KNOBS["rot_warps"],
            **_cap("rot_bwd_maxnreg"),
        )  # fmt: skip
    else:
        dth.zero_()
        pq.zero_()
        pk.zero_()
    if dtheta_given:
        return dq, dk, pq.sum(0), pk.sum(0), dth
    return dq, dk, pq.sum(0), pk.sum(0), dth.sum(0) if R > 1 else dth[0]


def _bwd_tokens(T: int, groups: int, device: torch.device) -> int:
    """Tokens per rotary-backward program: KNOBS["rot_tokens"], halved (to 8 at least, the
    previous default) while the T / tokens x groups programs would not give three per
    multiprocessor. Each program walks its heads one after another, so with few programs the
    pass takes as long as a whole wave
    (H200, SISO (1, 2048) at 16 tokens: 128 programs, fwd+bwd 2.39 -> 2.93 ms; MIMO R=4
    (1, 2048), 512 programs, gained from 16 tokens)."""
    bt = KNOBS["rot_tokens"]
    if device.type != "cuda":
        return bt
    want = 3 * _multiprocessors(device)
    while bt > 8 and triton.cdiv(T, bt) * groups < want:
        bt //= 2
    return bt


def _cap(knob: str) -> dict:
    """A register cap knob as a launch option (none when it is 0)."""
    cap = KNOBS[knob]
    return {"maxnreg": cap} if cap else {}


def _angle_launch(S: int) -> tuple[int, int, dict]:
    """(pairs per program, tokens per step, launch options: warps and pipelining depth) of the
    angle scans, from KNOBS."""
    sp = min(triton.next_power_of_2(S), triton.next_power_of_2(KNOBS["angle_pairs"]))
    return sp, KNOBS["angle_step"], {"num_warps": KNOBS["angle_warps"],
                                     "STAGES": KNOBS["angle_stages"]}  # fmt: skip


def _angle_segments(nseq: int, H: int, S: int, L: int, varlen: bool, device) -> tuple[int, int]:
    """(segments per sequence, tokens per segment) of the angle scans: a (sequence, head, pair
    block)'s walk over L tokens is cut into segments (whole steps each) until the programs
    reach KNOBS["angle_programs"] per multiprocessor (0: never; varlen: never, its sequences'
    lengths are on the device)."""
    sp, step, _ = _angle_launch(S)
    per_sm = KNOBS["angle_programs"]
    if varlen or per_sm == 0 or L <= step:
        return 1, L
    sms = _multiprocessors(device) if device.type == "cuda" else 1
    blocks = nseq * H * triton.cdiv(S, sp)
    nseg = min(triton.cdiv(per_sm * sms, blocks), triton.cdiv(L, step))
    seg = triton.cdiv(triton.cdiv(L, max(nseg, 1)), step) * step
    return triton.cdiv(L, seg), seg


def _angle_sums(x, dt, nseg: int, seg: int, rate: bool) -> Tensor:
    """Per-segment sums of the angle rates (rate: segments 0 .. nseg - 2, the forward's carries)
    or of x = d theta (segments 1 .. nseg - 1, the backward's): (B, H, nseg - 1, S) fp32."""
    B, L, H, S = x.shape
    sp, step, opts = _angle_launch(S)
    sums = torch.empty((B, H, nseg - 1, S), dtype=torch.float32, device=x.device)
    run_kernel(
        _angle_sums_kernel, (B * H, triton.cdiv(S, sp), nseg - 1), x, dt, sums, L, H, seg,
        S=S, SP=sp, BL=step, RATE=rate, num_warps=opts["num_warps"],
    )  # fmt: skip
    return sums


def angle_fwd(angles, dt, angle0, cu_seqlens, nseq: int):
    """angles (B, L, H, S) fp32, dt (B, H, L) fp32, angle0 (nseq, H, S) fp32 or None,
    cu_seqlens (nseq + 1,) int32 or None. Returns theta (B, L, H, S) fp32 in [0, 2 pi)."""
    B, L, H, S = angles.shape
    theta = torch.empty_like(angles)
    if L > 0 and S > 0:
        sp, step, opts = _angle_launch(S)
        nseg, seg = _angle_segments(nseq, H, S, L, cu_seqlens is not None, angles.device)
        sums = _angle_sums(angles, dt, nseg, seg, rate=True) if nseg > 1 else dt
        run_kernel(
            _angle_fwd_kernel, (nseq * H, triton.cdiv(S, sp), nseg),
            angles, dt, angle0 if angle0 is not None else dt,
            cu_seqlens if cu_seqlens is not None else dt, sums, theta, L, H, seg,
            S=S, SP=sp, BL=step, VARLEN=cu_seqlens is not None,
            HAS_A0=angle0 is not None, SEGMENTED=nseg > 1, **opts,
        )  # fmt: skip
    return theta


def angle_bwd(gtheta, angles, dt, cu_seqlens, nseq: int):
    """Backward of angle_fwd: (d angles (B, L, H, S), d dt (B, H, L), d angle0 (nseq, H, S)),
    all fp32."""
    B, L, H, S = angles.shape
    f32, dev = torch.float32, angles.device
    if L == 0 or S == 0:
        return torch.zeros_like(angles), torch.zeros_like(dt), torch.zeros((nseq, H, S), dtype=f32,
                                                                           device=dev)  # fmt: skip
    sp, step, opts = _angle_launch(S)
    atomic = sp < S
    nseg, seg = _angle_segments(nseq, H, S, L, cu_seqlens is not None, dev)
    sums = _angle_sums(gtheta, dt, nseg, seg, rate=False) if nseg > 1 else dt
    # The kernel writes every element of d angles and d angle0 (each token belongs to one
    # sequence: cu_seqlens ends at L; d angle0 from each sequence's first segment), and of
    # d dt unless several pair blocks add into it.
    dang = torch.empty_like(angles)
    ddt = torch.zeros_like(dt) if atomic else torch.empty_like(dt)
    da0 = torch.empty((nseq, H, S), dtype=f32, device=dev)
    run_kernel(
        _angle_bwd_kernel, (nseq * H, triton.cdiv(S, sp), nseg),
        gtheta, angles, dt, cu_seqlens if cu_seqlens is not None else dt, sums, dang, ddt, da0,
        L, H, seg, S=S, SP=sp, BL=step, VARLEN=cu_seqlens is not None, ATOMIC=atomic,
        SEGMENTED=nseg > 1, **opts,
    )  # fmt: skip
    return dang, ddt, da0


# Custom ops (functorch unwraps tensors before an op's kernel runs; see core_scan).
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@eager_custom_op("mamba3_triton::rotary_fwd")
def _rotary_fwd_op(
    q: Tensor, k: Tensor, qb: Tensor, kb: Tensor, theta: Tensor, halves: bool, out_dtype: str,
    pair_major: bool = False,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    return rotary_fwd(q, k, qb, kb, theta, halves, _DTYPES[out_dtype], pair_major)


@_rotary_fwd_op.register_fake
def _rotary_fwd_fake(q, k, qb, kb, theta, halves, out_dtype, pair_major=False):
    B, L, R, G, N = q.shape
    shape = (B, L, R, qb.shape[1], N)
    return q.new_empty(shape, dtype=_DTYPES[out_dtype]), q.new_empty(
        shape, dtype=_DTYPES[out_dtype]
    )


@eager_custom_op("mamba3_triton::rotary_bwd")
def _rotary_bwd_op(
    dqr: Tensor, dkr: Tensor, q: Tensor, k: Tensor, qb: Tensor, kb: Tensor, theta: Tensor,
    halves: bool, xr_dtype: str, dtheta_given: bool = False, pair_major: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    return rotary_bwd(dqr.contiguous(), dkr.contiguous(), q, k, qb, kb, theta, halves,
                      _DTYPES[xr_dtype], dtheta_given, pair_major)  # fmt: skip


@_rotary_bwd_op.register_fake
def _rotary_bwd_fake(dqr, dkr, q, k, qb, kb, theta, halves, xr_dtype, dtheta_given=False,
                     pair_major=False):  # fmt: skip
    f32 = torch.float32
    e = q.new_empty
    return (
        e(q.shape, dtype=f32),
        e(q.shape, dtype=f32),
        e(qb.shape, dtype=f32),
        e(kb.shape, dtype=f32),
        e((0,) if dtheta_given else theta.shape, dtype=f32),
    )


@eager_custom_op("mamba3_triton::angle_fwd")
def _angle_fwd_op(
    angles: Tensor, dt: Tensor, angle0: Tensor | None, cu_seqlens: Tensor | None, nseq: int
) -> Tensor:
    return angle_fwd(angles, dt, angle0, cu_seqlens, nseq)


@_angle_fwd_op.register_fake
def _angle_fwd_fake(angles, dt, angle0, cu_seqlens, nseq):
    return torch.empty_like(angles)


@eager_custom_op("mamba3_triton::angle_bwd")
def _angle_bwd_op(
    gtheta: Tensor, angles: Tensor, dt: Tensor, cu_seqlens: Tensor | None, nseq: int
) -> tuple[Tensor, Tensor, Tensor]:
    return angle_bwd(gtheta.contiguous(), angles, dt, cu_seqlens, nseq)


@_angle_bwd_op.register_fake
def _angle_bwd_fake(gtheta, angles, dt, cu_seqlens, nseq):
    H, S = angles.shape[2], angles.shape[3]
    return torch.empty_like(angles), torch.empty_like(dt), angles.new_empty((nseq, H, S))


class _AngleScan(torch.autograd.Function):
    """theta = angle0 + cumsum(pi tanh(angles) dt) mod 2 pi, with its hand-written backward (the
    modulo is a constant shift: its gradient is the identity)."""

    @staticmethod
    def forward(angles, dt, angle0, cu_seqlens, nseq):
        return _angle_fwd_op(angles, dt, angle0, cu_seqlens, nseq)

    @staticmethod
    def setup_context(ctx, inputs, output):
        angles, dt, angle0, cu_seqlens, nseq = inputs
        ctx.save_for_backward(angles, dt, cu_seqlens)
        ctx.nseq = nseq
        ctx.has_a0 = angle0 is not None

    @staticmethod
    def backward(ctx, gtheta):
        angles, dt, cu_seqlens = ctx.saved_tensors
        dang, ddt, da0 = _angle_bwd_op(gtheta, angles, dt, cu_seqlens, ctx.nseq)
        return dang, ddt, da0 if ctx.has_a0 else None, None, None


def angle_scan(angles, dt, angle0, cu_seqlens, nseq: int):
    """Differentiable cumulative angles: angles (B, L, H, S), dt (B, H, L), angle0 (nseq, H, S)
    or None -> theta (B, L, H, S) fp32 in [0, 2 pi), per sequence when cu_seqlens is given."""
    angles = angles.float().contiguous()
    dt = dt.float().contiguous()
    angle0 = angle0.float().contiguous() if angle0 is not None else None
    return apply_positional(_AngleScan, angles, dt, angle0, cu_seqlens, nseq)


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
    needs them side by side; interleaved pairs read as strided columns made it 3x slower on
    an H200, docs/performance.md)."""

    @staticmethod
    def forward(q, k, qb, kb, theta, vr, adt, w, gam, s0, D, cu, halves, need_y, chunk,
                dot_dtype, nw, ns, nseq, split_n, segment, fwd_chunk):  # fmt: skip
        op_dtype = dot_dtype if dot_dtype in ("bfloat16", "float16") else "float32"
        qr, kr = _rotary_fwd_op(q, k, qb, kb, theta, halves, op_dtype, True)
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
        ctx.flags = inputs[14:-1]  # (the backward's; the forward chunk is the recompute's)

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
                                               in_core, True)  # fmt: skip
        if in_core:
            dth = dth_core
        return (dq.to(q.dtype), dk.to(k.dtype), dqb, dkb, dth, dv.to(vr.dtype),
                dadt.to(adt.dtype), dw.to(w.dtype), dg.to(gam.dtype),
                ds0 if s0 is not None else None, dD if D is not None else None,
                *([None] * 11))  # fmt: skip


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
    epilogue backward never reads y needs."""
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
                                   fwd_chunk)  # fmt: skip
    return y, sf


def compile_kernels(
    R: int, N: int, S: int, halves: bool, dtype: str = "bf16", target=None, fast: bool = True,
    pairs: int = 32, bwd_heads: int = 4, atomic: bool = True,
    tokens: int = 32, given: bool = False, pair_major: bool = True, segmented: bool = True,
):  # fmt: skip
    """Compile the rotary and angle-scan forward and backward kernels ahead of time (no GPU
    needed) for ``target`` (default sm_90); fast: hardware trig in the rotary kernels; pairs:
    angle pairs per angle-scan program; bwd_heads, atomic: heads per rotary-backward program
    and whether those add into dq/dk; tokens: tokens per rotary
    program; given: the backward whose d theta the core backward formed (it takes 16-bit dqr,
    dkr and leaves d theta alone); pair_major: qr, kr (and their gradients) in the core's
    pair-member column order, as the backward's recompute runs them; segmented: the angle scans
    walk segments of the sequence from carries (_angle_segments; their sums kernel is then also
    built). Returns {name: compiled}."""
    from triton.backends.compiler import GPUTarget

    target = target or GPUTarget("cuda", 90, 64)
    consts = dict(N=N, S=S, R=R, BT=tokens, HALVES=halves, FAST=fast, PAIR_MAJOR=pair_major)
    ints = dict(T="i32", H="i32", G="i32")
    fwd = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "qb_ptr": "*fp32", "kb_ptr": "*fp32",
           "th_ptr": "*fp32", "qr_ptr": f"*{dtype}", "kr_ptr": f"*{dtype}"}  # fmt: skip
    bwd = {"dqr_ptr": "*fp32", "dkr_ptr": "*fp32", "q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}",
           "qb_ptr": "*fp32", "kb_ptr": "*fp32", "th_ptr": "*fp32", "dq_ptr": "*fp32",
           "dk_ptr": "*fp32", "dqb_ptr": "*fp32", "dkb_ptr": "*fp32",
           "dth_ptr": "*fp32"}  # fmt: skip
    if given:
        bwd.update(dqr_ptr=f"*{dtype}", dkr_ptr=f"*{dtype}")
    out = {}
    xr = {"bf16": 1, "fp16": 2}.get(dtype, 0)
    fwd_fn, bwd_fn = _rot_fwd_kernel, _rot_bwd_kernel
    bwd_c = {**consts, "XR": xr, "HB": bwd_heads, "ATOMIC": atomic, "GIVEN": given,
             "STAGES": KNOBS["rot_bwd_stages"]}  # fmt: skip
    launches = (("rotary_fwd", fwd_fn, fwd, consts), ("rotary_bwd", bwd_fn, bwd, bwd_c))
    for name, fn, sig, c in launches:
        sig = {**sig, **ints, **{k: "constexpr" for k in c}}
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=c)
        opts = {
            "num_warps": KNOBS["rot_warps"],
            **(_cap("rot_bwd_maxnreg") if fn is bwd_fn else {}),
        }
        out[name] = triton.compile(src, target=target, options=opts)
    sp = min(triton.next_power_of_2(S), pairs)
    ac = dict(S=S, SP=sp, BL=KNOBS["angle_step"], VARLEN=False, STAGES=KNOBS["angle_stages"],
              SEGMENTED=segmented)  # fmt: skip
    afwd = {"ang_ptr": "*fp32", "dt_ptr": "*fp32", "a0_ptr": "*fp32", "cu_ptr": "*i32",
            "sums_ptr": "*fp32", "th_ptr": "*fp32", "L": "i32", "H": "i32",
            "SEG": "i32"}  # fmt: skip
    abwd = {"gth_ptr": "*fp32", "ang_ptr": "*fp32", "dt_ptr": "*fp32", "cu_ptr": "*i32",
            "sums_ptr": "*fp32", "dang_ptr": "*fp32", "ddt_ptr": "*fp32", "da0_ptr": "*fp32",
            "L": "i32", "H": "i32", "SEG": "i32"}  # fmt: skip
    asums = {"x_ptr": "*fp32", "dt_ptr": "*fp32", "sums_ptr": "*fp32", "L": "i32", "H": "i32",
             "SEG": "i32"}  # fmt: skip
    angle_launches = [
        ("angle_fwd", _angle_fwd_kernel, afwd, {**ac, "HAS_A0": True}),
        ("angle_bwd", _angle_bwd_kernel, abwd, {**ac, "ATOMIC": sp < S}),
    ]
    if segmented:
        sc = dict(S=S, SP=sp, BL=KNOBS["angle_step"], RATE=True)
        angle_launches.append(("angle_sums", _angle_sums_kernel, asums, sc))
    for name, fn, sig, c in angle_launches:
        sig = {**sig, **{k: "constexpr" for k in c}}
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=c)
        out[name] = triton.compile(src, target=target, options={"num_warps": KNOBS["angle_warps"]})
    return out
