"""Triton decode step (SISO and MIMO): one launch per step, state updated in place.

``split_p`` programs share one (batch, head) pair, each walking its P / split_p rows of the state
in tiles of ``block_p`` rows (more programs in flight at small batch). The fp32 P x N state is
read and written tile by tile (each element by the thread that loaded it), which is the memory
floor of a decode step; old v is read and new v written per row, by the row's owner. Old k and
the old angle feed every program of the head, so the new ones may only be written after all of
them have read: with one program per head a CTA barrier settles it; with several, each program
takes a ticket from a per-head counter after its reads (release/acquire), and the one that
draws the last ticket of the step writes them. The counter is never reset: tickets are taken
modulo split_p, and one step's programs all draw before the next step's (stream order).

A state pool (POOLED, ``state_indices``): each program loads its batch row's slot and offsets
the state pointers by it, so the pool is read and written where it lies (no gather or scatter
copies); a padding row (negative slot) writes a zero output and returns. The ssm state may be
bf16 or fp16: loaded in its dtype, accumulated in fp32, stored rounded to its dtype (the output
reads the fp32 accumulator, as the reference does).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from operator import or_

import torch
import triton
import triton.language as tl

from mamba3_kernels.backend import KernelSpec, packed_inner
from mamba3_kernels.inputs import ScanInputs
from mamba3_kernels.problem import Problem, memo_by_identity
from mamba3_kernels.state import Mamba3State

from .launch import Launch, launch_all


@dataclass(frozen=True)
class StepConfig:
    """Tunable parameters of the step kernel.

    block_p:    rows of the P x N state tile processed at once (divides P / split_p).
    num_warps:  warps per program.
    num_stages: software-pipelining depth of the loop over P tiles.
    split_p:    programs per (batch, head), each owning P / split_p rows of its state.
    prefetch:   1: request each state tile one step ahead (the first before the prologue); 0:
                when it is needed. Which is faster depends on the GPU and the batch
                (docs/performance.md, "Decode step"): a per-GPU choice for the tuner.
    """

    block_p: int = 32
    num_warps: int = 4
    num_stages: int = 2
    split_p: int = 1
    prefetch: int = 1


def _applies(problem: Problem) -> bool:
    return problem.decode


@memo_by_identity
def default_config(problem: Problem) -> StepConfig:
    """The heuristic's config for ``problem`` (see ``_heuristic``), memoized by the Problem's
    identity: one dict hit per decode step, and the same config object, which the launch plans
    key on."""
    return _heuristic(problem)


def _heuristic(problem: Problem) -> StepConfig:
    """Heuristic (from sweeps on an H100 at H=64, P=64, N=128).

    Few programs (batch * heads under ~2 per SM): one wide tile per program, so each program
    has its whole state in flight at once. Many programs: small tiles and few warps, many
    programs per SM; MIMO (R >= 2) holds R rank vectors per tile, so 1 warp on 8-row tiles.
    """
    n, p = problem.d_state, problem.headdim
    if problem.batch * problem.nheads < 256:
        block_p = min(p, max(8, 8192 // n))
        num_warps = 4 if problem.rank == 1 else 8
    elif problem.rank == 1:
        block_p, num_warps = min(p, max(8, 2048 // n)), 2
    else:
        block_p, num_warps = min(p, 8), 1
    while block_p * n < 128 * num_warps and num_warps > 1:
        num_warps //= 2
    return StepConfig(block_p=block_p, num_warps=num_warps, num_stages=1)


def search_space(problem: Problem) -> dict[str, list]:
    p = problem.headdim
    return {
        "block_p": [b for b in (8, 16, 32, 64, 128) if b <= p],
        "num_warps": [1, 2, 4, 8],
        "num_stages": [1, 2, 3],
        "split_p": [s for s in (1, 2, 4, 8) if p // s >= 8],
        "prefetch": [0, 1],
    }


def constraint(problem: Problem, config: StepConfig, device_props: dict | None) -> str | None:
    """Why ``config`` cannot run ``problem``, or None."""
    p, n = problem.headdim, problem.d_state
    bp, split = config.block_p, config.split_p
    if split < 1 or split & (split - 1) or p % split:
        return f"split_p={split} must be a power of two dividing P={p}"
    if bp < 1 or bp & (bp - 1) or (p // split) % bp:
        return f"block_p={bp} must be a power of two dividing P / split_p = {p // split}"
    if config.num_warps not in (1, 2, 4, 8, 16):
        return f"num_warps={config.num_warps} not a power of two <= 16"
    if config.num_stages < 1:
        return "num_stages must be >= 1"
    if config.prefetch not in (0, 1):
        return f"prefetch={config.prefetch} not 0 or 1"
    # A tile smaller than the threads' footprint would be held twice by different threads; the
    # in-place update is only race-free when each state element has one owner thread.
    if bp * n < 128 * config.num_warps:
        return f"tile {bp}x{n} too small for {config.num_warps} warps (needs >= 128 per warp)"
    # 3 fp32 registers per tile element is a loose bound on live values (state, update, product).
    if device_props is not None and bp * n * 3 > 255 * 32 * config.num_warps:
        return f"tile {bp}x{n} would spill with {config.num_warps} warps"
    return None


SPEC = KernelSpec(
    name="step",
    modes=("decode",),
    config_cls=StepConfig,
    applies=_applies,
    default=default_config,
    space=search_space,
    constraint=constraint,
)


@triton.jit
def _tanh(x):
    # Overflow-safe tanh from one exp; absolute error ~1e-7, which is what the angle needs.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _rot_load(x_base, b_base, offs_n, partner, cos, sin_signed):
    """Rot(theta) (x + bias) for one N vector: x[n] cos +- x[partner(n)] sin, in fp32."""
    x = tl.load(x_base + offs_n).to(tl.float32) + tl.load(b_base + offs_n)
    xp = tl.load(x_base + partner).to(tl.float32) + tl.load(b_base + partner)
    return x * cos + xp * sin_signed


@triton.jit
def _step_kernel(
    q_ptr, k_ptr, v_ptr, z_ptr, adt_ptr, dt_ptr, trap_ptr, qb_ptr, kb_ptr, ang_ptr,
    d_ptr, mv_ptr, mz_ptr, mo_ptr,
    sa_ptr, ss_ptr, sk_ptr, sv_ptr, out_ptr, cnt_ptr, idx_ptr,
    s_q_b, s_k_b, s_v_b, s_z_b, s_adt_b, s_dt_b, s_tr_b, s_a_b,
    H: tl.constexpr, G: tl.constexpr, R: tl.constexpr, N: tl.constexpr, P: tl.constexpr,
    S: tl.constexpr, BLOCK_P: tl.constexpr, SPLIT: tl.constexpr, INTERLEAVED: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_MV: tl.constexpr, HAS_MZ: tl.constexpr,
    HAS_MO: tl.constexpr, KEEP_RANKS: tl.constexpr, PREFETCH: tl.constexpr,
    POOLED: tl.constexpr,
):  # fmt: skip
    # Layouts: the per-step tensors have packed inner axes and a free batch stride (s_*_b); the
    # state, out and the per-head parameters are contiguous, so their offsets follow from the sizes.
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # the state's batch offsets can pass 2**31 elements
    PP: tl.constexpr = P // SPLIT  # rows of this program
    p_lo = tl.program_id(2) * PP
    g = h // (H // G)
    bh = b * H + h  # this row's (batch, head): out and the tickets
    slot = b  # the state's row: the batch row, or its slot in a pool
    if POOLED:  # (compiled out otherwise: a contiguous step has no padding rows)
        slot = tl.load(idx_ptr + b).to(tl.int64)
        if slot < 0:  # a padding row: zero output, the pool untouched
            offs_pad = p_lo + tl.arange(0, PP)
            zero = tl.zeros([PP], dtype=out_ptr.dtype.element_ty)
            if KEEP_RANKS:
                for r in tl.static_range(R):
                    tl.store(out_ptr + ((b * R + r) * H + h) * P + offs_pad, zero)
            else:
                tl.store(out_ptr + bh * P + offs_pad, zero)
            return
    sbh = slot * H + h

    # Rotary pairing of each coordinate n: its angle index j, its partner, which side it is.
    offs_n = tl.arange(0, N)
    if INTERLEAVED:
        j = offs_n // 2
        partner = offs_n ^ 1
        first = (offs_n % 2) == 0
    else:
        j = offs_n % (N // 2)
        first = offs_n < (N // 2)
        partner = tl.where(first, offs_n + N // 2, offs_n - N // 2)
    rot = j < S
    tile = tl.arange(0, BLOCK_P)[:, None] * N + offs_n[None, :]
    ss_head = ss_ptr + (sbh * P + p_lo) * N  # this program's first state row
    if PREFETCH:
        # The first state tile is requested before anything else, so that its DRAM latency
        # overlaps the prologue's dependent loads and trig instead of following them.
        nxt = tl.load(ss_head + tile)

    dt = tl.load(dt_ptr + b * s_dt_b + h).to(tl.float32)
    adt = tl.load(adt_ptr + b * s_adt_b + h).to(tl.float32)
    lam = tl.sigmoid(tl.load(trap_ptr + b * s_tr_b + h).to(tl.float32))
    alpha = tl.exp(adt)
    beta = (1.0 - lam) * dt * alpha
    gamma = lam * dt

    # theta_t = theta_{t-1} + pi tanh(angles) dt, gathered per coordinate (0 where unrotated).
    th_old = tl.load(sa_ptr + sbh * S + j, mask=rot, other=0.0)
    rate = tl.load(ang_ptr + b * s_a_b + h * S + j, mask=rot, other=0.0)
    theta = th_old + 3.141592653589793 * _tanh(rate) * dt
    # kept in [0, 2 pi): a stored angle that grew step after step would lose fp32 precision
    theta = theta - tl.floor(theta * 0.15915494309189535) * 6.283185307179586
    cos = tl.cos(theta)
    sin_signed = tl.where(first, -tl.sin(theta), tl.sin(theta))

    if HAS_D:
        d_h = tl.load(d_ptr + h)

    q_base = q_ptr + b * s_q_b + g * N
    k_base = k_ptr + b * s_k_b + g * N
    qb_base = qb_ptr + h * (R * N)
    kb_base = kb_ptr + h * (R * N)
    sk_base = sk_ptr + (slot * R * H + h) * N  # state k (B, R, H, N): rank r at + r * H * N
    v_base = v_ptr + b * s_v_b + h * P
    sv_base = sv_ptr + sbh * P
    par_base = h * (R * P)  # offset of head h in mimo_v / mimo_z / mimo_o, (H, R, P)

    for p0 in range(0, PP, BLOCK_P):
        offs_p = p_lo + p0 + tl.arange(0, BLOCK_P)
        ss_ptrs = ss_head + p0 * N + tile
        if PREFETCH:  # this tile was requested one iteration (or the prologue) ahead
            acc = nxt.to(tl.float32) * alpha
            nxt = tl.load(ss_ptrs + BLOCK_P * N, mask=p0 + BLOCK_P < PP, other=0.0)
        else:
            acc = tl.load(ss_ptrs).to(tl.float32) * alpha
        v_old = tl.load(sv_base + offs_p).to(tl.float32)
        v_new = tl.load(v_base + offs_p).to(tl.float32)

        # Hs = alpha Hs + beta sum_r vr_prev kr_prev^T + gamma sum_r vr kr^T
        for r in tl.static_range(R):
            k_prev = tl.load(sk_base + r * (H * N) + offs_n).to(tl.float32)
            k_cur = _rot_load(
                k_base + r * (G * N), kb_base + r * N, offs_n, partner, cos, sin_signed
            )
            if HAS_MV:
                mv = tl.load(mv_ptr + par_base + r * P + offs_p)
                w_prev = beta * v_old * mv
                w_cur = gamma * v_new * mv
            else:
                w_prev = beta * v_old
                w_cur = gamma * v_new
            acc += w_prev[:, None] * k_prev[None, :] + w_cur[:, None] * k_cur[None, :]
        tl.store(ss_ptrs, acc.to(ss_ptr.dtype.element_ty))

        # y_r = Hs q_r + D vr, gated by silu(zr), mixed over ranks by mimo_o.
        if HAS_Z:
            z = tl.load(z_ptr + b * s_z_b + h * P + offs_p).to(tl.float32)
        o = tl.zeros([BLOCK_P], dtype=tl.float32)
        for r in tl.static_range(R):
            q_cur = _rot_load(
                q_base + r * (G * N), qb_base + r * N, offs_n, partner, cos, sin_signed
            )
            y = tl.sum(acc * q_cur[None, :], axis=1)
            if HAS_D:
                if HAS_MV:
                    y += d_h * v_new * tl.load(mv_ptr + par_base + r * P + offs_p)
                else:
                    y += d_h * v_new
            if HAS_Z:
                if HAS_MZ:
                    zr = z * tl.load(mz_ptr + par_base + r * P + offs_p)
                else:
                    zr = z
                y *= zr * tl.sigmoid(zr)
            if KEEP_RANKS:  # out (B, R, H, P)
                o_ptrs = out_ptr + ((b * R + r) * H + h) * P + offs_p
                tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty))
            elif HAS_MO:
                o += tl.load(mo_ptr + par_base + r * P + offs_p) * y
            else:
                o += y
        if not KEEP_RANKS:  # out (B, H, P)
            tl.store(out_ptr + bh * P + offs_p, o.to(out_ptr.dtype.element_ty))

    # Every old angle / k / v row this program needs has been read above; only now overwrite.
    tl.debug_barrier()
    if SPLIT == 1:
        _store_shared_state(
            sa_ptr, sk_ptr, k_base, kb_base, sk_base, sbh, j, rot, first, theta, offs_n, partner,
            cos, sin_signed, G, H, N, R, S,
        )  # fmt: skip
    else:
        # The barrier above orders this CTA's reads before the ticket (taken by one thread,
        # release); the last ticket's holder (acquire) writes after every program's reads.
        ticket = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel")
        if (ticket & (SPLIT - 1)) == SPLIT - 1:
            _store_shared_state(
                sa_ptr, sk_ptr, k_base, kb_base, sk_base, sbh, j, rot, first, theta, offs_n,
                partner, cos, sin_signed, G, H, N, R, S,
            )  # fmt: skip
    offs_pp = p_lo + tl.arange(0, PP)
    v_own = tl.load(v_base + offs_pp)
    tl.store(sv_base + offs_pp, v_own.to(sv_ptr.dtype.element_ty))


@triton.jit
def _store_shared_state(
    sa_ptr, sk_ptr, k_base, kb_base, sk_base, bh, j, rot, first, theta, offs_n, partner, cos,
    sin_signed, G: tl.constexpr, H: tl.constexpr, N: tl.constexpr, R: tl.constexpr,
    S: tl.constexpr,
):  # fmt: skip
    """The head's new angle and rotated k (every rank) into the state."""
    tl.store(sa_ptr + bh * S + j, theta, mask=rot & first)
    for r in tl.static_range(R):
        k_cur = _rot_load(k_base + r * (G * N), kb_base + r * N, offs_n, partner, cos, sin_signed)
        tl.store(sk_base + r * (H * N) + offs_n, k_cur.to(sk_ptr.dtype.element_ty))


def output_shape(problem: Problem) -> tuple[int, ...]:
    """(B, H, P), or (B, R, H, P) for MIMO without mimo_o."""
    b, h, p = problem.batch, problem.nheads, problem.headdim
    if problem.mimo and not problem.has_mimo_o:
        return (b, problem.rank, h, p)
    return (b, h, p)


_CONST_NAMES = (
    "H", "G", "R", "N", "P", "S", "BLOCK_P", "SPLIT", "INTERLEAVED",
    "HAS_D", "HAS_Z", "HAS_MV", "HAS_MZ", "HAS_MO", "KEEP_RANKS", "PREFETCH", "POOLED",
)  # fmt: skip


class _Plan:
    """What a call signature needs per launch, worked out once: whether inputs must be copied to
    a packed layout, the batch strides, and the kernel's Launch (grid, constants, the compiled
    kernel once known)."""

    __slots__ = (
        "keep", "out_shape", "device_index", "repack", "slow", "strides", "on_gpu", "split",
        "launch",
    )  # fmt: skip

    def __init__(self, problem, config, step_tensors: tuple, params: tuple, out) -> None:
        # The plan's key holds problem and config by id: keep them alive so the ids stay theirs.
        self.keep = (problem, config)
        z = step_tensors[3]
        d, mv, mz, mo = params[2:]
        consts = (
            problem.nheads, problem.ngroups, problem.rank, problem.d_state, problem.headdim,
            problem.n_angles, config.block_p, config.split_p, problem.rotary == "interleaved",
            d is not None, z is not None, mv is not None, mz is not None, mo is not None,
            problem.mimo and mo is None, bool(config.prefetch), problem.pooled,
        )  # fmt: skip
        self.out_shape = output_shape(problem)
        v = step_tensors[2]
        self.device_index = v.get_device()
        # A per-step tensor whose inner axes are not packed (rare: a strided slice) is copied.
        self.repack = tuple(t is not None and not packed_inner(t) for t in step_tensors)
        self.strides = tuple(
            0 if t is None else (t[0].numel() if rp else t.stride(0))
            for t, rp in zip(step_tensors, self.repack, strict=True)
        )
        # Anything to copy (inputs, parameters, a strided out): the general path of step().
        self.slow = (
            True in self.repack
            or any(t is not None and not t.is_contiguous() for t in params)
            or (out is not None and not out.is_contiguous())
        )
        self.on_gpu = v.device.type == "cuda"
        self.split = config.split_p
        # The kernel's 21 pointers in its order (the call's table), the batch strides, then the
        # constants; its compiled kernel is kept after the first GPU launch.
        self.launch = Launch(
            _step_kernel, (problem.nheads, problem.batch, config.split_p), range(21),
            self.strides, dict(zip(_CONST_NAMES, consts, strict=True)),
            {"num_warps": config.num_warps, "num_stages": config.num_stages},
        )  # fmt: skip


# Plans by call signature. Problem and config enter by identity: the validation memo and the
# dispatcher hand back the same objects for a repeated call, and hashing them by value each call
# would cost more than the rest of the lookup. The other entries are what the kernel's layout
# assumptions and Triton's specialisation depend on (strides, dtypes, contiguity, device).
_PLANS: dict[tuple, _Plan] = {}
_PLANS_MAX = 256


# Per-head ticket counters of split steps, by (device, stream, split_p): steps on one stream run
# in order, so their programs never draw from a counter at the same time; other streams get their
# own. Each step adds exactly split_p to every head's counter it uses, so a counter stays a
# multiple of split_p between steps, which is what the modulo-split_p tickets rely on.
_TICKETS: dict[tuple, torch.Tensor] = {}
# Outgrown counters stay allocated: a captured CUDA graph may still point at one.
_RETIRED: list[torch.Tensor] = []


def _tickets(device: torch.device, heads: int, split: int) -> torch.Tensor:
    """An int32 counter per (batch, head) for split steps on the current stream of ``device``."""
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    key = (device, stream, split)
    t = _TICKETS.get(key)
    if t is None or t.numel() < heads:
        if t is not None:
            _RETIRED.append(t)
        # Any multiple of split_p is a valid start, so a new buffer starts from zero.
        t = torch.zeros(max(triton.next_power_of_2(heads), 4096), dtype=torch.int32, device=device)
        _TICKETS[key] = t
    return t


def _plan_key(problem, config, q, k, v, adt, dt, trap, qb, kb, ang, d, z, mv, mz, mo, sa, ss,
              sk, sv, out, idx) -> tuple:  # fmt: skip
    """Everything a plan depends on, for inputs that did not come from the validation memo.

    Spelled out (no loops or helper calls: a decode step's host time is mostly attribute reads
    like these). q's dtype is the problem's; k, v and z match it (validated); q_bias and k_bias
    are always given. The state's contiguity is in it so that a plan hit cannot skip the check.
    """
    return (
        id(problem), id(config), v.get_device(),
        q.stride(), k.stride(), v.stride(), None if z is None else z.stride(),
        adt.stride(), dt.stride(), trap.stride(), ang.stride(),
        adt.dtype, dt.dtype, trap.dtype, ang.dtype,
        qb.dtype, qb.is_contiguous(), kb.dtype, kb.is_contiguous(),
        None if d is None else (d.dtype, d.is_contiguous()),
        None if mv is None else (mv.dtype, mv.is_contiguous()),
        None if mz is None else (mz.dtype, mz.is_contiguous()),
        None if mo is None else (mo.dtype, mo.is_contiguous()),
        sa.dtype, ss.dtype, sk.dtype, sv.dtype,
        sa.is_contiguous() and ss.is_contiguous() and sk.is_contiguous() and sv.is_contiguous(),
        None if out is None else (out.dtype, out.is_contiguous()),
        None if idx is None else idx.dtype,
    )  # fmt: skip


def step(
    problem: Problem,
    inputs: ScanInputs,
    state: Mamba3State,
    config: StepConfig,
    out: torch.Tensor | None = None,
    state_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step in one kernel launch; ``state`` is updated in place.

    Shapes: q, k (B, G, N) or (B, R, G, N); v, z (B, H, P); adt, dt, trap (B, H);
    angles (B, H, S); q_bias, k_bias (H, N) or (H, R, N); D (H,); mimo_* (H, R, P);
    state (contiguous): angle (B, H, S) fp32, ssm (B, H, P, N) fp32 / bf16 / fp16,
    k (B, R, H, N), v (B, H, P); with ``state_indices`` (B,) int32 / int64 (problem.pooled) the
    state's leading axis is a pool of slots instead of B, addressed by the kernel in place.
    Returns out (B, H, P), or (B, R, H, P) for MIMO without mimo_o, in v's dtype (written
    into ``out`` when given: no allocation then, so the call can be captured in a CUDA graph).
    """
    q, k, v, adt, dt, trap, qb, kb, ang, d, z, mv, mz, mo = inputs[:14]
    sa, ss, sk, sv = state
    idx = state_indices
    if out is None and getattr(inputs, "validated_problem", None) is problem:
        # From the validation memo, whose Problem stands for one signature: every tensor's shape,
        # dtype and device, the per-step tensors' strides, the contiguity of the parameters and
        # the state. Those fix the plan, so the Problem's identity is its key (the plan holds
        # the Problem, so the id stays its own).
        key = (id(problem), id(config))
    else:
        key = _plan_key(problem, config, q, k, v, adt, dt, trap, qb, kb, ang, d, z, mv, mz, mo,
                        sa, ss, sk, sv, out, idx)  # fmt: skip
    plan = _PLANS.get(key)
    if plan is None:
        for name, t in zip(Mamba3State._fields, state, strict=True):
            if not t.is_contiguous():
                raise ValueError(f"state.{name}: the step kernel needs a contiguous state")
        plan = _Plan(
            problem, config, (q, k, v, z, adt, dt, trap, ang), (qb, kb, d, mv, mz, mo), out
        )
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = plan
    ln = plan.launch
    if ln.compiled is not None and not plan.slow:
        # The hot path (a GPU call of a known signature, nothing to copy): raw addresses straight
        # to the compiled kernel. Absent optional tensors: v's address stands in (never read: the
        # kernel's flags skip them), as in the general path below.
        if out is None:  # v's dtype and device (new_empty: no keyword arguments to parse)
            out = v.new_empty(plan.out_shape)
        pv = v.data_ptr()
        ptrs = (
            q.data_ptr(), k.data_ptr(), pv, pv if z is None else z.data_ptr(), adt.data_ptr(),
            dt.data_ptr(), trap.data_ptr(), qb.data_ptr(), kb.data_ptr(), ang.data_ptr(),
            pv if d is None else d.data_ptr(), pv if mv is None else mv.data_ptr(),
            pv if mz is None else mz.data_ptr(), pv if mo is None else mo.data_ptr(),
            sa.data_ptr(), ss.data_ptr(), sk.data_ptr(), sv.data_ptr(), out.data_ptr(),
            pv if plan.split == 1 else _tickets(v.device, problem.batch * problem.nheads,
                                                plan.split).data_ptr(),
            pv if idx is None else idx.data_ptr(),
        )  # fmt: skip
        # The compiled kernel assumes 16-byte aligned pointers; others go through the binder.
        if not reduce(or_, ptrs) & 15 and ln.run_direct((*ptrs, *ln.tail), plan.device_index):
            return out
    target = None
    if plan.slow:  # copies into the layouts the kernel assumes
        q, k, v, z, adt, dt, trap, ang = (
            t.contiguous() if rp else t
            for t, rp in zip((q, k, v, z, adt, dt, trap, ang), plan.repack, strict=True)
        )
        qb, kb, d, mv, mz, mo = (
            None if t is None else t.contiguous() for t in (qb, kb, d, mv, mz, mo)
        )
        if out is not None and not out.is_contiguous():
            target, out = out, None
    if out is None:
        out = torch.empty(plan.out_shape, dtype=v.dtype, device=v.device)
    # Absent optional tensors: v stands in (never read: the kernel's flags skip them).
    tensors = [
        q, k, v, v if z is None else z, adt, dt, trap, qb, kb, ang, v if d is None else d,
        v if mv is None else mv, v if mz is None else mz, v if mo is None else mo, *state, out,
        v if config.split_p == 1 else _tickets(v.device, problem.batch * problem.nheads,
                                               config.split_p),
        v if idx is None else idx,
    ]  # fmt: skip
    if plan.on_gpu:
        launch_all((ln,), [t.data_ptr() for t in tensors], lambda: tensors, plan.device_index)
    else:  # the interpreter (CPU tensors): Triton's launcher
        ln.generic(tensors)
    if target is not None:
        target.copy_(out)
        return target
    return out
