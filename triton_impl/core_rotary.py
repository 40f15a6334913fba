"""Bias + rotary + group->head expansion of q and k in Triton, and its hand-written backward;
RotaryConfig, the launch choices of these passes and of the angle scans (angle_scan.py): the
"rotary" kernel family of the backend, tuned with the core family it serves.

Fused with the core (rot_core.rot_core_scan) so that the per-head rotated q/k exist only as the
core's dot operands (in the dot dtype) and their fp32 gradients only between the core's
backward and the rotary backward: no PyTorch elementwise pass and no autograd ever touches a
per-head tensor.

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

import dataclasses
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from mamba3_kernels.backend import KernelSpec
from mamba3_kernels.eager_calls import eager_custom_op
from mamba3_kernels.problem import Problem

from .core_segments import _multiprocessors
from .fwd_tiles import _TWO_PI, _load_rot, _store_rot
from .launch import interpreting, run_kernel

__all__ = ["SPEC", "RotaryConfig", "rotary_fwd", "rotary_bwd"]


@dataclass(frozen=True)
class RotaryConfig:
    """Launch choices of the rotary passes (this file) and of the angle scans (angle_scan.py):
    the core family's prep, which inference forwards through the core, training forwards and
    backwards run (docs/performance.md has the measurements behind each default).

    fast_trig:      1: hardware cos/sin after range reduction (GPU builds; the interpreter keeps
                    the accurate functions); 0: the accurate library functions.
    angle_step:     tokens per step of the angle scans; angle_warps: their warps per program.
    angle_pairs:    angle pairs per angle-scan program (fewer: more programs in flight).
    angle_stages:   software-pipelining depth of the angle scans' walks (1: none).
    angle_programs: the angle scans' walks over a sequence are cut into segments (each then
                    starting from the sums of the segments before it, a separate pass) until
                    there are this many programs per multiprocessor (0: one walk per sequence).
    bwd_heads:      heads per rotary-backward program (0: the whole group); fewer heads mean
                    more programs, whose dq/dk partial sums over heads are added atomically.
    rot_tokens:     tokens per rotary program (its (tokens, N/2) fp32 pair tiles live in
                    registers); rot_warps: their warps.
    rot_bwd_maxnreg: register cap of the rotary backward (0: none): capped, more programs share
                    a multiprocessor at the price of a small spill.
    rot_bwd_stages: software-pipelining depth of the rotary backward's loop over heads (2
                    prefetches the next head's gradient rows while this one unrotates).
    """

    fast_trig: int = 1
    angle_step: int = 64
    angle_warps: int = 1
    angle_pairs: int = 32
    angle_stages: int = 1
    angle_programs: int = 16
    bwd_heads: int = 0
    rot_tokens: int = 16
    rot_warps: int = 2
    rot_bwd_maxnreg: int = 128
    rot_bwd_stages: int = 2

    def knobs(self) -> list[int]:
        """The fields as the custom ops take them (an int list, in field order)."""
        return [int(getattr(self, f.name)) for f in dataclasses.fields(self)]

    @classmethod
    def of(cls, knobs: list[int] | None) -> RotaryConfig:
        """The config of ``knobs()`` (None: the defaults)."""
        return _DEFAULT if not knobs else cls(*knobs)


_DEFAULT = RotaryConfig()


def default_config(problem: Problem) -> RotaryConfig:
    """The measured defaults (one setting for every call: docs/performance.md)."""
    return _DEFAULT


def search_space(problem: Problem) -> dict[str, list]:
    """Candidate values per parameter (constraint() removes invalid combinations)."""
    return {
        "angle_step": [32, 64, 128, 256],
        "angle_warps": [1, 2, 4],
        "angle_pairs": [8, 16, 32],
        "angle_programs": [0, 8, 16, 32],
        "bwd_heads": [0, 1, 2, 4],
        "rot_tokens": [8, 16, 32],
        "rot_warps": [2, 4],
        "rot_bwd_maxnreg": [0, 128, 192],
        "rot_bwd_stages": [1, 2],
    }


def constraint(problem: Problem, config: RotaryConfig, device_props: dict | None) -> str | None:
    """Why ``config`` cannot run ``problem``, or None."""
    pow2 = ("angle_step", "angle_warps", "angle_pairs", "rot_tokens", "rot_warps")
    for name in pow2:
        v = getattr(config, name)
        if v < 1 or v & (v - 1):
            return f"{name} {v} is not a power of two"
    if config.fast_trig not in (0, 1):
        return f"fast_trig {config.fast_trig} not 0 or 1"
    if config.angle_stages < 1 or config.rot_bwd_stages < 1:
        return "angle_stages and rot_bwd_stages are >= 1"
    if config.angle_programs < 0 or config.bwd_heads < 0:
        return "angle_programs and bwd_heads are >= 0"
    if config.rot_bwd_maxnreg and not 64 <= config.rot_bwd_maxnreg <= 255:
        return f"rot_bwd_maxnreg {config.rot_bwd_maxnreg} outside [64, 255]"
    return None


SPEC = KernelSpec(
    name="rotary",
    modes=("training", "inference"),
    config_cls=RotaryConfig,
    applies=lambda problem: not problem.decode,
    default=default_config,
    space=search_space,
    constraint=constraint,
)


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


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _fast_trig(cfg: RotaryConfig) -> bool:
    return bool(cfg.fast_trig) and not interpreting()


def rotary_fwd(q, k, qb, kb, theta, halves: bool, out_dtype: torch.dtype, pair_major=False,
               cfg: RotaryConfig = _DEFAULT):  # fmt: skip
    """q, k (B, L, R, G, N) any float; qb, kb (R, H, N) fp32; theta (B, L, H, S) fp32.
    Returns qr, kr (B, L, R, H, N) in out_dtype; with pair_major their columns in pair-member
    order (the halves layout) whatever q's layout."""
    B, L, R, G, N = q.shape
    H, S = qb.shape[1], theta.shape[-1]
    qr = torch.empty((B, L, R, H, N), dtype=out_dtype, device=q.device)
    kr = torch.empty_like(qr)
    T = B * L
    if T > 0:
        bt = cfg.rot_tokens
        run_kernel(
            _rot_fwd_kernel, (triton.cdiv(T, bt), R * H),
            q, k, qb, kb, theta, qr, kr, T, H, G, N=N, S=S, R=R, BT=bt, HALVES=halves,
            FAST=_fast_trig(cfg), PAIR_MAJOR=pair_major,
            num_warps=cfg.rot_warps,
        )  # fmt: skip
    return qr, kr


_XR = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def rotary_bwd(dqr, dkr, q, k, qb, kb, theta, halves: bool, xr_dtype=torch.float32,
               dtheta_given=False, pair_major=False, cfg: RotaryConfig = _DEFAULT):  # fmt: skip
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
    hb = math.gcd(cfg.bwd_heads or HG, HG)  # heads per program, a divisor of HG
    alloc = torch.zeros if hb < HG else torch.empty
    dq = alloc((B, L, R, G, N), dtype=f32, device=dev)
    dk = alloc((B, L, R, G, N), dtype=f32, device=dev)
    bt = _bwd_tokens(T, R * H // hb, dev, cfg.rot_tokens)
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
            N=N, S=S, R=R, BT=bt, HALVES=halves, XR=_XR[xr_dtype], FAST=_fast_trig(cfg),
            HB=hb, ATOMIC=hb < HG, GIVEN=dtheta_given,
            PAIR_MAJOR=pair_major, STAGES=cfg.rot_bwd_stages,
            num_warps=cfg.rot_warps,
            **_cap(cfg.rot_bwd_maxnreg),
        )  # fmt: skip
    else:
        dth.zero_()
        pq.zero_()
        pk.zero_()
    if dtheta_given:
        return dq, dk, pq.sum(0), pk.sum(0), dth
    return dq, dk, pq.sum(0), pk.sum(0), dth.sum(0) if R > 1 else dth[0]


def _bwd_tokens(T: int, groups: int, device: torch.device, tokens: int) -> int:
    """Tokens per rotary-backward program: ``tokens`` (RotaryConfig.rot_tokens), halved (to 8
    at least) while the T / tokens x groups programs would not give three per multiprocessor.
    Each program walks its heads one after another, so with few programs the pass takes as
    long as a whole wave; with many, longer token blocks win (docs/performance.md)."""
    bt = tokens
    if device.type != "cuda":
        return bt
    want = 3 * _multiprocessors(device)
    while bt > 8 and triton.cdiv(T, bt) * groups < want:
        bt //= 2
    return bt


def _cap(cap: int) -> dict:
    """A register cap as a launch option (none when it is 0)."""
    return {"maxnreg": cap} if cap else {}


# Custom ops (functorch unwraps tensors before an op's kernel runs; see core_scan). Their autograd
# node is rot_core's _RotCore.
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@eager_custom_op("mamba3_triton::rotary_fwd")
def _rotary_fwd_op(
    q: Tensor, k: Tensor, qb: Tensor, kb: Tensor, theta: Tensor, halves: bool, out_dtype: str,
    pair_major: bool = False, knobs: list[int] | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    return rotary_fwd(q, k, qb, kb, theta, halves, _DTYPES[out_dtype], pair_major,
                      RotaryConfig.of(knobs))  # fmt: skip


@_rotary_fwd_op.register_fake
def _rotary_fwd_fake(q, k, qb, kb, theta, halves, out_dtype, pair_major=False, knobs=None):
    B, L, R, G, N = q.shape
    shape = (B, L, R, qb.shape[1], N)
    return q.new_empty(shape, dtype=_DTYPES[out_dtype]), q.new_empty(
        shape, dtype=_DTYPES[out_dtype]
    )


@eager_custom_op("mamba3_triton::rotary_bwd")
def _rotary_bwd_op(
    dqr: Tensor, dkr: Tensor, q: Tensor, k: Tensor, qb: Tensor, kb: Tensor, theta: Tensor,
    halves: bool, xr_dtype: str, dtheta_given: bool = False, pair_major: bool = False,
    knobs: list[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    return rotary_bwd(dqr.contiguous(), dkr.contiguous(), q, k, qb, kb, theta, halves,
                      _DTYPES[xr_dtype], dtheta_given, pair_major,
                      RotaryConfig.of(knobs))  # fmt: skip


@_rotary_bwd_op.register_fake
def _rotary_bwd_fake(dqr, dkr, q, k, qb, kb, theta, halves, xr_dtype, dtheta_given=False,
                     pair_major=False, knobs=None):  # fmt: skip
    f32 = torch.float32
    e = q.new_empty
    return (
        e(q.shape, dtype=f32),
        e(q.shape, dtype=f32),
        e(qb.shape, dtype=f32),
        e(kb.shape, dtype=f32),
        e((0,) if dtheta_given else theta.shape, dtype=f32),
    )


def compile_kernels(
    R: int, N: int, S: int, halves: bool, dtype: str = "bf16", target=None, fast: bool = True,
    bwd_heads: int = 4, atomic: bool = True, tokens: int = 32, given: bool = False,
    pair_major: bool = True, cfg: RotaryConfig = _DEFAULT,
):  # fmt: skip
    """Compile the rotary forward and backward kernels ahead of time (no GPU needed) for
    ``target`` (default sm_90); fast: hardware trig; bwd_heads, atomic: heads per backward
    program and whether those add into dq/dk; tokens: tokens per program; given: the backward
    whose d theta the core backward formed (it takes 16-bit dqr, dkr and leaves d theta alone);
    pair_major: qr, kr (and their gradients) in the core's pair-member column order, as the
    backward's recompute runs them. Returns {name: compiled}."""
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
             "STAGES": cfg.rot_bwd_stages}  # fmt: skip
    launches = (("rotary_fwd", fwd_fn, fwd, consts), ("rotary_bwd", bwd_fn, bwd, bwd_c))
    for name, fn, sig, c in launches:
        sig = {**sig, **ints, **{k: "constexpr" for k in c}}
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=c)
        opts = {
            "num_warps": cfg.rot_warps,
            **(_cap(cfg.rot_bwd_maxnreg) if fn is bwd_fn else {}),
        }
        out[name] = triton.compile(src, target=target, options=opts)
    return out
