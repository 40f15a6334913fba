"""The cumulative rotary angles in Triton, theta = angle0 + cumsum(pi tanh(angles) dt) reduced
modulo 2 pi along each sequence, with its hand-written backward, and their autograd node
(angle_scan, core_prep's prep).

One program walks one (sequence, head, block of angle pairs) in steps of tokens; with
RotaryConfig.angle_programs (core_rotary) the walk is cut into segments, each starting from the sums
of the segments before it (a sums pass first), until there are that many programs per
multiprocessor. The backward walks the same segments from the end: with G_t the reverse
cumulative sum of d theta within the sequence, d angles_t = G_t pi (1 - tanh^2) dt_t,
d dt_t = pi sum_j G_t tanh_t and d angle0 = G at the first token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mamba3_kernels.eager_calls import apply_positional, eager_custom_op

from .core_rotary import RotaryConfig
from .core_segments import _multiprocessors
from .core_tiles import _seq_bounds
from .fwd_tiles import _PI, _TWO_PI
from .launch import run_kernel

__all__ = ["angle_fwd", "angle_bwd", "angle_scan"]


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


def _angle_launch(S: int, cfg: RotaryConfig) -> tuple[int, int, dict]:
    """(pairs per program, tokens per step, launch options: warps and pipelining depth) of the
    angle scans, from the config."""
    sp = min(triton.next_power_of_2(S), triton.next_power_of_2(cfg.angle_pairs))
    return sp, cfg.angle_step, {"num_warps": cfg.angle_warps, "STAGES": cfg.angle_stages}


def _angle_segments(nseq: int, H: int, S: int, L: int, varlen: bool, device,
                    cfg: RotaryConfig) -> tuple[int, int]:  # fmt: skip
    """(segments per sequence, tokens per segment) of the angle scans: a (sequence, head, pair
    block)'s walk over L tokens is cut into segments (whole steps each) until the programs
    reach cfg.angle_programs per multiprocessor (0: never; varlen: never, its sequences'
    lengths are on the device)."""
    sp, step, _ = _angle_launch(S, cfg)
    per_sm = cfg.angle_programs
    if varlen or per_sm == 0 or L <= step:
        return 1, L
    sms = _multiprocessors(device) if device.type == "cuda" else 1
    blocks = nseq * H * triton.cdiv(S, sp)
    nseg = min(triton.cdiv(per_sm * sms, blocks), triton.cdiv(L, step))
    seg = triton.cdiv(triton.cdiv(L, max(nseg, 1)), step) * step
    return triton.cdiv(L, seg), seg


def _angle_sums(x, dt, nseg: int, seg: int, rate: bool, cfg: RotaryConfig) -> Tensor:
    """Per-segment sums of the angle rates (rate: segments 0 .. nseg - 2, the forward's carries)
    or of x = d theta (segments 1 .. nseg - 1, the backward's): (B, H, nseg - 1, S) fp32."""
    B, L, H, S = x.shape
    sp, step, opts = _angle_launch(S, cfg)
    sums = torch.empty((B, H, nseg - 1, S), dtype=torch.float32, device=x.device)
    run_kernel(
        _angle_sums_kernel, (B * H, triton.cdiv(S, sp), nseg - 1), x, dt, sums, L, H, seg,
        S=S, SP=sp, BL=step, RATE=rate, num_warps=opts["num_warps"],
    )  # fmt: skip
    return sums


def angle_fwd(angles, dt, angle0, cu_seqlens, nseq: int, cfg: RotaryConfig = RotaryConfig()):
    """angles (B, L, H, S) fp32, dt (B, H, L) fp32, angle0 (nseq, H, S) fp32 or None,
    cu_seqlens (nseq + 1,) int32 or None. Returns theta (B, L, H, S) fp32 in [0, 2 pi)."""
    B, L, H, S = angles.shape
    theta = torch.empty_like(angles)
    if L > 0 and S > 0:
        sp, step, opts = _angle_launch(S, cfg)
        nseg, seg = _angle_segments(nseq, H, S, L, cu_seqlens is not None, angles.device, cfg)
        sums = _angle_sums(angles, dt, nseg, seg, True, cfg) if nseg > 1 else dt
        run_kernel(
            _angle_fwd_kernel, (nseq * H, triton.cdiv(S, sp), nseg),
            angles, dt, angle0 if angle0 is not None else dt,
            cu_seqlens if cu_seqlens is not None else dt, sums, theta, L, H, seg,
            S=S, SP=sp, BL=step, VARLEN=cu_seqlens is not None,
            HAS_A0=angle0 is not None, SEGMENTED=nseg > 1, **opts,
        )  # fmt: skip
    return theta


def angle_bwd(gtheta, angles, dt, cu_seqlens, nseq: int, cfg: RotaryConfig = RotaryConfig()):
    """Backward of angle_fwd: (d angles (B, L, H, S), d dt (B, H, L), d angle0 (nseq, H, S)),
    all fp32."""
    B, L, H, S = angles.shape
    f32, dev = torch.float32, angles.device
    if L == 0 or S == 0:
        return torch.zeros_like(angles), torch.zeros_like(dt), torch.zeros((nseq, H, S), dtype=f32,
                                                                           device=dev)  # fmt: skip
    sp, step, opts = _angle_launch(S, cfg)
    atomic = sp < S
    nseg, seg = _angle_segments(nseq, H, S, L, cu_seqlens is not None, dev, cfg)
    sums = _angle_sums(gtheta, dt, nseg, seg, False, cfg) if nseg > 1 else dt
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


@eager_custom_op("mamba3_triton::angle_fwd")
def _angle_fwd_op(
    angles: Tensor, dt: Tensor, angle0: Tensor | None, cu_seqlens: Tensor | None, nseq: int,
    knobs: list[int] | None = None,
) -> Tensor:
    return angle_fwd(angles, dt, angle0, cu_seqlens, nseq, RotaryConfig.of(knobs))


@_angle_fwd_op.register_fake
def _angle_fwd_fake(angles, dt, angle0, cu_seqlens, nseq, knobs=None):
    return torch.empty_like(angles)


@eager_custom_op("mamba3_triton::angle_bwd")
def _angle_bwd_op(
    gtheta: Tensor, angles: Tensor, dt: Tensor, cu_seqlens: Tensor | None, nseq: int,
    knobs: list[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    return angle_bwd(gtheta.contiguous(), angles, dt, cu_seqlens, nseq, RotaryConfig.of(knobs))


@_angle_bwd_op.register_fake
def _angle_bwd_fake(gtheta, angles, dt, cu_seqlens, nseq, knobs=None):
    H, S = angles.shape[2], angles.shape[3]
    return torch.empty_like(angles), torch.empty_like(dt), angles.new_empty((nseq, H, S))


class _AngleScan(torch.autograd.Function):
    """theta = angle0 + cumsum(pi tanh(angles) dt) mod 2 pi, with its hand-written backward (the
    modulo is a constant shift: its gradient is the identity)."""

    @staticmethod
    def forward(angles, dt, angle0, cu_seqlens, nseq, knobs):
        return _angle_fwd_op(angles, dt, angle0, cu_seqlens, nseq, knobs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        angles, dt, angle0, cu_seqlens, nseq, knobs = inputs
        ctx.save_for_backward(angles, dt, cu_seqlens)
        ctx.nseq, ctx.knobs = nseq, knobs
        ctx.has_a0 = angle0 is not None

    @staticmethod
    def backward(ctx, gtheta):
        angles, dt, cu_seqlens = ctx.saved_tensors
        dang, ddt, da0 = _angle_bwd_op(gtheta, angles, dt, cu_seqlens, ctx.nseq, ctx.knobs)
        return dang, ddt, da0 if ctx.has_a0 else None, None, None, None


def angle_scan(angles, dt, angle0, cu_seqlens, nseq: int, cfg: RotaryConfig = RotaryConfig()):
    """Differentiable cumulative angles: angles (B, L, H, S), dt (B, H, L), angle0 (nseq, H, S)
    or None -> theta (B, L, H, S) fp32 in [0, 2 pi), per sequence when cu_seqlens is given."""
    angles = angles.float().contiguous()
    dt = dt.float().contiguous()
    angle0 = angle0.float().contiguous() if angle0 is not None else None
    return apply_positional(_AngleScan, angles, dt, angle0, cu_seqlens, nseq, cfg.knobs())


def compile_kernels(S: int, target=None, pairs: int = 32, segmented: bool = True,
                    cfg: RotaryConfig = RotaryConfig()) -> dict:  # fmt: skip
    """Compile the angle scan's forward and backward kernels ahead of time (no GPU needed) for
    ``target`` (default sm_90); pairs: angle pairs per program; segmented: the walks over
    segments of the sequence from carries (_angle_segments; their sums kernel is then also
    built). Returns {name: compiled}."""
    from triton.backends.compiler import GPUTarget

    target = target or GPUTarget("cuda", 90, 64)
    out = {}
    sp = min(triton.next_power_of_2(S), pairs)
    ac = dict(S=S, SP=sp, BL=cfg.angle_step, VARLEN=False, STAGES=cfg.angle_stages,
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
        sc = dict(S=S, SP=sp, BL=cfg.angle_step, RATE=True)
        angle_launches.append(("angle_sums", _angle_sums_kernel, asums, sc))
    for name, fn, sig, c in angle_launches:
        sig = {**sig, **{k: "constexpr" for k in c}}
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=c)
        out[name] = triton.compile(src, target=target, options={"num_warps": cfg.angle_warps})
    return out
