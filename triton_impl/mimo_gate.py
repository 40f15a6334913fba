"""The MIMO rank mixing around the core, each with a one-pass Triton backward: the epilogue (z
gate and mimo_o rank sum) and the prologue (v's rank weights).

Per token t, head h, rank r (docs/spec.md): vr_{t,r} = v_t * mimo_v_r into the core;
zr = z_t * mimo_z_r (z_t without mimo_z), yg = y_{t,r} * silu(zr), out_t = sum_r mimo_o_r * yg
out of it. Through PyTorch autograd their backward is about fourteen elementwise passes and
seven reductions over (B, L, R, H, P) fp32 tensors (counted with a dispatch mode: ~320 bf16
(B, L, H, P) tensors of traffic at R=4 with z, ~43 GB at (1, 16384), H=64, P=64;
docs/performance.md).
``_gate_bwd_kernel`` reads dout, y and z once and writes dy and dz once; ``_vmix_bwd_kernel``
reads dvr and v once and writes dv once; both sum their weights' gradients per program.
``_vmix_fwd_kernel`` forms vr itself in one pass (read v, write vr in its 16-bit dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from mamba3_kernels.eager_calls import apply_positional, eager_custom_op

from .core_scan import operand_dtype
from .launch import run_kernel

__all__ = ["gated", "gate_fwd", "mimo_gate", "mimo_v_mix", "vmix_fwd"]

_ROWS = 16  # rank rows (tokens x R) per step: 72 registers at R=4, P=64 (no spills)
# Tokens per program: each program adds its (R, P) weight-gradient sums atomically once, so this
# sets the number of atomic adds (with short blocks, serialised adds on the same few cache lines
# dominated the kernels' time; docs/performance.md).
_TOKENS = 256


def _token_blocks(R: int) -> tuple[int, int]:
    """(tokens per step, steps per program) of the rank-mixing kernels at rank R: _ROWS rank
    rows per step, about _TOKENS tokens per program."""
    bt = max(1, _ROWS // R)
    return bt, max(1, _TOKENS // bt)


@triton.jit
def _fold_tokens(acc, BT: tl.constexpr, R: tl.constexpr, P: tl.constexpr):
    """(BT * R, P) per-row sums -> (R, P) per-rank sums (rows are token * R + rank)."""
    return tl.sum(tl.reshape(acc, (BT, R, P)), axis=0)


@triton.jit
def _gate_bwd_kernel(
    dout_ptr, y_ptr, z_ptr, mz_ptr, mo_ptr, dy_ptr, dz_ptr, dmz_ptr, dmo_ptr, T, H,
    R: tl.constexpr, P: tl.constexpr, BT: tl.constexpr, STEPS: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_MZ: tl.constexpr, HAS_MO: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(T, BT * STEPS) * H,) over T = B * L tokens and the heads (heads fastest),
    STEPS blocks of BT tokens per program. dout, z (T, H, P); y, dy (T, R, H, P) (one dtype,
    fp32 or 16-bit: core_scan.operand_dtype);
    mimo_z, mimo_o (H, R, P) fp32; dz (T, H, P) fp32; dmz, dmo (H, R, P) fp32,
    zero-initialised (each program adds its part).
    Without HAS_MO (SISO's gate: R = 1) the rank weights are ones."""
    # heads vary fastest over the grid: programs in flight together add into different heads'
    # weight sums (no queue of atomic adds on one cache line) and read neighbouring P-rows
    h = tl.program_id(0) % H
    blk = tl.program_id(0) // H
    rows = tl.arange(0, BT * R)
    r = rows % R
    pp = tl.arange(0, P)[None, :]
    w_off = (h * R + r)[:, None] * P + pp
    if HAS_MO:
        mo = tl.load(mo_ptr + w_off)
    if HAS_MZ:
        mz = tl.load(mz_ptr + w_off)
    rp = tl.arange(0, R)[:, None] * P + tl.arange(0, P)[None, :]
    # weight-gradient sums per row, folded over the tokens once at the end (not per step)
    acc_mo = tl.zeros((BT * R, P), dtype=tl.float32)
    acc_mz = tl.zeros((BT * R, P), dtype=tl.float32)
    for step in range(STEPS):
        t0 = (blk * STEPS + step) * BT
        t = (t0 + rows // R).to(tl.int64)
        valid = (t < T)[:, None]
        tok = (t * H + h)[:, None] * P + pp  # (T, H, P) offsets of each row's token
        y_off = ((t * R + r) * H + h)[:, None] * P + pp
        y = tl.load(y_ptr + y_off, mask=valid, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + tok, mask=valid, other=0.0).to(tl.float32)
        dyg = dout
        if HAS_MO:
            dyg = dout * mo
        if HAS_Z:
            zt = tl.load(z_ptr + tok, mask=valid, other=0.0).to(tl.float32)
            zr = zt
            if HAS_MZ:
                zr = zt * mz
            s = tl.sigmoid(zr)
            g = zr * s
            yg = y * g
            dy = dyg * g
            dzr = dyg * y * (s * (1.0 + zr * (1.0 - s)))  # d silu(x)/dx = s (1 + x (1 - s))
            dz_rows = dzr
            if HAS_MZ:
                dz_rows = dzr * mz
                acc_mz += dzr * zt
            dz = tl.sum(tl.reshape(dz_rows, (BT, R, P)), axis=1)
            tt = (t0 + tl.arange(0, BT)).to(tl.int64)
            dz_off = (tt * H + h)[:, None] * P + tl.arange(0, P)[None, :]
            tl.store(dz_ptr + dz_off, dz, mask=(tt < T)[:, None])
        else:
            yg = y
            dy = dyg
        if HAS_MO:
            acc_mo += dout * yg
        tl.store(dy_ptr + y_off, dy.to(dy_ptr.dtype.element_ty), mask=valid)
    if HAS_MO:
        tl.atomic_add(dmo_ptr + h * R * P + rp, _fold_tokens(acc_mo, BT, R, P), sem="relaxed")
    if HAS_MZ:
        tl.atomic_add(dmz_ptr + h * R * P + rp, _fold_tokens(acc_mz, BT, R, P), sem="relaxed")


def gate_bwd(dout: Tensor, y: Tensor, z: Tensor | None, mz: Tensor | None, mo: Tensor | None):
    """(dy, dz, dmz, dmo) of out = sum_r mo_r * y_r * silu(z * mz_r) (no gate without z).
    dout (B, L, H, P); y (B, L, R, H, P) fp32 or 16-bit; z (B, L, H, P) or None; mz, mo
    (H, R, P) fp32 (mz None: z ungated by rank; mo None, only with R = 1: SISO's gate).
    dy (B, L, R, H, P) in y's dtype (the core's backward rounds it to that for its products);
    dz (B, L, H, P) fp32 or an empty tensor; dmz, dmo (H, R, P) fp32 (empty without
    z and mz, without mo)."""
    B, L, R, H, P = y.shape
    T = B * L
    f32 = torch.float32
    dy = torch.empty_like(y)
    dz = torch.empty(z.shape, dtype=f32, device=y.device) if z is not None else y.new_empty(0)
    has_mz = z is not None and mz is not None
    dmz = torch.zeros((H, R, P), dtype=f32, device=y.device) if has_mz else y.new_empty(0)
    if mo is None and R != 1:
        raise ValueError(f"the gate without mimo_o needs one rank, not {R}")
    dmo = torch.zeros((H, R, P), dtype=f32, device=y.device) if mo is not None else y.new_empty(0)
    if T == 0:
        return dy, dz, dmz, dmo
    bt, steps = _token_blocks(R)
    dummy = dy
    run_kernel(
        _gate_bwd_kernel, (triton.cdiv(T, bt * steps) * H,), dout, y,
        z if z is not None else dummy, mz if has_mz else dummy, mo if mo is not None else dummy,
        dy, dz if z is not None else dummy, dmz if has_mz else dummy,
        dmo if mo is not None else dummy, T, H, R=R, P=P, BT=bt, STEPS=steps,
        HAS_Z=z is not None, HAS_MZ=has_mz, HAS_MO=mo is not None, num_warps=4,
    )  # fmt: skip
    return dy, dz, dmz, dmo


@eager_custom_op("mamba3_triton::mimo_gate_bwd")
def _gate_bwd_op(
    dout: Tensor, y: Tensor, z: Tensor | None, mz: Tensor | None, mo: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return gate_bwd(dout.contiguous(), y.contiguous(), z, mz, mo)


@_gate_bwd_op.register_fake
def _gate_bwd_fake(dout, y, z, mz, mo):
    f32 = torch.float32
    B, L, R, H, P = y.shape
    e = y.new_empty
    has_mz = z is not None and mz is not None
    return (e(y.shape, dtype=y.dtype), e(z.shape, dtype=f32) if z is not None else e(0),
            e((H, R, P), dtype=f32) if has_mz else e(0),
            e((H, R, P), dtype=f32) if mo is not None else e(0))  # fmt: skip


@triton.jit
def _gate_fwd_kernel(
    y_ptr, z_ptr, mz_ptr, mo_ptr, out_ptr, T, H,
    R: tl.constexpr, P: tl.constexpr, BT: tl.constexpr, STEPS: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_MZ: tl.constexpr, HAS_MO: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(T, BT * STEPS) * H,), heads fastest (see _gate_bwd_kernel). y (T, R, H, P)
    fp32 or 16-bit; z (T, H, P); mimo_z, mimo_o (H, R, P) fp32; out (T, H, P) in its own
    dtype: out_t = sum_r mo_r y_{t,r} silu(z_t mz_r), in fp32 and rounded once."""
    h = tl.program_id(0) % H
    blk = tl.program_id(0) // H
    rows = tl.arange(0, BT * R)
    r = rows % R
    pp = tl.arange(0, P)[None, :]
    w_off = (h * R + r)[:, None] * P + pp
    if HAS_MO:
        mo = tl.load(mo_ptr + w_off)
    if HAS_MZ:
        mz = tl.load(mz_ptr + w_off)
    for step in range(STEPS):
        t0 = (blk * STEPS + step) * BT
        t = (t0 + rows // R).to(tl.int64)
        valid = (t < T)[:, None]
        y = tl.load(y_ptr + ((t * R + r) * H + h)[:, None] * P + pp, mask=valid, other=0.0)
        yg = y.to(tl.float32)
        if HAS_Z:
            # (each token's z row is read by its R rank rows: cache hits after the first)
            zr = tl.load(z_ptr + (t * H + h)[:, None] * P + pp, mask=valid, other=0.0)
            zr = zr.to(tl.float32)
            if HAS_MZ:
                zr = zr * mz
            yg = yg * zr * tl.sigmoid(zr)
        if HAS_MO:
            yg = yg * mo
        out = tl.sum(tl.reshape(yg, (BT, R, P)), axis=1)
        tt = (t0 + tl.arange(0, BT)).to(tl.int64)
        o_off = (tt * H + h)[:, None] * P + tl.arange(0, P)[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=(tt < T)[:, None])


def gate_fwd(y: Tensor, z: Tensor | None, mz: Tensor | None, mo: Tensor | None,
             out_dtype: torch.dtype) -> Tensor:  # fmt: skip
    """out (B, L, H, P) in ``out_dtype`` = sum_r mo_r * y_r * silu(z * mz_r) in one pass (shapes
    as gate_bwd; fp32 arithmetic, one rounding)."""
    B, L, R, H, P = y.shape
    if mo is None and R != 1:
        raise ValueError(f"the gate without mimo_o needs one rank, not {R}")
    out = torch.empty((B, L, H, P), dtype=out_dtype, device=y.device)
    T = B * L
    if T == 0:
        return out
    bt, steps = _token_blocks(R)
    has_mz = z is not None and mz is not None
    run_kernel(
        _gate_fwd_kernel, (triton.cdiv(T, bt * steps) * H,), y,
        z if z is not None else y, mz if has_mz else y, mo if mo is not None else y, out, T, H,
        R=R, P=P, BT=bt, STEPS=steps, HAS_Z=z is not None, HAS_MZ=has_mz,
        HAS_MO=mo is not None, num_warps=4,
    )  # fmt: skip
    return out


@eager_custom_op("mamba3_triton::mimo_gate_fwd")
def _gate_fwd_op(
    y: Tensor, z: Tensor | None, mz: Tensor | None, mo: Tensor | None, out_dtype: str
) -> Tensor:
    z = z.contiguous() if z is not None else None
    return gate_fwd(y.contiguous(), z, mz, mo, getattr(torch, out_dtype))


@_gate_fwd_op.register_fake
def _gate_fwd_fake(y, z, mz, mo, out_dtype):
    B, L, R, H, P = y.shape
    return y.new_empty((B, L, H, P), dtype=getattr(torch, out_dtype))


def gated(y: Tensor, z: Tensor | None, mz: Tensor | None) -> Tensor:
    """y (B, L, R, H, P) times silu(z * mz_r) (z (B, L, H, P), mz (H, R, P) or None), in
    PyTorch; y itself without z."""
    if z is None:
        return y
    zr = z.float().unsqueeze(2)
    if mz is not None:
        zr = zr * mz.float().transpose(0, 1)
    return y * F.silu(zr)


class _MimoGate(torch.autograd.Function):
    """The epilogue as one autograd node (setup_context style for functorch)."""

    @staticmethod
    def forward(y, z, mz, mo, need_value, out_dtype):
        if need_value:
            return _gate_fwd_op(y, z, mz, mo, str(out_dtype).replace("torch.", ""))
        # Value not wanted (a vjp-only caller): zero-strided zeros, no passes over y.
        B, L, R, H, P = y.shape
        return torch.zeros(1, dtype=out_dtype, device=y.device).expand(B, L, H, P)

    @staticmethod
    def setup_context(ctx, inputs, output):
        y, z, mz, mo, _, _ = inputs
        ctx.save_for_backward(y, z, mz, mo)

    @staticmethod
    def backward(ctx, dout):
        y, z, mz, mo = ctx.saved_tensors
        dy, dz, dmz, dmo = _gate_bwd_op(dout, y, z, mz, mo)
        return (dy, dz.to(z.dtype) if z is not None else None,
                dmz if z is not None and mz is not None else None,
                dmo if mo is not None else None, None, None)  # fmt: skip


def mimo_gate(y: Tensor, z: Tensor | None, mimo_z: Tensor | None, mimo_o: Tensor | None,
              out_dtype: torch.dtype, need_value: bool = True) -> Tensor:  # fmt: skip
    """Differentiable epilogue: out (B, L, H, P) in ``out_dtype`` = sum_r mimo_o_r * y_r *
    silu(z * mimo_z_r) (no gate without z). y (B, L, R, H, P) fp32 or 16-bit; z (B, L, H, P)
    or None; mimo_z (H, R, P) or None; mimo_o (H, R, P), or None with R = 1 (SISO's z gate:
    out = y silu(z)). need_value=False: the output's value is zeros (a caller that only takes
    the vjp), its gradients stay exact."""
    mz = mimo_z.float() if mimo_z is not None else None
    mo = mimo_o.float() if mimo_o is not None else None
    return apply_positional(_MimoGate, y, z, mz, mo, need_value, out_dtype)


@triton.jit
def _rank_rows(mv_ptr, H, R: tl.constexpr, P: tl.constexpr, BT: tl.constexpr):
    """A v-mix program's (head, token block, rank rows 0..BT*R, their ranks, P columns (1, P),
    the head's (BT*R, P) rank weights). Heads vary fastest over the grid: programs in flight
    together touch neighbouring P-rows, and the backward's add into different heads' weight
    sums (no queue of atomic adds on one cache line)."""
    h = tl.program_id(0) % H
    blk = tl.program_id(0) // H
    rows = tl.arange(0, BT * R)
    r = rows % R
    pp = tl.arange(0, P)[None, :]
    mv = tl.load(mv_ptr + (h * R + r)[:, None] * P + pp)
    return h, blk, rows, r, pp, mv


@triton.jit
def _vmix_fwd_kernel(
    v_ptr, mv_ptr, vr_ptr, T, H,
    R: tl.constexpr, P: tl.constexpr, BT: tl.constexpr, STEPS: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(T, BT * STEPS) * H,), heads fastest (neighbouring programs write neighbouring
    P-rows). v (T, H, P); mimo_v (H, R, P) fp32; vr (T, R, H, P) = v_t * mimo_v_r, the product
    in fp32 rounded once to vr's dtype."""
    h, blk, rows, r, pp, mv = _rank_rows(mv_ptr, H, R, P, BT)
    for step in range(STEPS):
        t = ((blk * STEPS + step) * BT + rows // R).to(tl.int64)
        valid = (t < T)[:, None]
        # (each token's row is read by its R rank rows: cache hits after the first)
        v = tl.load(v_ptr + (t * H + h)[:, None] * P + pp, mask=valid, other=0.0).to(tl.float32)
        vr = (v * mv).to(vr_ptr.dtype.element_ty)
        tl.store(vr_ptr + ((t * R + r) * H + h)[:, None] * P + pp, vr, mask=valid)


def vmix_fwd(v: Tensor, mv: Tensor) -> Tensor:
    """vr (B, L, R, H, P) = v (B, L, H, P) * mv (H, R, P) fp32 per rank, in v's dtype when that
    is 16-bit, else fp32."""
    B, L, H, P = v.shape
    R = mv.shape[1]
    vr = torch.empty((B, L, R, H, P), dtype=operand_dtype(v.dtype), device=v.device)
    T = B * L
    if T == 0:
        return vr
    bt, steps = _token_blocks(R)
    run_kernel(
        _vmix_fwd_kernel, (triton.cdiv(T, bt * steps) * H,), v, mv, vr, T, H,
        R=R, P=P, BT=bt, STEPS=steps, num_warps=4,
    )  # fmt: skip
    return vr


@eager_custom_op("mamba3_triton::mimo_vmix_fwd")
def _vmix_fwd_op(v: Tensor, mv: Tensor) -> Tensor:
    return vmix_fwd(v.contiguous(), mv.contiguous())


@_vmix_fwd_op.register_fake
def _vmix_fwd_fake(v, mv):
    B, L, H, P = v.shape
    return v.new_empty((B, L, mv.shape[1], H, P), dtype=operand_dtype(v.dtype))


@triton.jit
def _vmix_bwd_kernel(
    dvr_ptr, v_ptr, mv_ptr, dv_ptr, dmv_ptr, T, H,
    R: tl.constexpr, P: tl.constexpr, BT: tl.constexpr, STEPS: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(T, BT * STEPS) * H,), heads fastest (see _gate_bwd_kernel). dvr (T, R, H, P)
    fp32; v, dv (T, H, P); mimo_v (H, R, P) fp32; dmv (H, R, P) fp32, zero-initialised:
    dv_t = sum_r dvr_{t,r} mimo_v_r, dmv_r += sum_t dvr_{t,r} v_t."""
    h, blk, rows, r, pp, mv = _rank_rows(mv_ptr, H, R, P, BT)
    acc = tl.zeros((BT * R, P), dtype=tl.float32)
    for step in range(STEPS):
        t0 = (blk * STEPS + step) * BT
        t = (t0 + rows // R).to(tl.int64)
        valid = (t < T)[:, None]
        dvr = tl.load(dvr_ptr + ((t * R + r) * H + h)[:, None] * P + pp, mask=valid, other=0.0)
        dvr = dvr.to(tl.float32)  # (16-bit when vr is: see _MimoVMix)
        v = tl.load(v_ptr + (t * H + h)[:, None] * P + pp, mask=valid, other=0.0).to(tl.float32)
        acc += dvr * v
        dv = tl.sum(tl.reshape(dvr * mv, (BT, R, P)), axis=1)
        tt = (t0 + tl.arange(0, BT)).to(tl.int64)
        dv_off = (tt * H + h)[:, None] * P + tl.arange(0, P)[None, :]
        tl.store(dv_ptr + dv_off, dv.to(dv_ptr.dtype.element_ty), mask=(tt < T)[:, None])
    rp = tl.arange(0, R)[:, None] * P + tl.arange(0, P)[None, :]
    tl.atomic_add(dmv_ptr + h * R * P + rp, _fold_tokens(acc, BT, R, P), sem="relaxed")


def vmix_bwd(dvr: Tensor, v: Tensor, mv: Tensor) -> tuple[Tensor, Tensor]:
    """(dv, dmv) of vr = v * mimo_v: dvr (B, L, R, H, P) fp32 or 16-bit; v (B, L, H, P);
    mv (H, R, P) fp32. dv (B, L, H, P) in v's dtype, dmv (H, R, P) fp32."""
    B, L, R, H, P = dvr.shape
    T = B * L
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dmv = torch.zeros((H, R, P), dtype=torch.float32, device=v.device)
    if T == 0:
        return dv, dmv
    bt, steps = _token_blocks(R)
    run_kernel(
        _vmix_bwd_kernel, (triton.cdiv(T, bt * steps) * H,), dvr, v, mv, dv, dmv, T, H,
        R=R, P=P, BT=bt, STEPS=steps, num_warps=4,
    )  # fmt: skip
    return dv, dmv


@eager_custom_op("mamba3_triton::mimo_vmix_bwd")
def _vmix_bwd_op(dvr: Tensor, v: Tensor, mv: Tensor) -> tuple[Tensor, Tensor]:
    return vmix_bwd(dvr.contiguous(), v.contiguous(), mv.contiguous())


@_vmix_bwd_op.register_fake
def _vmix_bwd_fake(dvr, v, mv):
    return v.new_empty(v.shape), v.new_empty(mv.shape, dtype=torch.float32)


class _MimoVMix(torch.autograd.Function):
    """vr = v * mimo_v as one autograd node (setup_context style for functorch). vr is in v's
    dtype when that is 16-bit: the core rounds vr to it for every product anyway, so only its
    D skip (y += D vr in the backward's recompute, dD) sees the rounding, and the fp32 copy
    would be R times v's bytes written here and read by every core kernel."""

    @staticmethod
    def forward(v, mv):
        # One Triton pass: the product in fp32 rounded once (bit for bit the fp32 product then a
        # cast), written in the (B, L, R, H, P) order the core reads: PyTorch's fp32 product
        # and cast take two passes over R times v's bytes (docs/performance.md); and a product
        # against a transposed view of the weights once came out in (B, L, H, R, P) order,
        # which the core copied whole.
        return _vmix_fwd_op(v, mv)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, dvr):
        v, mv = ctx.saved_tensors
        dv, dmv = _vmix_bwd_op(dvr, v, mv)  # (the kernel reads dvr in its own dtype)
        return dv, dmv


def mimo_v_mix(v: Tensor, mimo_v: Tensor) -> Tensor:
    """Differentiable vr (B, L, R, H, P) = v (B, L, H, P) * mimo_v (H, R, P) per rank, in v's
    dtype when it is 16-bit, else fp32 (see _MimoVMix)."""
    return apply_positional(_MimoVMix, v, mimo_v.float())
