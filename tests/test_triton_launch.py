"""triton_impl/launch.py against Triton's own launcher, on CPU: the launch plans (chunk_fwd's;
the decode step's are in test_triton_step.py), the launches keyed per call (run_kernel), and
the side-by-side compiles of a call's first launches.

Launch plans. The GPU hot path (raw addresses straight to the compiled kernels) cannot run
here, so Triton's launcher and the compiled kernels' ``run`` are recorded instead: for every
launch of a call that takes the direct path, the grid, stream, compiled function and every
argument must equal what Triton's launcher hands its compiled kernel for the same call (its
binder's arguments in signature order, tensors as their addresses), and the call must have the
specialisation (dtypes, pointer alignment, integers, compile-time arguments, launch options) of
the launch whose compiled kernel it reuses. Covers the three kernels of each chunk-parallel
variant (SISO segment walk, MIMO R=4 block kernel), the one-launch walk, with and without
initial and final state, through the public call (the validation memo's key) and through
chunk_fwd (the full key).

Keyed launches and first-call compiles. Triton's JIT compiles for sm_90 through the stand-in
driver (tools/jit_standin.py: the JIT only asks it for the target, device and stream when it
compiles; nothing is launched), in a subprocess with the interpreter off and a fresh kernel
cache, and the compiled kernels' launcher is replaced by a recorder: past the first launch of a
key, run_kernel hands the compiled kernel's launcher exactly what Triton's own launch path gives
it, and any change of what Triton specialises on goes back through Triton's launcher; every
launch of the backward is keyed after its first; the forward's launch plan and one dry run of
the backward compile their kernels on more than one thread, and a second pass compiles nothing
new.
"""

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

# Without a GPU the kernels run under Triton's interpreter; must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mamba3_kernels.triton_impl import chunk_fwd as cf  # noqa: E402
from mamba3_kernels.triton_impl import launch as tlaunch  # noqa: E402

import mamba3_kernels  # noqa: E402
from mamba3_kernels import ops, validate  # noqa: E402
from mamba3_kernels.problem import Problem  # noqa: E402
from mamba3_kernels.testing import random_inputs, run_compiled  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
cpu_interpreted = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (CPU)")
_TOOLS = str(Path(__file__).resolve().parents[1] / "tools")

STREAM = 7


class _Compiled:
    """A compiled kernel as Triton's launcher returns it: ``run`` records what it is handed."""

    def __init__(self, rec, kernel):
        self.rec, self.kernel = rec, kernel
        self.function = ("function", kernel.fn.__name__)
        self.packed_metadata = ("packed", kernel.fn.__name__)

    @property
    def run(self):
        return lambda *args: self.rec.direct.append((self.kernel, args))

    def launch_metadata(self, grid, stream, *args):  # called where a launch hook is installed
        return ("meta", self.kernel.fn.__name__, grid, stream)


class _Recorder:
    """Stands in for Triton's launcher: records each launch as its binder binds it."""

    def __init__(self):
        self.generic, self.direct = [], []

    def launch_generic(self, kernel, grid, args, consts, options):
        bound = inspect.signature(kernel.fn).bind(*args, **consts)
        bound.apply_defaults()
        self.generic.append((kernel, tuple(grid), dict(bound.arguments), dict(options)))
        return _Compiled(self, kernel)


def _addresses(arguments: dict) -> tuple:
    """Triton's launcher's arguments after the launch parameters: the bound values in signature
    order, tensors as their addresses (its C launcher takes data_ptr() of each)."""
    return tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in arguments.values())


def _specialisation(arguments: dict) -> tuple:
    """What Triton specialises a launch on: each tensor's dtype and 16-byte alignment, every
    other argument's value (integers, compile-time arguments)."""
    return tuple(
        (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a
        for a in arguments.values()
    )


@pytest.fixture
def rec(monkeypatch):
    """Fresh plans, Triton's launcher recorded, a fixed current stream; with every direct call
    of chunk_fwd checked against Triton's launcher on the same call's tensors."""
    r = _Recorder()
    monkeypatch.setattr(cf, "_PLANS", {})
    monkeypatch.setattr(tlaunch, "_ENABLED", [True])
    monkeypatch.setattr(tlaunch, "_launch_generic", r.launch_generic)
    monkeypatch.setattr(tlaunch, "_current_stream", lambda index: STREAM)
    r.checked = []
    real = tlaunch.launch_all

    def launch_all(launches, ptrs, tensors, device_index):
        table = tensors()
        # The two argument tables agree entry by entry (same call, same allocations).
        assert [t.data_ptr() for t in table] == list(ptrs)
        n_direct, n_generic = len(r.direct), len(r.generic)
        real(launches, ptrs, tensors, device_index)
        direct = r.direct[n_direct:]
        if len(r.generic) > n_generic:  # a launch went through Triton's launcher: not checked
            return
        # The same call through Triton's launcher (the interpreter's path), for comparison.
        tlaunch.launch_generic(launches, table)
        generic = r.generic[n_generic:]
        del r.generic[n_generic:]
        assert len(direct) == len(generic) == len(launches)
        for (k_d, args), (k_g, grid, arguments, _), ln in zip(direct, generic, launches,
                                                             strict=True):  # fmt: skip
            assert k_d is k_g is ln.kernel
            assert args[:3] == (*grid, 1, 1)[:3]
            assert args[3] == STREAM
            assert args[4:6] == (("function", k_d.fn.__name__), ("packed", k_d.fn.__name__))
            enter, leave = tlaunch._hooks()
            assert args[7:9] == (enter, leave)
            assert args[6] == (None if enter is None else ("meta", k_d.fn.__name__, grid, STREAM))
            assert args[9:] == _addresses(arguments)
        r.checked.append([(k, grid, _specialisation(a), o) for k, grid, a, o in generic])

    monkeypatch.setattr(cf, "launch_all", launch_all)
    return r


def _gpu_plans():
    for plan in cf._PLANS.values():
        plan.on_gpu = True


def _call_three_times(rec, call):
    """A call on the interpreter's branch (builds the plan), one on the GPU branch through
    Triton's launcher (which compiles; kept), one on the direct path. Returns the records of
    Triton's launcher for the second call and the checked third call's specialisation."""
    call()
    _gpu_plans()
    n, n_direct, n_checked = len(rec.generic), len(rec.direct), len(rec.checked)
    call()
    first_gpu = [(k, g, _specialisation(a), o) for k, g, a, o in rec.generic[n:]]
    assert first_gpu and len(rec.direct) == n_direct
    call()
    assert len(rec.checked) == n_checked + 1
    assert len(rec.direct) == n_direct + len(first_gpu)
    return first_gpu, rec.checked[-1]


# (rank, with an initial state, returning the final state, seqlen, kernels expected)
CASES = [
    (1, False, False, 300, ("_segment_state_kernel", "_state_pass_kernel", "_chunk_fwd_kernel")),
    (1, True, True, 300, ("_segment_state_kernel", "_state_pass_kernel", "_chunk_fwd_kernel")),
    (1, False, True, 300, ("_segment_state_kernel", "_state_pass_kernel", "_chunk_fwd_kernel")),
    (4, False, False, 300, ("_segment_state_kernel", "_state_pass_kernel", "_block_out_kernel")),
    (4, True, True, 300, ("_segment_state_kernel", "_state_pass_kernel", "_block_out_kernel")),
    (1, True, True, 40, ("_chunk_fwd_kernel",)),
    (4, False, False, 40, ("_chunk_fwd_kernel",)),
]


def _inputs(rank, with_state, seqlen, seed=0, **kw):
    # P = 64 so that MIMO R=4 in bf16 takes the block kernel by default (split=2).
    sizes = dict(batch=2, nheads=4, ngroups=2, d_state=32, headdim=64, n_angles=8)
    g = torch.Generator().manual_seed(seed)
    return random_inputs(seqlen=seqlen, rank=rank, dtype=torch.bfloat16,
                         with_initial_state=with_state, generator=g, **{**sizes, **kw})  # fmt: skip


def _scan(x, final, backend="triton"):
    return mamba3_kernels.scan(*x[:9], D=x.D, z=x.z, mimo_v=x.mimo_v, mimo_z=x.mimo_z,
                               mimo_o=x.mimo_o, initial_state=x.initial_state,
                               return_final_state=final, backend=backend)  # fmt: skip


@cpu_interpreted
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"R{c[0]}-init{c[1]:d}-final{c[2]:d}-L{c[3]}")
def test_public_scan_direct_launches_match_tritons_launcher(rec, case):
    """Through mamba3_kernels.scan (a validation-memo hit keys the plan on its Problem)."""
    rank, with_state, final, seqlen, kernels = case
    x = _inputs(rank, with_state, seqlen)
    with torch.no_grad():
        first_gpu, checked = _call_three_times(rec, lambda: _scan(x, final))
    assert tuple(k.fn.__name__ for k, *_ in first_gpu) == kernels
    # The compiled kernels reused by the direct call were made for its specialisation.
    assert checked == first_gpu
    # Absent tensors are v's address, the state's entries follow the state's presence.
    (plan,) = cf._PLANS.values()
    assert plan.final is not None if final else plan.final is None
    # Every direct launch got distinct scratch buffers inside one workspace, 256-byte aligned.
    used = [s for s in plan.scratch if s is not None]
    ends = [o + torch.Size(shape).numel() * dt.itemsize for o, shape, dt in used]
    assert all(o % 256 == 0 for o, _, _ in used)
    assert all(e <= b[0] for e, b in zip(ends, used[1:], strict=False))
    assert (ends[-1] if ends else 0) <= plan.ws_bytes


@cpu_interpreted
@pytest.mark.parametrize("split", [0, 1, 2])
@pytest.mark.parametrize("state", [False, True])
def test_chunk_fwd_direct_launches_match_tritons_launcher(rec, split, state):
    """Through chunk_fwd with plain ScanInputs (the plan keyed in full), MIMO R=4 with each
    algorithm, also varlen (split 0 only: varlen never splits)."""
    x = _inputs(4, state, 300 if split else 40, seed=split)
    problem = Problem(
        batch=2, seqlen=x.v.shape[1], nheads=4, ngroups=2, rank=4, d_state=32, headdim=64,
        n_angles=8, nseq=2, dtype=torch.bfloat16, device_type="cpu", mimo=True, rotary="halves",
        has_D=True, has_z=True, has_mimo_o=True, has_initial_state=state,
        return_final_state=state, varlen=False,
    )  # fmt: skip
    config = cf.default_config(problem)
    if split:
        config = cf.ChunkFwdConfig(chunk_size=4, block_p=64, num_warps=8, split=split, segment=32)
    assert cf.constraint(problem, config, None) is None
    first_gpu, checked = _call_three_times(rec, lambda: cf.chunk_fwd(problem, x, config))
    assert len(first_gpu) == (3 if split else 1) and checked == first_gpu
    if split == 0:
        cu = torch.tensor([0, 17, 40], dtype=torch.int32)
        xv = _inputs(4, state, 40, seed=9, batch=1)._replace(cu_seqlens=cu)
        if state:
            xv = xv._replace(initial_state=_inputs(4, True, 40, seed=9).initial_state)
        pv = Problem(**{**problem.__dict__, "batch": 1, "varlen": True})
        first_gpu, checked = _call_three_times(rec, lambda: cf.chunk_fwd(pv, xv, config))
        assert checked == first_gpu
        # The table's cu entry is cu_seqlens itself.
        assert rec.direct[-1][1][9 + 18] == cu.data_ptr()


@cpu_interpreted
def test_misaligned_or_other_layouts_do_not_reuse_a_direct_launch(rec):
    """A pointer off 16-byte alignment goes back to Triton's launcher; a non-contiguous input
    has its own plan (through the public call: its own validated Problem), copied first."""
    x = _inputs(1, True, 300)
    with torch.no_grad():
        _call_three_times(rec, lambda: _scan(x, True))
        n_direct, n_generic = len(rec.direct), len(rec.generic)
        buf = torch.empty(x.v.numel() + 1, dtype=x.v.dtype)
        shifted = buf[1:].view(x.v.shape)  # same strides, a 2-byte offset
        shifted.copy_(x.v)
        _scan(x._replace(v=shifted), True)
        assert len(rec.direct) == n_direct and len(rec.generic) == n_generic + 3
        wide = torch.zeros(*x.q.shape[:-1], 2 * x.q.shape[-1], dtype=x.q.dtype)
        wide[..., ::2] = x.q
        strided = x._replace(q=wide[..., ::2])
        assert not strided.q.is_contiguous()
        plans = len(cf._PLANS)
        _scan(strided, True)
        assert len(cf._PLANS) == plans + 1
        (plan,) = [p for p in cf._PLANS.values() if p.copy]
        # The copy happened before the launch: Triton's launcher got a contiguous q.
        assert all(a["q_ptr"].is_contiguous() for k, _, a, _ in rec.generic[-3:] if "q_ptr" in a)


@cpu_interpreted
@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("seqlen", [0, 40, 300])
def test_triton_scan_outputs_need_no_ownership_copy(rec, rank, seqlen):
    """The eager path returns the Triton backend's outputs as they are (scan_outputs_owned):
    each is what run_scan's ownership step would return unchanged (fresh, contiguous, not a
    view, not sharing an input's memory, in the op's dtypes), and the values equal the op's."""
    x = _inputs(rank, True, seqlen)
    wide = torch.zeros(*x.k.shape[:-1], 2 * x.k.shape[-1], dtype=x.k.dtype)
    wide[..., ::2] = x.k
    fp32 = random_inputs(seqlen=seqlen, rank=rank, batch=2, nheads=4, d_state=32, headdim=16,
                         with_initial_state=True)  # fmt: skip
    for y in (x, x._replace(k=wide[..., ::2]), fp32):  # packed, strided (copied), fp32
        problem, inputs = validate.validate_scan(*y[:14], y.initial_state, True)
        backend, configs = mamba3_kernels.dispatch.plan(problem, "triton", "inference")
        assert backend.scan_outputs_owned
        out, state = backend.scan(problem, inputs, configs)
        owned = ops.owned_outputs(inputs, out, state)
        # (An empty output is copied there: its null address matches an empty input's.)
        assert all(a is b or b.numel() == 0 for a, b in zip(owned, (out, *state), strict=True))
        assert all(t.numel() for t in state)
        with torch.no_grad():
            res = ops.scan_eager(problem, inputs, "triton")
        assert res[0].shape == out.shape and all(
            a.shape == b.shape and a.dtype == b.dtype for a, b in zip(res[1], state, strict=True)
        )


@cpu_interpreted
@pytest.mark.parametrize("rank", [1, 4])
def test_public_scan_results_identical_to_the_op(monkeypatch, rank):
    """With the kernels really running (interpreter), the eager no-grad call and the op give
    identical outputs and final states, from an initial state and without one."""
    monkeypatch.setattr(cf, "_PLANS", {})
    for with_state in (False, True):
        x = _inputs(rank, with_state, 300, seed=3, batch=1, nheads=2)
        with torch.no_grad():
            out, state = _scan(x, True)
            st = x.initial_state
            ref, *ref_state = torch.ops.mamba3.scan(
                *x[:14], *(st if st is not None else (None,) * 4), None, True,
                "halves" if rank > 1 else "interleaved", 0, "triton",
            )  # fmt: skip
        assert torch.equal(out, ref)
        assert all(torch.equal(a, b) for a, b in zip(state, ref_state, strict=True))


# ---------------------------------------------------------------------- keyed launches

# Triton's JIT through the stand-in driver, the compiled kernels' launcher a recorder, and
# run_kernel's direct path taken by CPU tensors on stream 0.
_STANDIN = f"TOOLS = {_TOOLS!r}\n" + textwrap.dedent(
    """
    import sys
    import torch
    import triton
    from triton.compiler.compiler import CompiledKernel

    sys.path.insert(0, TOOLS)
    import jit_standin

    jit_standin.install()
    calls = []  # (grid, launcher arguments) of every launch the compiled kernels get

    def recorder(gx, gy, gz, stream, function, packed, meta, enter, leave, *args):
        calls.append(((gx, gy, gz), args))

    CompiledKernel._init_handles = lambda self: None  # nothing to load: nothing is launched
    CompiledKernel.run = property(lambda self: recorder)
    CompiledKernel.function = None
    from mamba3_kernels.triton_impl import launch

    launch._direct = lambda args: launch._ENABLED[0] and isinstance(args[0], torch.Tensor)
    launch._current_stream = lambda device: 0
    """
)

_KEYED_SCRIPT = _STANDIN + textwrap.dedent(
    """
    import triton.language as tl

    compiles = []
    real_compile = triton.compiler.compile

    def recording_compile(src, *args, **kwargs):
        compiles.append(src.fn.__name__)
        return real_compile(src, *args, **kwargs)

    triton.compiler.compile = recording_compile

    @triton.jit
    def scale(x_ptr, y_ptr, n, factor, BLOCK: tl.constexpr, SHIFT: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < n, other=0.0)
        tl.store(y_ptr + i, x * factor + SHIFT, mask=i < n)

    x = torch.randn(256)
    y = torch.empty(256)

    def run(args, grid=(4,), **kw):
        before = len(compiles)
        n_calls = len(calls)
        launch.run_kernel(scale, grid, *args, **(dict(BLOCK=64, SHIFT=0, num_warps=4) | kw))
        assert len(calls) == n_calls + 1
        return calls[-1], len(compiles) - before

    as_addr = lambda args: tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args)

    (grid, first), n = run((x, y, 256, 2.0))
    assert n == 1 and isinstance(first[0], torch.Tensor)  # Triton's launcher: compiled, tensors
    (grid2, again), n = run((x, y, 256, 2.0))
    assert n == 0 and grid2 == grid == (4, 1, 1)
    assert again == as_addr(first), (again, as_addr(first))  # direct: same arguments, addresses
    assert launch._CACHE
    print("same-args ok")

    # Each change Triton specialises on misses the key: Triton's launcher (tensors) runs again.
    for args, kw in (
        ((x, y, 1, 2.0), {}),  # n == 1 becomes a constant
        ((x, y, 255, 2.0), {}),  # n no longer divisible by 16
        ((x[1:], y[1:], 255, 2.0), {}),  # 4-byte aligned pointers
        ((x.double(), y.double(), 256, 2.0), {}),  # dtypes
        ((x, y, 256, 2.0), {"SHIFT": 1}),  # a compile-time argument
        ((x, y, 256, 2.0), {"num_warps": 2}),  # a launch option
    ):
        (_, got), _n = run(args, **kw)
        assert isinstance(got[0], torch.Tensor), (args[2], kw)
        (_, got2), n2 = run(args, **kw)
        assert n2 == 0 and got2 == as_addr(got), (args[2], kw)
    print("keys ok")

    # A value Triton does not specialise on (the float, an aligned pointer elsewhere, n of the
    # same class) reuses the entry.
    z = torch.empty(256)
    (_, got), n = run((x, z, 512, 3.0))
    assert n == 0 and got == as_addr((x, z, 512, 3.0)) + (64, 0)
    print("reuse ok")
    """
)


def test_keyed_launches_match_tritons_launcher(tmp_path):
    """run_kernel past the first launch of a key: the compiled kernel's launcher gets exactly
    what Triton's own launch path gives it (tensors as their addresses); an integer becoming 1
    or losing its divisibility by 16, an unaligned pointer, another dtype, compile-time argument
    or launch option goes back through Triton's launcher."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    script = tmp_path / "keyed_launch_check.py"  # (@triton.jit reads its source from a file)
    script.write_text(_KEYED_SCRIPT)
    res = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for step in ("same-args ok", "keys ok", "reuse ok"):
        assert step in res.stdout, res.stdout


_BACKWARD_SCRIPT = _STANDIN + textwrap.dedent(
    """
    import triton.runtime.jit as jit

    binder = []  # every launch through Triton's launcher (kernel[grid](...))
    real_run = jit.JITFunction.run

    def counting_run(self, *args, **kwargs):
        binder.append(self.fn.__name__)
        return real_run(self, *args, **kwargs)

    jit.JITFunction.run = counting_run
    from mamba3_kernels import validate
    from mamba3_kernels.testing import random_inputs
    from mamba3_kernels.triton_impl import chunk_bwd as cb

    g = torch.Generator().manual_seed(0)
    x = random_inputs(batch=1, seqlen=64, nheads=4, ngroups=1, d_state=32, headdim=16,
                      n_angles=8, rank=1, dtype=torch.bfloat16, with_D=True, with_z=False,
                      with_mimo_o=True, generator=g)
    problem, inputs = validate.validate_scan(*x[:9], x.D, x.z, x.mimo_v, x.mimo_z, x.mimo_o,
                                             None, False)
    config = cb.default_config(problem)
    grad_out = torch.randn(x.v.shape, generator=g).to(x.v.dtype)
    cb.chunk_bwd(problem, inputs, grad_out, None, config)  # compiles every kernel
    per_call, first = len(calls), len(binder)
    assert per_call >= 5 and first == per_call, (per_call, binder)
    cb.chunk_bwd(problem, inputs, grad_out, None, config)
    # every launch of the second call direct: none through Triton's launcher
    assert len(calls) == 2 * per_call and len(binder) == first, binder[first:]
    assert len(launch._CACHE) == per_call
    print("direct", per_call)
    """
)


def test_backward_launches_all_go_direct(tmp_path):
    """Every kernel the backward launches (through Triton's JIT, its launcher recorded) is keyed
    for the direct path after its first launch: no call site leaves Triton's binder in the
    loop."""
    env = {"TRITON_CACHE_DIR": str(tmp_path / "cache")}
    out = run_compiled(_BACKWARD_SCRIPT, timeout=900, env=env)
    assert "direct" in out, out


# ---------------------------------------------------------------------- first-call compiles

_COMPILE_SCRIPT = f"TOOLS = {_TOOLS!r}\n" + textwrap.dedent(
    """
    import dataclasses
    import sys
    import threading
    import torch
    import triton
    import triton.compiler

    sys.path.insert(0, TOOLS)
    import jit_standin

    jit_standin.install()
    compiled = []  # (kernel name, thread) of every compile the JIT makes
    real_compile = triton.compiler.compile

    def recording_compile(src, *args, **kwargs):
        compiled.append((src.fn.__name__, threading.get_ident()))
        return real_compile(src, *args, **kwargs)

    triton.compiler.compile = recording_compile

    from mamba3_kernels import validate
    from mamba3_kernels.testing import random_inputs
    from mamba3_kernels.triton_impl import chunk_bwd as cb, chunk_fwd as cf, launch

    assert launch.available()
    g = torch.Generator().manual_seed(0)
    x = random_inputs(batch=1, seqlen=256 + 32, nheads=2, d_state=64, headdim=32,
                      dtype=torch.bfloat16, generator=g)
    problem, inputs = validate.validate_scan(*x[:9], x.D, x.z, x.mimo_v, x.mimo_z, x.mimo_o,
                                             None, False)

    # Forward: the launch plan's kernels, from the call's argument table.
    config = cf.default_config(problem)
    plan = cf._plan(problem, inputs, config, False)
    out = inputs.v.new_empty(plan.out_shape)
    ws = inputs.v.new_empty((plan.ws_bytes,), dtype=torch.uint8) if plan.ws_bytes else None
    table = cf._tensor_table(plan, tuple(inputs[:14]), None, None, out, None, ws, None)
    launch.compile_launches(plan.launches, table)
    names = sorted({n for n, _ in compiled})
    want = sorted(ln.kernel.fn.__name__ for ln in plan.launches)
    assert names == want, (names, want)
    print("fwd", len(compiled), len({t for _, t in compiled}))
    assert all(ln.tried for ln in plan.launches)
    launch.compile_launches(plan.launches, table)  # tried once: nothing more
    n_fwd = len(compiled)
    assert n_fwd == len(want)

    # Backward: one dry run compiles every kernel the backward launches (its core backward over
    # segments of 128 tokens: the segment kernels too).
    grad_out = torch.randn_like(out)
    bcfg = dataclasses.replace(cb.default_config(problem), segment=128)
    with launch.compile_only():
        cb._chunk_bwd(problem, inputs, grad_out, None, bcfg)
    bwd = compiled[n_fwd:]
    print("bwd", sorted({n for n, _ in bwd}), len({t for _, t in bwd}))
    with launch.compile_only():  # the same specializations: every kernel found in the JIT's cache
        cb._chunk_bwd(problem, inputs, grad_out, None, bcfg)
    assert len(compiled) == n_fwd + len(bwd), compiled[n_fwd + len(bwd):]
    print("again", 0)
    """
)


def test_first_call_kernels_compile_side_by_side(tmp_path):
    env = {"TRITON_CACHE_DIR": str(tmp_path / "cache"), tlaunch.ENV_SERIAL: "0"}
    out = run_compiled(_COMPILE_SCRIPT, timeout=600, env=env)
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    fwd_compiles, fwd_threads = map(int, lines["fwd"].split())
    assert fwd_compiles == 3 and fwd_threads >= 2, lines["fwd"]
    bwd_names, bwd_threads = lines["bwd"].rsplit(" ", 1)
    for name in ("_rot_fwd_kernel", "_rot_bwd_kernel", "_angle_fwd_kernel", "_angle_bwd_kernel",
                 "_core_bwd_kernel", "_contrib_kernel", "_pass_kernel"):  # fmt: skip
        assert name in bwd_names, bwd_names
    assert int(bwd_threads) >= 2
    assert lines["again"] == "0"


def test_compile_only_refuses_the_interpreter():
    if tlaunch.available():
        pytest.skip("runs where the interpreter is on (CPU CI)")
    with pytest.raises(RuntimeError, match="compile_only needs"):
        with tlaunch.compile_only():
            pass


def test_run_kernel_launches_outside_compile_only():
    # Under the interpreter run_kernel is kernel[grid](...): the backward's kernels still run
    # (the interpreter suites check their values); here one tiny launch writes its output.
    import triton
    import triton.language as tl

    @triton.jit
    def _fill(out_ptr, value, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out_ptr + i, tl.zeros((N,), dtype=tl.float32) + value)

    if tlaunch.available():
        pytest.skip("launches on a GPU only; the interpreter suites cover CPU")
    out = torch.zeros(16)
    tlaunch.run_kernel(_fill, (1,), out, 2.5, N=16)
    assert torch.equal(out, torch.full((16,), 2.5))


def test_serial_compile_switch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(tlaunch.ENV_SERIAL, "1")
    assert not tlaunch.available()
    monkeypatch.setenv(tlaunch.ENV_SERIAL, "0")
    assert tlaunch.available() == hasattr(__import__("triton"), "AsyncCompileMode")


def test_first_call_compile_script_runs(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "fc.json"
    cmd = [sys.executable, str(root / "tools" / "first_call_compile.py"), "--shape",
           "1,64,2,64,32", "--json", str(out)]  # fmt: skip
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=root, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["seconds"]
    assert set(rows) == {f"{k} ({m})" for k in ("fwd_s", "bwd_s") for m in ("serial", "parallel")}
    assert all(v[0] > 0 for v in rows.values())
