"""mamba3_kernels.eager_calls: the host-cheap paths give what Function.apply and the custom ops
give, are taken only in plain eager calls, and the Triton backward takes them."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mamba3_kernels as m
from mamba3_kernels.eager_calls import apply_positional, eager_custom_op
from mamba3_kernels.testing import random_inputs


class _Scale(torch.autograd.Function):
    """y = x * a + b (b may be None), setup_context style; records what setup_context saw."""

    seen: list = []

    @staticmethod
    def forward(x, a, b):
        return x * a + (0 if b is None else b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _Scale.seen.append(len(inputs))
        ctx.a = inputs[1]
        ctx.has_b = inputs[2] is not None

    @staticmethod
    def backward(ctx, g):
        return g * ctx.a, None, g if ctx.has_b else None


class _WithDefault(torch.autograd.Function):
    @staticmethod
    def forward(x, a=3.0):
        return x * a

    @staticmethod
    def setup_context(ctx, inputs, output):
        _Scale.seen.append(len(inputs))
        ctx.a = inputs[1]

    @staticmethod
    def backward(ctx, g):
        return g * ctx.a, None


def test_apply_positional_matches_apply_values_and_gradients():
    x = torch.randn(5, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    got = apply_positional(_Scale, x, 2.5, b)
    want = _Scale.apply(x, 2.5, b)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    w = torch.randn(5)
    gx, gb = torch.autograd.grad((got * w).sum(), [x, b])
    torch.testing.assert_close(gx, 2.5 * w)
    torch.testing.assert_close(gb, w)


def test_apply_positional_under_functorch_and_with_defaults_takes_apply():
    # Under a functorch transform it must take Function.apply (custom_function_call).
    x = torch.randn(4)
    gx = torch.func.grad(lambda t: apply_positional(_Scale, t, 1.5, None).sum())(x)
    torch.testing.assert_close(gx, torch.full_like(x, 1.5))
    # A forward with a default: apply fills it in before setup_context sees the inputs.
    _Scale.seen.clear()
    y = apply_positional(_WithDefault, torch.ones(3, requires_grad=True))
    assert _Scale.seen == [2] and torch.equal(y.detach(), torch.full((3,), 3.0))


def test_apply_positional_argument_count_errors_as_apply():
    with pytest.raises(TypeError):
        apply_positional(_Scale, torch.ones(2), 1.0)  # b missing: apply's own error


_calls: list[str] = []


@eager_custom_op("mamba3_test::twice")
def _twice(x: torch.Tensor, scale: float) -> torch.Tensor:
    _calls.append("impl")
    x.untyped_storage()  # raw storage, as a kernel launch reads it (a functorch wrapper has none)
    return x * (2 * scale)


@_twice.register_fake
def _twice_fake(x, scale):
    return torch.empty_like(x)


def test_eager_custom_op_runs_the_implementation_only_when_nothing_needs_the_op(monkeypatch):
    op_calls = []
    op = _twice.op
    monkeypatch.setattr(_twice, "op", lambda *a: op_calls.append(1) or op(*a))
    x = torch.randn(3)
    _calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(_twice(x, 1.5), x * 3)
    assert op_calls == [] and _calls == ["impl"]
    # Grad mode on (the op records no autograd: a caller relying on it must see the op's error),
    # and under a functorch transform: the op.
    _twice(x, 1.0)
    torch.func.vmap(lambda t: _twice(t, 1.0))(x[None])
    assert len(op_calls) == 2
    assert torch.ops.mamba3_test.twice(x, 0.5).allclose(x)  # the registered op itself
    torch.library.opcheck(torch.ops.mamba3_test.twice.default, (x, 2.0))


class _TwiceFn(torch.autograd.Function):
    """y = 2 x; its backward calls the eager custom op on a saved input and the cotangent."""

    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _twice(g, 1.0) + _twice(x, 0.0)


def test_eager_custom_op_on_tensors_of_an_ended_transform():
    # torch.func.vjp's vjp_fn runs the Function's backward after the transform's level ended:
    # its saved tensors are dead functorch wrappers, which the direct path must unwrap. (Under
    # no_grad, as inside the compiled backward op: vjp_fn then builds no graph, grad mode stays
    # off in the backward, and the direct path is taken.)
    x, g = torch.randn(4), torch.randn(4)
    _, vjp_fn = torch.func.vjp(lambda t: _TwiceFn.apply(t), x)
    _calls.clear()
    with torch.no_grad():
        (gx,) = vjp_fn(g)
    assert _calls == ["impl", "impl"]
    torch.testing.assert_close(gx, 2 * g)


def test_eager_triton_backward_dispatches_no_custom_op(monkeypatch):
    """One eager fwd+bwd through the Triton backend reaches none of its kernels' custom ops
    (mamba3_triton::*) through the dispatcher, and no Function.apply binds its arguments."""
    g = torch.Generator().manual_seed(3)
    x = random_inputs(batch=1, seqlen=12, nheads=2, d_state=16, headdim=16, generator=g,
                      dtype=torch.float32)  # fmt: skip
    leaves = [t.requires_grad_() if t is not None else None for t in x[:14]]
    m.scan(*leaves, backend="triton").sum().backward()  # compiles and memoizes everything once
    bound = []
    signature = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda fn, *a, **k: bound.append(fn) or
                        signature(fn, *a, **k))  # fmt: skip
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        m.scan(*leaves, backend="triton").sum().backward()
    keys = {ev.key for ev in prof.key_averages()}
    assert not [k for k in keys if k.startswith(("mamba3_triton::", "mamba3::"))], sorted(keys)
    assert not [fn for fn in bound if getattr(fn, "__name__", "") == "forward"], bound


def test_training_host_time_script_runs_both_modes(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "host.json"
    cmd = [sys.executable, str(root / "tools" / "host_time_train.py"), "--repeats", "1",
           "--calls", "2", "--ab", "--json", str(out)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["us_per_call"]
    assert set(rows) == {f"{c} ({m})" for c in ("forward", "fwd+bwd") for m in ("on", "off")}
    assert all(r["best"] > 0 for r in rows.values())


class _Mul(torch.autograd.Function):
    @staticmethod
    def forward(x, a):
        return x * a

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.a = inputs[1]

    @staticmethod
    def backward(ctx, g):
        return g * ctx.a, None


def test_apply_positional_traced_by_torch_compile():
    def f(t):
        return apply_positional(_Mul, t, 2.0).sum()

    x = torch.randn(6, requires_grad=True)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    (gx,) = torch.autograd.grad(compiled(x), [x])
    torch.testing.assert_close(gx, torch.full_like(x, 2.0))


def test_eager_custom_op_traced_by_torch_compile_is_the_op():
    x = torch.randn(5)
    compiled = torch.compile(lambda t: _twice(t, 2.0) + 1, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), x * 4 + 1)
