"""The TileLang backend without a GPU.

Every kernel of the default config set lowers with TileLang and compiles with nvcc for sm_90a;
TileLang's shared-memory figure for each stays within the constraint's estimate and the
device limit; the constraint rejects configs over the limit with the bytes in its reason. The
stages around the kernel (prep.py) are checked against the float64 reference on CPU through
the kernel's PyTorch emulation (chunk_fwd.emulate_kernel), which needs no tilelang.

Lowering and nvcc cost a few seconds per kernel: each build is made once per test process
(nvcc's output is also cached on disk by TileLang, so a second run skips nvcc).
"""

import dataclasses
import functools

import pytest
import torch
from mamba3_kernels.tilelang_impl import backend as tl_backend
from mamba3_kernels.tilelang_impl import chunk_fwd as cf
from mamba3_kernels.tilelang_impl import prep

from mamba3_kernels.reference import reference_scan
from mamba3_kernels.testing import cast_inputs, random_inputs, rel_err
from mamba3_kernels.validate import validate_scan

ARCH = "sm_90a"


@pytest.fixture(scope="module")
def tilelang():
    return pytest.importorskip(
        "tilelang", reason="tilelang is not importable (pip install 'mamba3-kernels[tilelang]')"
    )


def problem_of(rank=4, d_state=128, headdim=64, rotary=None, dtype=torch.bfloat16, **kw):
    x = random_inputs(batch=1, seqlen=8, nheads=2, d_state=d_state, headdim=headdim, rank=rank,
                      dtype=dtype, **kw)  # fmt: skip
    problem, _ = validate_scan(*x[:14], x.initial_state, True, x.cu_seqlens, rotary)
    return problem


@functools.cache
def lowered(key: cf.KernelKey):
    """TileLang's lowering of one build with its device code compiled by nvcc (once per
    process)."""
    return cf.lower_kernel(key, ARCH, compile_device=True)


# The default config set: R = 1, 2, 4, 8 at N = 64, 128 and P = 64.
DEFAULT_SET = [(r, n) for n in (64, 128) for r in (1, 2, 4, 8)]


@pytest.mark.parametrize("rank,d_state", DEFAULT_SET)
def test_default_kernels_lower_and_compile_for_sm90a(tilelang, rank, d_state):
    keys = set()
    for rotary in ("interleaved", "halves"):
        problem = problem_of(rank=rank, d_state=d_state, headdim=64, rotary=rotary)
        config = cf.default_config(problem)
        assert cf.constraint(problem, config, None) is None
        keys.add(cf.kernel_key(problem, config))
    # The rotary layout is applied before the kernel: both layouts run the same build.
    assert len(keys) == 1
    key = keys.pop()
    assert key.chunk * key.rank == 64
    art = lowered(key)
    src = art.kernel_source
    assert "wgmma" in src, src[:400]  # the three chunk products on Hopper's tensor cores
    assert "tma_load" in src  # the chunk loop's operands arrive by TMA
    smem = cf.lowered_smem_bytes(art)
    assert 0 < smem <= cf.smem_bytes(key) <= smem + 4096, (smem, cf.smem_bytes(key))
    assert cf.smem_bytes(key) <= cf.SMEM_SM90


def test_jit_build_for_sm90a_without_gpu(tilelang):
    # The path a GPU call takes (tilelang.compile: kernel and host wrapper), here for sm_90a;
    # the in-process cache hands back the same object for the same build.
    problem = problem_of(rank=4, d_state=128, headdim=64)
    key = cf.kernel_key(problem, cf.default_config(problem))
    kernel = cf.compile_kernel(key, ARCH)
    assert "wgmma" in kernel.get_kernel_source()
    assert cf.compile_kernel(key, ARCH) is kernel
    # fp16 inputs are a build of their own.
    half = cf.kernel_key(problem_of(rank=4, d_state=128, headdim=64, dtype=torch.float16),
                         cf.default_config(problem))  # fmt: skip
    assert half.dtype == "float16" and half != key
    assert "wgmma" in lowered(half).kernel_source


def test_constraint_rejects_shared_memory_over_the_limit():
    problem = problem_of(rank=4, d_state=256, headdim=128)
    big = cf.ChunkFwdConfig(chunk_size=32, block_p=64, threads=256, num_stages=2)
    need = cf.smem_bytes(cf.kernel_key(problem, big))
    assert need > cf.SMEM_SM90
    reason = cf.constraint(problem, big, None)
    assert reason == f"shared memory {need} bytes > {cf.SMEM_SM90} bytes per block", reason
    # The device's own limit when given (here a GPU with 99 KiB per block).
    small = {"shared_memory_per_block_optin": 101376}
    default = cf.default_config(problem_of(rank=4, d_state=128, headdim=64))
    reason = cf.constraint(problem_of(rank=4, d_state=128, headdim=64), default, small)
    assert reason is not None and "bytes > 101376 bytes" in reason, reason


def test_constraint_rejects_bad_tiles():
    problem = problem_of(rank=2, d_state=128, headdim=64)
    ok = cf.default_config(problem)
    cases = [
        (dict(chunk_size=16), "32 rows is not a multiple of 64"),
        (dict(threads=256), "64 rows is not a multiple of 128"),
        (dict(block_p=48), "dividing P=64"),
        (dict(threads=96), "threads 96"),
        (dict(chunk_size=64), "register fragments of 320 values per thread > 224"),
    ]
    for fields, words in cases:
        reason = cf.constraint(problem, dataclasses.replace(ok, **fields), None)
        assert reason is not None and words in reason, (fields, reason)


@pytest.mark.parametrize("rank", [1, 2, 4, 8])
@pytest.mark.parametrize("d_state", [64, 128, 256])
@pytest.mark.parametrize("headdim", [32, 64, 128])
def test_default_configs_are_valid(rank, d_state, headdim):
    problem = problem_of(rank=rank, d_state=d_state, headdim=headdim)
    config = cf.default_config(problem)
    assert cf.constraint(problem, config, None) is None, config
    space = cf.search_space(problem)
    for name in ("chunk_size", "block_p", "threads", "num_stages"):
        assert getattr(config, name) in space[name], (name, config, space)


def test_backend_reasons_without_gpu():
    b = tl_backend.TileLangBackend()
    assert b.name == "tilelang" and b.priority == 10 and not b.has_backward
    assert [s.name for s in b.all_kernels()] == ["chunk_fwd"]
    assert b.all_kernels()[0].modes == ("inference",)
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in b.unavailable_reason() or "not installed" in b.unavailable_reason()
    assert "varlen" in b.unsupported_reason(problem_of(cu_seqlens=[0, 3, 8]))
    assert "decode" in b.unsupported_reason(dataclasses.replace(problem_of(), decode=True))
    cpu = b.unsupported_reason(problem_of())
    assert cpu is not None and "CUDA" in cpu


# The host stages (prep.prepare, prep.finish) with the kernel's emulation, against the float64
# reference: every optional input, both layouts, GQA, ranks, lengths off the chunk grid.
EMULATED = [
    # rank, rotary, ngroups, nheads, seqlen, d_state, headdim, initial state, D, z, mimo_o
    (1, "interleaved", 1, 4, 100, 64, 32, False, True, True, True),
    (1, "halves", 2, 4, 64, 64, 32, True, False, True, True),
    (2, "interleaved", 1, 2, 37, 64, 32, True, True, False, False),
    (4, "halves", 2, 4, 70, 64, 32, True, True, True, True),
    (4, "interleaved", 1, 2, 1, 64, 32, True, True, True, False),
    (8, "halves", 4, 4, 50, 128, 64, False, True, True, True),
]


@pytest.mark.parametrize("case", EMULATED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_host_stages_with_emulated_kernel_match_reference(case, dtype):
    rank, rotary, ngroups, nheads, seqlen, n, p, init, with_d, with_z, with_o = case
    torch.manual_seed(0)
    x = random_inputs(batch=2, seqlen=seqlen, nheads=nheads, ngroups=ngroups, d_state=n,
                      headdim=p, rank=rank, n_angles=n // 2 if rank % 2 else n // 4,
                      dtype=dtype, with_initial_state=init, with_D=with_d, with_z=with_z,
                      with_mimo_o=with_o)  # fmt: skip
    problem, inputs = validate_scan(*x[:14], x.initial_state, True, None, rotary)
    key = cf.kernel_key(problem, cf.default_config(problem))
    prepared = prep.prepare(problem, inputs, key.chunk)
    y, hf = cf.emulate_kernel(key, prepared)
    out, state = prep.finish(problem, inputs, prepared, y, hf)
    ref_out, ref_state = reference_scan(cast_inputs(inputs, torch.float64), rotary)
    assert out.shape == ref_out.shape and out.dtype == inputs.v.dtype
    assert rel_err(out, ref_out) < 1e-2
    assert rel_err(state.ssm, ref_state.ssm) < 1e-2 and state.ssm.dtype == torch.float32
    assert rel_err(state.k, ref_state.k) < 1e-2 and state.k.dtype == inputs.k.dtype
    assert torch.equal(state.v, inputs.v[:, -1])
    # The angle state is kept modulo 2 pi: compare through cosine and sine.
    for f in (torch.cos, torch.sin):
        assert rel_err(f(state.angle), f(ref_state.angle)) < 1e-5


def test_empty_call_returns_initial_state():
    x = random_inputs(batch=2, seqlen=0, nheads=2, d_state=64, headdim=32, rank=4,
                      dtype=torch.bfloat16, with_initial_state=True, with_mimo_o=False)  # fmt: skip
    problem, inputs = validate_scan(*x[:14], x.initial_state, True, None, None)
    out, state = prep.empty_call(problem, inputs)
    assert out.shape == (2, 0, 4, 2, 32)
    for got, want in zip(state, x.initial_state, strict=True):
        assert torch.equal(got, want.to(got.dtype))
