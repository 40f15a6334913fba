"""Backward of the chunked prefill scan (SISO and MIMO) through the Triton core.

The backward recomputes the scan as prep -> core -> epilogue (core_prep.scan_via_core) and takes
one vector-Jacobian product: the elementwise prep and epilogue go through PyTorch autograd, the
chunked core through its Triton backward (core_scan). Called from the scan's autograd backward
(eager), plain ``torch.autograd.grad`` records; called inside the ``mamba3::scan_bwd`` op's
kernel (torch.compile), below the autograd dispatch keys, only functorch records, so
``torch.func.vjp`` is the fallback there (a few ms more host time per call).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass

import torch

from mamba3_kernels.backend import KernelSpec
from mamba3_kernels.inputs import ScanInputs
from mamba3_kernels.problem import Problem
from mamba3_kernels.state import Mamba3State

from . import launch
from .core_rotary import RotaryConfig

__all__ = [
    "SPEC", "ChunkBwdConfig", "RecordedForward", "chunk_bwd", "record_forward", "core_forward",
    "default_config", "search_space", "constraint",
]  # fmt: skip

_MIN_DOT = 16
# Column splits of the core backward allowed here: on an H100 (bf16, N=128, P=64, 64-row chunks,
# 4 warps) split_n=4 hit an illegal memory access that is not understood yet (docs/performance.md),
# and was slower than 1 and 2 wherever it ran; only the verified values are offered.
_SPLIT_N = (1, 2)
_INPUT_NAMES = ScanInputs._fields[:14]  # q .. mimo_o
_STATE_NAMES = ("angle", "ssm", "k", "v")


@dataclass(frozen=True)
class ChunkBwdConfig:
    """Tunable parameters of the core kernels used by the backward (its forward recompute and
    its two-sweep backward).

    chunk_size: tokens per chunk (a MIMO chunk holds chunk_size * R rows).
    num_warps, num_stages: Triton launch parameters of both core kernels.
    split_n: programs per sweep and head in the core backward, each owning N / split_n state
        columns (more programs in flight; their partial sums over N are added atomically).
    segment: tokens per segment of the core kernels' walks (the backward's two sweeps, and the
        forward's recompute of y where z or mimo_o read it): one program per segment, their
        entering states from a pass over the segments (core_segments); 0 chooses per device
        and call (enough programs to fill the GPU); ignored for varlen calls.
    fwd_chunk_size: tokens per chunk of that forward recompute (0: chunk_size); its best chunk
        is longer than the backward's (no reverse sweep's tiles share its registers).
    record_forward: how a training call's forward runs. 1: through this family's graph with
        autograd recording (record_forward), so the backward reuses the rotated q/k, the angles
        and the core's segment states instead of recomputing them (more activation memory:
        about twice q's and k's per-head bytes, plus the angles (B, L, H, S) fp32); 0: the fused
        forward (chunk_fwd), the backward then recomputing its prep. Fixed-length calls only.
    save_y: with record_forward=0, whether the fused forward keeps the core's output y (R times
        v's bytes) where the backward's epilogue reads it (z gate, mimo_o), so the backward
        need not recompute it (1), or not (0: less memory, more time).
    """

    chunk_size: int = 64
    num_warps: int = 8
    num_stages: int = 1
    split_n: int = 1
    segment: int = 0
    fwd_chunk_size: int = 0
    record_forward: int = 1
    save_y: int = 1


def _pow2(x: int) -> bool:
    return x >= 1 and not x & (x - 1)


def _chunk(problem: Problem, config: ChunkBwdConfig) -> int:
    return problem.chunk_size if problem.chunk_size is not None else config.chunk_size


def _fwd_chunk(problem: Problem, config: ChunkBwdConfig) -> int:
    if problem.chunk_size is not None:
        return problem.chunk_size
    return config.fwd_chunk_size or config.chunk_size


def default_config(problem: Problem) -> ChunkBwdConfig:
    """32 rows per chunk on 4 warps, 2 pipeline stages, one program per sweep (no column
    split), segments chosen per call; the forward recompute on 64-row chunks. Once the sweeps
    are cut into segments (segment=0) the GPU is full, so neither 8 warps nor the column split's
    extra programs pay for their cost; the recompute, with no reverse sweep sharing its
    registers, takes longer chunks; two stages overlap the chunk loads (measurements:
    docs/performance.md, "The core backward").
    """
    chunk = max(1, 32 // problem.rank)
    fwd_chunk = max(1, 64 // problem.rank)
    if problem.d_state > 128 or problem.dtype == torch.float32:
        fwd_chunk = chunk  # (the forward kernel's tiles at N = 256 or fp32: as the backward's)
    warps = 4
    # the largest heads (N * P = 256 * 128) keep the state within 128 registers per thread
    split_n = 1 if problem.d_state * problem.headdim <= 128 * 32 * warps else 2
    # Training forwards record the backward's graph where that measured faster: fixed-length
    # calls (varlen calls, not measured, keep the fused forward).
    record = int(not problem.varlen and problem.seqlen > 0)
    return ChunkBwdConfig(chunk_size=chunk, num_warps=warps, num_stages=2, split_n=split_n,
                          fwd_chunk_size=fwd_chunk, record_forward=record)  # fmt: skip


def search_space(problem: Problem) -> dict[str, list]:
    """Candidate values per parameter (constraint() removes invalid combinations)."""
    return {
        "chunk_size": [c for c in (8, 16, 32, 64, 128) if 16 <= c * problem.rank <= 128],
        "num_warps": [4, 8],
        "num_stages": [1, 2],
        "split_n": [s for s in _SPLIT_N if problem.d_state // s >= _MIN_DOT],
        "segment": [0, 1024, 2048, 4096, 1 << 30],
        "fwd_chunk_size": [c for c in (8, 16, 32, 64, 128) if 16 <= c * problem.rank <= 128],
        "record_forward": [0, 1],
    }


def constraint(problem: Problem, config: ChunkBwdConfig, device_props: dict | None) -> str | None:
    """Why ``config`` cannot run ``problem``, or None."""
    for name, chunk in (("chunk_size", _chunk(problem, config)),
                        ("fwd_chunk_size", _fwd_chunk(problem, config))):  # fmt: skip
        rows = chunk * problem.rank
        if not _pow2(chunk):
            return f"{name} {chunk} is not a power of two"
        if rows < _MIN_DOT or rows > 256:
            return f"{name}*R = {rows} rows outside [16, 256]"
    if not _pow2(problem.headdim) or problem.headdim < _MIN_DOT:
        return f"headdim P={problem.headdim} is not a power of two >= 16"
    if not _pow2(problem.d_state) or problem.d_state < _MIN_DOT:
        return f"d_state N={problem.d_state} is not a power of two >= 16"
    if config.num_warps not in (1, 2, 4, 8, 16):
        return f"num_warps {config.num_warps} not a power of two <= 16"
    if config.num_stages < 1:
        return "num_stages < 1"
    sn = config.split_n
    if sn not in _SPLIT_N or problem.d_state % sn or problem.d_state // sn < _MIN_DOT:
        return (f"split_n={sn} must be one of {_SPLIT_N} and divide N={problem.d_state} into "
                f"blocks of >= {_MIN_DOT}")  # fmt: skip
    if config.segment < 0:
        return f"segment {config.segment} < 0"
    if config.record_forward not in (0, 1) or config.save_y not in (0, 1):
        return "record_forward and save_y are 0 or 1"
    # The fp32 state (or its gradient) lives in registers.
    state_regs = problem.headdim * problem.d_state // (32 * config.num_warps * sn)
    if state_regs > 128:
        return f"state tile needs {state_regs} registers per thread (> 128)"
    return None


def _applies(problem: Problem) -> bool:
    return not problem.decode


def _flat(inputs: ScanInputs) -> list[tuple[str, torch.Tensor | None]]:
    """(key, tensor) for every differentiable input slot, initial state fields included."""
    items = [(n, getattr(inputs, n)) for n in _INPUT_NAMES]
    state = inputs.initial_state
    for i, n in enumerate(_STATE_NAMES):
        items.append((f"initial_state.{n}", None if state is None else state[i]))
    return items


def _rebuild(inputs: ScanInputs, keys: list[str], tensors) -> ScanInputs:
    """``inputs`` with the tensors named by ``keys`` replaced."""
    new = dict(zip(keys, tensors, strict=True))
    fields = {n: new.get(n, getattr(inputs, n)) for n in _INPUT_NAMES}
    state = inputs.initial_state
    if state is not None:
        state = Mamba3State(*(new.get(f"initial_state.{n}", state[i])
                              for i, n in enumerate(_STATE_NAMES)))  # fmt: skip
    return ScanInputs(**fields, initial_state=state, cu_seqlens=inputs.cu_seqlens)


def _empty_backward(inputs: ScanInputs, grad_state: Mamba3State | None) -> dict:
    """L == 0: the final state is the initial state, nothing else is used."""
    grads: dict = {n: None for n, _ in _flat(inputs)}
    state = inputs.initial_state
    if state is not None and grad_state is not None:
        for i, n in enumerate(_STATE_NAMES):
            grads[f"initial_state.{n}"] = grad_state[i].to(state[i].dtype)
    return grads


def chunk_bwd(
    problem: Problem,
    inputs: ScanInputs,
    grad_out: torch.Tensor,
    grad_state: Mamba3State | None,
    config: ChunkBwdConfig,
    y: torch.Tensor | None = None,
    rotary: RotaryConfig = RotaryConfig(),
) -> dict[str, torch.Tensor | None]:
    """Gradients of every floating input of the scan (rotary: the rotary family's config).

    inputs: ScanInputs in scan shapes (docs/spec.md). grad_out: the output's shape and dtype.
    grad_state: Mamba3State of cotangents for the final state (angle, ssm fp32; k, v in the
    inputs' dtypes), or None when the call returned no final state. y: the core's output as the
    forward kept it (chunk_fwd.chunk_fwd_saving_y), or None to recompute it where needed.
    Returns {ScanInputs field name: gradient or None}, with the initial state's gradients under
    'initial_state.angle' / '.ssm' / '.k' / '.v'.
    """
    reason = constraint(problem, config, None)
    if reason is not None:
        raise ValueError(f"chunk_bwd config {config}: {reason}")
    if problem.seqlen == 0:
        return _empty_backward(inputs, grad_state)
    if inputs.v.is_cuda:
        _compile_ahead(problem, inputs, grad_out, grad_state, config, y, rotary)
    return _chunk_bwd(problem, inputs, grad_out, grad_state, config, y, rotary)


# Backward call kinds whose kernels were compiled ahead (see _compile_ahead), and the (problem,
# config) objects already looked up there (a repeated call signature hands back the same ones).
_COMPILED_AHEAD: set = set()
_SEEN: dict[tuple[int, int], tuple] = {}


def _compile_ahead(problem, inputs, grad_out, grad_state, config, y, rotary) -> None:
    """The first backward of its kind in this process: one dry run (launch.compile_only) compiles
    its six kernels side by side before the real run launches them. The kind holds what the
    kernels are specialised on: the call's description without its lengths, which enter the
    kernels as integers specialised on being 1 or a multiple of 16 (a kind that compiles nothing
    new costs one extra host pass, once)."""
    kind = ("backward", grad_out.dtype, grad_state is not None, _autograd_records(), y is None,
            rotary)  # fmt: skip
    if _first_of_kind(problem, inputs, config, kind):
        _dry_run(lambda: _chunk_bwd(problem, inputs, grad_out, grad_state, config, y, rotary))


def _first_of_kind(problem, inputs, config, kind: tuple) -> bool:
    """Whether this (problem, config, kind) is the first of its compile kind (see
    _compile_ahead) and a dry run can compile it ahead."""
    ids = (id(problem), id(config), kind)
    seen = _SEEN.get(ids)
    if seen is not None and seen[0] is problem and seen[1] is config:
        return False
    if len(_SEEN) >= 256:
        _SEEN.clear()
    _SEEN[ids] = (problem, config)
    if (
        not launch.available()
        or torch.compiler.is_compiling()
        or torch.cuda.is_current_stream_capturing()  # the dry run's PyTorch ops would be captured
    ):
        return False
    B, L = problem.batch, problem.seqlen
    lengths = tuple((x == 1, x % 16 == 0) for x in (L, B * L, problem.nseq))
    key = (dataclasses.replace(problem, batch=0, seqlen=0, nseq=0), lengths, config, kind,
           _segmented(problem, config, inputs.v.device))  # fmt: skip
    if key in _COMPILED_AHEAD:
        return False
    _COMPILED_AHEAD.add(key)
    return True


def _dry_run(run) -> None:
    try:
        with launch.compile_only():
            run()
    except Exception as e:  # the real run compiles each kernel at its launch
        warnings.warn(f"chunk_bwd: compiling the kernels ahead failed ({e})", stacklevel=4)


def _segmented(problem: Problem, config: ChunkBwdConfig, device: torch.device) -> tuple:
    """Whether the core backward and the core forward (when it runs) cut this call's walks into
    segments (other kernels, other specialisations)."""
    from .core_segments import bwd_segment_len, fwd_segment_len

    if problem.varlen:
        return (False, False)
    L, nseq, H = problem.seqlen, problem.nseq, problem.nheads
    chunk, warps, segment = _chunk(problem, config), config.num_warps, config.segment
    bwd = bwd_segment_len(L, nseq, H, config.split_n, chunk, warps, segment, device)
    fwd = fwd_segment_len(L, nseq, H, _fwd_chunk(problem, config), warps, segment, device)
    return (bwd < L, fwd < L)


def _scan_graph(problem, inputs, config, values: bool, state: bool, y=None,
                rotary: RotaryConfig = RotaryConfig()):  # fmt: skip
    """The scan as a function of its floating inputs (core_prep.scan_via_core), for autograd:
    (present, forward), present the (key, tensor) pairs it differentiates against, forward
    their function returning (out[, angle, ssm, k, v])."""
    from .core_prep import scan_via_core

    present = [(n, t) for n, t in _flat(inputs) if t is not None and t.is_floating_point()]
    keys = [n for n, _ in present]
    meta = _core_meta(problem, config)
    sd = torch.float64 if inputs.q.dtype == torch.float64 else torch.float32

    def forward(*tensors):
        out, st = scan_via_core(problem, _rebuild(inputs, keys, tensors), meta, values=values,
                                state=state, y_saved=y, rotary=rotary)  # fmt: skip
        if not state:
            return (out,)
        return (out, st.angle.to(sd), st.ssm.to(sd), st.k.to(inputs.q.dtype),
                st.v.to(inputs.v.dtype))  # fmt: skip

    return present, forward


def _core_meta(problem: Problem, config: ChunkBwdConfig) -> tuple:
    """The core's settings as core_prep.scan_via_core takes them (its meta)."""
    return (_chunk(problem, config), problem.dtype, config.num_warps, config.num_stages,
            config.split_n, config.segment, _fwd_chunk(problem, config))  # fmt: skip


def _chunk_bwd(problem, inputs, grad_out, grad_state, config, y=None,
               rotary: RotaryConfig = RotaryConfig()) -> dict:  # fmt: skip
    # only the vjp is used: values=False lets it skip recomputing the core's output
    present, forward = _scan_graph(problem, inputs, config, False, grad_state is not None, y,
                                   rotary)  # fmt: skip
    cot = (grad_out,) if grad_state is None else (grad_out, *grad_state)
    if _autograd_records():
        # plain autograd: far less host time per call than a functorch vjp (ms at H=64)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for _, t in present]
            vjps = _grad(forward(*leaves), leaves, cot)
    else:
        _, vjp_fn = torch.func.vjp(forward, *(t for _, t in present))
        vjps = vjp_fn(cot)
    return _named_grads(inputs, present, vjps)


def _grad(outputs, leaves, cot):
    """torch.autograd.grad of the outputs that require it, with their cotangents."""
    pairs = [(o, c) for o, c in zip(outputs, cot, strict=True) if o.requires_grad]
    return torch.autograd.grad(
        [o for o, _ in pairs], leaves, [c for _, c in pairs], allow_unused=True
    )


def _named_grads(inputs, present, vjps) -> dict:
    grads: dict = {n: None for n, _ in _flat(inputs)}
    for (n, t), g in zip(present, vjps, strict=True):
        grads[n] = None if g is None else g.to(t.dtype)
    return grads


class RecordedForward:
    """A training forward's autograd graph (record_forward), which the backward then runs
    instead of recomputing its prep (angles, rotated q/k, weights) and the core's output.
    Used once: backward() drops the graph, and a second backward of a retained outer graph
    recomputes (chunk_bwd without it)."""

    def __init__(self, present, leaves, outputs) -> None:
        self.present, self.leaves, self.outputs = present, leaves, outputs

    def backward(self, inputs: ScanInputs, grad_out, grad_state) -> dict | None:
        """Gradients as chunk_bwd returns them, or None once the graph was used."""
        if self.outputs is None:
            return None
        cot = (grad_out,) if grad_state is None else (grad_out, *grad_state)
        with torch.enable_grad():
            vjps = _grad(self.outputs, self.leaves, cot)
        present = self.present
        self.present = self.leaves = self.outputs = None  # (frees the graph's saved tensors)
        return _named_grads(inputs, present, vjps)


def record_forward(
    problem: Problem, inputs: ScanInputs, config: ChunkBwdConfig,
    rotary: RotaryConfig = RotaryConfig(),
) -> tuple[torch.Tensor, Mamba3State | None, RecordedForward]:  # fmt: skip
    """A training forward through the backward's own graph: the scan as prep -> rotary ->
    core forward -> epilogue (core_prep.scan_via_core) with autograd recording, so that its
    backward reuses what the forward made (theta, the rotated q/k, the weights) rather than
    recomputing them. Returns (out, final state or None, the recorded graph).

    Against the fused forward (chunk_fwd) plus a recomputing backward this writes the rotated
    q and k once more and keeps them until the backward: activation memory of about twice
    q's and k's per-head size, plus theta (B, L, H, S) fp32 (ChunkBwdConfig.record_forward)."""
    reason = constraint(problem, config, None)
    if reason is not None:
        raise ValueError(f"chunk_bwd config {config}: {reason}")
    if inputs.v.is_cuda and _first_of_kind(problem, inputs, config, ("recorded", rotary)):
        _dry_run(lambda: _dry_record(problem, inputs, config, rotary))
    return _record(problem, inputs, config, rotary)


def _dry_record(problem, inputs, config, rotary) -> None:
    """record_forward and its backward on uninitialised cotangents, inside compile_only: the
    forward's and the backward's kernels compile side by side."""
    out, state, recorded = _record(problem, inputs, config, rotary)
    grad_state = None if state is None else Mamba3State(*(torch.empty_like(t) for t in state))
    recorded.backward(inputs, torch.empty_like(out), grad_state)


def _record(problem, inputs, config, rotary) -> tuple:
    present, forward = _scan_graph(problem, inputs, config, True, problem.return_final_state,
                                   rotary=rotary)  # fmt: skip
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for _, t in present]
        outputs = forward(*leaves)
    # out may view the core's y, which no node of the graph keeps (the core's backward never
    # reads it, and the gate, which does, writes a fresh out); the small final state is copied
    # (theta's last row, which the graph keeps, would be a view)
    out = outputs[0].detach()
    state = None
    if problem.return_final_state:
        state = Mamba3State(*(t.detach().clone() for t in outputs[1:]))
    return out, state, RecordedForward(present, leaves, outputs)


def core_forward(
    problem: Problem, inputs: ScanInputs, config: ChunkBwdConfig,
    rotary: RotaryConfig = RotaryConfig(),
) -> tuple[torch.Tensor, Mamba3State | None]:  # fmt: skip
    """An inference forward through the training forward's graph without autograd: prep ->
    rotary (the rotated per-head q/k written once) -> core forward -> epilogue
    (core_prep.scan_via_core). inputs: ScanInputs in scan shapes (docs/spec.md). Returns (out,
    final state or None) as chunk_fwd does: fresh contiguous tensors, out in v's dtype, the
    state's angle and ssm fp32, its k and v in the inputs' dtypes."""
    reason = constraint(problem, config, None)
    if reason is not None:
        raise ValueError(f"chunk_bwd config {config}: {reason}")
    config = _inference_config(problem, config, inputs.v.device)
    if inputs.v.is_cuda and _first_of_kind(problem, inputs, config, ("core_forward", rotary)):
        _dry_run(lambda: _core_forward(problem, inputs, config, rotary))
    out, state = _core_forward(problem, inputs, config, rotary)
    # out may be a view of the core's y (SISO without z: its rank axis squeezed), which nothing
    # else holds: detached, it is not copied (the state's views of theta and v are)
    return _owned(inputs, out.detach(), state)


def _owned(inputs: ScanInputs, out, state) -> tuple[torch.Tensor, Mamba3State | None]:
    """out and the final state in chunk_fwd's dtypes (out, the state's k and v in the inputs',
    its angle and ssm fp32, fp64 for fp64 inputs), each contiguous and owning its memory:
    copied where it views other memory or shares an input's (the final angle and v are slices
    of theta and of v; an op's outputs must not alias its inputs)."""
    init = inputs.initial_state
    taken = {t.untyped_storage().data_ptr() for t in (*inputs[:14], *(init or ()))
             if t is not None}  # fmt: skip

    def own(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t = t.to(dtype).contiguous()
        shared = t._is_view() or t.storage_offset() or t.untyped_storage().data_ptr() in taken
        return t.clone() if shared else t

    out = own(out, inputs.v.dtype)
    if state is None:
        return out, None
    sd = torch.float64 if inputs.q.dtype == torch.float64 else torch.float32
    return out, Mamba3State(own(state.angle, sd), own(state.ssm, sd), own(state.k, inputs.k.dtype),
                            own(state.v, inputs.v.dtype))  # fmt: skip


@functools.lru_cache(maxsize=256)
def _inference_config(problem: Problem, config: ChunkBwdConfig, device) -> ChunkBwdConfig:
    """config with its automatic segments (segment=0) chosen for an inference forward
    (core_segments.inference_segment_len), rounded up to whole forward chunks; the same object
    for the same call (memoised: _first_of_kind keys on identity)."""
    from .core_segments import inference_segment_len

    if config.segment > 0 or problem.varlen:
        return config
    seg = inference_segment_len(problem.seqlen, problem.nseq, problem.nheads, problem.rank,
                                device)  # fmt: skip
    chunk = _fwd_chunk(problem, config)
    # (>= L: a whole-sequence walk; a given segment > 0 is never 0 again)
    return dataclasses.replace(config, segment=max(-(-seg // chunk) * chunk, 1))


def _core_forward(problem, inputs, config, rotary) -> tuple:
    from .core_prep import scan_via_core

    with torch.no_grad():
        return scan_via_core(problem, inputs, _core_meta(problem, config), values=True,
                             state=problem.return_final_state, rotary=rotary)  # fmt: skip


def _autograd_records() -> bool:
    """Whether plain autograd records here: not below the autograd dispatch keys (inside an
    op's kernel, e.g. mamba3::scan_bwd under torch.compile), where only functorch does."""
    with torch.enable_grad():
        probe = torch.zeros((), requires_grad=True)
        return (probe * 1.0).requires_grad


SPEC = KernelSpec(
    name="chunk_bwd",
    modes=("training", "inference"),
    version=2,  # 2: record_forward and save_y (the training forward's path) are fields
    config_cls=ChunkBwdConfig,
    applies=_applies,
    default=default_config,
    space=search_space,
    constraint=constraint,
)
