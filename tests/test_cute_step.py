"""CuTe decode step on a Hopper GPU: 64 consecutive steps against the float64 reference and the
Triton step, through the JIT (nvidia-cutlass-dsl installed) and through the prebuilt library
(libmamba3_native: $MAMBA3_KERNELS_NATIVE_LIB, or build/ of this checkout, or built here when
the DSL and cmake are present); dynamic batch, CUDA graph capture, the disk cache, the C++
example. Every test is marked gpu."""

import importlib.util
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from mamba3_kernels.cute_impl import jit, native
from mamba3_kernels.cute_impl.backend import CuteBackend
from mamba3_kernels.cute_impl.export import DEFAULT_SET
from mamba3_kernels.cute_impl.step import heuristic

from mamba3_kernels.backend import registered_backends
from mamba3_kernels.reference import reference_step
from mamba3_kernels.state import Mamba3State
from mamba3_kernels.testing import cast_inputs, rel_err
from mamba3_kernels.validate import validate_step

pytestmark = pytest.mark.gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_DSL = importlib.util.find_spec("cutlass") is not None
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
SSM_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-3, torch.float16: 2e-3}
STEPS = 64
IDS = [v.name(heuristic(v.d_state, v.headdim, v.rank)) for v in DEFAULT_SET]


def _load_case_module():
    path = os.path.join(ROOT, "examples", "cpp", "make_case.py")
    spec = importlib.util.spec_from_file_location("mamba3_make_case", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CASE = _load_case_module()


def _with_env(env: dict, fn):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return fn()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def native_lib(tmp_path_factory) -> str:
    path = os.environ.get("MAMBA3_KERNELS_NATIVE_LIB") or os.path.join(
        ROOT, "build", native.LIB_NAME
    )
    if os.path.isfile(path):
        return path
    if not (HAS_DSL and shutil.which("cmake") and shutil.which("nvcc")):
        pytest.skip(f"no {path} (set MAMBA3_KERNELS_NATIVE_LIB), and no DSL + cmake to build it")
    build = tmp_path_factory.mktemp("native")
    subprocess.run(["cmake", "-S", ROOT, "-B", str(build), f"-DMAMBA3_PYTHON={sys.executable}"],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run(["cmake", "--build", str(build), "-j", "8"], check=True, capture_output=True)
    return str(build / native.LIB_NAME)


@pytest.fixture(scope="module", params=["jit", "native"])
def backend(request) -> CuteBackend:
    if request.param == "jit":
        if not HAS_DSL:
            pytest.skip("nvidia-cutlass-dsl is not installed (the JIT path)")
        env = {"MAMBA3_KERNELS_CUTE_PATH": "jit"}
    else:
        env = {
            "MAMBA3_KERNELS_CUTE_PATH": "native",
            "MAMBA3_KERNELS_NATIVE_LIB": request.getfixturevalue("native_lib"),
        }
    b = CuteBackend()
    _with_env(env, b._resolve)
    assert b.path_info()["path"] == request.param, b.path_info()
    assert b.unavailable_reason() is None, b.unavailable_reason()
    return b


def _rotary(v) -> str:
    return "interleaved" if v.interleaved else "halves"


def _inputs(v, batch: int, seed: int, params=None):
    x = CASE.case_inputs(v, batch, seed)
    x = type(x)(*(t.cuda() if isinstance(t, torch.Tensor) else t for t in x[:14]),
                None if x.initial_state is None else Mamba3State(*(t.cuda() for t in
                                                                    x.initial_state)))  # fmt: skip
    if not v.has_mimo_z:
        x = x._replace(mimo_z=None)
    if params is not None:
        x = x._replace(q_bias=params.q_bias, k_bias=params.k_bias, D=params.D,
                       mimo_v=params.mimo_v, mimo_z=params.mimo_z,
                       mimo_o=params.mimo_o)  # fmt: skip
    return x


def _call(b, x, state, rotary, out=None):
    problem, xin = validate_step(*x[:9], state, *x[9:14], rotary)
    if out is not None:
        return b.step(problem, xin, state, None, out=out)
    return b.step(problem, xin, state)


def _truth_step(x, truth, rotary, dtype):
    t64 = cast_inputs(x._replace(initial_state=None), torch.float64)
    out, truth = reference_step(t64, truth, rotary)
    # The kernels store k and v in the inputs' dtype; so does the truth (their next use).
    return out, truth._replace(k=truth.k.to(dtype).double(), v=truth.v.to(dtype).double())


@pytest.mark.parametrize("index", range(len(DEFAULT_SET)), ids=IDS)
def test_steps_match_reference_and_triton(backend, index):
    v = DEFAULT_SET[index]
    rotary = _rotary(v)
    first = _inputs(v, 3, seed=index)
    dtype = first.v.dtype
    state = first.initial_state.clone()
    state_t = first.initial_state.clone()
    truth = Mamba3State(*(t.double() for t in first.initial_state))
    triton = registered_backends()["triton"]
    worst = worst_t = 0.0
    for t in range(STEPS):
        x = first if t == 0 else _inputs(v, 3, seed=1000 * index + t, params=first)
        out = _call(backend, x, state, rotary)
        out_t = _call(triton, x, state_t, rotary)
        ref, truth = _truth_step(x, truth, rotary, dtype)
        worst = max(worst, rel_err(out, ref))
        worst_t = max(worst_t, rel_err(out, out_t))
    assert worst < TOL[dtype], f"out vs reference {worst:.3g}"
    assert worst_t < TOL[dtype], f"out vs triton {worst_t:.3g}"
    # (every backend keeps the angle modulo 2 pi: compare the rotations, which a wrap keeps)
    assert ((state.angle >= 0) & (state.angle < 2 * math.pi + 1e-6)).all()
    got = torch.stack((state.angle.double().cos(), state.angle.double().sin()))
    assert rel_err(got, torch.stack((truth.angle.cos(), truth.angle.sin()))) < 1e-5
    assert rel_err(state.ssm, truth.ssm) < SSM_TOL[dtype]
    assert rel_err(state.k, truth.k) < TOL[dtype]
    assert rel_err(state.v, truth.v) < TOL[dtype]


def test_batch_is_dynamic(backend):
    v = DEFAULT_SET[4]  # SISO N=128 P=64
    rotary = _rotary(v)
    sizes = []
    for batch in (1, 2, 7, 33):
        x = _inputs(v, batch, seed=batch)
        truth = Mamba3State(*(t.double() for t in x.initial_state))
        state = x.initial_state.clone()
        out = _call(backend, x, state, rotary)
        ref, truth = _truth_step(x, truth, rotary, x.v.dtype)
        assert rel_err(out, ref) < TOL[x.v.dtype]
        assert rel_err(state.ssm, truth.ssm) < SSM_TOL[x.v.dtype]
        sizes.append(len(jit._LOADED))
    if backend.path_info()["path"] == "jit":
        assert len(set(sizes)) == 1, f"a batch size compiled again: {sizes}"


@pytest.mark.parametrize("index", [0, 13], ids=[IDS[0], IDS[13]])
def test_cuda_graph_capture(backend, index):
    v = DEFAULT_SET[index]
    rotary = _rotary(v)
    x = _inputs(v, 4, seed=7)
    state_g = x.initial_state.clone()
    state_e = x.initial_state.clone()
    out_g = torch.empty_like(_call(backend, x, x.initial_state.clone(), rotary))  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _call(backend, x, state_g, rotary, out=out_g)
    for t in range(3):
        nxt = _inputs(v, 4, seed=100 + t, params=x)
        for i in (0, 1, 2, 3, 4, 5, 8, 10):  # the per-step tensors, in place
            if x[i] is not None:
                x[i].copy_(nxt[i])
        graph.replay()
        out_e = _call(backend, x, state_e, rotary)
        torch.cuda.synchronize()
        assert torch.equal(out_g, out_e)
        assert torch.equal(state_g.ssm, state_e.ssm)


@pytest.mark.skipif(not HAS_DSL, reason="the JIT path needs nvidia-cutlass-dsl")
def test_jit_disk_cache_across_processes(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import mamba3_kernels  # noqa: F401
        from mamba3_kernels.cute_impl import jit, step_kernel
        from mamba3_kernels.cute_impl.export import DEFAULT_SET
        from mamba3_kernels.cute_impl.step import heuristic
        v = DEFAULT_SET[0]
        if sys.argv[1] == "load":
            def no_compile(*a, **k):
                raise SystemExit("compiled although cached")
            step_kernel.compile_variant = no_compile
        jit.get_kernel(v, heuristic(v.d_state, v.headdim, v.rank))
        print("ok")
    """)
    env = {**os.environ, "MAMBA3_KERNELS_CUTE_CACHE": str(tmp_path)}
    for mode in ("compile", "load"):
        r = subprocess.run([sys.executable, "-c", script, mode], env=env, capture_output=True,
                           text=True)  # fmt: skip
        assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
    assert any(p.suffix == ".o" for p in tmp_path.iterdir())


@pytest.mark.parametrize("index", [0, 13], ids=[IDS[0], IDS[13]])
def test_cpp_example(native_lib, index, tmp_path):
    exe = os.path.join(os.path.dirname(native_lib), "decode_step")
    if not os.path.isfile(exe):
        pytest.skip(f"no {exe} (built by the CMake project next to the library)")
    case = tmp_path / "case.bin"
    CASE.write_case(str(case), DEFAULT_SET[index], batch=3, steps=16, seed=index)
    r = subprocess.run([exe, str(case)], capture_output=True, text=True)
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr


def test_timing_report(backend):
    """Not a check: prints the time per step of cute and triton (run with -s to see it)."""
    v = DEFAULT_SET[15]  # the model-sized SISO layer: H=32, N=128, P=64
    rotary = _rotary(v)
    x = _inputs(v, 64, seed=3)
    triton = registered_backends()["triton"]
    for name, b in (("cute", backend), ("triton", triton)):
        state = x.initial_state.clone()
        for _ in range(5):
            _call(b, x, state, rotary)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(100):
            _call(b, x, state, rotary)
        end.record()
        torch.cuda.synchronize()
        print(f"\n{name} ({backend.path_info()['path']}): B=64 H=32 N=128 P=64 bf16 "
              f"{start.elapsed_time(end) * 10:.1f} us per step (host included)")  # fmt: skip
