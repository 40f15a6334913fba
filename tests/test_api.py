"""The public API and the registered ops: results, autograd, opcheck, torch.compile, dispatch."""

import pytest
import torch

import mamba3_kernels as m
from mamba3_kernels.reference import reference_scan, reference_step
from mamba3_kernels.testing import cast_inputs, random_inputs, rel_err


def _layout(rank):
    return "halves" if rank > 1 else "interleaved"


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("with_state", [False, True])
def test_scan_matches_reference(rank, with_state):
    x = random_inputs(batch=2, seqlen=11, nheads=4, ngroups=2, d_state=16, headdim=8, rank=rank,
                      with_initial_state=with_state, dtype=torch.float64)  # fmt: skip
    out, state = m.scan(*x[:14], initial_state=x.initial_state, return_final_state=True,
                        chunk_size=4, backend="reference")  # fmt: skip
    ref, ref_state = reference_scan(x, _layout(rank))
    assert rel_err(out, ref) < 1e-12
    for a, b in zip(state, ref_state, strict=True):
        assert rel_err(a, b) < 1e-12


def test_mimo_without_mimo_o_keeps_rank_axis():
    x = random_inputs(batch=1, seqlen=5, nheads=2, d_state=16, headdim=8, rank=2, with_mimo_o=False)
    out = m.scan(*x[:14])
    assert out.shape == (1, 5, 2, 2, 8)


def test_bf16_inputs_within_spec_tolerance():
    x = random_inputs(batch=1, seqlen=20, nheads=2, d_state=16, headdim=8, dtype=torch.bfloat16)
    out = m.scan(*x[:14])
    assert out.dtype == torch.bfloat16
    ref, _ = reference_scan(cast_inputs(x, torch.float64), "interleaved")
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("rank", [1, 2])
def test_step_in_place_and_copy(rank):
    x = random_inputs(batch=2, nheads=4, d_state=16, headdim=8, rank=rank, step=True,
                      dtype=torch.float64)  # fmt: skip
    before = x.initial_state.clone()
    out_copy, new_state = m.step(*x[:9], x.initial_state, *x[9:14], inplace=False)
    assert torch.equal(x.initial_state.ssm, before.ssm)  # untouched
    ref, ref_state = reference_step(x, before, _layout(rank))
    assert rel_err(out_copy, ref) < 1e-12 and rel_err(new_state.ssm, ref_state.ssm) < 1e-12
    ptr = x.initial_state.ssm.data_ptr()
    out, state = m.step(*x[:9], x.initial_state, *x[9:14])
    assert state.ssm.data_ptr() == ptr
    for a, b in zip(state, ref_state, strict=True):
        assert rel_err(a, b) < 1e-12
    assert rel_err(out, ref) < 1e-12


def test_step_copy_takes_a_state_of_any_layout():
    # inplace=False updates contiguous copies of its own, so a non-contiguous state is fine
    # there (in place, it is refused: the kernels update the given tensors).
    x = random_inputs(batch=3, nheads=2, d_state=16, headdim=8, step=True, dtype=torch.float64)
    s = x.initial_state
    strided = m.Mamba3State(*(t.transpose(0, -1).contiguous().transpose(0, -1) for t in s))
    out, new = m.step(*x[:9], strided, *x[9:14], inplace=False)
    ref, ref_state = reference_step(x, s.clone(), _layout(1))
    assert rel_err(out, ref) < 1e-12 and rel_err(new.ssm, ref_state.ssm) < 1e-12
    with pytest.raises(ValueError, match="expected a contiguous tensor"):
        m.step(*x[:9], strided, *x[9:14])


def test_gradients_through_op_match_reference_autograd():
    x = random_inputs(batch=1, seqlen=7, nheads=2, d_state=8, headdim=4, n_angles=2, rank=2,
                      with_initial_state=True, dtype=torch.float64)  # fmt: skip
    leaves = [t.clone().requires_grad_() if t is not None else None for t in x[:14]]
    state = m.Mamba3State(*(t.clone().requires_grad_() for t in x.initial_state))
    out, final = m.scan(*leaves, initial_state=state, return_final_state=True, chunk_size=3)
    loss = (out * torch.randn_like(out)).sum() + (final.ssm * torch.randn_like(final.ssm)).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None] + list(state))
    # The same loss through the reference directly, with the same random weights.
    torch.manual_seed(0)
    leaves2 = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves]
    state2 = m.Mamba3State(*(t.detach().clone().requires_grad_() for t in state))
    from mamba3_kernels.inputs import ScanInputs

    ref_out, ref_final = reference_scan(ScanInputs(*leaves2, state2, None), "halves", chunk_size=3)
    assert rel_err(out, ref_out) < 1e-12
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_gradcheck_through_op():
    x = random_inputs(batch=1, seqlen=5, nheads=2, d_state=4, headdim=2, n_angles=1,
                      with_initial_state=True, dtype=torch.float64)  # fmt: skip

    def f(q, k, v, adt, angles, ssm0):
        st = x.initial_state._replace(ssm=ssm0)
        out, fin = m.scan(q, k, v, adt, x.dt, x.trap, x.q_bias, x.k_bias, angles, x.D, x.z,
                          initial_state=st, return_final_state=True, chunk_size=2)  # fmt: skip
        return out, fin.ssm

    args = [
        t.clone().requires_grad_() for t in (x.q, x.k, x.v, x.adt, x.angles, x.initial_state.ssm)
    ]
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("rank", [1, 2])
def test_opcheck(rank):
    x = random_inputs(batch=1, seqlen=6, nheads=2, d_state=8, headdim=4, rank=rank,
                      with_initial_state=True, dtype=torch.float64)  # fmt: skip
    args = (*x[:14], *x.initial_state, None, True, _layout(rank), 4, "reference")
    torch.library.opcheck(torch.ops.mamba3.scan.default, args)
    s = random_inputs(batch=2, nheads=2, d_state=8, headdim=4, rank=rank, step=True)
    step_args = (*s[:9], *s.initial_state, *s[9:14], None, _layout(rank), "reference")
    torch.library.opcheck(torch.ops.mamba3.step.default, step_args)


def test_compile_fullgraph_scan_and_step():
    x = random_inputs(batch=1, seqlen=8, nheads=2, d_state=16, headdim=8, with_initial_state=True)

    def prefill(*a, initial_state):
        return m.scan(*a, initial_state=initial_state, return_final_state=True)

    compiled = torch.compile(prefill, fullgraph=True)
    out, state = compiled(*x[:11], initial_state=x.initial_state)
    ref, ref_state = m.scan(*x[:11], initial_state=x.initial_state, return_final_state=True)
    assert rel_err(out, ref) < 1e-6 and rel_err(state.ssm, ref_state.ssm) < 1e-6

    s = random_inputs(batch=2, nheads=2, d_state=16, headdim=8, step=True)
    expected_out, expected_state = m.step(*s[:9], s.initial_state, *s[9:11], inplace=False)
    compiled_step = torch.compile(lambda *a, st: m.step(*a[:9], st, *a[9:]), fullgraph=True)
    out, st = compiled_step(*s[:9], *s[9:11], st=s.initial_state)
    assert rel_err(out, expected_out) < 1e-6
    assert rel_err(s.initial_state.ssm, expected_state.ssm) < 1e-6  # mutated in place


def test_empty_sequence_and_varlen_with_empty_piece():
    x = random_inputs(batch=1, seqlen=0, nheads=2, d_state=16, headdim=8, with_initial_state=True)
    out, state = m.scan(*x[:14], initial_state=x.initial_state, return_final_state=True)
    assert out.shape == (1, 0, 2, 8) and torch.equal(state.ssm, x.initial_state.ssm)
    y = random_inputs(nheads=2, d_state=16, headdim=8, cu_seqlens=[0, 3, 3, 9])
    out, state = m.scan(*y[:14], cu_seqlens=y.cu_seqlens, return_final_state=True)
    assert out.shape == (1, 9, 2, 8) and state.ssm.shape == (3, 2, 8, 16)


def test_explicit_backend_fails_loudly_and_auto_falls_back(monkeypatch):
    x = random_inputs(batch=1, seqlen=4, nheads=2, d_state=16, headdim=8)
    with pytest.raises(ValueError, match="backend: 'tilelang' cannot run this call"):
        m.scan(*x[:14], backend="tilelang")
    with pytest.raises(ValueError, match="backend: expected one of"):
        m.scan(*x[:14], backend="cuda-magic")
    info = m.info(x)
    assert info["auto"] in info["backends"] and info["call"]["reference"] is None
    monkeypatch.setenv("MAMBA3_KERNELS_BACKEND", "reference")
    assert m.info(x)["auto"] == "reference"


def test_info_lists_every_backend():
    names = set(m.info()["backends"])
    assert {"reference", "triton", "tilelang", "cute"} <= names


def test_eager_no_grad_path_matches_op_and_owns_outputs():
    # Without autograd, scan skips the op's dispatch: the same results as the op, and no output
    # shares memory with an input (for L = 0 the final state would be the initial one).
    x = random_inputs(batch=1, seqlen=0, nheads=2, d_state=16, headdim=8, with_initial_state=True)
    with torch.no_grad():
        out, state = m.scan(*x[:14], initial_state=x.initial_state, return_final_state=True)
    taken = {t.untyped_storage().data_ptr() for t in (*x[:14], *x.initial_state)
             if t is not None and t.numel()}  # fmt: skip
    assert all(t.untyped_storage().data_ptr() not in taken for t in state if t.numel())
    assert torch.equal(state.ssm, x.initial_state.ssm)
    y = random_inputs(batch=2, seqlen=9, nheads=2, d_state=16, headdim=8, with_initial_state=True)
    with torch.no_grad():
        a, sa = m.scan(*y[:14], initial_state=y.initial_state, return_final_state=True)
    b, *sb = torch.ops.mamba3.scan(*y[:14], *y.initial_state, None, True, "interleaved", 0, "auto")
    assert torch.equal(a, b)
    assert all(torch.equal(p, q) for p, q in zip(sa, sb, strict=True))


@pytest.mark.parametrize(
    "backend,training_forward", [("reference", None), ("triton", "fused"), ("triton", "auto")]
)
def test_eager_autograd_path_skips_op_dispatch_and_matches_op(backend, training_forward,
                                                               pin_config):  # fmt: skip
    # Eager calls that autograd records run the op's autograd without its dispatch
    # (ops.scan_autograd): the same values and gradients as the op, with a final state. (The
    # Triton backend's default training forward records the backward's own graph, another
    # algorithm than the op's fused forward: equal to rounding, not to the bit.)
    if training_forward == "fused":
        pin_config("triton", "chunk_bwd", record_forward=0)
    exact = training_forward != "auto"
    x = random_inputs(batch=2, seqlen=9, nheads=2, d_state=32, headdim=16,
                      with_initial_state=True, dtype=torch.float32)  # fmt: skip

    def leaves():
        fields = [t.clone().requires_grad_() if t is not None else None for t in x[:14]]
        state = [t.clone().requires_grad_() for t in x.initial_state]
        return fields, state

    fa, sa = leaves()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out_a, fin_a = m.scan(*fa, initial_state=m.Mamba3State(*sa), return_final_state=True,
                              backend=backend)  # fmt: skip
    assert not any(ev.key == "mamba3::scan" for ev in prof.key_averages())
    fb, sb = leaves()
    out_b, *fin_b = torch.ops.mamba3.scan(*fb, *sb, None, True, "interleaved", 0, backend)
    tol = 0 if exact else 1e-5
    torch.testing.assert_close(out_a, out_b, rtol=tol, atol=tol)
    weight = torch.randn_like(out_a)
    wssm = torch.randn_like(fin_a.ssm)
    la = (out_a * weight).sum() + (fin_a.ssm * wssm).sum()
    lb = (out_b * weight).sum() + (fin_b[1] * wssm).sum()
    ga = torch.autograd.grad(la, [t for t in fa if t is not None] + sa)
    gb = torch.autograd.grad(lb, [t for t in fb if t is not None] + sb)
    for p, q in zip(ga, gb, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6 if exact else 1e-4, atol=1e-6 if exact else 1e-4)


def test_registered_op_schemas_are_the_schema_modules():
    # Each op's schema as torch sees it lists exactly schema.py's arguments: names, order,
    # types, optionality, in-place updates; and the results.
    from mamba3_kernels import schema

    for op in (schema.SCAN, schema.SCAN_BWD, schema.STEP):
        registered = getattr(torch.ops.mamba3, op.name.split("::")[1]).default._schema
        assert str(registered) == op.name + op.schema
        got = []
        for a in registered.arguments:
            optional = isinstance(a.type, torch.OptionalType)
            kind = str(a.type.getElementType() if optional else a.type)
            got.append((a.name, kind, optional, bool(a.alias_info and a.alias_info.is_write)))
        want = [(a.name, a.type.replace("SymInt", "int"), a.optional, a.mutable) for a in op.args]
        assert got == want
    assert schema.SCAN_BWD.names[len(schema.SCAN_OUTPUTS) :] == schema.SCAN.names
    from mamba3_kernels.ops import BACKEND_GRAD_KEYS, GRAD_INPUTS

    assert GRAD_INPUTS == schema.SCAN.names[:18] and BACKEND_GRAD_KEYS[14] == "initial_state.angle"


def test_public_signatures_follow_the_schema():
    # The public calls (and validate_*) name their tensors as the ops do, in the same order.
    import inspect

    from mamba3_kernels import schema, validate

    fields = schema.TENSOR_FIELDS
    for fn in (m.scan, validate.validate_scan):
        params = list(inspect.signature(fn).parameters)
        assert tuple(params[: len(fields)]) == fields and params[len(fields)] == "initial_state"
    for fn in (m.step, validate.validate_step):
        params = list(inspect.signature(fn).parameters)
        assert tuple(params[:9] + params[10:15]) == fields and params[9] == "state"


def test_op_arguments_round_trip_through_scan_inputs():
    from mamba3_kernels import ops, schema, validate

    x = random_inputs(batch=1, seqlen=3, nheads=2, d_state=8, headdim=4, with_initial_state=True)
    problem, inputs = validate.validate_scan(*x[:14], x.initial_state, True, chunk_size=2)
    args = ops.scan_args(problem, inputs, "reference")
    assert len(args) == len(schema.SCAN.args) and args[-4:] == (True, "interleaved", 2, "reference")
    back = schema.SCAN.inputs(args)
    assert all(a is b for a, b in zip(back[:14], inputs[:14], strict=True))
    assert all(a is b for a, b in zip(back.initial_state, inputs.initial_state, strict=True))
    assert schema.SCAN.inputs(ops.scan_args(problem, inputs._replace(initial_state=None),
                                            "auto")).initial_state is None  # fmt: skip
    s = random_inputs(batch=2, nheads=2, d_state=8, headdim=4, step=True)
    sp, sin = validate.validate_step(*s[:9], s.initial_state, *s[9:14])
    sargs = ops.step_args(sp, sin, "auto")
    assert sargs[9:13] == tuple(sin.initial_state) and sargs[-2:] == ("interleaved", "auto")
    assert tuple(schema.STEP.inputs(sargs)) == tuple(sin)
    assert schema.SCAN.options == ("return_final_state", "rotary", "chunk_size", "backend")
    assert schema.STEP.options == ("rotary", "backend")
    with pytest.raises(TypeError, match="got 1 values"):
        schema.STEP.call_args(sin, "auto")
