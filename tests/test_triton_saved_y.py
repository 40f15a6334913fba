"""The training forward keeps the core's y for the backward (chunk_fwd_saving_y): its values
against the float64 reference, and the backward that reads it instead of recomputing it
against the reference's gradients (CPU under TRITON_INTERPRET=1)."""

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mamba3_kernels.triton_impl import chunk_bwd as cb  # noqa: E402
from mamba3_kernels.triton_impl import chunk_fwd as cf  # noqa: E402
from mamba3_kernels.triton_impl import rot_core  # noqa: E402
from mamba3_kernels.triton_impl.backend import TritonBackend  # noqa: E402

import mamba3_kernels  # noqa: E402
from mamba3_kernels.backend import registered_backends  # noqa: E402
from mamba3_kernels.reference import reference_scan  # noqa: E402
from mamba3_kernels.state import Mamba3State  # noqa: E402
from mamba3_kernels.testing import cast_inputs, random_inputs, rel_err  # noqa: E402
from mamba3_kernels.validate import describe  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (CPU)")


def _inputs(rank, cu=None, seed=0, init=True):
    g = torch.Generator().manual_seed(seed)
    return random_inputs(
        batch=2 if cu is None else 1, seqlen=40, nheads=2, d_state=16, headdim=16, rank=rank,
        with_initial_state=init, cu_seqlens=cu, generator=g,
    )  # fmt: skip


def _core_y_reference(inputs, rotary):
    """The core's y (B, L, R, H, P): the reference's output without the z gate and mimo_o."""
    bare = cast_inputs(inputs, torch.float64)._replace(z=None, mimo_z=None, mimo_o=None)
    out, _ = reference_scan(bare, rotary)
    return out if out.dim() == 5 else out.unsqueeze(2)


@pytest.mark.parametrize(
    "rank,split,cu",
    [(1, 0, None), (1, 1, None), (1, 0, [0, 13, 13, 40]), (2, 2, None), (4, 1, None)],
)
def test_saved_y_is_the_core_output(rank, split, cu):
    """Every algorithm (whole walks, segment walks, blocks; varlen) stores y after the D skip and
    before the gate, and the same out as without saving."""
    inputs = _inputs(rank, cu, seed=rank + split)
    rotary = "halves" if rank > 1 else "interleaved"
    problem = describe(inputs, False, rotary, True, None)
    config = cf.ChunkFwdConfig(chunk_size=8 // rank, block_p=16, num_warps=4, split=split,
                               segment=16 if split else 0)  # fmt: skip
    assert cf.constraint(problem, config, None) is None
    out, state, y = cf.chunk_fwd_saving_y(problem, inputs, config)
    plain, plain_state = cf.chunk_fwd(problem, inputs, config)
    B, L, H, P = inputs.v.shape
    assert y.shape == (B, L, rank, H, P) and y.dtype == inputs.v.dtype
    assert rel_err(y, _core_y_reference(inputs, rotary)) < 1e-4
    assert torch.equal(out, plain)
    for a, b in zip(state, plain_state, strict=True):
        assert torch.equal(a, b)
    assert cf.chunk_fwd_saving_y(problem, inputs, config, save_y=False)[2] is None


def _grads(inputs, backend, final, rotary):
    leaves = [t.detach().clone().requires_grad_()
              for t in (*inputs[:14], *(inputs.initial_state or ())) if t is not None]  # fmt: skip
    it = iter(leaves)
    fields = [None if t is None else next(it) for t in inputs[:14]]
    state = Mamba3State(*(next(it) for _ in range(4))) if inputs.initial_state else None
    res = mamba3_kernels.scan(*fields, initial_state=state, return_final_state=final,
                              cu_seqlens=inputs.cu_seqlens, rotary=rotary,
                              backend=backend)  # fmt: skip
    out, st = res if final else (res, None)
    g = torch.Generator().manual_seed(99)
    loss = (out * torch.randn(out.shape, generator=g).to(out.dtype)).sum()
    if st is not None:
        loss = loss + st.ssm.sum() + st.k.square().sum() + st.v.sum()
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize(
    "rank,final,cu,with_z",
    [(1, True, None, True), (1, False, [0, 9, 40], True), (2, False, None, False),
     (4, True, None, True)],
)  # fmt: skip
def test_backward_reads_the_saved_y(rank, final, cu, with_z, monkeypatch, pin_config):
    """With z or mimo_o the training forward keeps y and the backward runs no core forward;
    its gradients are the reference's, and those of the recomputing backward."""
    inputs = _inputs(rank, cu, seed=10 + rank)
    if not with_z:
        inputs = inputs._replace(z=None, mimo_z=None)
    rotary = "halves" if rank > 1 else "interleaved"
    calls = []
    core_fwd = rot_core._core_fwd_op
    monkeypatch.setattr(rot_core, "_core_fwd_op",
                        lambda *a, **k: calls.append(1) or core_fwd(*a, **k))  # fmt: skip
    backend = registered_backends()["triton"]
    assert isinstance(backend, TritonBackend)
    problem = describe(inputs, False, rotary, final, None)
    assert cb.default_config(problem).save_y == 1
    pin_config("triton", "chunk_bwd", record_forward=0)  # (the path that keeps y)
    saved = _grads(inputs, "triton", final, rotary)
    assert calls == []  # y came from the forward
    pin_config("triton", "chunk_bwd", save_y=0)
    recomputed = _grads(inputs, "triton", final, rotary)
    assert calls == [1]  # the backward recomputed y
    want = _grads(cast_inputs(inputs, torch.float64), "reference", final, rotary)
    assert len(saved) == len(recomputed) == len(want)
    for a, b, c in zip(saved, recomputed, want, strict=True):
        assert rel_err(a, c) < 1e-4
        assert rel_err(a, b) < 1e-5


def test_no_y_kept_when_the_backward_does_not_read_it():
    """SISO without z: the epilogue's backward never reads y, so nothing is kept (no memory)."""
    inputs = _inputs(1, seed=3)._replace(z=None)
    problem = describe(inputs, False, "interleaved", False, None)
    backend = registered_backends()["triton"]
    fused = {"chunk_bwd": dataclasses.replace(cb.default_config(problem), record_forward=0)}
    out, state, y = backend.scan_for_backward(problem, inputs, fused)
    assert y is None and state is None
    assert rel_err(out, reference_scan(cast_inputs(inputs, torch.float64), "interleaved")[0]) < 1e-4


def test_backward_with_only_the_state_used():
    """A loss on the final state alone: the output's gradient is absent (no zero fill is made
    for the kept y), and the gradients still match the reference's."""
    inputs = _inputs(2, seed=7)
    got_want = []
    for backend, x in (("triton", inputs), ("reference", cast_inputs(inputs, torch.float64))):
        leaves = [t.detach().clone().requires_grad_() for t in (*x[:14], *x.initial_state)
                  if t is not None]  # fmt: skip
        it = iter(leaves)
        fields = [None if t is None else next(it) for t in x[:14]]
        state = Mamba3State(*(next(it) for _ in range(4)))
        _, st = mamba3_kernels.scan(*fields, initial_state=state, return_final_state=True,
                                    backend=backend)  # fmt: skip
        loss = st.ssm.sum() + st.k.square().sum()
        got_want.append(torch.autograd.grad(loss, leaves, allow_unused=True))
    for a, b in zip(*got_want, strict=True):
        if b is None:
            assert a is None or not a.any()
        else:
            assert rel_err(a, b) < 1e-4
