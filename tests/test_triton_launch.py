"""The prefill forward's direct launches (triton_impl/launch.py, chunk_fwd's plans) against
Triton's own launcher, on CPU.

The GPU hot path (raw addresses straight to the compiled kernels) cannot run here, so Triton's
launcher and the compiled kernels' ``run`` are recorded instead: for every launch of a call
that takes the direct path, the grid, stream, compiled function and every argument must equal
what Triton's launcher hands its compiled kernel for the same call (its binder's arguments in
signature order, tensors as their addresses), and the call must have the specialisation
(dtypes, pointer alignment, integers, compile-time arguments, launch options) of the launch
whose compiled kernel it reuses. Covers the three kernels of each chunk-parallel variant (SISO
segment walk, MIMO R=4 block kernel), the one-launch walk, with and without initial and final
state, through the public call (the validation memo's key) and through chunk_fwd (the full key).
"""

import inspect
import os

import pytest
import torch

# Without a GPU the kernels run under Triton's interpreter; must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mamba3_kernels.triton_impl import chunk_fwd as cf  # noqa: E402
from mamba3_kernels.triton_impl import launch as tlaunch  # noqa: E402
from mamba3_kernels.triton_impl import step as tstep  # noqa: E402

import mamba3_kernels  # noqa: E402
from mamba3_kernels import ops, validate  # noqa: E402
from mamba3_kernels.problem import Problem  # noqa: E402
from mamba3_kernels.testing import random_inputs  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
cpu_interpreted = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (CPU)")
pytestmark = cpu_interpreted

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
    monkeypatch.setattr(tlaunch, "_DIRECT", [True])
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
            enter, leave = tstep._hooks()
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
        backend, configs = mamba3_kernels.dispatch.plan(problem, "triton", "scan_fwd")
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
