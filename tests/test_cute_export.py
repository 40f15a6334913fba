"""CuTe backend without a GPU: configs, the AOT export of the default kernel set for sm_90a, the
CMake build of libmamba3_native and the C++ example, and the library's variant table."""

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from mamba3_kernels.cute_impl import native
from mamba3_kernels.cute_impl import step as cstep
from mamba3_kernels.cute_impl.backend import CuteBackend
from mamba3_kernels.cute_impl.export import DEFAULT_SET, variants_source

from mamba3_kernels.problem import Problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_DSL = importlib.util.find_spec("cutlass") is not None
needs_dsl = pytest.mark.skipif(
    not HAS_DSL, reason="nvidia-cutlass-dsl is not installed (pip install 'mamba3-kernels[cute]')"
)
HAS_TOOLS = shutil.which("cmake") is not None and shutil.which("nvcc") is not None
needs_tools = pytest.mark.skipif(not HAS_TOOLS, reason="needs cmake and nvcc on PATH")


def problem(n=128, p=64, rank=1, batch=2, decode=True, dtype=torch.bfloat16) -> Problem:
    return Problem(
        batch=batch, seqlen=1, nheads=8, ngroups=2, rank=rank, d_state=n, headdim=p,
        n_angles=n // 4, nseq=batch, dtype=dtype, device_type="cuda", mimo=rank > 1,
        rotary="interleaved", has_D=True, has_z=True, has_mimo_o=rank > 1,
        has_initial_state=True, return_final_state=True, varlen=False, decode=decode,
    )  # fmt: skip


@pytest.mark.parametrize("rank", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [64, 128, 256])
@pytest.mark.parametrize("p", [32, 64, 128])
def test_default_config_valid(n, p, rank):
    pr = problem(n, p, rank)
    cfg = cstep.SPEC.default(pr)
    assert cstep.SPEC.constraint(pr, cfg, None) is None
    # Every candidate of the space either passes or says why not.
    space = cstep.SPEC.space(pr)
    for threads in space["threads"]:
        for cols in space["cols"]:
            c = cstep.StepConfig(threads=threads, cols=cols, block_p=cfg.block_p)
            reason = cstep.SPEC.constraint(pr, c, None)
            assert reason is None or isinstance(reason, str)


def test_constraint_rejects():
    pr = problem(128, 64)
    assert "threads" in cstep.check_config(128, 64, cstep.StepConfig(threads=100))
    assert "per row" in cstep.check_config(256, 64, cstep.StepConfig(cols=4))  # 64 threads a row
    assert "block_p" in cstep.check_config(128, 64, cstep.StepConfig(block_p=2))
    big = cstep.StepConfig(threads=32, cols=16, block_p=64, prefetch=0)
    assert "registers" in cstep.SPEC.constraint(pr, big, None)


def test_variant_names_unique_and_c_identifiers():
    names = [v.name(cstep.heuristic(v.d_state, v.headdim, v.rank)) for v in DEFAULT_SET]
    assert len(set(names)) == len(names)
    assert all(n.isidentifier() for n in names)
    src = variants_source([(v, None, n) for v, n in zip(DEFAULT_SET, names, strict=True)])
    assert f"MAMBA3_NUM_VARIANTS = {len(names)};" in src


def test_backend_reasons():
    b = CuteBackend()
    assert "prefill" in b.unsupported_reason(problem(decode=False))
    assert "dtype" in b.unsupported_reason(problem(dtype=torch.float64))
    info = b.path_info()
    assert info["path"] in ("jit", "native", None)
    if not torch.cuda.is_available():
        assert b.unavailable_reason() is not None


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Configure (which exports the default set for sm_90a) and build the CMake project."""
    if not HAS_DSL:
        pytest.skip("nvidia-cutlass-dsl is not installed (pip install 'mamba3-kernels[cute]')")
    if not HAS_TOOLS:
        pytest.skip("needs cmake and nvcc on PATH")
    build = tmp_path_factory.mktemp("cute_build")
    subprocess.run(
        ["cmake", "-S", ROOT, "-B", str(build), f"-DMAMBA3_PYTHON={sys.executable}",
         "-DMAMBA3_ARCH=sm_90a"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    subprocess.run(
        ["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True, text=True
    )
    return build


def _cubin_sms(path) -> list[int]:
    """The SM version of every CUDA ELF image embedded in an object file (EM_CUDA = 190; the
    version sits in the low byte of e_flags, or the next one in newer images)."""
    data = path.read_bytes()
    sms, i = [], data.find(b"\x7fELF", 1)
    while i > 0:
        machine = struct.unpack_from("<H", data, i + 18)[0]
        if machine == 190:
            flags = struct.unpack_from("<I", data, i + 48)[0]
            sms.append(flags & 0xFF if flags & 0xFF >= 50 else (flags >> 8) & 0xFF)
        i = data.find(b"\x7fELF", i + 4)
    return sms


@needs_dsl
@needs_tools
def test_export_writes_every_variant(built):
    kernels = built / "cute_kernels"
    manifest = json.loads((kernels / "manifest.json").read_text())
    assert manifest["arch"] == "sm_90a"
    assert len(manifest["variants"]) == len(DEFAULT_SET)
    for entry in manifest["variants"]:
        name = entry["name"]
        assert (kernels / f"{name}.o").stat().st_size > 0
        assert _cubin_sms(kernels / f"{name}.o") == [90], name  # (not the DSL's default arch)
        header = (kernels / f"{name}.h").read_text()
        assert f"cute_dsl_{name}_wrapper" in header
    assert (kernels / "libcuda_dialect_runtime_static.a").is_file()


@needs_dsl
@needs_tools
def test_library_and_example_build(built):
    lib = built / native.LIB_NAME
    exe = built / "decode_step"
    assert lib.is_file() and exe.is_file()
    # Without a GPU the library still loads (the CUDA runtime starts on the first step).
    listed = subprocess.run([str(exe), "--list"], check=True, capture_output=True, text=True)
    names = listed.stdout.split()
    assert names == [v.name(cstep.heuristic(v.d_state, v.headdim, v.rank)) for v in DEFAULT_SET]
    library = native.NativeLibrary(str(lib))
    assert len(library.variants) == len(DEFAULT_SET)
    assert all(library.has(v) for v in DEFAULT_SET)
    other = DEFAULT_SET[0].__class__(**{**DEFAULT_SET[0].__dict__, "nheads": 12})
    assert not library.has(other)


@needs_dsl
@needs_tools
def test_backend_native_path_reports(built, monkeypatch):
    monkeypatch.setenv("MAMBA3_KERNELS_CUTE_PATH", "native")
    monkeypatch.setenv("MAMBA3_KERNELS_NATIVE_LIB", str(built / native.LIB_NAME))
    b = CuteBackend()
    assert b.path_info()["path"] == "native"
    assert b.unsupported_reason(problem(128, 64)) is None  # in the set (H=8, G=2, SISO bf16)
    odd = problem(128, 64)
    odd = Problem(**{**odd.__dict__, "nheads": 12})
    assert "prebuilt library has no kernel" in b.unsupported_reason(odd)
