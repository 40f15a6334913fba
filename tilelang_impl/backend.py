"""The TileLang backend object: what this version runs, and which kernel serves which call."""

import functools
import importlib.util
import os
from typing import Any

import torch

from mamba3_kernels.backend import (
    Backend,
    KernelSpec,
    device_properties,
    size_reason,
    wide_state_reason,
)
from mamba3_kernels.inputs import ScanInputs
from mamba3_kernels.problem import Problem

SUPPORTED_N = (64, 128, 256)
SUPPORTED_P = (32, 64, 128)
SUPPORTED_R = (1, 2, 4, 8)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
INSTALL_HINT = "pip install 'mamba3-kernels[tilelang]'"


@functools.lru_cache(maxsize=1)
def _import_error() -> str | None:
    """Why ``import tilelang`` fails here, or None (tried once per process)."""
    if importlib.util.find_spec("tilelang") is None:
        return f"tilelang is not installed ({INSTALL_HINT})"
    try:
        import tilelang.env
    except Exception as exc:  # a broken install (e.g. a mismatched apache-tvm-ffi)
        return f"tilelang does not import ({type(exc).__name__}: {exc}; {INSTALL_HINT})"
    # TileLang builds each kernel with nvcc on first use (then loads it from its disk cache).
    home = getattr(tilelang.env, "CUDA_HOME", None)
    if not home or not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return "tilelang found no CUDA toolkit to build its kernels (nvcc; set CUDA_HOME)"
    return None


class TileLangBackend(Backend):
    """MIMO and SISO chunked prefill forwards in TileLang (chunk_fwd.py), inference only.

    Priority 10, below Triton's 20: ``backend="auto"`` takes it only where the tuner's backend
    record says it is faster for the call. Training calls through it run the reference backward
    (has_backward is False); decode steps are not served.
    """

    def __init__(self) -> None:
        super().__init__(name="tilelang", priority=10, kernels=[], has_backward=False)
        self._loaded = False

    # The kernel module is imported lazily (it imports tilelang itself only to build).
    def _load(self) -> None:
        if self._loaded:
            return
        from . import chunk_fwd

        self._chunk_fwd = chunk_fwd
        self.kernels = [chunk_fwd.SPEC]
        self._loaded = True

    def all_kernels(self) -> list[KernelSpec]:
        self._load()
        return self.kernels

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("tilelang") is None:
            return f"tilelang is not installed ({INSTALL_HINT})"
        if not torch.cuda.is_available():
            return "no CUDA GPU (tilelang kernels run on NVIDIA GPUs; sm_90 is what is tested)"
        return _import_error()

    def unsupported_reason(self, problem: Problem) -> str | None:
        if problem.decode:
            return "decode steps are not implemented in the tilelang backend yet"
        if problem.varlen:
            return "cu_seqlens (varlen) is not implemented in the tilelang backend yet"
        reason = wide_state_reason(problem)
        if reason is not None:
            return reason
        if problem.device_type != "cuda":
            return f"tensors on {problem.device_type}; tilelang needs CUDA"
        if problem.dtype not in SUPPORTED_DTYPES:
            return f"dtype {problem.dtype} (tilelang runs bf16 and fp16)"
        reason = size_reason(problem, SUPPORTED_N, SUPPORTED_P, SUPPORTED_R)
        if reason is not None:
            return reason
        major, _ = torch.cuda.get_device_capability()
        if major < 9:
            return f"compute capability {major}.x; the tilelang kernels target sm_90 (Hopper)"
        self._load()
        spec = self._chunk_fwd.SPEC
        reason = spec.constraint(problem, spec.default(problem), device_properties())
        return None if reason is None else f"{spec.name}: {reason}"

    def auto_eligible(self, problem: Problem) -> bool:
        return problem.device_type == "cuda"

    def scan(self, problem: Problem, inputs: ScanInputs, configs: dict[str, Any] | None = None):
        """Prefill forward without autograd: (out, final state or None)."""
        self._load()
        spec = self._chunk_fwd.SPEC
        cfg = (configs or {}).get(spec.name)
        if cfg is None:
            cfg = spec.default(problem)
        return self._chunk_fwd.chunk_fwd(problem, inputs, cfg)
