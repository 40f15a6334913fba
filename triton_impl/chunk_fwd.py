"""Chunked prefill forward of the Mamba-3 scan in Triton (SISO and MIMO): the family's config
(ChunkFwdConfig, its heuristic, search space and constraints, SPEC) and its entry points
(chunk_fwd, chunk_fwd_saving_y), which run a call's launches from a plan made once per call
signature (directly on the compiled kernels after the first GPU call: launch.py).

With config.split (the default for fixed-length calls over 256 tokens) the sequence is cut into
segments: chunk_fwd_split computes the state entering each segment, then either the walk kernel
(chunk_fwd_kernel) walks every segment at once (split=1: grid axis 2, "segment mode") or
chunk_fwd_blocks runs every chunk of every segment at once (split=2: the state from memory,
earlier chunks of the segment as keys). Without it (varlen, short calls) the walk kernel walks
whole sequences.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from mamba3_kernels.backend import KernelSpec
from mamba3_kernels.inputs import ScanInputs
from mamba3_kernels.problem import Problem, memo_by_identity
from mamba3_kernels.state import Mamba3State

from .chunk_fwd_blocks import block_launch
from .chunk_fwd_kernel import _chunk, _chunk_fwd_kernel, _constexprs, _splits, compile_kernel
from .chunk_fwd_split import segment_buffers, segment_launches
from .launch import Launch, interpreting, launch_all, launch_generic
from .launch import cdiv as _cdiv

__all__ = [
    "SPEC",
    "ChunkFwdConfig",
    "chunk_fwd",
    "chunk_fwd_saving_y",
    "compile_kernel",
    "default_config",
    "search_space",
    "constraint",
    "with_split",
]

_MIN_DOT = 16  # smallest tile side tl.dot accepts on GPU


@dataclass(frozen=True)
class ChunkFwdConfig:
    """Tunable parameters of the chunked forward kernel.

    path:       how the forward runs: "fused", this family's kernels (the fields below); "core",
                the core family's graph without autograd (prep -> rotary pass -> core forward
                -> epilogue, chunk_bwd.core_forward, on the core family's config), which wins
                where the fused kernels' per-chunk elementwise work dominates (long MIMO
                calls, long SISO sequences too few to fill the GPU). Only inference forwards
                take "core"; a training forward's path is the core family's record_forward.
    chunk_size: tokens per chunk (C); a MIMO chunk holds C*R rows. problem.chunk_size overrides it.
    block_p:    value-dim columns per program (P is split into P / block_p programs).
    num_warps, num_stages: Triton launch parameters (num_stages pipelines the chunk loop's loads).
    maxnreg:    register cap per thread (0: the compiler's choice, which is 255 at every tile
                size); a lower cap trades spills for more resident programs per multiprocessor.
    split_rot:  1: when S <= N/4, trig on N/4 pairs only (pass-through columns zipped in);
                0: trig on all N/2 pairs (fewer layout shuffles; faster for small SISO chunks).
    split:      1: the chunk-parallel three-launch forward (chunk_fwd_split.py) for fixed-length
                batches; 2: the same segment states, then one program per chunk
                (chunk_fwd_blocks.py); 0: one program per (sequence, head, P-block) walks all
                chunks.
    segment:    with split, tokens per segment (a multiple of the chunk; 0: one chunk): the
                states between segments go through memory; inside a segment the chunks are
                walked with the state in registers (split=1), or each chunk reads the
                segment's earlier chunks as keys (split=2).
    prefetch:   chunks ahead whose streamed inputs (coefficients, angles, v, z) the chunk
                loops of the walk and the segment-state kernel ask L2 for (0: none; see
                l2_prefetch.py). Changes no value; the interpreter ignores it. Off by default
                (it measured within the spread or slower; docs/performance.md): a choice left
                to the tuner per GPU.
    """

    chunk_size: int = 64
    block_p: int = 64
    num_warps: int = 8
    num_stages: int = 1
    maxnreg: int = 0
    split_rot: int = 1
    split: int = 0
    segment: int = 0
    prefetch: int = 0
    path: str = "fused"


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


@memo_by_identity  # a dict hit for the validation memo's Problem, on every prefill call
@functools.lru_cache(maxsize=256)
def default_config(problem: Problem) -> ChunkFwdConfig:
    """Heuristic config (memoized: it runs on every prefill call): the fused kernels' tiles
    (_fused_heuristic) and the path (_core_wins)."""
    fused = _fused_heuristic(problem)
    return dataclasses.replace(fused, path="core" if _core_wins(problem, fused.split) else "fused")


def _fused_heuristic(problem: Problem) -> ChunkFwdConfig:
    """The fused kernels' heuristic config, from sweeps of the tile space (docs/performance.md,
    "SISO prefill forward" and "MIMO prefill forward").

    Fixed-length batches longer than 256 tokens: the chunk-parallel variant (split=1) with
    whole-P tiles on 4 warps; SISO chunks of 32 tokens, 2 stages, in the longest segments of
    4096/2048/1024/512/256 tokens that leave ~2 programs per multiprocessor, or, where whole
    sequences already make ~2 programs per multiprocessor, those tiles walking whole sequences
    (split=0); MIMO chunks of 16 rows in segments of 128 tokens.
    Varlen and short calls: one program walks each sequence; few programs (sequences x heads x
    32-wide P-blocks under ~2 per multiprocessor) take long chunks (SISO 128 rows, 8 warps, 2
    stages; MIMO 32 rows, 4 warps, P in blocks of 32); many SISO programs 32 rows with 4 warps
    and trig on all pairs (split_rot 0 measured faster there); many MIMO programs 64 rows, whole
    P, 8 warps.
    N = 256 or fp32 inputs halve the rows (register pressure).
    MIMO R=4 in 16-bit with N <= 128, P >= 64 (where it was measured): the block-parallel
    variant (split=2), 16-token blocks of 64 rows, two per segment, whole 64-wide P tiles on 4
    warps.
    """
    p2 = _next_pow2(problem.headdim)
    pairs = problem.nseq * problem.nheads
    few = pairs * max(1, p2 // 32) <= 2 * 132
    # (a call of one segment gains nothing from the extra launches)
    split = not problem.varlen and problem.seqlen > 256
    # SISO whose whole-sequence walks (64-wide P tiles) already make ~2 programs per
    # multiprocessor: those walks, on the split variant's tiles (segments would only add
    # state traffic and launches there).
    whole_walks = (split and problem.rank == 1 and problem.chunk_size is None
                   and pairs * -(-problem.headdim // 64) >= 2 * 132)  # fmt: skip
    if (split and problem.rank == 4 and problem.chunk_size is None and problem.d_state <= 128
            and problem.headdim >= 64 and problem.dtype != torch.float32):  # fmt: skip
        return ChunkFwdConfig(chunk_size=16, block_p=64, num_warps=4, num_stages=1, split_rot=1,
                              split=2, segment=32)  # fmt: skip
    if split:
        # SISO pipelines its chunk loop (2 stages measured 6-25 % faster); MIMO does not
        # (2 stages measured 19 % slower at R=4).
        if problem.rank == 1:
            rows, block_p, warps, stages, rot = (32, 64, 4, 2, 1)
        else:
            rows, block_p, warps, stages, rot = (16, 64, 4, 1, 1)
    elif problem.rank == 1:
        rows, block_p, warps, stages, rot = (128, 32, 8, 2, 1) if few else (32, 32, 4, 1, 0)
    else:
        rows, block_p, warps, stages, rot = (32, 32, 4, 1, 1) if few else (64, 64, 8, 1, 1)
    if problem.d_state > 128 or problem.dtype == torch.float32:
        rows //= 2
    rows = max(rows, 16, problem.rank)
    block_p = min(block_p, p2)
    # The fp32 state tile in registers (see constraint()): at most 96 registers per thread.
    while block_p > 16 and block_p * problem.d_state // (32 * warps) > 96:
        block_p //= 2
    # Fit the shared-memory estimate (close to the compiler's figure, docs/performance.md) under an
    # sm_90 block's limit: fewer pipeline stages first, then shorter chunks.
    while _smem_estimate(problem, max(1, rows // problem.rank), block_p, stages) > _SMEM_SM90:
        if stages > 1:
            stages -= 1
        elif rows > 16:
            rows //= 2
        else:
            break
    chunk = max(1, rows // problem.rank)
    eff_rows = (problem.chunk_size or chunk) * problem.rank
    if problem.rank > 1 and eff_rows >= 64:
        warps = 8  # see constraint(): MIMO with >= 64 rows on 4 warps miscompiles
    segment = 0
    if split:
        # Segments of 128 tokens for MIMO; SISO: the longest of 4096/2048/1024/512/256 (less
        # state traffic) that still gives ~2 programs per multiprocessor.
        segment = 128
        if problem.rank == 1:
            segment = 256
            for seg in (4096, 2048, 1024, 512):
                programs = pairs * -(-problem.headdim // block_p) * -(-problem.seqlen // seg)
                if programs >= 2 * 128:
                    segment = seg
                    break
        segment = max(segment, problem.chunk_size or chunk)
        segment -= segment % (problem.chunk_size or chunk)
    if whole_walks or (split and problem.rank == 1 and segment >= problem.seqlen):
        split, segment = False, 0  # (one segment per sequence: the same walks, fewer launches)
    return ChunkFwdConfig(
        chunk_size=chunk, block_p=block_p, num_warps=warps, num_stages=stages, split_rot=rot,
        split=int(split), segment=segment,
    )  # fmt: skip


def _core_wins(problem: Problem, split: bool) -> bool:
    """Whether the heuristic runs an inference forward through the core family (path="core"):
    MIMO calls of >= 8K tokens, and SISO sequences of >= 8K tokens that the fused forward cuts
    into segments (too few to fill the GPU by themselves). Not where the fused forward walks
    whole sequences, nor on short calls (the core path's dozen more launches cost host time),
    nor varlen calls (not measured). docs/performance.md has the measurements."""
    from .chunk_bwd import constraint as core_constraint
    from .chunk_bwd import default_config as core_default

    if problem.varlen or problem.seqlen == 0 or problem.decode:
        return False
    if core_constraint(problem, core_default(problem), None) is not None:
        return False
    if problem.mimo:
        return problem.batch * problem.seqlen >= 8192
    return problem.seqlen >= 8192 and bool(split)


def with_split(problem: Problem, config: ChunkFwdConfig, split: int) -> ChunkFwdConfig:
    """``config`` switched to algorithm ``split`` (0 drops the segment), for comparing the
    algorithms at one chunk size: where the switch breaks a constraint (a MIMO chunk of >= 64
    rows walked on 4 warps), on 8 warps."""
    new = dataclasses.replace(config, split=split, segment=config.segment if split else 0)
    if constraint(problem, new, None) is not None:
        new = dataclasses.replace(new, num_warps=8)
    return new


def search_space(problem: Problem) -> dict[str, list]:
    """Candidate values per parameter (constraint() removes invalid combinations)."""
    p2 = _next_pow2(problem.headdim)
    space = {
        "chunk_size": [c for c in (2, 4, 8, 16, 32, 64, 128) if 16 <= c * problem.rank <= 256],
        "block_p": [b for b in (16, 32, 64, 128) if b <= max(p2, 16)],
        "num_warps": [4, 8],
        "num_stages": [1, 2, 3],
        "prefetch": [0, 1],
    }
    if not problem.varlen and problem.seqlen > 256:
        # Only the chunk-parallel variants (segment walk 1, block-parallel 2): they beat the
        # sequential walk at every fixed-length shape measured (docs/performance.md, v3), and a
        # split=0 point would make every segment value but 0 an invalid combination.
        space["split"] = [1, 2]
        space["segment"] = [0, 128, 256, 512, 1024]
        space["path"] = ["fused", "core"]
    return space


_SMEM_SM90 = 232448  # bytes of shared memory one block may opt into on sm_90


def _smem_estimate(problem: Problem, chunk: int, block_p: int, num_stages: int) -> int:
    """Rough bytes of shared memory: the dot operands of one chunk (q, k, v, scores), times the
    pipelining depth for the loaded ones, plus the state tiles staged for the state dot."""
    rows = chunk * problem.rank
    esize = 4 if problem.dtype == torch.float32 else 2
    n = problem.d_state
    loaded = rows * (2 * n + block_p) * esize
    staged = rows * rows * esize + block_p * n * esize
    return loaded * max(1, num_stages) + staged


def constraint(problem: Problem, config: ChunkFwdConfig, device_props: dict | None) -> str | None:
    """Why ``config`` cannot run ``problem`` (divisibility, tile limits, shared memory), or None."""
    chunk = _chunk(problem, config)
    rows = chunk * problem.rank
    if chunk < 1 or chunk & (chunk - 1):
        return f"chunk_size {chunk} is not a power of two"
    if config.block_p < 1 or config.block_p & (config.block_p - 1):
        return f"block_p {config.block_p} is not a power of two"
    # Compiled dots need every side >= 16; the interpreter has no such limit (CI's small shapes).
    min_dot = 1 if interpreting() else _MIN_DOT
    if rows < min_dot or rows > 256:
        return f"chunk_size*R = {rows} rows outside [{min_dot}, 256]"
    if config.block_p < min_dot:
        return f"block_p {config.block_p} < {min_dot}"
    if config.block_p > max(_next_pow2(problem.headdim), _MIN_DOT):
        return f"block_p {config.block_p} larger than P={problem.headdim}"
    if problem.d_state % 2 or problem.d_state // 2 < min_dot:
        return f"d_state N={problem.d_state}: N/2 must be even and >= {min_dot}"
    if config.num_warps not in (1, 2, 4, 8, 16):
        return f"num_warps {config.num_warps} not a power of two <= 16"
    if config.num_stages < 1:
        return "num_stages < 1"
    if config.split not in (0, 1, 2):
        return f"split {config.split} not 0, 1 or 2"
    if config.segment and not config.split:
        return "segment is a parameter of split=1"
    if config.segment and (config.segment < chunk or config.segment % chunk):
        return f"segment {config.segment} is not a multiple of chunk_size {chunk}"
    if config.prefetch not in range(5):
        return f"prefetch {config.prefetch} not in 0..4 chunks ahead"
    if config.path not in ("fused", "core"):
        return f"path {config.path!r} not 'fused' or 'core'"
    if config.path == "core" and (problem.varlen or problem.seqlen == 0):
        return "path 'core' runs fixed-length calls only"
    if config.split_rot not in (0, 1):
        return f"split_rot {config.split_rot} not 0 or 1"
    if config.maxnreg and not 64 <= config.maxnreg <= 255:
        return f"maxnreg {config.maxnreg} outside [64, 255]"
    mimo_4w = problem.rank > 1 and config.num_warps == 4 and rows >= 64
    if mimo_4w and (config.split != 2 or config.block_p < 64):
        # Seen with Triton 3.6 on an H100 (MIMO R=4, 64 rows, block_p 32, 4 warps): the
        # scores x V product reads shared memory out of range (compute-sanitizer), an illegal
        # address at run time; on an H200 the block kernel (split=2) hit it at block_p 32 too.
        # Its block_p 64 build ran clean under compute-sanitizer (docs/performance.md).
        return "MIMO with >= 64 rows on 4 warps miscompiles (Triton 3.6, out-of-range shared)"
    # The fp32 state lives in registers: keep it within about 96 registers per thread.
    state_regs = config.block_p * problem.d_state // (32 * config.num_warps)
    if state_regs > 96:
        return f"state tile needs {state_regs} registers per thread (> 96)"
    if device_props is not None:
        limit = device_props.get("shared_memory_per_block_optin", _SMEM_SM90)
        need = _smem_estimate(problem, chunk, config.block_p, config.num_stages)
        if need > limit:
            return f"shared memory estimate {need} B > {limit} B"
    return None


def _applies(problem: Problem) -> bool:
    return not problem.decode


# --------------------------------------------------------------------------------------------
# Launch plans and entry points
# --------------------------------------------------------------------------------------------


_CONSTS: dict[tuple, dict] = {}


def _checked_constexprs(
    problem: Problem, config: ChunkFwdConfig, has_mv: bool, has_mz: bool, save_y: bool
):
    """The kernel's compile-time arguments after the config's constraint check, memoized per call
    signature (both are pure functions of it; this runs on every prefill call)."""
    interp = interpreting()
    key = (problem, config, has_mv, has_mz, save_y, interp)
    consts = _CONSTS.get(key)
    if consts is None:
        reason = constraint(problem, config, None)
        if reason is not None:
            raise ValueError(f"chunk_fwd config {config}: {reason}")
        if len(_CONSTS) >= 256:
            _CONSTS.clear()
        consts = _CONSTS[key] = _constexprs(problem, config, interp, has_mv, has_mz, save_y)
    return consts


def _c(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


# The call's argument table: every tensor a launch of the forward may take, by name, in this
# order (as tensors for Triton's launcher, as addresses for the direct launch). Absent optional
# tensors and unused scratch buffers are v (never read: the kernels' flags skip them).
_TABLE = ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "D", "z", "mimo_v",
          "mimo_z", "mimo_o", "a0", "s0", "k0", "v0", "cu", "out", "a1", "s1", "k1", "v1",
          "ds", "fst", "clast", "phi", "th", "cs", "gm", "wt", "ys")  # fmt: skip
_SLOT = {name: i for i, name in enumerate(_TABLE)}
_SCRATCH = _TABLE[24:32]  # segment_buffers' names, carved out of one workspace allocation
_ALIGN = 256  # bytes between workspace buffers: the kernels assume 16-byte aligned pointers


class _Plan:
    """What one call signature of chunk_fwd needs, worked out once: whether inputs must be
    copied (non-contiguous, or a non-fp32 state), the shapes to allocate, the scratch layout in
    one workspace, and the launches (with their compiled kernels after the first GPU call)."""

    __slots__ = ("keep", "copy", "on_gpu", "device_index", "out_shape", "final", "y_shape",
                 "offsets", "ws_bytes", "scratch", "launches")  # fmt: skip

    def __init__(
        self, problem: Problem, config: ChunkFwdConfig, inputs: ScanInputs, save_y: bool
    ) -> None:
        # A plan keyed by the ids of problem and config keeps them, so the ids stay theirs.
        self.keep = (problem, config)
        init = inputs.initial_state
        self.copy = any(t is not None and not t.is_contiguous() for t in inputs[:14]) or (
            init is not None
            and (
                any(not t.is_contiguous() for t in init)
                or init.angle.dtype != torch.float32
                or init.ssm.dtype != torch.float32
            )
        )
        v = inputs.v
        self.on_gpu = v.is_cuda
        self.device_index = v.get_device()
        B, L, H, R, P = problem.batch, problem.seqlen, problem.nheads, problem.rank, problem.headdim
        N, S, nseq = problem.d_state, problem.n_angles, problem.nseq
        keep_ranks = problem.mimo and inputs.mimo_o is None
        self.out_shape = (B, L, R, H, P) if keep_ranks else (B, L, H, P)
        self.y_shape = (B, L, R, H, P) if save_y else None
        # Shapes of the final state's angle and ssm (fp32), k and v (in k's and v's dtypes).
        self.final = None
        if problem.return_final_state:
            self.final = ((nseq, H, S), (nseq, H, P, N), (nseq, R, H, N), (nseq, H, P))
        consts = _checked_constexprs(
            problem, config, inputs.mimo_v is not None, inputs.mimo_z is not None, save_y
        )
        launch = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        if config.maxnreg:
            launch["maxnreg"] = config.maxnreg
        slot = dict(_SLOT)
        if not save_y:
            slot["ys"] = _SLOT["v"]  # not written
        buffers: dict = {}
        launches = []
        split = config.split if _splits(problem, config) else 0
        nseg = 1
        if split == 2:
            # The state entering every segment (in v's dtype: it is only a dot operand there)
            # and each token's segment-local frame; then every chunk at once.
            buffers = segment_buffers(problem, consts, frames=True, state_dtype=v.dtype)
            nseg = buffers["fst"][0][1]
            launches = segment_launches(problem, consts, launch, slot, frames=True)
            launches.append(block_launch(problem, consts, launch, slot, nseg))
        elif split == 1 or L > 0 or problem.return_final_state:
            if split == 1:
                # The state entering every segment (and the final state) first; then this
                # kernel runs each segment independently (grid axis 2).
                buffers = segment_buffers(problem, consts)
                nseg = buffers["fst"][0][1]
                launches = segment_launches(problem, consts, launch, slot)
            else:
                slot["fst"] = _SLOT["v"]  # not read when walking whole sequences
            grid = (nseq * H, _cdiv(P, config.block_p), nseg)
            args = [slot[n] for n in _TABLE[:24]] + [slot["fst"], slot["ys"]]
            launches.append(Launch(_chunk_fwd_kernel, grid, args, (L, H, problem.ngroups, nseg),
                                   consts, launch))  # fmt: skip
        # One workspace for the scratch buffers (one allocation per call instead of up to six):
        # each buffer at a 256-byte aligned offset; (offset, shape, dtype), or None when unused.
        offset, scratch = 0, []
        for name in _SCRATCH:
            if name not in buffers:
                scratch.append(None)
                continue
            shape, dtype = buffers[name]
            scratch.append((offset, shape, dtype))
            nbytes = math.prod(shape) * dtype.itemsize
            offset += -(-nbytes // _ALIGN) * _ALIGN
        self.scratch = tuple(scratch)
        self.offsets = tuple(None if s is None else s[0] for s in scratch)
        self.ws_bytes = offset
        # chunk_fwd's direct path spells out these two layouts (segment walk, block kernel).
        assert not offset or (
            None not in self.offsets[:4] and len({o is None for o in self.offsets[4:]}) == 1
        )
        self.launches = launches


# Plans by call signature (see _plan). Problem and config enter by identity when the inputs come
# from the validation memo (its Problem stands for one signature): hashing them by value on
# every call would cost more than the lookup.
_PLANS: dict[tuple, _Plan] = {}
_PLANS_MAX = 256


def _layout(t: torch.Tensor | None):
    return None if t is None else (t.dtype, t.is_contiguous())


def _plan(problem: Problem, inputs: ScanInputs, config: ChunkFwdConfig, save_y: bool) -> _Plan:
    """The plan of this call, made on the first call of its signature.

    A plan depends on the problem and config, the interpreter switch, the device, and each
    tensor's presence, dtype (what Triton specialises on) and contiguity (what is copied). From
    the validation memo (``inputs.validated_problem is problem``) the Problem stands for all of
    those but the switch: every tensor's shape, dtype and device, the per-token tensors' strides
    and the other tensors' contiguity are its signature's. Other callers key on them in full.
    """
    interp = interpreting()
    if getattr(inputs, "validated_problem", None) is problem:
        key = (id(problem), id(config), interp, save_y)
    else:
        init = inputs.initial_state
        key = (problem, config, interp, save_y, inputs.v.device,
               *(_layout(t) for t in inputs[:14]),
               None if init is None else tuple(_layout(t) for t in init),
               _layout(inputs.cu_seqlens))  # fmt: skip
    plan = _PLANS.get(key)
    if plan is None:
        plan = _Plan(problem, config, inputs, save_y)
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _tensor_table(plan: _Plan, tensors: tuple, init, cu, out, final, ws, ys) -> tuple:
    """The argument table (_TABLE order) as tensors: the call's, v for absent ones, views of
    the workspace ``ws`` (uint8) for the scratch buffers, and the saved y (or v)."""
    v = tensors[2]
    scratch = tuple(
        v if s is None else ws[s[0] : s[0] + math.prod(s[1]) * s[2].itemsize].view(s[2]).view(s[1])
        for s in plan.scratch
    )
    return (
        *(v if t is None else t for t in tensors),
        *(init if init is not None else (v,) * 4),
        v if cu is None else cu,
        out,
        *(final if final is not None else (v,) * 4),
        *scratch,
        v if ys is None else ys,
    )


_tuple_new = tuple.__new__
_F32 = torch.float32


def chunk_fwd(
    problem: Problem, inputs: ScanInputs, config: ChunkFwdConfig
) -> tuple[torch.Tensor, Mamba3State | None]:
    """Run the chunked forward scan: chunk_fwd_saving_y's (out, final state) without the y."""
    out, final, _ = chunk_fwd_saving_y(problem, inputs, config, False)
    return out, final


def chunk_fwd_saving_y(
    problem: Problem, inputs: ScanInputs, config: ChunkFwdConfig, save_y: bool = True
) -> tuple[torch.Tensor, Mamba3State | None, torch.Tensor | None]:
    """Run the chunked forward scan, keeping the core's output for a backward.

    inputs: ScanInputs in scan shapes (docs/spec.md): q, k (B, L, G, N) or (B, L, R, G, N);
        v, z (B, L, H, P); adt, dt, trap (B, H, L); angles (B, L, H, S); ...
    Returns out ((B, L, H, P), or (B, L, R, H, P) for MIMO without mimo_o) in v's dtype, and the
    final state (angle (nseq, H, S) fp32 reduced modulo 2*pi, ssm (nseq, H, P, N) fp32,
    k (nseq, R, H, N) in k's dtype, v (nseq, H, P) in v's dtype) when problem.return_final_state.
    With save_y, also y (B, L, R, H, P) in v's dtype: every row's output after the D skip and
    before the z gate and the mimo_o rank sum, which is what the backward's epilogue reads of
    the core (chunk_bwd then skips recomputing it); else None.
    Each output is a fresh allocation of its own (contiguous, not a view).
    """
    plan = _plan(problem, inputs, config, save_y)
    q, k, v, adt, dt, trap, qb, kb, ang, d, z, mv, mz, mo, init, cu = inputs
    if plan.copy:  # into the layouts the kernels assume
        q, k, v, adt, dt, trap, qb, kb, ang, d, z, mv, mz, mo = (_c(x) for x in inputs[:14])
        if init is not None:
            init = Mamba3State(
                angle=init.angle.contiguous().float(),
                ssm=init.ssm.contiguous().float(),
                k=init.k.contiguous(),
                v=init.v.contiguous(),
            )
    out = v.new_empty(plan.out_shape)
    ys = None if plan.y_shape is None else v.new_empty(plan.y_shape)
    final = None
    if plan.final is not None:
        sa, ss, sk, sv = plan.final
        # tuple.__new__: the named tuple's own constructor is a Python function (~0.6 us).
        final = _tuple_new(Mamba3State, (v.new_empty(sa, dtype=_F32),
                                          v.new_empty(ss, dtype=_F32), k.new_empty(sk),
                                          v.new_empty(sv)))  # fmt: skip
    if not plan.launches:
        return out, final, ys
    ws = v.new_empty((plan.ws_bytes,), dtype=torch.uint8) if plan.ws_bytes else None
    if not plan.on_gpu:  # the interpreter (CPU tensors): Triton's launcher
        tensors = (q, k, v, adt, dt, trap, qb, kb, ang, d, z, mv, mz, mo)
        launch_generic(plan.launches, _tensor_table(plan, tensors, init, cu, out, final, ws, ys))
        return out, final, ys
    # The direct launch's argument table: the same entries as _tensor_table, as addresses.
    # (Spelled out, without generators: each Python-level step costs here, on every call.)
    pv = v.data_ptr()
    if init is None:
        state_in = (pv, pv, pv, pv)
    else:
        a0, s0, k0, v0 = init
        state_in = (a0.data_ptr(), s0.data_ptr(), k0.data_ptr(), v0.data_ptr())
    if final is None:
        state_out = (pv, pv, pv, pv)
    else:
        a1, s1, k1, v1 = final
        state_out = (a1.data_ptr(), s1.data_ptr(), k1.data_ptr(), v1.data_ptr())
    if ws is None:
        scratch = (pv, pv, pv, pv, pv, pv, pv, pv)
    else:
        base = ws.data_ptr()
        o = plan.offsets
        if o[4] is None:  # the segment walk: no frames
            scratch = (base + o[0], base + o[1], base + o[2], base + o[3], pv, pv, pv, pv)
        else:
            scratch = (base + o[0], base + o[1], base + o[2], base + o[3], base + o[4],
                       base + o[5], base + o[6], base + o[7])  # fmt: skip
    ptrs = (
        q.data_ptr(), k.data_ptr(), pv, adt.data_ptr(), dt.data_ptr(), trap.data_ptr(),
        qb.data_ptr(), kb.data_ptr(), ang.data_ptr(), pv if d is None else d.data_ptr(),
        pv if z is None else z.data_ptr(), pv if mv is None else mv.data_ptr(),
        pv if mz is None else mz.data_ptr(), pv if mo is None else mo.data_ptr(), *state_in,
        pv if cu is None else cu.data_ptr(), out.data_ptr(), *state_out, *scratch,
        pv if ys is None else ys.data_ptr(),
    )  # fmt: skip

    def tensors():
        inputs14 = (q, k, v, adt, dt, trap, qb, kb, ang, d, z, mv, mz, mo)
        return _tensor_table(plan, inputs14, init, cu, out, final, ws, ys)

    launch_all(plan.launches, ptrs, tensors, plan.device_index)
    return out, final, ys


SPEC = KernelSpec(
    name="chunk_fwd",
    modes=("inference", "training"),
    version=2,  # 2: the path field (fused or core); version-1 entries predate it
    config_cls=ChunkFwdConfig,
    applies=_applies,
    default=default_config,
    space=search_space,
    constraint=constraint,
)
