"""Multi-token verify (speculative decoding): ``verify`` over a draft equals token-by-token steps
and a scan from the same states, returns the state after every token and leaves the given
state or pool untouched; ``commit`` keeps each sequence's accepted prefix (reference, and
Triton under TRITON_INTERPRET=1 on CPU)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mamba3_kernels  # noqa: E402
from mamba3_kernels.state import Mamba3State  # noqa: E402
from mamba3_kernels.testing import random_inputs, rel_err  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BACKENDS = [
    "reference",
    pytest.param("triton", marks=pytest.mark.skipif(not INTERPRET, reason="needs the interpreter")),
]


def case(batch=3, draft=5, rank=1, slots=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    kw = dict(nheads=2, d_state=16, headdim=8, rank=rank, generator=g)
    x = random_inputs(batch=batch, seqlen=draft, with_initial_state=slots is None, **kw)
    if slots is None:
        return x, x.initial_state
    pool = random_inputs(batch=slots, seqlen=1, with_initial_state=True, **kw).initial_state
    return x, Mamba3State(*(t.contiguous() for t in pool))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank", [1, 2])
def test_verify_equals_steps_and_scan(backend, rank):
    x, state = case(rank=rank)
    before = state.clone()
    out, states = mamba3_kernels.verify(*x[:9], state, *x[9:14], backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(state, before, strict=True))  # untouched
    current = state.clone()
    for i in range(x.q.shape[1]):
        xi = x.along_tokens(lambda t, i=i: t[:, i], lambda t, i=i: t[:, :, i])
        want, current = mamba3_kernels.step(*xi[:9], current, *xi[9:14], backend="reference")
        assert rel_err(out[:, i], want) < 1e-5
        for got, ref in zip(states, current, strict=True):
            assert rel_err(got[:, i], ref) < 1e-5
    scanned, final = mamba3_kernels.scan(*x[:14], initial_state=state, return_final_state=True)
    assert rel_err(out, scanned) < 1e-5
    assert rel_err(states.ssm[:, -1], final.ssm) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_from_slots_then_commit(backend):
    x, pool = case(slots=6, draft=4)
    idx = torch.tensor([4, -1, 1], dtype=torch.int32)
    before = pool.clone()
    out, states = mamba3_kernels.verify(*x[:9], pool, *x[9:14], state_indices=idx,
                                        backend=backend)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(pool, before, strict=True))
    start = Mamba3State(*(t[[4, 1, 1]].clone() for t in before))
    start = Mamba3State(*(torch.cat([t[:1], torch.zeros_like(t[1:2]), t[2:]]) for t in start))
    assert rel_err(out, mamba3_kernels.scan(*x[:14], initial_state=start)) < 1e-5
    accepted = torch.tensor([2, 3, 0])
    mamba3_kernels.commit(pool, idx, states, accepted)
    assert rel_err(pool.ssm[4], states.ssm[0, 1]) < 1e-6  # slot 4 after 2 tokens
    assert torch.equal(pool.ssm[1], before.ssm[1])  # nothing accepted: slot 1 as before
    others = [0, 2, 3, 5]
    assert all(torch.equal(a[others], b[others]) for a, b in zip(pool, before, strict=True))
    # The committed slot equals a scan over the accepted prefix.
    x1 = x.along_tokens(lambda t: t[:1, :2], lambda t: t[:1, :, :2])
    _, want = mamba3_kernels.scan(*x1[:14], initial_state=Mamba3State(*(t[:1] for t in start)),
                                  return_final_state=True)  # fmt: skip
    for got, ref in zip(pool, want, strict=True):
        assert rel_err(got[4:5], ref) < 1e-5


def test_verify_refuses_bad_calls():
    x, state = case()
    with pytest.raises(TypeError, match="state"):
        mamba3_kernels.verify(*x[:9], None, *x[9:14])
    x2, pool = case(slots=4)
    with pytest.raises(ValueError, match="distinct"):
        mamba3_kernels.verify(*x2[:9], pool, *x2[9:14], state_indices=torch.tensor([1, 1, 2]))
    idx = torch.tensor([0, 1, 2])
    _, states = mamba3_kernels.verify(*x2[:9], pool, *x2[9:14], state_indices=idx)
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        mamba3_kernels.commit(pool, torch.tensor([0, 1, 2]), states, torch.tensor([1, 6, 0]))
    with pytest.raises(ValueError, match="accepted"):
        mamba3_kernels.commit(pool, torch.tensor([0, 1, 2]), states, torch.tensor([1.0, 2.0, 0.0]))
