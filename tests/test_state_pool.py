"""Decode steps on a state pool (``state_indices``) and 16-bit ssm states: the pool step equals
the contiguous step on the gathered states, padding rows touch nothing, bad calls are refused
before anything is written (reference everywhere; Triton under TRITON_INTERPRET=1 on CPU, and
at model size on a GPU)."""

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mamba3_kernels  # noqa: E402
from mamba3_kernels.backend import registered_backends  # noqa: E402
from mamba3_kernels.state import Mamba3State  # noqa: E402
from mamba3_kernels.testing import random_inputs, rel_err  # noqa: E402
from mamba3_kernels.validate import validate_step  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
cpu_interpreted = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (CPU)")


def make_case(batch=3, slots=5, H=2, P=16, N=16, rank=1, dtype=torch.float32,
              state_dtype=torch.float32, device="cpu", seed=0, with_mimo_o=True):  # fmt: skip
    """Step inputs of ``batch`` rows and a random pool of ``slots`` states."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(nheads=H, d_state=N, headdim=P, rank=rank, dtype=dtype, step=True, generator=g,
              with_mimo_o=with_mimo_o)  # fmt: skip
    x = random_inputs(batch=batch, **kw)
    pool = random_inputs(batch=slots, with_initial_state=True, **kw).initial_state
    pool = pool._replace(ssm=pool.ssm.to(state_dtype))
    x = type(x)(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in x[:14]))
    pool = Mamba3State(*(t.to(device).contiguous() for t in pool))
    return x, pool


def call(x, state, idx=None, backend="reference"):
    return mamba3_kernels.step(*x[:9], state, *x[9:14], backend=backend, state_indices=idx)


def gathered(pool, idx):
    """The contiguous state of the rows named by ``idx`` (padding rows: slot 0, ignored)."""
    safe = idx.long().clamp(min=0)
    return Mamba3State(*(t.index_select(0, safe).contiguous() for t in pool))


def check_pool_step(x, pool, idx, backend, tol):
    """Pool step (``backend``) vs the reference's contiguous step on the gathered states."""
    before = pool.clone()
    ref_state = gathered(pool, idx)
    ref_out, ref_state = call(x, ref_state, backend="reference")
    out, same = call(x, pool, idx, backend=backend)
    assert same is pool or all(a is b for a, b in zip(same, pool, strict=True))
    live = idx >= 0
    assert rel_err(out[live], ref_out[live]) < tol
    assert torch.all(out[~live] == 0)
    used = set(idx[live].tolist())
    for field, new, old, ref in zip(Mamba3State._fields, pool, before, ref_state, strict=True):
        for slot in range(new.shape[0]):
            if slot not in used:
                assert torch.equal(new[slot], old[slot]), f"{field}: slot {slot} was written"
        rows = live.nonzero().squeeze(1)
        slots = idx[live].long()
        # (the reference's state is rounded to the pool's dtype by the contiguous step too)
        err = rel_err(new[slots].float(), ref[rows].float())
        assert err < tol, f"{field}: rel err {err}"


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("rank", [1, 2])
def test_reference_pool_step(index_dtype, rank):
    x, pool = make_case(rank=rank)
    idx = torch.tensor([3, -1, 0], dtype=index_dtype)
    check_pool_step(x, pool, idx, "reference", 1e-6)


@cpu_interpreted
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("rank, mimo_o", [(1, True), (2, True), (2, False)])
def test_triton_pool_step(index_dtype, rank, mimo_o):
    """(rank 2 without mimo_o: out keeps its rank axis, padding rows zero in every rank)"""
    x, pool = make_case(rank=rank, with_mimo_o=mimo_o)
    idx = torch.tensor([4, -1, 1], dtype=index_dtype)
    check_pool_step(x, pool, idx, "triton", 1e-4)


@cpu_interpreted
def test_triton_pool_step_split_heads(pin_config):
    """Two programs per head (the ticket that orders the shared state's writes), on a pool."""
    pin_config("triton", "step", block_p=8, num_warps=1, num_stages=1, split_p=2)
    x, pool = make_case(rank=2, with_mimo_o=False)
    check_pool_step(x, pool, torch.tensor([0, 4, -1]), "triton", 1e-4)
    check_pool_step(x, pool, torch.tensor([-1, 2, 4]), "triton", 1e-4)


@cpu_interpreted
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16])
def test_triton_16bit_state(state_dtype):
    """The Triton step on a 16-bit ssm state (pooled) vs the reference: fp32 math, state rounded."""
    x, pool = make_case(state_dtype=state_dtype, seed=1)
    idx = torch.tensor([2, 0, -3], dtype=torch.int32)
    check_pool_step(x, pool, idx, "triton", 1e-2)
    # and without a pool: the same state, contiguous
    x, state = make_case(batch=2, slots=2, state_dtype=state_dtype, seed=2)
    ref_out, ref_state = call(x, state.clone(), backend="reference")
    out, state = call(x, state, backend="triton")
    assert state.ssm.dtype == state_dtype and state.angle.dtype == torch.float32
    assert rel_err(out, ref_out) < 1e-2
    assert rel_err(state.ssm.float(), ref_state.ssm.float()) < 1e-2


def test_zeros_state_dtype():
    st = Mamba3State.zeros(2, 4, 8, 16, 4, state_dtype=torch.bfloat16)
    assert st.ssm.dtype == torch.bfloat16 and st.angle.dtype == torch.float32
    assert st.k.dtype == torch.bfloat16 and st.v.dtype == torch.bfloat16


def test_all_padding_rows():
    x, pool = make_case()
    before = pool.clone()
    out, _ = call(x, pool, torch.full((3,), -1, dtype=torch.int64))
    assert torch.all(out == 0)
    assert all(torch.equal(a, b) for a, b in zip(pool, before, strict=True))


@pytest.mark.parametrize(
    "idx, error, match",
    [
        (torch.tensor([1, 1, 0]), ValueError, "state_indices: expected distinct slots"),
        (torch.tensor([1, 5, 0]), ValueError, "state_indices: expected indices < 5"),
        (torch.tensor([1.0, 2.0, 0.0]), TypeError, "state_indices: expected dtype int32 or int64"),
        (torch.tensor([1, 2], dtype=torch.int32), ValueError, "state_indices: expected shape"),
        (torch.tensor([[1, 2, 0]]), ValueError, "state_indices: expected shape"),
    ],
)
def test_rejected_indices_write_nothing(idx, error, match):
    x, pool = make_case()
    before = pool.clone()
    for _ in range(2):  # the second call hits the validation memo for valid signatures
        with pytest.raises(error, match=match):
            call(x, pool, idx)
        assert all(torch.equal(a, b) for a, b in zip(pool, before, strict=True))


def test_rejected_pool_shapes():
    x, pool = make_case()
    idx = torch.tensor([1, 2, 0])
    bad = pool._replace(ssm=pool.ssm[:, :, :8].contiguous())
    with pytest.raises(ValueError, match=r"state\.ssm: expected shape"):
        call(x, bad, idx)
    bad = pool._replace(angle=pool.angle[:4].contiguous())
    with pytest.raises(ValueError, match=r"state\.angle: expected shape \(5, 2, 4\)"):
        call(x, bad, idx)
    bad = pool._replace(angle=pool.angle.to(torch.bfloat16))
    with pytest.raises(TypeError, match=r"state\.angle: expected dtype"):
        call(x, bad, idx)
    with pytest.raises(ValueError, match="state_indices: expected a contiguous"):
        call(x, pool, torch.tensor([1, 9, 2, 9, 0, 9])[::2])


def test_backends_without_pool_refuse():
    x, pool = make_case()
    problem, _ = validate_step(*x[:9], pool, *x[9:14], state_indices=torch.tensor([1, 2, 0]))
    assert problem.pooled and problem.state_dtype == torch.float32
    on_gpu = dataclasses.replace(problem, device_type="cuda")
    backends = registered_backends()
    if "cute" in backends:
        assert "state_indices" in backends["cute"].unsupported_reason(on_gpu)
        wide = dataclasses.replace(on_gpu, pooled=False, state_dtype=torch.bfloat16)
        assert "bfloat16" in backends["cute"].unsupported_reason(wide)
    if "tilelang" in backends:
        assert backends["tilelang"].unsupported_reason(on_gpu) is not None
    if "triton" in backends:  # the scans read fp32 initial states only
        scan16 = dataclasses.replace(on_gpu, decode=False, pooled=False,
                                     state_dtype=torch.float16)  # fmt: skip
        assert "float16" in backends["triton"].unsupported_reason(scan16)


def test_compiled_pool_step_reference():
    x, pool = make_case()
    idx = torch.tensor([3, -1, 0], dtype=torch.int32)
    expect_pool = pool.clone()
    ref_out, _ = call(x, expect_pool, idx)

    def fn(*a, st, ix):
        return mamba3_kernels.step(*a[:9], st, *a[9:], backend="reference", state_indices=ix)

    compiled = torch.compile(fn, fullgraph=True)
    out, _ = compiled(*x[:14], st=pool, ix=idx)
    assert rel_err(out, ref_out) < 1e-6
    for a, b in zip(pool, expect_pool, strict=True):
        assert rel_err(a.float(), b.float()) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 2])
def test_triton_pool_step_gpu(state_dtype, rank):
    x, pool = make_case(batch=8, slots=13, H=64, P=64, N=128, rank=rank, dtype=torch.bfloat16,
                        state_dtype=state_dtype, device="cuda")  # fmt: skip
    idx = torch.tensor([12, -1, 0, 5, 7, -1, 3, 1], dtype=torch.int32, device="cuda")
    tol = 2e-2 if state_dtype == torch.bfloat16 else 5e-3
    check_pool_step(x, pool, idx, "triton", tol)
    idx = idx.flip(0).to(torch.int64)  # the launch plan's second signature, then its hot path
    for _ in range(2):
        check_pool_step(x, pool, idx, "triton", tol)


def test_opcheck_pool_step():
    """mamba3::step with state_indices: schema, fake impl and in-place mutation of the pool."""
    x, pool = make_case()
    idx = torch.tensor([3, -1, 0], dtype=torch.int64)
    args = (*x[:9], *pool, *x[9:14], idx, "interleaved", "reference")
    torch.library.opcheck(torch.ops.mamba3.step.default, args)


def _serve(*argv: str) -> int:
    """examples/serve.py (a tiny LM served from pooled caches with continuous batching): the
    number of requests whose tokens differ from the same request run alone."""
    import importlib.util
    import sys

    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "serve.py")
    spec = importlib.util.spec_from_file_location("serve_example", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module.main(list(argv))


@pytest.mark.parametrize(
    "argv",
    [(), ("--mimo-rank", "2", "--state-dtype", "bf16", "--requests", "6", "--chunk", "5")],
)
def test_serve_example_reference(argv):
    """Slots reused, prompts prefilled in chunks between padded decode steps: every request's
    tokens equal the same request run alone."""
    assert _serve("--backend", "reference", *argv) == 0


@cpu_interpreted
def test_serve_example_triton():
    small = ("--requests", "3", "--max-prompt", "8", "--max-new", "3", "--layers", "1")
    assert _serve("--backend", "triton", *small, "--slots", "2", "--batch", "2") == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_serve_example_triton_gpu():
    assert _serve("--backend", "triton", "--device", "cuda", "--requests", "16",
                  "--slots", "6", "--batch", "6", "--max-prompt", "100") == 0  # fmt: skip


# scan from pool slots (chunked prefill): gather, scan, write the final states back.


def scan_case(slots=5, batch=3, seqlen=12, rank=1, cu=None, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    kw = dict(nheads=2, d_state=16, headdim=8, rank=rank, dtype=dtype, generator=g)
    x = random_inputs(batch=batch, seqlen=seqlen, cu_seqlens=cu, **kw)
    pool = random_inputs(batch=slots, seqlen=1, with_initial_state=True, **kw).initial_state
    return x, Mamba3State(*(t.contiguous() for t in pool))


def scan_slots(x, pool, idx, backend="reference", **kw):
    return mamba3_kernels.scan(*x[:14], initial_state=pool, state_indices=idx,
                               cu_seqlens=x.cu_seqlens, backend=backend, **kw)  # fmt: skip


SCAN_BACKENDS = ["reference", pytest.param("triton", marks=cpu_interpreted)]


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
@pytest.mark.parametrize("rank, cu", [(1, None), (2, None), (1, [0, 5, 6, 13])])
def test_scan_from_slots(backend, rank, cu):
    """Each sequence starts from its slot and leaves its final state there; a padding sequence
    starts from zeros; slots not named are untouched."""
    x, pool = scan_case(rank=rank, cu=cu)
    idx = torch.tensor([3, -1, 0], dtype=torch.int32)
    before = pool.clone()
    start = Mamba3State(*(t[[3, 0, 0]].clone() for t in before))
    start = Mamba3State(*(torch.cat([t[:1], torch.zeros_like(t[1:2]), t[2:]]) for t in start))
    want, want_final = mamba3_kernels.scan(
        *x[:14], initial_state=start, return_final_state=True, cu_seqlens=x.cu_seqlens
    )
    out, returned = scan_slots(x, pool, idx, backend, return_final_state=True)
    assert all(a is b for a, b in zip(returned, pool, strict=True))  # the pool, updated
    assert rel_err(out, want) < 1e-5
    for field, got, ref, old in zip(Mamba3State._fields, pool, want_final, before, strict=True):
        assert rel_err(got[[3, 0]], ref[[0, 2]]) < 1e-5, field
        assert torch.equal(got[[1, 2, 4]], old[[1, 2, 4]]), field


def test_chunked_prefill_through_a_slot():
    """A prompt scanned in two chunks through its slot equals one scan of the whole prompt."""
    x, pool = scan_case(batch=1, seqlen=20)
    pool = Mamba3State(*(torch.zeros_like(t) for t in pool))
    idx = torch.tensor([2])
    first = scan_slots(x.along_tokens(lambda t: t[:, :11], lambda t: t[:, :, :11]), pool, idx)
    second = scan_slots(x.along_tokens(lambda t: t[:, 11:], lambda t: t[:, :, 11:]), pool, idx)
    want, final = mamba3_kernels.scan(*x[:14], return_final_state=True, backend="reference")
    assert rel_err(torch.cat([first, second], 1), want) < 1e-5
    for got, ref in zip(pool, final, strict=True):
        assert rel_err(got[2:3], ref) < 1e-5


def test_scan_from_slots_16bit_pool():
    x, pool = scan_case()
    pool = pool._replace(ssm=pool.ssm.to(torch.bfloat16))
    wide = Mamba3State(*(t.clone() for t in pool))._replace(ssm=pool.ssm.float())
    idx = torch.tensor([4, 1, 2])
    out = scan_slots(x, pool, idx)
    want = scan_slots(x, wide, idx)
    assert rel_err(out, want) < 1e-6 and pool.ssm.dtype == torch.bfloat16
    assert rel_err(pool.ssm.float(), wide.ssm) < 1e-2


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(idx=torch.tensor([0, 0, 1])), ValueError, "distinct"),
        (dict(idx=torch.tensor([0, 5, 1])), ValueError, "< 5"),
        (dict(idx=torch.tensor([0, 1])), ValueError, "state_indices"),
        (dict(idx=torch.tensor([0.0, 1.0, 2.0])), TypeError, "int32 or int64"),
        (dict(pool=None), TypeError, "the pool"),
        (dict(grad=True), RuntimeError, "not differentiable"),
    ],
)
def test_scan_from_slots_refused(change, error, match):
    """Bad pooled scans are refused before any slot is written."""
    x, pool = scan_case()
    before = pool.clone()
    if change.get("grad"):
        x = x._replace(v=x.v.requires_grad_())
    idx = change.get("idx", torch.tensor([0, 1, 2]))
    with pytest.raises(error, match=match):
        scan_slots(x, change.get("pool", pool), idx)
    for got, old in zip(pool, before, strict=True):
        assert torch.equal(got, old)


def test_compiled_scan_from_slots():
    """torch.compile of a pooled scan gives the eager result and the same pool."""
    x, pool = scan_case()
    eager_pool = pool.clone()
    idx = torch.tensor([4, -1, 1])

    def fn(*a, st, ix):
        return mamba3_kernels.scan(*a, initial_state=st, state_indices=ix, backend="reference")

    want = fn(*x[:14], st=eager_pool, ix=idx)
    got = torch.compile(fn)(*x[:14], st=pool, ix=idx)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(pool, eager_pool, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
