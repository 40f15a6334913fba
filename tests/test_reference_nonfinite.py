"""The reference is causal for non-finite inputs, saturates huge decays and keeps its angles
modulo 2 pi: a NaN or Inf at token t of a sequence reaches only outputs at or after t (the
chunked form masks instead of multiplying masked-out entries by zero), a decay sum past fp32's
range gives no NaN, and a long decode keeps the fp32 rotation accurate.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba3_kernels.reference import reference_scan, reference_step
from mamba3_kernels.state import Mamba3State
from mamba3_kernels.testing import cast_inputs, random_inputs, rel_err

FIELDS = ("q", "k", "v", "adt", "dt", "trap", "angles", "z")


def _poison(inputs, field: str, b: int, t: int, value: float):
    """A copy of ``inputs`` with ``field`` set to ``value`` at batch row b, token t."""
    x = getattr(inputs, field).clone()
    if field in ("adt", "dt", "trap"):  # (B, H, L)
        x[b, :, t] = value
    else:  # (B, L, ...)
        x[b, t] = value
    return inputs._replace(**{field: x})


@settings(max_examples=40, deadline=None)
@given(field=st.sampled_from(FIELDS), t=st.integers(0, 36), value=st.sampled_from(
    [math.inf, -math.inf, math.nan]), chunk=st.sampled_from([None, 4, 16]),
    rank=st.sampled_from([1, 2]), seed=st.integers(0, 1000))  # fmt: skip
def test_a_bad_token_reaches_only_its_own_and_later_outputs(field, t, value, chunk, rank, seed):
    g = torch.Generator().manual_seed(seed)
    clean = random_inputs(batch=2, seqlen=37, nheads=2, d_state=16, headdim=8, rank=rank,
                          with_initial_state=True, generator=g)  # fmt: skip
    rotary = "halves" if rank > 1 else "interleaved"
    bad = _poison(clean, field, 1, t, value)
    want, _ = reference_scan(clean, rotary, chunk)
    got, state = reference_scan(bad, rotary, chunk)
    assert torch.isfinite(got[1, :t]).all() and torch.isfinite(got[0]).all()
    assert torch.equal(got[0], want[0])  # the other sequence is untouched
    if t:
        assert rel_err(got[1, :t], want[1, :t]) < 1e-6
    assert torch.isfinite(state.ssm[0]).all()


@pytest.mark.parametrize("chunk", [None, 8, 64])
def test_decay_beyond_fp32_range_gives_no_nan(chunk):
    g = torch.Generator().manual_seed(4)
    x = random_inputs(batch=1, seqlen=64, nheads=2, d_state=16, headdim=8, generator=g)
    x = x._replace(adt=torch.full_like(x.adt, -1e37))
    out, state = reference_scan(x, "interleaved", chunk)
    assert torch.isfinite(out).all() and torch.isfinite(state.ssm).all()
    # a decay of exp(-1e37) is zero: each output sees its own token alone
    exact, _ = reference_scan(cast_inputs(x, torch.float64), "interleaved", None)
    assert rel_err(out, exact) < 1e-5


def test_long_decode_keeps_the_rotation_accurate():
    """20k decode steps turning 2.8 rad each (5.6e4 rad in all, where one fp32 ulp of an unreduced
    angle is 4e-3 and the error would grow by about that each step): the fp32 stored angle stays
    in [0, 2 pi) and its rotation matches float64 to the rounding of an fp32 angle below 2 pi
    (~2.4e-7 a step)."""
    g = torch.Generator().manual_seed(6)
    x = random_inputs(batch=1, seqlen=1, nheads=1, d_state=8, headdim=4, step=True,
                      with_initial_state=True, generator=g)  # fmt: skip
    x = x._replace(angles=torch.full_like(x.angles, 3.0), dt=torch.full_like(x.dt, 0.9))
    s32 = Mamba3State(*(t.clone() for t in x.initial_state))
    s64 = Mamba3State(*(t.double() for t in x.initial_state))
    # the float64 truth of one step's increment, from the same fp32 inputs (B, H, S)
    inc = math.pi * torch.tanh(x.angles.double()) * x.dt.double()[..., None]
    for _ in range(20_000 // 100):
        for _ in range(100):
            s32 = reference_step(x, s32, "interleaved")[1]
        s64 = Mamba3State(s64.angle + 100 * inc, *s64[1:])
    assert ((s32.angle >= 0) & (s32.angle < 2 * math.pi)).all()
    got = torch.stack((s32.angle.double().cos(), s32.angle.double().sin()))
    want = torch.stack((s64.angle.cos(), s64.angle.sin()))
    assert (got - want).abs().max() < 5e-4
