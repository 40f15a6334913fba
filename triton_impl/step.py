"""Triton decode step (SISO and MIMO): one launch per step, state updated in place.

One program owns one (batch, head) pair and walks the P axis in tiles of ``block_p`` rows. A
program is the only reader and writer of its head's state, so the read-after-write hazard on the
state (old k and v feed the trapezoid term, new k and v overwrite them) is settled inside the
program: every old-state read happens before a CTA barrier, every write of k, v and the angle
after it. The fp32 P x N state itself is read and written tile by tile (each element by the
thread that loaded it), which is the memory floor of a decode step.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs

from mamba3_kernels.backend import KernelSpec
from mamba3_kernels.inputs import ScanInputs
from mamba3_kernels.problem import Problem
from mamba3_kernels.state import Mamba3State


@dataclass(frozen=True)
class StepConfig:
    """Tunable parameters of the step kernel.

    block_p:    rows of the P x N state tile processed at once (divides P).
    num_warps:  warps per program.
    num_stages: software-pipelining depth of the loop over P tiles.
    """

    block_p: int = 32
    num_warps: int = 4
    num_stages: int = 2


def _applies(problem: Problem) -> bool:
    return problem.decode


def default_config(problem: Problem) -> StepConfig:
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
    }


def constraint(problem: Problem, config: StepConfig, device_props: dict | None) -> str | None:
    """Why ``config`` cannot run ``problem``, or None."""
    p, n = problem.headdim, problem.d_state
    bp = config.block_p
    if bp < 1 or bp & (bp - 1) or p % bp:
        return f"block_p={bp} must be a power of two dividing P={p}"
    if config.num_warps not in (1, 2, 4, 8, 16):
        return f"num_warps={config.num_warps} not a power of two <= 16"
    if config.num_stages < 1:
        return "num_stages must be >= 1"
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
    mode="step",
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
def _rot_load(x_base, b_base, offs_n, partner, stride_n, cos, sin_signed):
    """Rot(theta) (x + bias) for one N vector: x[n] cos +- x[partner(n)] sin, in fp32."""
    x = tl.load(x_base + offs_n * stride_n).to(tl.float32) + tl.load(b_base + offs_n)
    xp = tl.load(x_base + partner * stride_n).to(tl.float32) + tl.load(b_base + partner)
    return x * cos + xp * sin_signed


@triton.jit
def _step_kernel(
    q_ptr, k_ptr, v_ptr, z_ptr, adt_ptr, dt_ptr, trap_ptr, qb_ptr, kb_ptr, ang_ptr,
    d_ptr, mv_ptr, mz_ptr, mo_ptr,
    sa_ptr, ss_ptr, sk_ptr, sv_ptr, out_ptr,
    s_q_b, s_q_r, s_q_g, s_q_n,
    s_k_b, s_k_r, s_k_g, s_k_n,
    s_v_b, s_v_h, s_v_p,
    s_z_b, s_z_h, s_z_p,
    s_adt_b, s_adt_h, s_dt_b, s_dt_h, s_tr_b, s_tr_h,
    s_a_b, s_a_h, s_a_s,
    s_sa_b, s_sa_h, s_sa_s,
    s_ss_b, s_ss_h, s_ss_p, s_ss_n,
    s_sk_b, s_sk_r, s_sk_h, s_sk_n,
    s_sv_b, s_sv_h, s_sv_p,
    s_o_b, s_o_r, s_o_h, s_o_p,
    HPG: tl.constexpr, R: tl.constexpr, N: tl.constexpr, P: tl.constexpr, S: tl.constexpr,
    BLOCK_P: tl.constexpr, INTERLEAVED: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_MV: tl.constexpr, HAS_MZ: tl.constexpr,
    HAS_MO: tl.constexpr, KEEP_RANKS: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0)
    b = tl.program_id(1)
    g = h // HPG

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

    dt = tl.load(dt_ptr + b * s_dt_b + h * s_dt_h).to(tl.float32)
    adt = tl.load(adt_ptr + b * s_adt_b + h * s_adt_h).to(tl.float32)
    lam = tl.sigmoid(tl.load(trap_ptr + b * s_tr_b + h * s_tr_h).to(tl.float32))
    alpha = tl.exp(adt)
    beta = (1.0 - lam) * dt * alpha
    gamma = lam * dt

    # theta_t = theta_{t-1} + pi tanh(angles) dt, gathered per coordinate (0 where unrotated).
    th_old = tl.load(sa_ptr + b * s_sa_b + h * s_sa_h + j * s_sa_s, mask=rot, other=0.0)
    rate = tl.load(ang_ptr + b * s_a_b + h * s_a_h + j * s_a_s, mask=rot, other=0.0)
    theta = th_old + 3.141592653589793 * _tanh(rate) * dt
    cos = tl.cos(theta)
    sin_signed = tl.where(first, -tl.sin(theta), tl.sin(theta))

    if HAS_D:
        d_h = tl.load(d_ptr + h)

    q_base = q_ptr + b * s_q_b + g * s_q_g
    k_base = k_ptr + b * s_k_b + g * s_k_g
    qb_base = qb_ptr + h * (R * N)
    kb_base = kb_ptr + h * (R * N)
    sk_base = sk_ptr + b * s_sk_b + h * s_sk_h
    par_base = h * (R * P)  # offset of head h in mimo_v / mimo_z / mimo_o, (H, R, P) contiguous

    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        ss_ptrs = (
            ss_ptr + b * s_ss_b + h * s_ss_h + offs_p[:, None] * s_ss_p + offs_n[None, :] * s_ss_n
        )
        acc = tl.load(ss_ptrs) * alpha
        v_old = tl.load(sv_ptr + b * s_sv_b + h * s_sv_h + offs_p * s_sv_p).to(tl.float32)
        v_new = tl.load(v_ptr + b * s_v_b + h * s_v_h + offs_p * s_v_p).to(tl.float32)

        # Hs = alpha Hs + beta sum_r vr_prev kr_prev^T + gamma sum_r vr kr^T
        for r in tl.static_range(R):
            k_prev = tl.load(sk_base + r * s_sk_r + offs_n * s_sk_n).to(tl.float32)
            k_cur = _rot_load(
                k_base + r * s_k_r, kb_base + r * N, offs_n, partner, s_k_n, cos, sin_signed
            )
            if HAS_MV:
                mv = tl.load(mv_ptr + par_base + r * P + offs_p)
                w_prev = beta * v_old * mv
                w_cur = gamma * v_new * mv
            else:
                w_prev = beta * v_old
                w_cur = gamma * v_new
            acc += w_prev[:, None] * k_prev[None, :] + w_cur[:, None] * k_cur[None, :]
        tl.store(ss_ptrs, acc)

        # y_r = Hs q_r + D vr, gated by silu(zr), mixed over ranks by mimo_o.
        if HAS_Z:
            z = tl.load(z_ptr + b * s_z_b + h * s_z_h + offs_p * s_z_p).to(tl.float32)
        o = tl.zeros([BLOCK_P], dtype=tl.float32)
        for r in tl.static_range(R):
            q_cur = _rot_load(
                q_base + r * s_q_r, qb_base + r * N, offs_n, partner, s_q_n, cos, sin_signed
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
            if KEEP_RANKS:
                o_ptrs = out_ptr + b * s_o_b + r * s_o_r + h * s_o_h + offs_p * s_o_p
                tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty))
            elif HAS_MO:
                o += tl.load(mo_ptr + par_base + r * P + offs_p) * y
            else:
                o += y
        if not KEEP_RANKS:
            o_ptrs = out_ptr + b * s_o_b + h * s_o_h + offs_p * s_o_p
            tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty))

    # Every old angle / k / v of this head has been read above; only now overwrite them.
    tl.debug_barrier()
    sa_ptrs = sa_ptr + b * s_sa_b + h * s_sa_h + j * s_sa_s
    tl.store(sa_ptrs, theta, mask=rot & first)
    for r in tl.static_range(R):
        k_cur = _rot_load(
            k_base + r * s_k_r, kb_base + r * N, offs_n, partner, s_k_n, cos, sin_signed
        )
        tl.store(sk_base + r * s_sk_r + offs_n * s_sk_n, k_cur.to(sk_ptr.dtype.element_ty))
    offs_pf = tl.arange(0, P)
    v_all = tl.load(v_ptr + b * s_v_b + h * s_v_h + offs_pf * s_v_p)
    tl.store(sv_ptr + b * s_sv_b + h * s_sv_h + offs_pf * s_sv_p, v_all.to(sv_ptr.dtype.element_ty))


def _params(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A per-head parameter as a contiguous tensor (a placeholder pointer when absent)."""
    if t is None:
        return like
    return t if t.is_contiguous() else t.contiguous()


def output_shape(problem: Problem) -> tuple[int, ...]:
    """(B, H, P), or (B, R, H, P) for MIMO without mimo_o."""
    b, h, p = problem.batch, problem.nheads, problem.headdim
    if problem.mimo and not problem.has_mimo_o:
        return (b, problem.rank, h, p)
    return (b, h, p)


_CONST_NAMES = (
    "HPG", "R", "N", "P", "S", "BLOCK_P", "INTERLEAVED",
    "HAS_D", "HAS_Z", "HAS_MV", "HAS_MZ", "HAS_MO", "KEEP_RANKS",
)  # fmt: skip

# Compiled kernels by everything Triton specialises on (constants, options, dtypes, pointer
# alignment, integer values). A hit launches the compiled kernel directly: Triton's generic
# launcher re-derives the specialisation of all 64 arguments on every call, which costs tens of
# microseconds of host time per decode step, more than the kernel itself at small batch.
_LAUNCHERS: dict[tuple, tuple] = {}
_DIRECT_LAUNCH = [True]


def _launch(grid, ptrs: list, ints: list, consts: tuple, config: StepConfig) -> None:
    dev = ptrs[2].device
    key = (
        dev.index, consts, config.num_warps, config.num_stages,
        tuple(t.dtype for t in ptrs), tuple(t.data_ptr() % 16 == 0 for t in ptrs), tuple(ints),
    )  # fmt: skip
    hit = _LAUNCHERS.get(key) if _DIRECT_LAUNCH[0] else None
    if hit is not None:
        kernel, run, function, packed = hit
        stream = torch._C._cuda_getCurrentRawStream(dev.index)
        args = (*ptrs, *ints, *consts)
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        try:
            meta = kernel.launch_metadata(grid, stream, *args)
            run(grid[0], grid[1], 1, stream, function, packed, meta, enter, leave, *args)
            return
        except (TypeError, AttributeError) as e:  # a Triton whose launcher differs: go generic
            _DIRECT_LAUNCH[0] = False
            msg = f"direct launch unavailable ({e}); using Triton's launcher"
            warnings.warn(msg, stacklevel=3)
    kernel = _step_kernel[grid](
        *ptrs, *ints, **dict(zip(_CONST_NAMES, consts, strict=True)),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    run = kernel.run  # initialises the module handles, then .function is set
    if len(_LAUNCHERS) < 256:
        _LAUNCHERS[key] = (kernel, run, kernel.function, kernel.packed_metadata)


def step(
    problem: Problem,
    inputs: ScanInputs,
    state: Mamba3State,
    config: StepConfig,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step in one kernel launch; ``state`` is updated in place.

    Shapes: q, k (B, G, N) or (B, R, G, N); v, z (B, H, P); adt, dt, trap (B, H);
    angles (B, H, S); q_bias, k_bias (H, N) or (H, R, N); D (H,); mimo_* (H, R, P);
    state: angle (B, H, S) fp32, ssm (B, H, P, N) fp32, k (B, R, H, N), v (B, H, P).
    Returns out (B, H, P), or (B, R, H, P) for MIMO without mimo_o, in v's dtype (written
    into ``out`` when given: no allocation then, so the call can be captured in a CUDA graph).
    """
    q, k, v, z = inputs.q, inputs.k, inputs.v, inputs.z
    keep_ranks = problem.mimo and inputs.mimo_o is None
    if out is None:
        out = torch.empty(output_shape(problem), dtype=v.dtype, device=v.device)

    if q.dim() == 4:
        sq, sk = q.stride(), k.stride()
    else:  # SISO: a rank axis of stride 0
        sq = (q.stride(0), 0, q.stride(1), q.stride(2))
        sk = (k.stride(0), 0, k.stride(1), k.stride(2))
    so = out.stride() if keep_ranks else (out.stride(0), 0, out.stride(1), out.stride(2))
    sz = z.stride() if z is not None else (0, 0, 0)
    qb, kb = _params(inputs.q_bias, v), _params(inputs.k_bias, v)
    mv, mz, mo = (_params(t, v) for t in (inputs.mimo_v, inputs.mimo_z, inputs.mimo_o))
    adt, dt, trap, ang = inputs.adt, inputs.dt, inputs.trap, inputs.angles

    ptrs = [
        q, k, v, z if z is not None else v, adt, dt, trap, qb, kb, ang,
        inputs.D if inputs.D is not None else v, mv, mz, mo,
        state.angle, state.ssm, state.k, state.v, out,
    ]  # fmt: skip
    ints = [
        *sq, *sk, *v.stride(), *sz, *adt.stride(), *dt.stride(), *trap.stride(),
        *ang.stride(), *state.angle.stride(), *state.ssm.stride(), *state.k.stride(),
        *state.v.stride(), *so,
    ]  # fmt: skip
    consts = (
        problem.nheads // problem.ngroups, problem.rank, problem.d_state, problem.headdim,
        problem.n_angles, config.block_p, problem.rotary == "interleaved",
        inputs.D is not None, z is not None, inputs.mimo_v is not None,
        inputs.mimo_z is not None, inputs.mimo_o is not None, keep_ranks,
    )  # fmt: skip
    grid = (problem.nheads, problem.batch)
    if v.device.type != "cuda":  # the interpreter (CPU tensors): the plain launch
        _step_kernel[grid](
            *ptrs, *ints, **dict(zip(_CONST_NAMES, consts, strict=True)),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
    else:
        _launch(grid, ptrs, ints, consts, config)
    return out
