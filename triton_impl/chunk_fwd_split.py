"""Chunk-parallel prefill forward of the Mamba-3 scan in Triton: three launches instead of one
sequential walk (the `split=1` variant of chunk_fwd; fixed-length batches only).

The fused kernel (chunk_fwd) walks each (sequence, head) chunk by chunk with the state in
registers: one dependent chain per program, so short batches leave most of the GPU idle and
every chunk pays the chain's latency. Here only a cheap elementwise pass is sequential:

1. chunk_state (grid: chunk x (sequence, head) x P-block): each chunk's own contribution to the
   state from a zero start, dS_c = (V * exp(c_last - c) w)^T Kr~, plus its log-decay c_last and
   its angle sum Phi_c. Kr~ is k rotated by the angle accumulated *inside the chunk* only.
2. state_pass (grid: (sequence, head) x P-block): F_{c+1} = (exp(c_last) F_c + dS_c) Rot(Phi_c),
   writing F_c, the state entering chunk c, for every chunk.
3. chunk_scan (grid: chunk x (sequence, head) x P-block): the fused kernel's loop body for one
   chunk with the state read from F_c: y = (Qr~ Kr~^T * M) V + exp(c) Qr~ F_c^T.

Why the chunk-local angles suffice: with Theta_s the absolute angle before chunk c and phi_t
the angle accumulated inside it, qr_t = Rot(Theta_s) Rot(phi_t) (q_t + b) = Rot(Theta_s) qr~_t,
so with the state expressed in the chunk's frame, F_c = Hs Rot(Theta_s) (Rot acting on the N
axis), Hs qr_t = F_c qr~_t and the chunk's contribution Hs += dS_c Rot(Theta_s)^T. Moving to the
next chunk's frame multiplies by Rot(Phi_c): the recurrence of step 2. The initial state enters
as F_0 = (ssm + mu_0 V0^T K0) Rot(theta_0); the final one leaves as F_end Rot(Theta_L)^T.
Every trig argument stays small (a chunk's angle, or an angle reduced modulo 2 pi).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mamba3_kernels.inputs import ScanInputs
from mamba3_kernels.problem import Problem
from mamba3_kernels.state import Mamba3State

from .fwd_tiles import (
    _TWO_PI,
    _chunk_coefs,
    _chunk_rates,
    _cos_sin,
    _finish_rows,
    _intra_scores,
    _load_lohi,
    _load_rot,
    _op,
    _rot_cos_sin,
    _rotated_operand,
    _store_final_kv,
    _store_lohi,
    _store_rot,
)

__all__ = ["chunk_fwd_split", "pass_block"]


@triton.jit
def _chunk_setup(H, G, C: tl.constexpr, R: tl.constexpr, SA: tl.constexpr, S: tl.constexpr):
    """Indices shared by the per-chunk kernels (program axes: chunk, sequence*H + head)."""
    pid_c = tl.program_id(0)
    pid_sh = tl.program_id(1)
    seq = pid_sh // H
    h = pid_sh % H
    g = h // (H // G)
    rows = tl.arange(0, C * R)
    t_loc = rows // R  # token of each row inside the chunk
    r_idx = rows % R  # rank of each row
    jr = tl.arange(0, SA)  # rotated pair index
    return pid_c, pid_sh, seq, h, g, t_loc, r_idx, jr, jr < S


@triton.jit
def _chunk_state_kernel(
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
    L,
    H,
    G,
    NC,
    P: tl.constexpr,
    N: tl.constexpr,
    S: tl.constexpr,
    SA: tl.constexpr,
    R: tl.constexpr,
    C: tl.constexpr,
    BP: tl.constexpr,
    HALVES: tl.constexpr,
    HAS_MV: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    FAST: tl.constexpr,
):
    NH: tl.constexpr = N // 2
    PASS: tl.constexpr = SA < NH
    pid_c, pid_sh, seq, h, g, t_loc, r_idx, jr, rot = _chunk_setup(H, G, C, R, SA, S)
    pid_p = tl.program_id(2)
    dd: tl.constexpr = v_ptr.dtype.element_ty
    seqlen = L + 0 * seq  # a tensor (the interpreter passes L as an int)
    coef_base = pid_sh.to(tl.int64) * L
    t = pid_c * C + t_loc
    valid = t < seqlen
    tok = seq.to(tl.int64) * L + t
    mrow = valid[:, None]
    first_rank = r_idx == 0
    c, c_last, dt_row, gamma, w = _chunk_coefs(
        adt_ptr, dt_ptr, trap_ptr, coef_base, t, valid, first_rank, seqlen
    )
    rate = _chunk_rates(ang_ptr, tok, h, H, S, jr, rot, valid, first_rank, dt_row)
    cos, sin = _rot_cos_sin(tl.cumsum(rate, axis=0), rot, PASS, FAST)
    bias_row = (h * R + r_idx[:, None]) * N
    kb_lo, kb_hi = _load_lohi(kb_ptr, bias_row, bias_row >= 0, NH, SA, HALVES)
    qk_row = ((tok[:, None] * R + r_idx[:, None]) * G + g) * N
    k_lo, k_hi = _rotated_operand(
        k_ptr, qk_row, mrow, kb_lo, kb_hi, cos, sin, NH, SA, HALVES, dd, UPCAST
    )
    pp = pid_p * BP + tl.arange(0, BP)
    mpr = (pp < P)[None, :]
    vr = tl.load(v_ptr + (tok[:, None] * H + h) * P + pp[None, :], mask=mrow & mpr, other=0.0)
    vr = vr.to(tl.float32)
    if HAS_MV:
        vr = vr * tl.load(mv_ptr + (h * R + r_idx[:, None]) * P + pp[None, :], mask=mpr, other=0.0)
    vw = tl.trans(_op(vr * (tl.exp(c_last - c) * w)[:, None], dd, UPCAST))
    ds_lo = tl.dot(vw, k_lo, input_precision=DOT_PREC)
    ds_hi = tl.dot(vw, k_hi, input_precision=DOT_PREC)
    ci = pid_sh.to(tl.int64) * NC + pid_c  # (sequence, head, chunk) index
    _store_lohi(ds_ptr, (ci * P + pp[:, None]) * N, ds_lo, ds_hi, pp[:, None] < P, NH, SA, HALVES)
    if pid_p == 0:
        tl.store(cl_ptr + ci, c_last)
        tl.store(phi_ptr + ci * S + jr, tl.sum(rate, axis=0), mask=rot)


@triton.jit
def _rotate_rows(a, b, th, rot, FAST: tl.constexpr):
    """Rotate each row (pairs (a, b), (M, NH)) by the angles th (NH,): (a cos - b sin, ...)."""
    cos, sin = _cos_sin(th[None, :], rot[None, :], FAST)
    return a * cos - b * sin, a * sin + b * cos


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
    NC,
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
        a, b = _load_rot(s0_ptr, row_off, mp, NH, NH, HALVES)
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        # Previous-input term of token 0: mu_0 * sum_r (v0 * mimo_v_r) k0_r^T.
        # (this kernel only runs for L > 0)
        dt0 = tl.load(dt_ptr + sh * L).to(tl.float32)
        tr0 = tl.load(trap_ptr + sh * L).to(tl.float32)
        mu0 = dt0 * (1.0 - tl.sigmoid(tr0))
        v0 = tl.load(v0_ptr + sh * P + pp, mask=pp < P, other=0.0).to(tl.float32) * mu0
        for r in tl.static_range(R):
            vr0 = v0
            if HAS_MV:
                vr0 = vr0 * tl.load(mv_ptr + (h * R + r) * P + pp, mask=pp < P, other=0.0)
            k_row = tl.zeros((1, 1), dtype=tl.int64) + ((seq.to(tl.int64) * R + r) * H + h) * N
            k0_a, k0_b = _load_rot(k0_ptr, k_row, k_row >= 0, NH, NH, HALVES)
            a += vr0[:, None] * k0_a.to(tl.float32)
            b += vr0[:, None] * k0_b.to(tl.float32)
        theta = tl.load(a0_ptr + sh * S + j, mask=rot, other=0.0).to(tl.float32)
        theta = theta - _TWO_PI * tl.floor(theta / _TWO_PI)
        # Into the frame of chunk 0: F = Hs Rot(theta), i.e. each row rotated by -theta.
        a, b = _rotate_rows(a, b, -theta, rot, FAST)
    else:
        a = tl.zeros((BP, NH), dtype=tl.float32)
        b = tl.zeros((BP, NH), dtype=tl.float32)
        theta = tl.zeros((NH,), dtype=tl.float32)
    fdt = fst_ptr.dtype.element_ty
    for c in range(0, NC):
        ci = sh * NC + c
        off = (ci * P + pp[:, None]) * N
        _store_rot(fst_ptr, off, a.to(fdt), b.to(fdt), mp, NH, NH, HALVES)
        da, db = _load_rot(ds_ptr, off, mp, NH, NH, HALVES)
        e_last = tl.exp(tl.load(cl_ptr + ci))
        phi = tl.load(phi_ptr + ci * S + j, mask=rot, other=0.0)
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


@triton.jit
def _chunk_scan_kernel(
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
    fst_ptr,
    out_ptr,
    L,
    H,
    G,
    NC,
    P: tl.constexpr,
    N: tl.constexpr,
    S: tl.constexpr,
    SA: tl.constexpr,
    R: tl.constexpr,
    C: tl.constexpr,
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
):
    NH: tl.constexpr = N // 2
    PASS: tl.constexpr = SA < NH
    pid_c, pid_sh, seq, h, g, t_loc, r_idx, jr, rot = _chunk_setup(H, G, C, R, SA, S)
    pid_p = tl.program_id(2)
    dd: tl.constexpr = v_ptr.dtype.element_ty
    seqlen = L + 0 * seq
    bos = seq.to(tl.int64) * L
    coef_base = pid_sh.to(tl.int64) * L
    c0 = pid_c * C
    t = c0 + t_loc
    valid = t < seqlen
    tok = bos + t
    mrow = valid[:, None]
    first_rank = r_idx == 0
    c, c_last, dt_row, gamma, w = _chunk_coefs(
        adt_ptr, dt_ptr, trap_ptr, coef_base, t, valid, first_rank, seqlen
    )
    rate = _chunk_rates(ang_ptr, tok, h, H, S, jr, rot, valid, first_rank, dt_row)
    cos, sin = _rot_cos_sin(tl.cumsum(rate, axis=0), rot, PASS, FAST)
    bias_row = (h * R + r_idx[:, None]) * N
    qb_lo, qb_hi = _load_lohi(qb_ptr, bias_row, bias_row >= 0, NH, SA, HALVES)
    kb_lo, kb_hi = _load_lohi(kb_ptr, bias_row, bias_row >= 0, NH, SA, HALVES)
    qk_row = ((tok[:, None] * R + r_idx[:, None]) * G + g) * N
    q_lo, q_hi = _rotated_operand(
        q_ptr, qk_row, mrow, qb_lo, qb_hi, cos, sin, NH, SA, HALVES, dd, UPCAST
    )
    k_lo, k_hi = _rotated_operand(
        k_ptr, qk_row, mrow, kb_lo, kb_hi, cos, sin, NH, SA, HALVES, dd, UPCAST
    )
    pp = pid_p * BP + tl.arange(0, BP)
    mpr = (pp < P)[None, :]
    vr = tl.load(v_ptr + (tok[:, None] * H + h) * P + pp[None, :], mask=mrow & mpr, other=0.0)
    vr = vr.to(tl.float32)
    if HAS_MV:
        vr = vr * tl.load(mv_ptr + (h * R + r_idx[:, None]) * P + pp[None, :], mask=mpr, other=0.0)
    scores = _intra_scores(q_lo, q_hi, k_lo, k_hi, t, c, w, gamma, DOT_PREC)
    ci = pid_sh.to(tl.int64) * NC + pid_c
    f_lo, f_hi = _load_lohi(fst_ptr, (ci * P + pp[:, None]) * N, pp[:, None] < P, NH, SA, HALVES)
    y = tl.dot(q_lo, tl.trans(_op(f_lo, dd, UPCAST)), input_precision=DOT_PREC)
    y = tl.dot(q_hi, tl.trans(_op(f_hi, dd, UPCAST)), y, input_precision=DOT_PREC)
    y = y * tl.exp(c)[:, None]
    y = tl.dot(_op(scores, dd, UPCAST), _op(vr, dd, UPCAST), y, input_precision=DOT_PREC)
    _finish_rows(
        y, vr, D_ptr, z_ptr, mz_ptr, mo_ptr, out_ptr, h, H, pp, P, bos, c0, seqlen, t, r_idx,
        R, C, BP, HAS_D, HAS_Z, HAS_MZ, HAS_MO,
    )  # fmt: skip


def pass_block(problem: Problem) -> int:
    """P-rows per program of the sequential state pass: enough programs to cover the GPU
    (sequences x heads x P-blocks >= ~2 per multiprocessor) without tiles below 8 rows."""
    bp = triton.next_power_of_2(problem.headdim)
    while bp > 8 and problem.nseq * problem.nheads * triton.cdiv(problem.headdim, bp) < 264:
        bp //= 2
    return bp


def chunk_fwd_split(
    problem: Problem,
    inputs: ScanInputs,
    out: torch.Tensor,
    final: Mamba3State | None,
    consts: dict,
    launch: dict,
) -> None:
    """Run the three-launch forward into ``out`` and ``final`` (allocated by chunk_fwd).

    consts: the fused kernel's compile-time arguments (chunk_fwd._constexprs); launch: num_warps,
    num_stages (and maxnreg) for the two per-chunk kernels. Fixed-length batches only.
    """
    B, L, H, G = problem.batch, problem.seqlen, problem.nheads, problem.ngroups
    P, N, S = problem.headdim, problem.d_state, problem.n_angles
    C, BP = consts["C"], consts["BP"]
    nc = triton.cdiv(L, C)
    v = inputs.v
    dev = v.device
    ds = torch.empty((B * H, nc, P, N), dtype=torch.float32, device=dev)
    fst = torch.empty((B * H, nc, P, N), dtype=v.dtype, device=dev)
    clast = torch.empty((B * H, nc), dtype=torch.float32, device=dev)
    phi = torch.empty((B * H, nc, S), dtype=torch.float32, device=dev)
    dummy = v
    mv = inputs.mimo_v if inputs.mimo_v is not None else dummy
    common = dict(
        (name, consts[name]) for name in ("P", "N", "S", "SA", "R", "HALVES", "HAS_MV", "FAST")
    )
    dots = dict(DOT_PREC=consts["DOT_PREC"], UPCAST=consts["UPCAST"])
    grid = (nc, B * H, triton.cdiv(P, BP))
    _chunk_state_kernel[grid](
        inputs.k, v, inputs.adt, inputs.dt, inputs.trap, inputs.k_bias, inputs.angles, mv,
        ds, clast, phi, L, H, G, nc, C=C, BP=BP, **common, **dots, **launch,
    )  # fmt: skip
    init = inputs.initial_state
    bp2 = pass_block(problem)
    _state_pass_kernel[(B * H, triton.cdiv(P, bp2))](
        ds, clast, phi, fst, inputs.dt, inputs.trap, mv,
        *((init.angle, init.ssm, init.k, init.v) if init is not None else (dummy,) * 4),
        inputs.k, inputs.k_bias, v,
        *((final.angle, final.ssm, final.k, final.v) if final is not None else (dummy,) * 4),
        L, H, G, nc, BP=bp2, HAS_INIT=consts["HAS_INIT"], HAS_FINAL=consts["HAS_FINAL"],
        **common, num_warps=4,
    )  # fmt: skip
    flags = dict((name, consts[name]) for name in ("HAS_D", "HAS_Z", "HAS_MZ", "HAS_MO"))
    _chunk_scan_kernel[grid](
        inputs.q, inputs.k, v, inputs.adt, inputs.dt, inputs.trap, inputs.q_bias,
        inputs.k_bias, inputs.angles,
        *(x if x is not None else dummy for x in (inputs.D, inputs.z, inputs.mimo_v,
                                                   inputs.mimo_z, inputs.mimo_o)),
        fst, out, L, H, G, nc, C=C, BP=BP, **common, **flags, **dots, **launch,
    )  # fmt: skip


def compile_kernels(problem: Problem, consts: dict, options: dict, target) -> dict:
    """Compile the three kernels ahead of time (no GPU needed) for ``target`` (a triton
    ``GPUTarget``). consts: chunk_fwd._constexprs(problem, config, interp=False); options:
    num_warps/num_stages. Returns {name: compiled kernel}; each one's ``asm`` holds ptx/cubin."""
    io = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}[problem.dtype]
    f32, i32 = "*fp32", "i32"
    # Pointer arguments whose element type is the I/O dtype; every other pointer is fp32.
    io_ptrs = {"q_ptr", "k_ptr", "v_ptr", "z_ptr", "k0_ptr", "v0_ptr", "k1_ptr", "v1_ptr",
               "out_ptr", "fst_ptr"}  # fmt: skip
    scalars = {"L", "H", "G", "NC"}
    launches = {
        _chunk_state_kernel: (consts, options),
        _state_pass_kernel: ({**consts, "BP": pass_block(problem)}, {"num_warps": 4}),
        _chunk_scan_kernel: (consts, options),
    }
    compiled = {}
    for kernel, (values, opts) in launches.items():
        names = kernel.arg_names
        kconsts = {n: values[n] for n in names if n in values}
        signature = {}
        for n in names:
            if n in kconsts:
                signature[n] = "constexpr"
            elif n in scalars:
                signature[n] = i32
            else:
                signature[n] = io if n in io_ptrs else f32
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
                 if signature[n].startswith("*")}  # fmt: skip
        src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=kconsts,
                                        attrs=attrs)  # fmt: skip
        compiled[kernel.fn.__name__] = triton.compile(src, target=target, options=opts)
    return compiled
