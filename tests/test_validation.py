"""Bad input to the public calls: a clear TypeError/ValueError naming the argument, never a crash
or an answer."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mamba3_kernels as m
from mamba3_kernels.testing import random_inputs

FIELDS = ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "D", "z",
          "mimo_v", "mimo_z", "mimo_o")  # fmt: skip


def _scan_kwargs(x, **overrides):
    kw = dict(zip(FIELDS, x[:14], strict=True))
    kw.update(initial_state=x.initial_state, cu_seqlens=x.cu_seqlens)
    kw.update(overrides)
    return kw


def _siso(**kw):
    return random_inputs(batch=2, seqlen=6, nheads=4, ngroups=2, d_state=16, headdim=8, **kw)


def test_k_shape_mismatch_names_both_shapes():
    x = random_inputs(batch=2, seqlen=64, nheads=2, d_state=128, headdim=8)
    bad_k = torch.randn(2, 64, 1, 64)
    with pytest.raises(
        ValueError, match=r"k: expected shape \(2, 64, 1, 128\) to match q, got \(2, 64, 1, 64\)"
    ):
        m.scan(**_scan_kwargs(x, k=bad_k))


def test_mixed_devices():
    x = _siso()
    with pytest.raises(ValueError, match="v: expected device cpu"):
        m.scan(**_scan_kwargs(x, v=x.v.to("meta")))


@pytest.mark.parametrize(
    "cu, message",
    [
        ([1, 3, 6], "cu_seqlens: expected to start at 0, got 1"),
        ([0, 4, 2, 6], "cu_seqlens: expected non-decreasing offsets"),
        ([0, 3, 5], "cu_seqlens: expected to end at L = 6, got 5"),
    ],
)
def test_bad_cu_seqlens(cu, message):
    x = random_inputs(nheads=2, d_state=16, headdim=8, cu_seqlens=[0, 3, 6])
    with pytest.raises(ValueError, match=message):
        m.scan(**_scan_kwargs(x, cu_seqlens=torch.tensor(cu, dtype=torch.int32)))


def test_cu_seqlens_needs_batch_one():
    x = _siso()
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens: expected batch size 1 .* got B = 2"):
        m.scan(**_scan_kwargs(x, cu_seqlens=cu))


def test_cu_seqlens_dtype():
    x = random_inputs(nheads=2, d_state=16, headdim=8, cu_seqlens=[0, 3, 6])
    with pytest.raises(TypeError, match="cu_seqlens: expected dtype int32"):
        m.scan(**_scan_kwargs(x, cu_seqlens=x.cu_seqlens.float()))


def test_heads_not_multiple_of_groups():
    x = random_inputs(batch=1, seqlen=4, nheads=3, ngroups=1, d_state=16, headdim=8)
    q2 = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="H = 3 to be a multiple of the groups G = 2"):
        m.scan(**_scan_kwargs(x, q=q2, k=q2.clone()))


def test_too_many_angles():
    x = _siso()
    angles = torch.randn(2, 6, 4, 9)
    with pytest.raises(ValueError, match=r"angles: expected S <= N/2 = 8 rotary angles, got S = 9"):
        m.scan(**_scan_kwargs(x, angles=angles))


def test_wrong_dtypes():
    x = _siso()
    with pytest.raises(TypeError, match="k: expected dtype float32 to match q, got bfloat16"):
        m.scan(**_scan_kwargs(x, k=x.k.bfloat16()))
    with pytest.raises(TypeError, match="q: expected dtype in"):
        m.scan(**_scan_kwargs(x, q=x.q.to(torch.int32), k=x.k.to(torch.int32)))
    with pytest.raises(TypeError, match="adt: expected dtype in"):
        m.scan(**_scan_kwargs(x, adt=x.adt.to(torch.int64)))


def test_not_a_tensor_and_missing():
    x = _siso()
    with pytest.raises(TypeError, match="dt: expected a torch.Tensor, got list"):
        m.scan(**_scan_kwargs(x, dt=[1.0]))
    with pytest.raises(TypeError, match="angles: expected a torch.Tensor, got None"):
        m.scan(**_scan_kwargs(x, angles=None))


def test_value_ranges_checked_on_cpu():
    x = _siso()
    with pytest.raises(ValueError, match="adt: expected A\\*dt <= 0"):
        m.scan(**_scan_kwargs(x, adt=x.adt.abs() + 0.1))
    with pytest.raises(ValueError, match="dt: expected dt > 0"):
        m.scan(**_scan_kwargs(x, dt=-x.dt))
    nan_dt = x.dt.clone()
    nan_dt[0, 0, 1] = float("nan")  # NaN compares false with everything: no range test passes
    with pytest.raises(ValueError, match="dt: expected dt > 0 everywhere, got values <= 0 or NaN"):
        m.scan(**_scan_kwargs(x, dt=nan_dt))
    with pytest.raises(ValueError, match="dt: expected finite values"):
        m.scan(**_scan_kwargs(x, dt=x.dt + float("inf")))
    nan_adt = x.adt.clone()
    nan_adt[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="adt: expected finite values"):
        m.scan(**_scan_kwargs(x, adt=nan_adt))


def test_mimo_only_arguments_and_missing_mimo_v():
    x = _siso()
    with pytest.raises(ValueError, match="mimo_v: only for MIMO"):
        m.scan(**_scan_kwargs(x, mimo_v=torch.ones(4, 1, 8)))
    y = random_inputs(batch=1, seqlen=4, nheads=2, d_state=16, headdim=8, rank=2)
    with pytest.raises(ValueError, match=r"mimo_o: expected shape \(2, 2, 8\)"):
        m.scan(**_scan_kwargs(y, mimo_o=torch.ones(2, 3, 8)))
    with pytest.raises(ValueError, match="mimo_v: expected a tensor of shape"):
        m.scan(**_scan_kwargs(y, mimo_v=None))


def test_bad_options():
    x = _siso()
    with pytest.raises(ValueError, match="rotary: expected one of"):
        m.scan(**_scan_kwargs(x), rotary="spiral")
    with pytest.raises(ValueError, match="chunk_size: expected a positive int"):
        m.scan(**_scan_kwargs(x), chunk_size=0)


def test_initial_state_shapes():
    x = _siso(with_initial_state=True)
    st0 = x.initial_state._replace(ssm=torch.zeros(2, 4, 8, 15))
    with pytest.raises(ValueError, match=r"initial_state.ssm: expected shape \(2, 4, 8, 16\)"):
        m.scan(**_scan_kwargs(x, initial_state=st0))
    with pytest.raises(TypeError, match="initial_state: expected a Mamba3State"):
        m.scan(**_scan_kwargs(x, initial_state=torch.zeros(3)))


def test_step_state_must_be_contiguous_and_present():
    s = random_inputs(batch=2, nheads=4, d_state=16, headdim=8, step=True)
    odd = s.initial_state._replace(
        ssm=s.initial_state.ssm.transpose(-1, -2).contiguous().transpose(-1, -2)
    )
    with pytest.raises(ValueError, match="state.ssm: expected a contiguous tensor"):
        m.step(*s[:9], odd, *s[9:14])
    with pytest.raises(TypeError, match="state: expected a Mamba3State, got None"):
        m.step(*s[:9], None, *s[9:14])
    with pytest.raises(ValueError, match="q: expected 3 or 4 dims"):
        m.step(s.q[:, None, None], *s[1:9], s.initial_state)


def test_q_rank():
    x = _siso()
    with pytest.raises(ValueError, match="q: expected 4 or 5 dims"):
        m.scan(**_scan_kwargs(x, q=x.q[0]))


# Corruptions of a valid call: each must raise TypeError/ValueError whose message names an argument.
def _corrupt(x, kind, field, rng):
    kw = _scan_kwargs(x)
    t = kw[field]
    if kind == "shape":
        # angles' last dim is S, free up to N/2: growing it stays valid, so leave it.
        dim = int(rng.integers(t.dim() - (field == "angles")))
        shape = list(t.shape)
        shape[dim] += 1
        kw[field] = torch.randn(*shape).to(t.dtype)
    elif kind == "drop_dim":
        kw[field] = t.reshape(-1) if t.dim() > 1 else t.reshape(1, -1)
    elif kind == "dtype":
        kw[field] = t.to(torch.int32)
    elif kind == "device":
        kw[field] = t.to("meta")
    elif kind == "type":
        kw[field] = t.tolist()
    return kw


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["shape", "drop_dim", "dtype", "device", "type"]),
    field=st.sampled_from(
        ["q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "D", "z"]
    ),
    mimo=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_corruptions_raise_clear_errors(kind, field, mimo, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = random_inputs(batch=2, seqlen=5, nheads=4, ngroups=2, d_state=16, headdim=8,
                      rank=2 if mimo else 1)  # fmt: skip
    kw = _corrupt(x, kind, field, rng)
    with pytest.raises((TypeError, ValueError)) as err:
        m.scan(**kw)
    names = set(FIELDS) | {"initial_state", "cu_seqlens"}
    assert any(str(err.value).startswith(f"{n}:") for n in names), str(err.value)


def test_step_memo_revalidates_changed_properties():
    """After a valid step has filled the validation memo, a call that differs in any checked
    property (dtype, shape, device, the state's layout, the state's type) is checked again and
    rejected, including a tensor whose metadata was changed in place (same object)."""
    s = random_inputs(batch=2, nheads=4, d_state=16, headdim=8, step=True)
    state = s.initial_state

    def call(x=s, st=state):
        return m.step(*x[:9], st, *x[9:14], backend="reference")

    call()
    call()  # a memo hit
    with pytest.raises(TypeError, match="k: expected dtype float32 to match q"):
        call(s._replace(k=s.k.to(torch.float16)))
    with pytest.raises(ValueError, match=r"adt: expected shape \(2, 4\)"):
        call(s._replace(adt=s.adt[:, :3]))
    with pytest.raises(ValueError, match="q_bias: expected device cpu"):
        call(s._replace(q_bias=s.q_bias.to("meta")))
    with pytest.raises(ValueError, match=r"D: expected shape \(4,\)"):
        call(s._replace(D=torch.ones(5)))
    with pytest.raises(TypeError, match="z: expected dtype float32 to match v"):
        call(s._replace(z=torch.ones_like(s.v, dtype=torch.float64)))
    odd = state.ssm.transpose(-1, -2).contiguous().transpose(-1, -2)  # same shape, other strides
    with pytest.raises(ValueError, match="state.ssm: expected a contiguous tensor"):
        call(st=state._replace(ssm=odd))
    with pytest.raises(TypeError, match="state.angle: expected dtype float32"):
        call(st=state._replace(angle=state.angle.half()))
    with pytest.raises(TypeError, match="state: expected a Mamba3State"):
        call(st=list(state))
    # In-place metadata changes keep the object (and its version counter, for .data =).
    k_bias = s.k_bias.clone()
    call(s._replace(k_bias=k_bias))
    k_bias.data = torch.zeros(4, 18)
    with pytest.raises(ValueError, match=r"k_bias: expected shape \(4, 16\)"):
        call(s._replace(k_bias=k_bias))
    ssm = state.ssm.clone()
    own = state._replace(ssm=ssm)
    call(st=own)
    ssm.data = odd.clone().transpose(-1, -2).contiguous().transpose(-1, -2)
    with pytest.raises(ValueError, match="state.ssm: expected a contiguous tensor"):
        call(st=own)
    call()  # the original signature still validates


def test_scan_memo_rejects_a_list_state():
    """A list of state tensors is not a Mamba3State, also after the same tensors passed as one."""
    x = _siso(with_initial_state=True)
    m.scan(**_scan_kwargs(x))
    with pytest.raises(TypeError, match="initial_state: expected a Mamba3State"):
        m.scan(**_scan_kwargs(x, initial_state=list(x.initial_state)))


def test_scan_memo_revalidates_changed_properties_and_keys_one_problem():
    """The scan's memo: the first call of a signature (a miss) already hands back the Problem
    that later hits return (one Problem per signature, which backends key their launch plans
    on); a call differing in a checked property (shape, dtype, device, a state's layout or
    dtype) is checked again and rejected, and a different valid layout gets its own Problem."""
    from mamba3_kernels import validate

    x = _siso(with_initial_state=True)
    state = x.initial_state

    def check(y=x, st=state, final=True):
        return validate.validate_scan(*y[:14], st, final)

    y = x._replace(q=x.q.clone())  # a fresh tensor object: a miss only if the memo had no entry
    problem, inputs = check(y)
    assert isinstance(inputs, validate.ValidatedInputs) and inputs.validated_problem is problem
    for _ in range(2):
        again, hit = check()
        assert again is problem and hit.validated_problem is problem
    assert check(final=False)[0] is not problem  # another option: another signature
    with pytest.raises(ValueError, match=r"z: expected shape \(2, 6, 4, 8\) to match v"):
        check(x._replace(z=x.z[..., :4]))
    with pytest.raises(TypeError, match="k: expected dtype float32 to match q"):
        check(x._replace(k=x.k.double()))
    with pytest.raises(ValueError, match="mimo_v: only for MIMO"):
        check(x._replace(mimo_v=torch.ones(4, 1, 8)))
    with pytest.raises(ValueError, match="angles: expected device cpu"):
        check(x._replace(angles=x.angles.to("meta")))
    with pytest.raises(TypeError, match="initial_state.angle: expected dtype float32"):
        check(st=state._replace(angle=state.angle.half()))
    with pytest.raises(ValueError, match=r"initial_state.ssm: expected shape"):
        check(st=state._replace(ssm=state.ssm[:1]))
    # A valid call with a strided q and a transposed (non-contiguous) ssm: its own Problem,
    # equal by value (same sizes and flags), not the same object.
    wide = torch.zeros(*x.q.shape[:-1], 2 * x.q.shape[-1])
    wide[..., ::2] = x.q
    odd = state.ssm.transpose(-1, -2).contiguous().transpose(-1, -2)
    other, oin = check(x._replace(q=wide[..., ::2]), state._replace(ssm=odd))
    assert other == problem and other is not problem and oin.validated_problem is other
    assert check()[0] is problem


def test_strided_int32_cu_seqlens_are_read_by_value():
    """A strided int32 view of the offsets gives the same result as its contiguous copy on every
    backend that runs here (the kernels read offsets through a plain pointer)."""
    import os

    from mamba3_kernels.testing import rel_err

    g = torch.Generator().manual_seed(8)
    x = random_inputs(batch=1, seqlen=12, nheads=2, d_state=16, headdim=8, generator=g)
    strided = torch.tensor([0, 9, 5, 9, 12, 9], dtype=torch.int32)[::2]
    assert not strided.is_contiguous() and strided.tolist() == [0, 5, 12]
    dense = strided.contiguous()
    backends = ["reference"]
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        backends.append("triton")
    for backend in backends:
        want = m.scan(*x[:14], cu_seqlens=dense, backend=backend)
        got = m.scan(*x[:14], cu_seqlens=strided, backend=backend)
        assert rel_err(got, want) == 0, backend


def test_meta_cu_seqlens_is_a_clear_error():
    x = random_inputs(batch=1, seqlen=12, nheads=2, d_state=16, headdim=8)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="cu_seqlens: on the meta device"):
        m.scan(*x[:14], cu_seqlens=cu)
