"""Training forwards recorded through the backward's own graph (chunk_bwd.record_forward, the
Triton backend's training_forward="core"): outputs and gradients against the float64 reference
and against the fused forward's path, the backward recomputing nothing the forward made, and a
second backward of a retained graph (CPU under TRITON_INTERPRET=1; the model-shape check is a
GPU test)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mamba3_kernels.triton_impl import angle_scan, rot_core  # noqa: E402
from mamba3_kernels.triton_impl import chunk_bwd as cb  # noqa: E402

import mamba3_kernels  # noqa: E402
from mamba3_kernels.state import Mamba3State  # noqa: E402
from mamba3_kernels.testing import cast_inputs, random_inputs, rel_err  # noqa: E402
from mamba3_kernels.validate import describe  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
cpu_interpreted = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (CPU)")


def _inputs(rank, seed, *, z=True, init=True, cu=None, **sizes):
    g = torch.Generator().manual_seed(seed)
    shape = dict(batch=2 if cu is None else 1, seqlen=40, nheads=2, d_state=16, headdim=16)
    shape.update(sizes)
    return random_inputs(**shape, rank=rank, with_z=z, with_initial_state=init, cu_seqlens=cu,
                         generator=g)  # fmt: skip


def _call(inputs, backend, final, rotary, cot_seed=99, backward_twice=False):
    """Out, final state and the gradients of every input of a loss on both (a second backward
    of the retained graph too, with backward_twice)."""
    leaves = [t.detach().clone().requires_grad_()
              for t in (*inputs[:14], *(inputs.initial_state or ())) if t is not None]  # fmt: skip
    it = iter(leaves)
    fields = [None if t is None else next(it) for t in inputs[:14]]
    state = Mamba3State(*(next(it) for _ in range(4))) if inputs.initial_state else None
    res = mamba3_kernels.scan(*fields, initial_state=state, return_final_state=final,
                              cu_seqlens=inputs.cu_seqlens, rotary=rotary,
                              backend=backend)  # fmt: skip
    out, st = res if final else (res, None)
    g = torch.Generator().manual_seed(cot_seed)
    loss = (out * torch.randn(out.shape, generator=g).to(out.device, out.dtype)).sum()
    if st is not None:
        loss = loss + st.ssm.sum() + st.k.square().sum() + st.v.sum() + st.angle.sin().sum()
    grads = torch.autograd.grad(loss, leaves, retain_graph=backward_twice)
    if backward_twice:
        again = torch.autograd.grad(loss, leaves)
        return out, st, grads, again
    return out, st, grads


def _mode(pin_config, mode):
    """The training forward's path: "core" records the backward's graph, "fused" does not,
    "auto" is the heuristic's choice."""
    if mode != "auto":
        pin_config("triton", "chunk_bwd", record_forward=int(mode == "core"))


@cpu_interpreted
@pytest.mark.parametrize(
    "rank,final,z,init", [(1, True, True, True), (1, False, False, False), (2, False, True, True),
                          (4, True, False, True)],
)  # fmt: skip
def test_recorded_forward_matches_reference_and_fused(rank, final, z, init, pin_config):
    """Out, final state and every gradient: recorded (core) against the float64 reference, and
    against the fused forward's path, which computes the same function."""
    inputs = _inputs(rank, 20 + rank, z=z, init=init)
    rotary = "halves" if rank > 1 else "interleaved"
    _mode(pin_config, "core")
    out, st, grads = _call(inputs, "triton", final, rotary)
    _mode(pin_config, "fused")
    f_out, f_st, f_grads = _call(inputs, "triton", final, rotary)
    w_out, w_st, w_grads = _call(cast_inputs(inputs, torch.float64), "reference", final, rotary)
    assert out.dtype == inputs.v.dtype and out.shape == w_out.shape
    assert rel_err(out, w_out) < 1e-4 and rel_err(out, f_out) < 1e-4
    if final:
        for name, a, b, w in zip(Mamba3State._fields, st, f_st, w_st, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            if name == "angle":  # (the kernels keep it reduced modulo 2 pi)
                a, w = torch.stack((a.cos(), a.sin())), torch.stack((w.cos(), w.sin()))
            assert rel_err(a, w) < 1e-4, (name, rel_err(a, w))
    assert len(grads) == len(f_grads) == len(w_grads)
    for i, (a, b, w) in enumerate(zip(grads, f_grads, w_grads, strict=True)):
        assert a.dtype == b.dtype, i
        assert rel_err(a, w) < 1e-4, (i, rel_err(a, w))
        assert rel_err(a, b) < 1e-4, (i, rel_err(a, b))


@cpu_interpreted
def test_recorded_backward_recomputes_nothing(monkeypatch, pin_config):
    """One rotary forward and one angle scan per training call, both in the forward (the fused
    path's backward runs them again); the backward launches no core forward."""
    inputs = _inputs(1, 5)
    counts = {"rot": 0, "angle": 0, "core_fwd": 0}

    def counting(name, fn):
        return lambda *a, **k: counts.__setitem__(name, counts[name] + 1) or fn(*a, **k)

    monkeypatch.setattr(rot_core, "_rotary_fwd_op",
                        counting("rot", rot_core._rotary_fwd_op))  # fmt: skip
    monkeypatch.setattr(angle_scan, "_angle_fwd_op",
                        counting("angle", angle_scan._angle_fwd_op))  # fmt: skip
    monkeypatch.setattr(rot_core, "_core_fwd_op",
                        counting("core_fwd", rot_core._core_fwd_op))  # fmt: skip
    _mode(pin_config, "core")
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs[:14]]
    out = mamba3_kernels.scan(*leaves, rotary="interleaved", backend="triton")
    assert counts == {"rot": 1, "angle": 1, "core_fwd": 1}
    out.sum().backward()
    assert counts == {"rot": 1, "angle": 1, "core_fwd": 1}
    assert all(t.grad is not None for t in leaves if t is not None)


@cpu_interpreted
def test_second_backward_of_a_retained_graph(monkeypatch, pin_config):
    """The recorded graph serves one backward; a second one (retain_graph) recomputes and gives
    the same gradients."""
    inputs = _inputs(2, 8)
    _mode(pin_config, "core")
    _, _, first, second = _call(inputs, "triton", True, "halves", backward_twice=True)
    for a, b in zip(first, second, strict=True):
        assert rel_err(a, b) < 1e-5


@cpu_interpreted
def test_loss_on_the_final_state_only(monkeypatch, pin_config):
    """Absent output gradient (zero-filled), recorded path: the reference's gradients."""
    inputs = _inputs(1, 9)
    got = []
    for backend, x in (("triton", inputs), ("reference", cast_inputs(inputs, torch.float64))):
        _mode(pin_config, "core")
        leaves = [t.detach().clone().requires_grad_() for t in (*x[:14], *x.initial_state)
                  if t is not None]  # fmt: skip
        it = iter(leaves)
        fields = [None if t is None else next(it) for t in x[:14]]
        state = Mamba3State(*(next(it) for _ in range(4)))
        _, st = mamba3_kernels.scan(*fields, initial_state=state, return_final_state=True,
                                    rotary="interleaved", backend=backend)  # fmt: skip
        got.append(torch.autograd.grad(st.ssm.sum() + st.k.square().sum(), leaves,
                                       allow_unused=True))  # fmt: skip
    for a, b in zip(*got, strict=True):
        if b is None or not b.any():
            assert a is None or not a.any()
        else:
            assert rel_err(a, b) < 1e-4


def test_which_calls_record():
    """The heuristic records fixed-length calls; varlen (not measured) and empty calls run
    fused."""
    fixed = describe(_inputs(1, 1), False, "interleaved", False, None)
    varlen = describe(_inputs(1, 1, cu=[0, 9, 40]), False, "interleaved", False, None)
    empty = describe(_inputs(1, 1, seqlen=0), False, "interleaved", False, None)
    assert cb.default_config(fixed).record_forward == 1
    assert cb.default_config(varlen).record_forward == 0
    assert cb.default_config(empty).record_forward == 0


@cpu_interpreted
def test_bad_training_forward_config_is_an_error(pin_config):
    """A record_forward other than 0 or 1 is refused by the family's constraint, naming it; an
    unknown field is refused when pinned."""
    inputs = _inputs(1, 2)
    pin_config("triton", "chunk_bwd", record_forward=2)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs[:14]]
    with pytest.raises(ValueError, match="record_forward and save_y are 0 or 1"):
        mamba3_kernels.scan(*leaves, rotary="interleaved", backend="triton")
    with pytest.raises(TypeError, match="no config field"):
        pin_config("triton", "chunk_bwd", training_forward="core")


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [1, 4])
def test_recorded_forward_on_gpu(rank, monkeypatch, pin_config):
    """Model shape (B=2, L=4096, H=32, N=128, P=64, S=32), bf16: the recorded path's out and
    gradients against the fused path's (the same function, different roundings) and the fp32
    reference's out."""
    sizes = dict(batch=2, seqlen=4096, nheads=32, d_state=128, headdim=64, n_angles=32)
    g = torch.Generator().manual_seed(3)
    inputs = random_inputs(**sizes, rank=rank, dtype=torch.bfloat16, device="cuda",
                           with_initial_state=True, generator=g)  # fmt: skip
    rotary = "halves" if rank > 1 else "interleaved"
    results = {}
    for mode in ("core", "fused"):
        _mode(pin_config, mode)
        results[mode] = _call(inputs, "triton", True, rotary)
    (out, st, grads), (f_out, f_st, f_grads) = results["core"], results["fused"]
    ref = cast_inputs(inputs, torch.float32)
    w_out, _ = mamba3_kernels.scan(
        *ref[:14],
        initial_state=ref.initial_state,
        return_final_state=True,
        rotary=rotary,
        backend="reference",
    )
    assert rel_err(out, w_out) < 2e-2 and rel_err(out, f_out) < 2e-2
    for name, a, b in zip(Mamba3State._fields, st, f_st, strict=True):
        if name == "angle":  # (reduced modulo 2 pi: compare the rotations)
            a, b = torch.stack((a.cos(), a.sin())), torch.stack((b.cos(), b.sin()))
        assert rel_err(a, b) < 2e-2, name
    for i, (a, b) in enumerate(zip(grads, f_grads, strict=True)):
        assert rel_err(a, b) < 2e-2, (i, rel_err(a, b))


@cpu_interpreted
@pytest.mark.parametrize("rank", [1, 2])
def test_backward_reuses_the_forward_segment_states(rank, monkeypatch):
    """With segments (given here: the CPU picks none), the recorded forward walks the backward's
    segments, keeps their entering states, and the backward computes only its state gradients'
    (one reverse contribution sweep): gradients as the recomputing backward's."""
    from mamba3_kernels.triton_impl import core_scan

    inputs = _inputs(rank, 30 + rank, seqlen=80)  # (three segments, the last one partial)
    rotary = "halves" if rank > 1 else "interleaved"
    problem = describe(inputs, False, rotary, True, None)
    config = cb.ChunkBwdConfig(chunk_size=16 // rank, num_warps=4, segment=32,
                               fwd_chunk_size=32 // rank)  # fmt: skip
    firsts = []
    real = core_scan.segment_states  # (core_segments', as core_scan's launches call it)
    monkeypatch.setattr(core_scan, "segment_states",
                        lambda *a, **k: firsts.append(a[-1] if len(a) > 14 else k.get("s_in"))
                        or real(*a, **k))  # fmt: skip
    out, state, recorded = cb.record_forward(problem, inputs, config)
    assert len(firsts) == 1 and firsts[0] is None  # the forward's states (both from zero)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=g)
    grad_state = Mamba3State(*(torch.randn(t.shape, generator=g) for t in state))
    got = recorded.backward(inputs, grad_out, grad_state)
    assert len(firsts) == 2 and firsts[1] is not None  # the backward reused them
    want = cb.chunk_bwd(problem, inputs, grad_out, grad_state, config)
    # (its recompute of y, which z reads, shares its states with its backward the same way)
    assert len(firsts) == 4 and firsts[2] is None and firsts[3] is not None
    assert got.keys() == want.keys()
    for key, a in got.items():
        b = want[key]
        assert (a is None) == (b is None), key
        if a is not None:
            assert rel_err(a, b) < 1e-5, (key, rel_err(a, b))
