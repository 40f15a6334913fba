"""Reliability (issue 26): bad inputs fail with a clear error on every path into the ops (the
API, the raw registered ops, torch.compile), and non-finite values stay causal."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mamba3_kernels as m
from mamba3_kernels.schema import SCAN
from mamba3_kernels.testing import random_inputs


def _packed(cu: list[int], seqlen: int = 12):
    """Inputs of a packed batch of ``seqlen`` tokens whose cu_seqlens is ``cu`` (maybe wrong)."""
    x = random_inputs(cu_seqlens=[0, 5, seqlen], nheads=2, d_state=8, headdim=4,
                      with_initial_state=True)  # fmt: skip
    return x._replace(cu_seqlens=torch.tensor(cu, dtype=torch.int32))


def _raw_scan(x, backend: str = "reference"):
    return torch.ops.mamba3.scan(*SCAN.call_args(x, True, "interleaved", 0, backend))


@pytest.mark.parametrize("cu", [[0, 5, 40], [0, 5, 10], [0, 7, 5, 12]])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_raw_op_rejects_bad_cu_seqlens(cu, backend):
    with pytest.raises(ValueError, match="cu_seqlens: expected"):
        _raw_scan(_packed(cu), backend)


def test_compiled_scan_rejects_bad_cu_seqlens():
    x = _packed([0, 5, 40])

    def prefill(x):
        return m.scan(*x[:14], initial_state=x.initial_state, return_final_state=True,
                      cu_seqlens=x.cu_seqlens)  # fmt: skip

    with pytest.raises(Exception, match="cu_seqlens: expected to end at L = 12, got 40"):
        torch.compile(prefill)(x)


def test_raw_op_rejects_positive_adt_and_wrong_k():
    x = _packed([0, 5, 12])
    with pytest.raises(ValueError, match="adt: expected A\\*dt <= 0"):
        _raw_scan(x._replace(adt=x.adt.abs() + 0.1))
    with pytest.raises(ValueError, match="k: expected shape"):
        _raw_scan(x._replace(k=x.k[..., :4]))


def test_fake_impl_checks_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = _packed([0, 5, 12])
    with FakeTensorMode() as mode:
        fake = type(x)(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in x))
        fake = fake._replace(initial_state=type(x.initial_state)(
            *(mode.from_tensor(t) for t in x.initial_state)))  # fmt: skip
        with pytest.raises(ValueError, match="k: expected shape"):
            _raw_scan(fake._replace(k=fake.k[..., :4]))
        out = _raw_scan(fake)[0]
    assert out.shape == (1, 12, 2, 4)


def _step_inputs(batch: int = 2):
    return random_inputs(batch=batch, nheads=2, d_state=16, headdim=8, step=True)


@pytest.mark.parametrize("rank", [1, 2])
def test_triton_step_batch_zero(rank):
    s = random_inputs(batch=0, nheads=2, d_state=16, headdim=8, rank=rank, step=True,
                      with_mimo_o=False)  # fmt: skip
    outs = [m.step(*s[:9], s.initial_state, *s[9:14], backend=b, inplace=False)[0]
            for b in ("reference", "triton")]  # fmt: skip
    assert outs[0].shape == outs[1].shape and outs[1].numel() == 0


@pytest.mark.parametrize("which", ["q", "state.ssm"])
def test_triton_step_rejects_grad(which):
    s = _step_inputs()
    if which == "q":
        s = s._replace(q=s.q.clone().requires_grad_())
    else:
        s = s._replace(initial_state=s.initial_state._replace(
            ssm=s.initial_state.ssm.clone().requires_grad_()))  # fmt: skip
    with pytest.raises(RuntimeError, match=f"{which}: requires grad.*not differentiable"):
        m.step(*s[:9], s.initial_state, *s[9:11], backend="triton", inplace=False)
    with torch.no_grad():  # fine without grad mode
        m.step(*s[:9], s.initial_state, *s[9:11], backend="triton", inplace=False)
    out, _ = m.step(*s[:9], s.initial_state, *s[9:11], backend="reference", inplace=False)
    assert out.requires_grad  # the reference's step stays differentiable


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_step_rejects_aliased_state(backend):
    s = _step_inputs()
    st = s.initial_state
    for _ in range(2):  # the second call hits the validation memo
        m.step(*s[:9], st, *s[9:11], backend=backend)
    buf = torch.zeros(st.v.numel() + st.k.numel())
    aliased = st._replace(v=buf[: st.v.numel()].view(st.v.shape),
                          k=buf[2:2 + st.k.numel()].view(st.k.shape))  # fmt: skip
    for _ in range(2):
        with pytest.raises(ValueError, match=r"state\.[kv]: shares memory with state\.[kv]"):
            m.step(*s[:9], aliased, *s[9:11], backend=backend)


@pytest.mark.parametrize("rank", [1, 2])
def test_step_with_l_axis_says_so(rank):
    s = random_inputs(batch=2, nheads=2, d_state=16, headdim=8, rank=rank, step=True)
    with pytest.raises(ValueError, match="^q: .*step takes no L axis"):
        m.step(s.q[:, None], s.k[:, None], *s[2:9], s.initial_state, *s[9:14])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_double_backward_is_a_clear_error(backend):
    x = random_inputs(batch=1, seqlen=8, nheads=2, d_state=16, headdim=16)
    q = x.q.clone().requires_grad_()
    out = m.scan(q, *x[1:11], backend=backend)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
    (g,) = torch.autograd.grad(m.scan(q, *x[1:11], backend=backend).sum(), q)
    assert torch.isfinite(g).all() and g.abs().sum() > 0  # a single backward still works


@pytest.mark.parametrize("record_forward", [0, 1])
@pytest.mark.parametrize(("headdim", "chunk_size"), [(8, None), (16, 4)])
def test_triton_training_forward_checks_backward_support(
    pin_config, record_forward, headdim, chunk_size
):
    pin_config("triton", "chunk_bwd", record_forward=record_forward)
    x = random_inputs(batch=1, seqlen=8, nheads=2, d_state=16, headdim=headdim)
    q = x.q.clone().requires_grad_()
    with pytest.raises(ValueError, match="cannot run the backward of this call"):
        m.scan(q, *x[1:11], backend="triton", chunk_size=chunk_size)
    with torch.no_grad():  # the forward alone runs
        out = m.scan(q, *x[1:11], backend="triton", chunk_size=chunk_size)
    assert torch.isfinite(out).all()


def test_nn_mamba3_rejects_other_input_dtype():
    from mamba3_kernels.nn import Mamba3

    layer = Mamba3(32, d_state=16, headdim=8, backend="reference")
    with pytest.raises(TypeError, match="hidden_states has dtype float64 but the layer's weights"):
        layer(torch.randn(1, 4, 32, dtype=torch.float64))


# Non-finite values at one token reach only that token's and later outputs. Triton: k and the
# per-token parameters are masked with a select; a non-finite v still reaches the earlier rows
# of its chunk (the intra-chunk product scores @ v multiplies it by the masked zeros).
_TRITON_CAUSAL_FIELDS = ("q", "k", "trap", "angles", "z")


def _poison_token(x, field: str, t: int, value: float):
    a = getattr(x, field).clone()
    if field in ("adt", "dt", "trap"):  # (B, H, L)
        a[0, :, t] = value
    else:  # (B, L, ...)
        a[0, t] = value
    return x._replace(**{field: a})


@settings(max_examples=12, deadline=None)
@given(field=st.sampled_from(_TRITON_CAUSAL_FIELDS), t=st.integers(1, 15),
       value=st.sampled_from([math.inf, -math.inf, math.nan]), rank=st.sampled_from([1, 2]),
       backend=st.sampled_from(["reference", "triton"]))  # fmt: skip
def test_bad_token_spares_earlier_outputs(field, t, value, rank, backend):
    clean = random_inputs(batch=1, seqlen=16, nheads=2, d_state=16, headdim=16, rank=rank,
                          generator=torch.Generator().manual_seed(t))  # fmt: skip
    want = m.scan(*clean[:14], backend=backend, chunk_size=16)
    got = m.scan(*_poison_token(clean, field, t, value)[:14], backend=backend, chunk_size=16)
    assert torch.isfinite(got[0, :t]).all()
    assert torch.allclose(got[0, :t], want[0, :t], rtol=1e-5, atol=1e-6)


def test_triton_nan_at_last_token_keeps_chunk_finite():
    clean = random_inputs(batch=1, seqlen=16, nheads=2, d_state=16, headdim=16,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    want = m.scan(*clean[:14], backend="triton")
    got = m.scan(*_poison_token(clean, "k", 15, math.nan)[:14], backend="triton")
    assert torch.isfinite(got[0, :15]).all() and not torch.isfinite(got[0, 15]).all()
    assert torch.allclose(got[0, :15], want[0, :15], rtol=1e-5, atol=1e-6)
