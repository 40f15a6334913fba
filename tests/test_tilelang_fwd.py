"""TileLang chunked prefill forward on a GPU, against the float64 reference and Triton.

Run on the GPU machine: ``python -m pytest -q -m gpu tests/test_tilelang_fwd.py``. Each build
(one per N, P, R, chunk, tiles and dtype) is made once per process; TileLang keeps it on disk.
"""

import pytest
import torch
from mamba3_kernels.tilelang_impl import backend as tl_backend
from mamba3_kernels.tilelang_impl import chunk_fwd as cf
from mamba3_kernels.tilelang_impl import prep

import mamba3_kernels as m
from mamba3_kernels.reference import reference_scan
from mamba3_kernels.testing import cast_inputs, random_inputs, rel_err
from mamba3_kernels.validate import validate_scan

pytestmark = pytest.mark.gpu
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2}


def make(rank=4, rotary=None, dtype=torch.bfloat16, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    return random_inputs(rank=rank, dtype=dtype, device="cuda", generator=gen, **kw), rotary


def run(x, rotary, backend="tilelang"):
    return m.scan(*x[:14], initial_state=x.initial_state, return_final_state=True,
                  rotary=rotary, backend=backend)  # fmt: skip


def check_against_reference(x, rotary, tol, chunk_size=None):
    out, state = run(x, rotary)
    ref_out, ref_state = reference_scan(cast_inputs(x, torch.float64), rotary, chunk_size)
    errs = {
        "out": rel_err(out, ref_out),
        "ssm": rel_err(state.ssm, ref_state.ssm),
        "k": rel_err(state.k, ref_state.k),
        "cos": rel_err(torch.cos(state.angle), torch.cos(ref_state.angle)),
        "sin": rel_err(torch.sin(state.angle), torch.sin(ref_state.angle)),
    }
    assert out.shape == ref_out.shape and out.dtype == x.v.dtype
    assert all(e < tol for e in errs.values()), errs
    assert torch.equal(state.v, x.v[:, -1])
    return out, state, errs


def test_backend_available_gpu():
    b = m.registered_backends()["tilelang"]
    assert b.unavailable_reason() is None, b.unavailable_reason()
    assert m.info()["backends"]["tilelang"]["available"]


SMALL = [
    # rank, rotary, seqlen, nheads, ngroups, d_state, headdim, n_angles, init, D, z, mimo_o
    (1, "interleaved", 200, 4, 1, 64, 32, 16, False, True, True, True),
    (1, "halves", 129, 4, 2, 128, 64, 64, True, False, True, True),
    (2, "interleaved", 77, 4, 1, 64, 64, 16, True, True, False, True),
    (4, "halves", 256, 4, 2, 128, 64, 32, True, True, True, True),
    (4, "interleaved", 100, 2, 1, 128, 64, 64, False, True, True, False),
    (8, "halves", 60, 4, 4, 64, 32, 32, True, True, True, True),
    (4, "halves", 64, 2, 1, 256, 64, 64, True, True, True, True),
    (2, "halves", 90, 2, 1, 128, 128, 32, True, True, True, True),  # two P blocks
    (1, "interleaved", 1, 2, 1, 64, 32, 16, True, True, True, True),  # one token
]


@pytest.mark.parametrize("case", SMALL)
def test_small_shapes_against_reference_gpu(case):
    rank, rotary, seqlen, h, g, n, p, s, init, with_d, with_z, with_o = case
    x, rotary = make(rank=rank, rotary=rotary, batch=2, seqlen=seqlen, nheads=h, ngroups=g,
                     d_state=n, headdim=p, n_angles=s, with_initial_state=init, with_D=with_d,
                     with_z=with_z, with_mimo_o=with_o)  # fmt: skip
    check_against_reference(x, rotary, TOL[torch.bfloat16])


def test_fp16_gpu():
    x, rotary = make(rank=4, rotary="halves", dtype=torch.float16, batch=2, seqlen=300,
                     nheads=4, d_state=128, headdim=64, with_initial_state=True)  # fmt: skip
    check_against_reference(x, rotary, TOL[torch.float16])


def test_kernel_matches_its_emulation_gpu():
    # The kernel alone against chunk_fwd.emulate_kernel on the same operands (same roundings):
    # a wrong index or mask shows here far above rounding.
    x, rotary = make(rank=4, rotary="halves", batch=2, seqlen=333, nheads=4, d_state=128,
                     headdim=64, with_initial_state=True)  # fmt: skip
    problem, inputs = validate_scan(*x[:14], x.initial_state, True, None, rotary)
    key = cf.kernel_key(problem, cf.default_config(problem))
    prepared = prep.prepare(problem, inputs, key.chunk)
    bh, nrows, _ = prepared.q.shape
    y = torch.full((bh, nrows, 64), float("nan"), device="cuda")
    hf = torch.full((bh, 64, 128), float("nan"), device="cuda")
    kernel = cf.compile_kernel(key, cf.device_arch())
    kernel(prepared.q, prepared.k, prepared.v, prepared.cum, prepared.w, prepared.g,
           prepared.h0, y, hf)  # fmt: skip
    y_ref, hf_ref = cf.emulate_kernel(key, prepared)
    assert rel_err(y, y_ref) < 5e-3 and rel_err(hf, hf_ref) < 5e-3, (
        rel_err(y, y_ref), rel_err(hf, hf_ref))  # fmt: skip


def test_symbolic_batch_and_length_share_one_build_gpu():
    x, rotary = make(rank=2, rotary="halves", batch=1, seqlen=100, nheads=2, d_state=64,
                     headdim=64)  # fmt: skip
    run(x, rotary)
    builds = len(cf._KERNELS)
    for batch, seqlen in ((3, 37), (2, 640), (1, 1)):
        y, rotary = make(rank=2, rotary="halves", batch=batch, seqlen=seqlen, nheads=2,
                         d_state=64, headdim=64, seed=batch)  # fmt: skip
        check_against_reference(y, rotary, TOL[torch.bfloat16])
    assert len(cf._KERNELS) == builds  # no build per batch size or length


def test_continuation_gpu():
    # Two calls, the second from the first's final state, equal one call (up to rounding).
    x, rotary = make(rank=4, rotary="halves", batch=2, seqlen=200, nheads=4, d_state=128,
                     headdim=64, with_initial_state=True)  # fmt: skip
    whole, whole_state = run(x, rotary)
    first, mid = run(x.tokens(0, 120, x.initial_state), rotary)
    second, end = run(x.tokens(120, 200, mid), rotary)
    assert rel_err(torch.cat((first, second), dim=1), whole) < 1e-2
    assert rel_err(end.ssm, whole_state.ssm) < 1e-2


def test_empty_sequence_gpu():
    x, rotary = make(rank=4, batch=2, seqlen=0, nheads=2, d_state=64, headdim=32,
                     with_initial_state=True)  # fmt: skip
    out, state = run(x, rotary)
    assert out.shape == (2, 0, 2, 32)
    assert torch.equal(state.ssm, x.initial_state.ssm)


def test_unsupported_calls_name_the_reason_gpu():
    b = tl_backend.TileLangBackend()
    x, rotary = make(rank=4, dtype=torch.float32, batch=1, seqlen=8, nheads=2, d_state=64,
                     headdim=32)  # fmt: skip
    problem, _ = validate_scan(*x[:14], None, True, None, rotary)
    assert "dtype" in b.unsupported_reason(problem)
    with pytest.raises(ValueError, match="tilelang' cannot run this call"):
        run(x, rotary)


MODEL = dict(batch=2, seqlen=4096, nheads=32, d_state=128, headdim=64)


@pytest.mark.parametrize("rotary", ["halves", "interleaved"])
def test_model_shape_against_reference_and_triton_gpu(rotary):
    x, rotary = make(rank=4, rotary=rotary, with_initial_state=True, **MODEL)
    out, state, errs = check_against_reference(x, rotary, 1e-2, chunk_size=64)
    print(f"tilelang vs float64 reference ({rotary}):", errs)
    tri_out, tri_state = run(x, rotary, backend="triton")
    vs_triton = {"out": rel_err(out, tri_out), "ssm": rel_err(state.ssm, tri_state.ssm)}
    print(f"tilelang vs triton ({rotary}):", vs_triton)
    assert all(e < 1e-2 for e in vs_triton.values()), vs_triton


def test_model_shape_siso_against_triton_gpu():
    x, rotary = make(rank=1, rotary="interleaved", **MODEL)
    out, state = run(x, rotary)
    tri_out, tri_state = run(x, rotary, backend="triton")
    assert rel_err(out, tri_out) < 1e-2 and rel_err(state.ssm, tri_state.ssm) < 1e-2


def test_model_shape_timing_gpu():
    # Not a benchmark gate: prints the forward's time next to Triton's, for the record.
    x, rotary = make(rank=4, rotary="halves", **MODEL)
    times = {}
    for name in ("tilelang", "triton"):
        for _ in range(3):
            run(x, rotary, backend=name)
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            run(x, rotary, backend=name)
        stop.record()
        torch.cuda.synchronize()
        times[name] = start.elapsed_time(stop) / 10
    print("model shape R=4 forward ms:", {k: round(v, 3) for k, v in times.items()})
