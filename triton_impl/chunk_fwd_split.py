"""Chunk-parallel prefill forward of the Mamba-3 scan in Triton (the `split=1` variant of
chunk_fwd; fixed-length batches only): the sequence is cut into segments of T tokens (a multiple
of the chunk C) and only a cheap elementwise pass runs across segments.

The walk kernel (chunk_fwd_kernel) walks each (sequence, head) through all its chunks with the
state in registers: one dependent chain per program, so short batches leave most of the GPU idle and
every chunk pays the chain's latency. Here:

1. segment_state (grid: segment x (sequence, head) x P-block): each segment's own contribution
   to the state from a zero start, dS = sum over its chunks of the decayed (V * w)^T Kr~, with
   its log-decay and its angle sum Phi. Kr~ is k rotated by the angle accumulated *inside the
   segment* only.
2. state_pass (grid: (sequence, head) x P-block): F_{s+1} = (exp(c_s) F_s + dS_s) Rot(Phi_s),
   writing F_s, the state entering segment s (fp32), for every segment, and the final state.
3. the walk kernel in segment mode (grid axis 2: segment): each segment walked from F_s with
   angles counted from the segment start.

Why segment-local angles suffice: with Theta_s the absolute angle before segment s and phi_t
the angle accumulated inside it, qr_t = Rot(Theta_s) Rot(phi_t) (q_t + b) = Rot(Theta_s) qr~_t,
so with the state expressed in the segment's frame, F_s = Hs Rot(Theta_s) (Rot acting on the N
axis), Hs qr_t = F_s qr~_t and the segment's contribution Hs += dS_s Rot(Theta_s)^T. Moving to
the next segment's frame multiplies by Rot(Phi_s): the recurrence of step 2. The initial state
enters as F_0 = (ssm + mu_0 V0^T K0) Rot(theta_0); the final one leaves as F_end Rot(Theta_L)^T.
Every trig argument stays small (an angle inside a segment, or one reduced modulo 2 pi).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mamba3_kernels.problem import Problem

from .fast_math import _exp
from .fwd_tiles import (
    _TWO_PI,
    _chunk_angles,
    _chunk_coefs,
    _cos_sin,
    _initial_ssm,
    _load_lohi,
    _load_rot,
    _op,
    _prefetch_chunk,
    _rot_cos_sin,
    _rotated_operand,
    _store_final_kv,
    _store_lohi,
    _store_rot,
    _v_rows,
)
from .launch import Launch
from .launch import cdiv as _cdiv

__all__ = ["segment_buffers", "segment_launches", "pass_block", "compile_kernels"]


@triton.jit
def _segment_state_kernel(
    k_ptr,
    v_ptr,
    adt_ptr,
    dt_ptr,
    trap_ptr,
    kb_ptr,
    ang_ptr,
    mv_ptr,
    ds_ptr,
    cl_ptr,
    phi_ptr,
    th_ptr,
    cs_ptr,
    gm_ptr,
    wt_ptr,
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
    HAS_MV: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    FAST: tl.constexpr,
    FRAMES: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    NH: tl.constexpr = N // 2
    PASS: tl.constexpr = SA < NH
    pid_s = tl.program_id(0)
    pid_sh = tl.program_id(1)
    pid_p = tl.program_id(2)
    seq = pid_sh // H
    h = pid_sh % H
    g = h // (H // G)
    rows = tl.arange(0, C * R)
    t_loc = rows // R  # token of each row inside a chunk
    r_idx = rows % R  # rank of each row
    first_rank = r_idx == 0
    jr = tl.arange(0, SA)  # rotated pair index
    rot = jr < S
    dd: tl.constexpr = v_ptr.dtype.element_ty
    seqlen = L + 0 * seq  # a tensor (the interpreter passes L as an int)
    coef_base = pid_sh.to(tl.int64) * L
    bias_row = (h * R + r_idx[:, None]) * N
    pp = pid_p * BP + tl.arange(0, BP)
    mpr = (pp < P)[None, :]
    ds_lo = tl.zeros((BP, NH), dtype=tl.float32)
    ds_hi = tl.zeros((BP, NH), dtype=tl.float32)
    theta = tl.zeros((SA,), dtype=tl.float32)  # angle accumulated since the segment start
    c_seg = 0.0  # log-decay accumulated since the segment start
    seg_start = pid_s * T
    seg_end = tl.minimum(seg_start + T, seqlen)
    for c0 in range(seg_start, seg_end, C):
        if PREFETCH > 0:  # the lines of the chunk PREFETCH ahead into L2 (none past the segment)
            _prefetch_chunk(
                adt_ptr, dt_ptr, trap_ptr, ang_ptr, v_ptr, v_ptr, coef_base, seq.to(tl.int64) * L,
                c0 + PREFETCH * C, seg_end, h, H, pid_p * BP, P, S, SA, C, BP, False,
            )  # fmt: skip
        t = c0 + t_loc
        valid = t < seqlen
        tok = seq.to(tl.int64) * L + t
        mrow = valid[:, None]
        c, c_last, dt_row, gamma, w = _chunk_coefs(
            adt_ptr, dt_ptr, trap_ptr, coef_base, t, valid, first_rank, seqlen, FAST
        )
        th, th_t, rate_sum = _chunk_angles(
            ang_ptr, dt_ptr, coef_base, seq.to(tl.int64) * L, c0, theta, tok, valid, first_rank,
            dt_row, seqlen, h, H, S, jr, rot, R, C, FAST,
        )  # fmt: skip
        if FRAMES:
            # Each token's frame for the block-parallel output kernel (chunk_fwd_blocks), one
            # row per token, by the first P-block: its angle and log-decay since the segment
            # start, and its trapezoid weights gamma and w.
            fr = pid_sh.to(tl.int64) * L + t
            mf = valid & first_rank & ((t * 0 + pid_p) == 0)
            tt = c0 + tl.arange(0, C)
            ft = pid_sh.to(tl.int64) * L + tt
            mft = (tt < seqlen) & ((tt * 0 + pid_p) == 0)
            tl.store(th_ptr + ft[:, None] * S + jr[None, :], th_t, mask=mft[:, None] & rot[None, :])
            tl.store(cs_ptr + fr, c_seg + c, mask=mf)
            tl.store(gm_ptr + fr, gamma, mask=mf)
            tl.store(wt_ptr + fr, w, mask=mf)
        cos, sin = _rot_cos_sin(th, rot, PASS, FAST)
        theta = theta + rate_sum
        theta = theta - _TWO_PI * tl.floor(theta / _TWO_PI)
        kb_lo, kb_hi = _load_lohi(kb_ptr, bias_row, bias_row >= 0, NH, SA, HALVES)
        qk_row = ((tok[:, None] * R + r_idx[:, None]) * G + g) * N
        k_lo, k_hi = _rotated_operand(
            k_ptr, qk_row, mrow, kb_lo, kb_hi, cos, sin, NH, SA, HALVES, dd, UPCAST
        )
        vr = _v_rows(v_ptr, seq.to(tl.int64) * L, c0, tok, mrow, seqlen, h, H, pp, mpr, P, R, C)
        if HAS_MV:
            vr = vr * tl.load(
                mv_ptr + (h * R + r_idx[:, None]) * P + pp[None, :], mask=mpr, other=0.0
            )
        vw = tl.trans(_op(vr * (_exp(c_last - c, FAST) * w)[:, None], dd, UPCAST))
        e_last = _exp(c_last, FAST)
        ds_lo = tl.dot(vw, k_lo, ds_lo * e_last, input_precision=DOT_PREC)
        ds_hi = tl.dot(vw, k_hi, ds_hi * e_last, input_precision=DOT_PREC)
        c_seg += c_last
    si = pid_sh.to(tl.int64) * NSEG + pid_s  # (sequence, head, segment) index
    _store_lohi(ds_ptr, (si * P + pp[:, None]) * N, ds_lo, ds_hi, pp[:, None] < P, NH, SA, HALVES)
    if pid_p == 0:
        tl.store(cl_ptr + si, c_seg)
        tl.store(phi_ptr + si * S + jr, theta, mask=rot)


@triton.jit
def _rotate_rows(a, b, th, rot, FAST: tl.constexpr):
    """Rotate each row (pairs (a, b), (M, NH)) by the angles th (NH,): (a cos - b sin, ...)."""
    cos, sin = _cos_sin(th[None, :], rot[None, :], FAST)
    return a * cos - b * sin, a * sin + b * cos


@triton.jit
def _pass_inputs(ds_ptr, cl_ptr, phi_ptr, sh, c, NSEG, pp, j, P: tl.constexpr,
                 N: tl.constexpr, S: tl.constexpr, NH: tl.constexpr,
                 HALVES: tl.constexpr):  # fmt: skip
    """Segment c's inputs to the state pass (zeros past the last segment): its dS rows as
    pair tiles (BP, NH) fp32, its summed log-decay and its angle sum phi (NH,)."""
    ci = sh * NSEG + c
    more = (sh * 0 + c) < NSEG  # (a tensor even when c and NSEG are both constants)
    # (masks as bounds: the interpreter rejects a tile mask and-ed with a scalar one)
    rows_in = pp[:, None] < tl.where(more, P, 0)
    da, db = _load_rot(ds_ptr, (ci * P + pp[:, None]) * N, rows_in, NH, NH, HALVES)
    cl = tl.load(cl_ptr + ci, mask=more, other=0.0)
    phi = tl.load(phi_ptr + ci * S + j, mask=j < tl.where(more, S, 0), other=0.0)
    return da.to(tl.float32), db.to(tl.float32), cl, phi


@triton.jit
def _state_pass_kernel(
    ds_ptr,
    cl_ptr,
    phi_ptr,
    fst_ptr,
    dt_ptr,
    trap_ptr,
    mv_ptr,
    a0_ptr,
    s0_ptr,
    k0_ptr,
    v0_ptr,
    k_ptr,
    kb_ptr,
    v_ptr,
    a1_ptr,
    s1_ptr,
    k1_ptr,
    v1_ptr,
    L,
    H,
    G,
    NSEG,
    P: tl.constexpr,
    N: tl.constexpr,
    S: tl.constexpr,
    SA: tl.constexpr,
    R: tl.constexpr,
    BP: tl.constexpr,
    HALVES: tl.constexpr,
    HAS_MV: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_FINAL: tl.constexpr,
    FAST: tl.constexpr,
):
    NH: tl.constexpr = N // 2
    pid_sh = tl.program_id(0)
    pid_p = tl.program_id(1)
    seq = pid_sh // H
    h = pid_sh % H
    sh = pid_sh.to(tl.int64)
    pp = pid_p * BP + tl.arange(0, BP)
    mp = pp[:, None] < P
    j = tl.arange(0, NH)  # every pair (those past S have a zero angle)
    rot = j < S
    row_off = (sh * P + pp[:, None]) * N  # rows of a (nseq, H, P, N) state
    if HAS_INIT:
        # (pairs in the natural (a, b) split: SA = NH)
        a, b = _initial_ssm(
            s0_ptr, k0_ptr, v0_ptr, mv_ptr, dt_ptr, trap_ptr, sh * L, L + 0 * seq > 0, seq, h, H,
            pp, P, N, NH, NH, R, HALVES, HAS_MV, FAST,
        )  # fmt: skip
        theta = tl.load(a0_ptr + sh * S + j, mask=rot, other=0.0).to(tl.float32)
        theta = theta - _TWO_PI * tl.floor(theta / _TWO_PI)
        # Into the frame of chunk 0: F = Hs Rot(theta), i.e. each row rotated by -theta.
        a, b = _rotate_rows(a, b, -theta, rot, FAST)
    else:
        a = tl.zeros((BP, NH), dtype=tl.float32)
        b = tl.zeros((BP, NH), dtype=tl.float32)
        theta = tl.zeros((NH,), dtype=tl.float32)
    fdt = fst_ptr.dtype.element_ty
    # Each step's inputs are requested two steps ahead (register double buffering): the chain
    # of NSEG dependent steps then waits on memory once per two steps, not on every step (at
    # B = 1 with MIMO's 32-token segments the chain is 512 steps long).
    da1, db1, cl1, phi1 = _pass_inputs(ds_ptr, cl_ptr, phi_ptr, sh, 0, NSEG, pp, j, P,
                                       N, S, NH, HALVES)  # fmt: skip
    da2, db2, cl2, phi2 = _pass_inputs(ds_ptr, cl_ptr, phi_ptr, sh, 1, NSEG, pp, j, P,
                                       N, S, NH, HALVES)  # fmt: skip
    for c in range(0, NSEG):
        da, db, cl, phi = da1, db1, cl1, phi1
        da1, db1, cl1, phi1 = da2, db2, cl2, phi2
        da2, db2, cl2, phi2 = _pass_inputs(ds_ptr, cl_ptr, phi_ptr, sh, c + 2, NSEG, pp, j, P,
                                           N, S, NH, HALVES)  # fmt: skip
        off = ((sh * NSEG + c) * P + pp[:, None]) * N
        _store_rot(fst_ptr, off, a.to(fdt), b.to(fdt), mp, NH, NH, HALVES)
        e_last = _exp(cl, FAST)
        phi = phi - _TWO_PI * tl.floor(phi / _TWO_PI + 0.5)
        a, b = _rotate_rows(e_last * a + da, e_last * b + db, -phi, rot, FAST)
        theta = theta + phi
        theta = theta - _TWO_PI * tl.floor(theta / _TWO_PI)
    if HAS_FINAL:
        # Back from the frame after the last chunk: Hs = F Rot(Theta_L)^T (rows rotated by
        # +Theta_L).
        a, b = _rotate_rows(a, b, theta, rot, FAST)
        _store_rot(s1_ptr, row_off, a, b, mp, NH, NH, HALVES)
        if pid_p == 0:
            tl.store(a1_ptr + sh * S + j, theta, mask=rot)
        _store_final_kv(
            k_ptr, kb_ptr, k0_ptr, k1_ptr, v_ptr, v0_ptr, v1_ptr, seq, h, H, G, pp,
            seq.to(tl.int64) * L, L + 0 * seq, theta, j, rot, pid_p == 0, P, NH, NH, R, HALVES,
            FAST, HAS_INIT,
        )  # fmt: skip


def pass_block(problem: Problem) -> int:
    """P-rows per program of the sequential state pass: enough programs to cover the GPU
    (sequences x heads x P-blocks >= ~2 per multiprocessor) without tiles below 8 rows."""
    bp = 1 << (problem.headdim - 1).bit_length()
    while bp > 8 and problem.nseq * problem.nheads * _cdiv(problem.headdim, bp) < 264:
        bp //= 2
    return bp


def segment_buffers(
    problem: Problem, consts: dict, frames: bool = False, state_dtype: torch.dtype = torch.float32
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The scratch buffers of steps 1 and 2, by name: (shape, dtype) of ds (B*H, nseg, P, N)
    (fp32; with frames in ``state_dtype``), fst (B*H, nseg, P, N) in ``state_dtype`` (the
    state entering every segment, in its rotary frame), clast (B*H, nseg) and phi
    (B*H, nseg, S) fp32; with ``frames`` also th (B*H, L, S) and cs, gm, wt (B*H, L) fp32: each
    token's angle and log-decay since its segment's start, gamma and w. consts:
    chunk_fwd_kernel._constexprs (T tokens per segment)."""
    B, L, H = problem.batch, problem.seqlen, problem.nheads
    P, N, S = problem.headdim, problem.d_state, problem.n_angles
    nseg = _cdiv(L, consts["T"])
    f32 = torch.float32
    # With frames (split=2) dS is stored like F, in state_dtype: the pass adds it in fp32, and
    # halving its bytes took 5-6 % off the MIMO forward (docs/performance.md).
    ds_dtype = state_dtype if frames else f32
    buffers = {
        "ds": ((B * H, nseg, P, N), ds_dtype),
        "fst": ((B * H, nseg, P, N), state_dtype),
        "clast": ((B * H, nseg), f32),
        "phi": ((B * H, nseg, S), f32),
    }
    if frames:
        buffers["th"] = ((B * H, L, S), f32)
        buffers["cs"] = ((B * H, L), f32)
        buffers["gm"] = ((B * H, L), f32)
        buffers["wt"] = ((B * H, L), f32)
    return buffers


def segment_launches(
    problem: Problem, consts: dict, launch: dict, slot: dict[str, int], frames: bool = False
) -> list[Launch]:
    """Steps 1 and 2 as two launches: the segment-state kernel, then the state pass, which
    writes fst (segment_buffers) and, with problem.return_final_state, the final state.

    consts: chunk_fwd_kernel._constexprs (C, T, ...); launch: num_warps/num_stages of the
    segment-state kernel; slot: the index of each argument in the call's argument table
    (chunk_fwd._TABLE names: the inputs, a0..v0 and a1..v1 for the initial and final state,
    the buffers of segment_buffers; absent tensors' entries hold a stand-in that is never
    read).
    """
    L, H, G = problem.seqlen, problem.nheads, problem.ngroups
    P = problem.headdim
    T, BP = consts["T"], consts["BP"]
    nseg = _cdiv(L, T)
    B_H = problem.batch * H
    common = {n: consts[n] for n in ("P", "N", "S", "SA", "R", "HALVES", "HAS_MV", "FAST")}
    seg_args = ("k", "v", "adt", "dt", "trap", "k_bias", "angles", "mimo_v", "ds", "clast", "phi",
                *(("th", "cs", "gm", "wt") if frames else ("v",) * 4))  # fmt: skip
    pass_args = ("ds", "clast", "phi", "fst", "dt", "trap", "mimo_v", "a0", "s0", "k0", "v0", "k",
                 "k_bias", "v", "a1", "s1", "k1", "v1")  # fmt: skip
    bp2 = pass_block(problem)
    return [
        Launch(
            _segment_state_kernel, (nseg, B_H, _cdiv(P, BP)), [slot[n] for n in seg_args],
            (L, H, G, nseg),
            dict(C=consts["C"], T=T, BP=BP, DOT_PREC=consts["DOT_PREC"],
                 UPCAST=consts["UPCAST"], FRAMES=frames, PREFETCH=consts["PREFETCH"], **common),
            launch,
        ),
        Launch(
            _state_pass_kernel, (B_H, _cdiv(P, bp2)), [slot[n] for n in pass_args],
            (L, H, G, nseg),
            dict(BP=bp2, HAS_INIT=problem.has_initial_state,
                 HAS_FINAL=problem.return_final_state, **common),
            {"num_warps": 4},
        ),
    ]  # fmt: skip


_IO_TYPE = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
# Pointer arguments whose element type is the I/O dtype; every other pointer is fp32.
_IO_PTRS = frozenset({"q_ptr", "k_ptr", "v_ptr", "z_ptr", "k0_ptr", "v0_ptr", "k1_ptr", "v1_ptr",
                      "out_ptr"})  # fmt: skip


def compile_ahead(kernel, problem: Problem, values: dict, options: dict, target, io_ptrs=_IO_PTRS):
    """Compile one forward kernel ahead of time (no GPU needed) for ``target``: its
    compile-time arguments taken from ``values`` by name, the integers L, H, G, NSEG as i32,
    the pointers in ``io_ptrs`` of the I/O dtype and the rest fp32, every pointer 16-byte
    aligned (as the launcher's specialisation marks torch allocations)."""
    io = _IO_TYPE[problem.dtype]
    names = kernel.arg_names
    kconsts = {n: values[n] for n in names if n in values}
    signature = {}
    for n in names:
        if n in kconsts:
            signature[n] = "constexpr"
        elif n in ("L", "H", "G", "NSEG"):
            signature[n] = "i32"
        else:
            signature[n] = io if n in io_ptrs else "*fp32"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if signature[n].startswith("*")}  # fmt: skip
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=kconsts,
                                    attrs=attrs)  # fmt: skip
    return triton.compile(src, target=target, options=options)


def compile_kernels(
    problem: Problem, consts: dict, options: dict, target, frames: bool = False
) -> dict:
    """Compile the segment-state and state-pass kernels ahead of time (no GPU needed) for
    ``target`` (a triton ``GPUTarget``). consts: chunk_fwd_kernel._constexprs(problem,
    config, interp=False); options: num_warps/num_stages; frames: as segment_launches (the
    split=2 forward, whose segment states are stored in the I/O dtype). Returns {name: compiled
    kernel}; each one's ``asm`` holds ptx/cubin."""
    io_ptrs = _IO_PTRS | ({"fst_ptr", "ds_ptr"} if frames else set())
    launches = {
        _segment_state_kernel: ({**consts, "FRAMES": frames}, options),
        _state_pass_kernel: ({**consts, "BP": pass_block(problem)}, {"num_warps": 4}),
    }
    return {
        kernel.fn.__name__: compile_ahead(kernel, problem, values, opts, target, io_ptrs)
        for kernel, (values, opts) in launches.items()
    }
