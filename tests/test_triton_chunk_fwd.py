"""Triton chunked prefill forward vs the float64 reference.

Without a GPU the kernel runs under Triton's interpreter on small shapes (N 16/32, P 8/16); on a
GPU machine the same grid runs compiled at GPU-legal sizes, plus the model-shape tests (gpu).
"""

import dataclasses
import os

import pytest
import torch

# Without a GPU the kernel runs under Triton's interpreter; must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mamba3_kernels.triton_impl import chunk_fwd as cf  # noqa: E402

from mamba3_kernels.inputs import ScanInputs  # noqa: E402
from mamba3_kernels.problem import Problem  # noqa: E402
from mamba3_kernels.reference import reference_scan  # noqa: E402
from mamba3_kernels.state import Mamba3State  # noqa: E402
from mamba3_kernels.testing import cast_inputs, poison_empty, random_inputs, rel_err  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
needs_device = pytest.mark.skipif(
    not INTERPRET and not torch.cuda.is_available(), reason="needs CUDA or TRITON_INTERPRET=1"
)
# Small sizes under the interpreter; the smallest GPU-legal ones when compiled.
SMALL_N, SMALL_P = ((16, 32), (8, 16)) if INTERPRET else ((64, 128), (32, 64))
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def make_problem(
    inputs: ScanInputs, rotary: str, final: bool = True, chunk_size: int | None = None
) -> Problem:
    """The Problem of a scan call, built by hand from scan-shaped inputs."""
    q, v = inputs.q, inputs.v
    mimo = q.dim() == 5
    bsz, seqlen, nheads, headdim = v.shape
    cu = inputs.cu_seqlens
    return Problem(
        batch=bsz,
        seqlen=seqlen,
        nheads=nheads,
        ngroups=q.shape[-2],
        rank=q.shape[2] if mimo else 1,
        d_state=q.shape[-1],
        headdim=headdim,
        n_angles=inputs.angles.shape[-1],
        nseq=bsz if cu is None else cu.numel() - 1,
        dtype=v.dtype,
        device_type=v.device.type,
        mimo=mimo,
        rotary=rotary,
        has_D=inputs.D is not None,
        has_z=inputs.z is not None,
        has_mimo_o=inputs.mimo_o is not None,
        has_initial_state=inputs.initial_state is not None,
        return_final_state=final,
        varlen=cu is not None,
        chunk_size=chunk_size,
    )


def run(
    inputs: ScanInputs,
    rotary: str,
    config=None,
    final: bool = True,
    chunk_size=None,
    split=None,
    segment=None,
):
    """The kernel's output and final state; split (0/1) and segment (tokens, or chunks when
    negative) override the config's algorithm."""
    problem = make_problem(inputs, rotary, final, chunk_size)
    config = config or cf.default_config(problem)
    if split is not None:
        config = cf.with_split(problem, config, split)
    if segment is not None and config.split:
        chunk = chunk_size or config.chunk_size
        config = dataclasses.replace(config, segment=-segment * chunk if segment < 0 else segment)
    assert cf.constraint(problem, config, None) is None
    return cf.chunk_fwd(problem, inputs, config)


def angle_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference of two angle tensors modulo 2*pi (the kernel reduces its angle)."""
    d = (a.double().cpu() - b.double().cpu() + torch.pi) % (2 * torch.pi) - torch.pi
    return d.abs().max().item() if d.numel() else 0.0


def check(
    inputs: ScanInputs,
    rotary: str,
    config=None,
    chunk_size=None,
    tol=None,
    split=None,
    segment=None,
):
    """Run the kernel and compare out and the final state with the float64 reference."""
    tol = tol or TOL[inputs.v.dtype]
    out, state = run(inputs, rotary, config, chunk_size=chunk_size, split=split, segment=segment)
    ref, rstate = reference_scan(cast_inputs(inputs, torch.float64), rotary)
    assert out.dtype == inputs.v.dtype and out.shape == ref.shape
    assert rel_err(out, ref) < tol, rel_err(out, ref)
    assert rel_err(state.ssm, rstate.ssm) < tol, rel_err(state.ssm, rstate.ssm)
    assert rel_err(state.k, rstate.k) < tol
    assert rel_err(state.v, rstate.v) == 0.0
    assert angle_err(state.angle, rstate.angle) < 1e-3
    assert state.ssm.dtype == torch.float32 and state.angle.dtype == torch.float32
    assert state.k.dtype == inputs.k.dtype and state.v.dtype == inputs.v.dtype
    return out, state


def gen(seed: int, **kw) -> ScanInputs:
    g = torch.Generator().manual_seed(seed)
    return random_inputs(device=DEVICE, generator=g, **kw)


# (rotary, rank, mimo_o, n_angles fraction, D/z, initial state)
GRID = [
    ("interleaved", 1, True, 4, True, True),
    ("halves", 1, True, 4, False, False),
    ("interleaved", 1, True, 2, True, False),
    ("halves", 2, True, 4, True, True),
    ("halves", 4, False, 2, True, True),
    ("interleaved", 4, True, 4, False, True),
    ("halves", 2, False, 4, False, False),
    ("interleaved", 2, True, 8, True, True),  # S = N/8: rotated pairs with zero rate
    ("halves", 1, False, 8, False, True),
]


# (split, segment in chunks): the sequential kernel; chunk-parallel with one-chunk segments and
# with two-chunk segments (a chunk loop inside each segment); block-parallel (every chunk its own
# program) with one-chunk segments and with three-chunk segments (earlier chunks as keys).
ALGOS = [(0, None), (1, -1), (1, -2), (2, -1), (2, -3)]


@needs_device
@pytest.mark.parametrize("split,segment", ALGOS)
@pytest.mark.parametrize("rotary,rank,mimo_o,frac,dz,init", GRID)
def test_grid_fp32(rotary, rank, mimo_o, frac, dz, init, split, segment):
    n, p = SMALL_N[1], SMALL_P[1]
    inputs = gen(
        rank * 10 + frac,
        batch=2,
        seqlen=37,  # not a multiple of any chunk size
        nheads=4,
        ngroups=2,
        d_state=n,
        headdim=p,
        n_angles=n // frac,
        rank=rank,
        with_D=dz,
        with_z=dz,
        with_mimo_o=mimo_o,
        with_initial_state=init,
    )
    check(inputs, rotary, chunk_size=8 if INTERPRET else None, split=split, segment=segment)


@needs_device
@pytest.mark.skipif(not INTERPRET, reason="CPU allocations (the interpreter)")
@pytest.mark.parametrize("split,segment", ALGOS)
@pytest.mark.parametrize("rank", [1, 4])
def test_no_kernel_reads_uninitialised_memory(rank, split, segment, monkeypatch):
    """Every algorithm with every torch.empty / empty_like / new_empty poisoned (testing.
    poison_empty: the outputs, final state and scratch workspace start as NaN): a buffer a kernel
    reads before writing, or leaves partly unwritten, fails the comparison."""
    n, p = SMALL_N[1], SMALL_P[1]
    inputs = gen(70 + rank, batch=2, seqlen=37, nheads=4, ngroups=2, d_state=n, headdim=p,
                 rank=rank, with_initial_state=True)  # fmt: skip

    poison_empty(monkeypatch)
    check(inputs, "halves", chunk_size=8, split=split, segment=segment)


@needs_device
@pytest.mark.parametrize("rank,rotary", [(1, "interleaved"), (2, "halves"), (4, "halves")])
def test_varlen_with_states(rank, rotary):
    # An empty sequence in the middle keeps its initial state; sequences shorter than a chunk.
    inputs = gen(
        7 + rank,
        cu_seqlens=[0, 5, 5, 26, 40],
        nheads=2,
        d_state=SMALL_N[1],
        headdim=SMALL_P[0],
        rank=rank,
        with_initial_state=True,
    )
    check(inputs, rotary)


@needs_device
def test_split_varlen_and_empty_fall_back():
    # split=1 asks for the chunk-parallel forward; varlen and empty calls take the sequential
    # kernel instead, with the same results.
    inputs = gen(4, cu_seqlens=[0, 9, 9, 30], nheads=2, d_state=SMALL_N[0], headdim=SMALL_P[0],
                 with_initial_state=True)  # fmt: skip
    check(inputs, "halves", split=1)
    empty = gen(5, batch=2, seqlen=0, nheads=2, d_state=SMALL_N[0], headdim=SMALL_P[0],
                with_initial_state=True)  # fmt: skip
    check(empty, "interleaved", split=1)


@needs_device
@pytest.mark.parametrize("segment", [-1, -4])
def test_split_matches_fused(segment):
    # The three algorithms at the same chunk size agree to fp32 rounding, over many chunks and
    # segments (64 chunks of 4 tokens; segments of 1 or 4 chunks).
    inputs = gen(17, batch=2, seqlen=256, nheads=2, ngroups=1, d_state=SMALL_N[0],
                 headdim=SMALL_P[0], n_angles=SMALL_N[0] // 2, with_initial_state=True,
                 with_D=True, with_z=True)  # fmt: skip
    chunk = 4 if INTERPRET else 16
    o0, s0 = run(inputs, "interleaved", chunk_size=chunk, split=0)
    for split in (1, 2):
        o1, s1 = run(inputs, "interleaved", chunk_size=chunk, split=split, segment=segment)
        assert rel_err(o1, o0) < 1e-5, (split, rel_err(o1, o0))
        assert rel_err(s1.ssm, s0.ssm) < 1e-5
        assert rel_err(s1.k, s0.k) < 1e-5
        assert angle_err(s1.angle, s0.angle) < 1e-4


@needs_device
def test_varlen_no_initial_state():
    inputs = gen(3, cu_seqlens=[0, 0, 17, 30], nheads=2, d_state=SMALL_N[0], headdim=SMALL_P[0])
    check(inputs, "interleaved")


@needs_device
@pytest.mark.parametrize("split,segment", ALGOS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank", [1, 4])
def test_half_precision(dtype, rank, split, segment):
    inputs = gen(
        11,
        batch=1,
        seqlen=33,
        nheads=2,
        d_state=SMALL_N[1],
        headdim=SMALL_P[1],
        rank=rank,
        dtype=dtype,
        with_initial_state=True,
    )
    check(inputs, "halves" if rank > 1 else "interleaved", split=split, segment=segment)


@needs_device
def test_mimo_rank1_and_unit_weights():
    # A MIMO call of rank 1, and MIMO without mimo_v/mimo_z (unit rank weights).
    inputs = gen(5, batch=1, seqlen=21, nheads=2, d_state=SMALL_N[0], headdim=SMALL_P[0], rank=1,
                 mimo=True)  # fmt: skip
    check(inputs, "halves")
    inputs = gen(6, batch=1, seqlen=21, nheads=2, d_state=SMALL_N[0], headdim=SMALL_P[0], rank=2)
    check(inputs._replace(mimo_v=None, mimo_z=None), "halves")


@needs_device
@pytest.mark.parametrize("chunk_size", [8, 16, 32])
def test_chunk_size_override(chunk_size):
    # problem.chunk_size overrides the config; every chunk size computes the same function.
    inputs = gen(9, batch=1, seqlen=40, nheads=2, d_state=SMALL_N[0], headdim=SMALL_P[0], rank=2)
    check(inputs, "halves", chunk_size=chunk_size)


@needs_device
def test_block_p_split():
    # P split over two programs per head gives the same result.
    n, p = SMALL_N[0], SMALL_P[1]
    inputs = gen(12, batch=1, seqlen=30, nheads=2, d_state=n, headdim=p, with_initial_state=True)
    config = cf.ChunkFwdConfig(chunk_size=16, block_p=p // 2, num_warps=4)
    check(inputs, "interleaved", config=config)


@needs_device
@pytest.mark.parametrize("split_rot", [0, 1])
def test_split_rot(split_rot):
    # Trig on all N/2 pairs or only the first N/4 (S = N/4): the same function.
    n = SMALL_N[1]
    inputs = gen(16, batch=1, seqlen=27, nheads=2, d_state=n, headdim=SMALL_P[0], n_angles=n // 4,
                 rank=2, with_initial_state=True)  # fmt: skip
    config = cf.ChunkFwdConfig(chunk_size=8, block_p=SMALL_P[0], num_warps=4, split_rot=split_rot)
    check(inputs, "interleaved", config=config)


@needs_device
def test_non_contiguous_inputs():
    inputs = gen(13, batch=2, seqlen=19, nheads=2, d_state=SMALL_N[0], headdim=SMALL_P[0])

    def strided(t):  # same values, non-contiguous storage
        return t.transpose(0, -1).contiguous().transpose(0, -1)

    inputs = inputs._replace(q=strided(inputs.q), v=strided(inputs.v), adt=strided(inputs.adt))
    assert not inputs.q.is_contiguous()
    check(inputs, "interleaved")


@needs_device
@pytest.mark.parametrize("split,segment", ALGOS)
def test_state_round_trip(split, segment):
    # Two calls chained through the final state equal one call over the whole sequence.
    inputs = gen(14, batch=2, seqlen=36, nheads=2, d_state=SMALL_N[0], headdim=SMALL_P[0], rank=2,
                 with_initial_state=True)  # fmt: skip
    full, full_state = run(inputs, "halves", split=split, segment=segment)
    cut = 23

    def part(a, b, state):
        tok = lambda x: None if x is None else x[:, a:b]  # noqa: E731
        return inputs._replace(
            q=tok(inputs.q), k=tok(inputs.k), v=tok(inputs.v), z=tok(inputs.z),
            angles=tok(inputs.angles), adt=inputs.adt[..., a:b], dt=inputs.dt[..., a:b],
            trap=inputs.trap[..., a:b], initial_state=state,
        )  # fmt: skip

    out1, s1 = run(part(0, cut, inputs.initial_state), "halves", split=split, segment=segment)
    out2, s2 = run(part(cut, 36, Mamba3State(*s1)), "halves", split=split, segment=segment)
    assert rel_err(torch.cat([out1, out2], dim=1), full) < 1e-5
    assert rel_err(s2.ssm, full_state.ssm) < 1e-5
    assert angle_err(s2.angle, full_state.angle) < 1e-4


@needs_device
def test_no_final_state():
    inputs = gen(15, batch=1, seqlen=18, nheads=2, d_state=SMALL_N[0], headdim=SMALL_P[0])
    out, state = run(inputs, "interleaved", final=False)
    ref, _ = reference_scan(cast_inputs(inputs, torch.float64), "interleaved")
    assert state is None and rel_err(out, ref) < 1e-4


def test_config_space_and_constraints():
    # The default config satisfies the constraints; every point of the space is either valid or
    # rejected with a reason; invalid configs are refused by the launcher. Long fixed-length
    # calls tune the chunk-parallel variant (split and segment), short ones the sequential walk.
    base = make_problem(random_inputs(seqlen=4, d_state=16, headdim=8), "interleaved")
    for seqlen in (4, 4096):
        for rank, n, p in [(1, 128, 64), (4, 128, 64), (2, 64, 32), (8, 256, 128), (1, 16, 8)]:
            sizes = dict(rank=rank, d_state=n, headdim=p, seqlen=seqlen)
            problem = Problem(**{**base.__dict__, **sizes, "mimo": rank > 1,
                                 "dtype": torch.bfloat16})  # fmt: skip
            default = cf.default_config(problem)
            assert cf.constraint(problem, default, None) is None, (problem, default)
            space = cf.search_space(problem)
            keys = {"chunk_size", "block_p", "num_warps", "num_stages", "prefetch"}
            split_keys = {"split", "segment", "path"}
            assert set(space) == (keys | split_keys if seqlen > 256 else keys)
            # (SISO whose sequences make one segment each walks them whole: see below)
            assert bool(default.split) == (seqlen > 256 and (rank > 1 or default.segment < seqlen))
            valid = 0
            for chunk in space["chunk_size"]:
                for bp in space["block_p"]:
                    for warps in space["num_warps"]:
                        for seg in space.get("segment", [0]):
                            config = cf.ChunkFwdConfig(chunk, bp, warps, 1, split=int(seqlen > 256),
                                                       segment=seg)  # fmt: skip
                            props = {"shared_memory_per_block_optin": 232448}
                            reason = cf.constraint(problem, config, props)
                            assert reason is None or isinstance(reason, str)
                            valid += reason is None
            assert valid > 0
    assert cf.SPEC.name == "chunk_fwd" and cf.SPEC.modes == ("inference", "training")
    bad = cf.ChunkFwdConfig(chunk_size=24)
    assert cf.constraint(problem, bad, None) is not None
    # The L2 prefetch: up to 4 chunks ahead; GPU builds get it, the interpreter's never (its
    # inline assembly has no interpreter form; it changes no value).
    assert cf.constraint(problem, dataclasses.replace(default, prefetch=5), None) is not None
    ahead = dataclasses.replace(default, prefetch=2)
    assert cf.constraint(problem, ahead, None) is None
    assert cf._constexprs(problem, ahead, interp=False)["PREFETCH"] == 2
    assert cf._constexprs(problem, ahead, interp=True)["PREFETCH"] == 0


def test_siso_default_split_rule():
    """SISO fixed-length defaults (the H200's measurements, docs/performance.md): segments of
    4096..512 tokens aiming at ~2 programs per multiprocessor; whole-sequence walks on the same
    tiles where sequences x heads make ~2 per multiprocessor already or a sequence is one
    segment; varlen keeps the sequential walk's own tiles."""
    base = make_problem(random_inputs(seqlen=4, d_state=16, headdim=8), "interleaved")

    def config(batch, seqlen, varlen=False):
        sizes = dict(batch=batch, nseq=batch, seqlen=seqlen, nheads=64, d_state=128, headdim=64,
                     n_angles=32, dtype=torch.bfloat16, varlen=varlen)  # fmt: skip
        return cf.default_config(Problem(**{**base.__dict__, **sizes}))

    tiles = lambda c: (c.chunk_size, c.block_p, c.num_warps, c.num_stages, c.split_rot)  # noqa: E731
    for (batch, seqlen), (split, segment) in {(1, 2048): (1, 512), (1, 16384): (1, 4096),
                                              (8, 2048): (0, 0), (4, 2048): (0, 0),
                                              (2, 16384): (1, 4096)}.items():  # fmt: skip
        c = config(batch, seqlen)
        assert (c.split, c.segment) == (split, segment), (batch, seqlen, c)
        assert tiles(c) == (32, 64, 4, 2, 1), c
    assert tiles(config(1, 16384, varlen=True)) != (32, 64, 4, 2, 1)


# ---- GPU: model shape --------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("split,segment", ALGOS + [(1, 512), (2, 256)])
@pytest.mark.parametrize("rank", [1, 4])
def test_model_shape_gpu(rank, split, segment):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(21 + rank)
    kw = dict(batch=2, seqlen=4096, nheads=32, ngroups=1, d_state=128, headdim=64, n_angles=32)
    inputs = random_inputs(rank=rank, dtype=torch.bfloat16, device="cuda", generator=g,
                           with_initial_state=True, **kw)  # fmt: skip
    rotary = "halves" if rank > 1 else "interleaved"
    out, state = run(inputs, rotary, split=split, segment=segment)
    torch.cuda.synchronize()
    ref, rstate = reference_scan(cast_inputs(inputs, torch.float32), rotary, chunk_size=64)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 2e-2, rel_err(out, ref)
    assert rel_err(state.ssm, rstate.ssm) < 2e-2
    assert rel_err(state.k, rstate.k) < 2e-2
    assert angle_err(state.angle, rstate.angle) < 1e-2


@pytest.mark.gpu
def test_fp32_gpu_long():
    # fp32 at a longer length: angles stay accurate (reduced modulo 2*pi), no NaN.
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(31)
    inputs = random_inputs(batch=1, seqlen=2048, nheads=4, d_state=64, headdim=32, n_angles=16,
                           device="cuda", generator=g, with_initial_state=True)  # fmt: skip
    out, state = run(inputs, "interleaved")
    ref, rstate = reference_scan(cast_inputs(inputs, torch.float64), "interleaved", chunk_size=64)
    assert rel_err(out, ref) < 1e-4, rel_err(out, ref)
    assert rel_err(state.ssm, rstate.ssm) < 1e-4


@pytest.mark.gpu
def test_cached_launch_gpu():
    # Repeated calls go through the cached compiled kernels (triton_impl/launch.py): the same
    # results as the first (Triton-launched) call, also for fresh tensors and a misaligned view.
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    kw = dict(batch=1, seqlen=1024, nheads=8, ngroups=1, d_state=128, headdim=64, n_angles=32)
    for rank, rotary in ((1, "interleaved"), (4, "halves")):
        g = torch.Generator().manual_seed(40 + rank)
        inputs = random_inputs(rank=rank, dtype=torch.bfloat16, device="cuda", generator=g,
                               with_initial_state=True, **kw)  # fmt: skip
        first, s_first = run(inputs, rotary)
        again, s_again = run(inputs, rotary)
        assert torch.equal(first, again) and torch.equal(s_first.ssm, s_again.ssm)
        fresh = inputs._replace(v=inputs.v.clone())
        out, _ = run(fresh, rotary)
        assert torch.equal(out, first)
        # A view one element into a larger buffer: not 16-byte aligned, Triton's launcher.
        buf = torch.empty(inputs.v.numel() + 1, dtype=inputs.v.dtype, device="cuda")
        shifted = buf[1:].view_as(inputs.v)
        shifted.copy_(inputs.v)
        assert shifted.data_ptr() % 16 != 0
        out, _ = run(inputs._replace(v=shifted), rotary)
        assert torch.equal(out, first)
        ref, _ = reference_scan(cast_inputs(inputs, torch.float32), rotary, chunk_size=64)
        assert rel_err(first, ref) < 2e-2


@needs_device
@pytest.mark.parametrize("rank", [8])
def test_split_rank8_default_shape(rank):
    # The default config of a long fixed-length MIMO R=8 call (chunk of 2 tokens = 16 rows,
    # segments of 128 tokens) against the reference, over several segments.
    inputs = gen(18, batch=1, seqlen=300, nheads=2, d_state=SMALL_N[0], headdim=SMALL_P[0],
                 rank=rank, with_initial_state=True, with_mimo_o=True)  # fmt: skip
    problem = make_problem(inputs, "halves")
    config = cf.default_config(problem)
    assert config.split == 1 and config.segment == 128 and config.chunk_size * rank == 16
    check(inputs, "halves", config=config)
