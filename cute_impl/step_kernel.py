"""The CuTe DSL source of the decode step (see step.py for what it computes and its config).

This module imports the DSL at its top (its annotations must resolve at compile time), so only
the JIT path and the export import it. Its source text is part of the on-disk cache key.
"""

import math

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass.cute.runtime import make_ptr

from .step import (
    DTYPE_POINTERS,
    POINTER_ARGS,
    STRIDE_ARGS,
    StepConfig,
    Variant,
    check_config,
    pointer_align,
)


def build_kernel(variant: Variant, config: StepConfig):
    """The @cute.jit host function of one variant and config, and the dtype's DSL type."""
    reason = check_config(variant.d_state, variant.headdim, config)
    if reason is not None:
        raise ValueError(f"config {config}: {reason}")
    dtype = {"bf16": cutlass.BFloat16, "fp16": cutlass.Float16, "fp32": cutlass.Float32}[
        variant.dtype
    ]
    f32 = cutlass.Float32
    H, G, R = variant.nheads, variant.ngroups, variant.rank
    N, P, S = variant.d_state, variant.headdim, variant.n_angles
    HPG = H // G
    INTERLEAVED = variant.interleaved
    HAS_D, HAS_Z = variant.has_D, variant.has_z
    HAS_MV, HAS_MZ, HAS_MO = variant.has_mimo_v, variant.has_mimo_z, variant.has_mimo_o
    KEEP = variant.keep_ranks
    T, C, BP = config.threads, config.cols, config.block_p
    TN = N // C  # threads per state row
    TP = T // TN  # rows of threads
    RPT = BP // TP  # rows per thread per pass
    VN = C // 4  # 16-byte vectors per thread per row
    PASSES = P // BP
    PREFETCH = bool(config.prefetch) and PASSES > 1
    SHFL = [1 << i for i in range(int(math.log2(TN)))]
    S1 = max(S, 1)
    PI = math.pi

    def tile(ss_head, pass_i, trow, tcol):
        """This thread's view of pass ``pass_i``'s state tile: (4, VN, RPT) fp32."""
        base = ss_head + ((pass_i * BP + trow) * N + tcol * 4)
        layout = cute.make_layout((4, VN, RPT), stride=(1, TN * 4, TP * N))
        return cute.make_tensor(base, layout)

    @cute.kernel
    def step_kernel(
        q_p: cute.Pointer, k_p: cute.Pointer, v_p: cute.Pointer, z_p: cute.Pointer,
        adt_p: cute.Pointer, dt_p: cute.Pointer, trap_p: cute.Pointer, qb_p: cute.Pointer,
        kb_p: cute.Pointer, ang_p: cute.Pointer, d_p: cute.Pointer, mv_p: cute.Pointer,
        mz_p: cute.Pointer, mo_p: cute.Pointer, sa_p: cute.Pointer, ss_p: cute.Pointer,
        sk_p: cute.Pointer, sv_p: cute.Pointer, out_p: cute.Pointer,
        s_q: cutlass.Int32, s_k: cutlass.Int32, s_v: cutlass.Int32, s_z: cutlass.Int32,
        s_adt: cutlass.Int32, s_dt: cutlass.Int32, s_tr: cutlass.Int32, s_ang: cutlass.Int32,
    ):  # fmt: skip
        tidx, _, _ = cute.arch.thread_idx()
        h, b, _ = cute.arch.block_idx()
        tcol = tidx % TN
        trow = tidx // TN
        g = h // HPG
        bh = cutlass.Int64(b) * H + h  # the state's offsets can pass 2**31 elements

        # --- phase 1: the first state tile in flight, then the head's vectors ---------------
        ss_head = ss_p + bh * (P * N)
        frags = [None] * PASSES
        frags[0] = cute.make_rmem_tensor((4, VN, RPT), f32)
        cute.autovec_copy(tile(ss_head, 0, trow, tcol), frags[0])

        smem = cutlass.utils.SmemAllocator()
        q_s = smem.allocate_tensor(f32, cute.make_layout((N, R), stride=(1, N)), 16)
        kc_s = smem.allocate_tensor(f32, cute.make_layout((N, R), stride=(1, N)), 16)
        kp_s = smem.allocate_tensor(f32, cute.make_layout((N, R), stride=(1, N)), 16)
        th_s = smem.allocate_tensor(f32, cute.make_layout(S1), 16)
        vo_s = smem.allocate_tensor(f32, cute.make_layout(P), 16)
        vn_s = smem.allocate_tensor(f32, cute.make_layout(P), 16)
        z_s = smem.allocate_tensor(f32, cute.make_layout(P), 16)

        dt = cute.make_tensor(dt_p + b * s_dt, cute.make_layout(H))[h].to(f32)
        adt = cute.make_tensor(adt_p + b * s_adt, cute.make_layout(H))[h].to(f32)
        tr = cute.make_tensor(trap_p + b * s_tr, cute.make_layout(H))[h].to(f32)
        lam = f32(1.0) / (f32(1.0) + cute.math.exp(-tr))
        alpha = cute.math.exp(adt)
        beta = (f32(1.0) - lam) * dt * alpha
        gamma = lam * dt

        q_g = cute.make_tensor(q_p + b * s_q + g * N, cute.make_layout((N, R), stride=(1, G * N)))
        k_g = cute.make_tensor(k_p + b * s_k + g * N, cute.make_layout((N, R), stride=(1, G * N)))
        qb_g = cute.make_tensor(qb_p + h * (R * N), cute.make_layout((N, R), stride=(1, N)))
        kb_g = cute.make_tensor(kb_p + h * (R * N), cute.make_layout((N, R), stride=(1, N)))
        # state k (B, R, H, N): rank r of (b, h) at ((b * R + r) * H + h) * N
        sk_g = cute.make_tensor(
            sk_p + (cutlass.Int64(b) * (R * H) + h) * N, cute.make_layout((N, R), stride=(1, H * N))
        )
        sa_g = cute.make_tensor(sa_p + bh * S1, cute.make_layout(S1))
        ang_g = cute.make_tensor(ang_p + b * s_ang + h * S, cute.make_layout(S1))
        v_g = cute.make_tensor(v_p + b * s_v + h * P, cute.make_layout(P))
        sv_g = cute.make_tensor(sv_p + bh * P, cute.make_layout(P))

        for n in range(tidx, N, T):
            if cutlass.const_expr(INTERLEAVED):
                j = n // 2
                first = n % 2 == 0
                partner = n ^ 1
            else:
                j = n % (N // 2)
                first = n < N // 2
                partner = (n + N // 2) % N
            cs = f32(1.0)
            sn = f32(0.0)
            if j < S:
                theta = sa_g[j] + f32(PI) * cute.math.tanh(ang_g[j].to(f32)) * dt
                # stored in [0, 2 pi): an angle that grew step after step would lose fp32 bits
                theta = theta - cute.math.floor(theta * f32(0.5 / PI)) * f32(2.0 * PI)
                cs = cute.math.cos(theta)
                sn = cute.math.sin(theta)
                if first:
                    th_s[j] = theta
                    sn = -sn
            for r in cutlass.range_constexpr(R):
                qx = q_g[n, r].to(f32) + qb_g[n, r].to(f32)
                qy = q_g[partner, r].to(f32) + qb_g[partner, r].to(f32)
                q_s[n, r] = qx * cs + qy * sn
                kx = k_g[n, r].to(f32) + kb_g[n, r].to(f32)
                ky = k_g[partner, r].to(f32) + kb_g[partner, r].to(f32)
                kc_s[n, r] = kx * cs + ky * sn
                kp_s[n, r] = sk_g[n, r].to(f32)
        for p in range(tidx, P, T):
            vo_s[p] = sv_g[p].to(f32)
            vn_s[p] = v_g[p].to(f32)
            if cutlass.const_expr(HAS_Z):
                z_s[p] = cute.make_tensor(z_p + b * s_z + h * P, cute.make_layout(P))[p].to(f32)
        cute.arch.sync_threads()

        # --- phase 2: the state, pass by pass ---------------------------------------------
        d_h = f32(0.0)
        if cutlass.const_expr(HAS_D):
            d_h = cute.make_tensor(d_p, cute.make_layout(H))[h].to(f32)
        mv_g = cute.make_tensor(mv_p + h * (R * P), cute.make_layout((P, R), stride=(1, P)))
        mz_g = cute.make_tensor(mz_p + h * (R * P), cute.make_layout((P, R), stride=(1, P)))
        mo_g = cute.make_tensor(mo_p + h * (R * P), cute.make_layout((P, R), stride=(1, P)))
        out_h = cute.make_tensor(out_p + bh * P, cute.make_layout(P))
        # out (B, R, H, P) when the ranks are kept: rank r of (b, h) at ((b * R + r) * H + h) * P
        out_r = cute.make_tensor(
            out_p + (cutlass.Int64(b) * (R * H) + h) * P,
            cute.make_layout((P, R), stride=(1, H * P)),
        )

        for i in cutlass.range_constexpr(PASSES):
            if cutlass.const_expr(i > 0 and not PREFETCH):
                frags[i] = cute.make_rmem_tensor((4, VN, RPT), f32)
                cute.autovec_copy(tile(ss_head, i, trow, tcol), frags[i])
            if cutlass.const_expr(PREFETCH and i + 1 < PASSES):
                frags[i + 1] = cute.make_rmem_tensor((4, VN, RPT), f32)
                cute.autovec_copy(tile(ss_head, i + 1, trow, tcol), frags[i + 1])
            acc = frags[i]
            for ri in cutlass.range_constexpr(RPT):
                p = i * BP + trow + ri * TP
                vo = vo_s[p]
                vn = vn_s[p]
                w_prev = []
                w_cur = []
                for r in cutlass.range_constexpr(R):
                    if cutlass.const_expr(HAS_MV):
                        mv = mv_g[p, r].to(f32)
                        w_prev.append(beta * vo * mv)
                        w_cur.append(gamma * vn * mv)
                    else:
                        w_prev.append(beta * vo)
                        w_cur.append(gamma * vn)
                ys = [f32(0.0) for _ in range(R)]
                for kv in cutlass.range_constexpr(VN):
                    for e in cutlass.range_constexpr(4):
                        n = tcol * 4 + kv * (TN * 4) + e
                        a = acc[e, kv, ri] * alpha
                        for r in cutlass.range_constexpr(R):
                            a = a + w_prev[r] * kp_s[n, r] + w_cur[r] * kc_s[n, r]
                        acc[e, kv, ri] = a
                        for r in cutlass.range_constexpr(R):
                            ys[r] = ys[r] + a * q_s[n, r]
                for r in cutlass.range_constexpr(R):
                    for off in cutlass.range_constexpr(len(SHFL)):
                        ys[r] = ys[r] + cute.arch.shuffle_sync_bfly(ys[r], offset=SHFL[off])
                if tcol == 0:
                    o = f32(0.0)
                    for r in cutlass.range_constexpr(R):
                        y = ys[r]
                        if cutlass.const_expr(HAS_D):
                            if cutlass.const_expr(HAS_MV):
                                y = y + d_h * vn * mv_g[p, r].to(f32)
                            else:
                                y = y + d_h * vn
                        if cutlass.const_expr(HAS_Z):
                            zr = z_s[p]
                            if cutlass.const_expr(HAS_MZ):
                                zr = zr * mz_g[p, r].to(f32)
                            y = y * zr / (f32(1.0) + cute.math.exp(-zr))
                        if cutlass.const_expr(KEEP):
                            out_r[p, r] = y.to(dtype)
                        elif cutlass.const_expr(HAS_MO):
                            o = o + mo_g[p, r].to(f32) * y
                        else:
                            o = o + y
                    if cutlass.const_expr(not KEEP):
                        out_h[p] = o.to(dtype)
            cute.autovec_copy(acc, tile(ss_head, i, trow, tcol))

        # --- phase 3: the new angle, k and v (every old one was read before the barrier) ----
        for n in range(tidx, N, T):
            for r in cutlass.range_constexpr(R):
                sk_g[n, r] = kc_s[n, r].to(dtype)
        for jj in range(tidx, S, T):
            sa_g[jj] = th_s[jj]
        for p in range(tidx, P, T):
            sv_g[p] = v_g[p]

    @cute.jit
    def step_host(
        q_p: cute.Pointer, k_p: cute.Pointer, v_p: cute.Pointer, z_p: cute.Pointer,
        adt_p: cute.Pointer, dt_p: cute.Pointer, trap_p: cute.Pointer, qb_p: cute.Pointer,
        kb_p: cute.Pointer, ang_p: cute.Pointer, d_p: cute.Pointer, mv_p: cute.Pointer,
        mz_p: cute.Pointer, mo_p: cute.Pointer, sa_p: cute.Pointer, ss_p: cute.Pointer,
        sk_p: cute.Pointer, sv_p: cute.Pointer, out_p: cute.Pointer,
        batch: cutlass.Int32,
        s_q: cutlass.Int32, s_k: cutlass.Int32, s_v: cutlass.Int32, s_z: cutlass.Int32,
        s_adt: cutlass.Int32, s_dt: cutlass.Int32, s_tr: cutlass.Int32, s_ang: cutlass.Int32,
        stream: cuda.CUstream,
    ):  # fmt: skip
        step_kernel(
            q_p, k_p, v_p, z_p, adt_p, dt_p, trap_p, qb_p, kb_p, ang_p, d_p, mv_p, mz_p, mo_p,
            sa_p, ss_p, sk_p, sv_p, out_p, s_q, s_k, s_v, s_z, s_adt, s_dt, s_tr, s_ang,
        ).launch(grid=(H, batch, 1), block=(T, 1, 1), stream=stream)  # fmt: skip

    return step_host, dtype


def compile_variant(variant: Variant, config: StepConfig, options: str | None = None):
    """``cute.compile`` of one variant and config, on placeholder pointers (16-byte aligned),
    for the architecture of CUTE_DSL_ARCH (or the GPU's). Returns the JitCompiledFunction."""
    host, dtype = build_kernel(variant, config)
    ptrs = [
        make_ptr(dtype if name in DTYPE_POINTERS else cutlass.Float32, 256,
                 cute.AddressSpace.gmem, assumed_align=pointer_align(name, variant.dtype))
        for name in POINTER_ARGS
    ]  # fmt: skip
    ints = [cutlass.Int32(1)] * (1 + len(STRIDE_ARGS))
    args = [*ptrs, *ints, cuda.CUstream(0)]
    if options:
        return cute.compile(host, *args, options=options)
    return cute.compile(host, *args)
