"""The CuTe DSL backend object: the decode step on Hopper, just in time or from a prebuilt library.

Two ways to the same kernels (step_kernel.py):
- "jit": nvidia-cutlass-dsl is installed; a kernel is compiled on first use and cached on disk
  across processes (jit.py); tuned configs apply.
- "native": no DSL, but libmamba3_native (CMakeLists.txt) is found (native.py); it holds the
  exported kernel set (export.DEFAULT_SET) with each variant's default config.
``MAMBA3_KERNELS_CUTE_PATH=jit`` or ``=native`` forces one. ``path_info()`` says which serves.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from mamba3_kernels.backend import (
    Backend,
    KernelSpec,
    packed_inner,
    size_reason,
    wide_state_reason,
)
from mamba3_kernels.inputs import ScanInputs
from mamba3_kernels.problem import Problem
from mamba3_kernels.state import Mamba3State

from . import step as _step

SUPPORTED_N = (64, 128, 256)
SUPPORTED_P = (32, 64, 128)
SUPPORTED_R = (1, 2, 4, 8)
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_INT32_MAX = 2**31 - 1


def _dsl_installed() -> bool:
    try:
        return importlib.util.find_spec("cutlass") is not None and (
            importlib.util.find_spec("cutlass.cute") is not None
        )
    except (ImportError, ValueError):
        return False


class CuteBackend(Backend):
    def __init__(self) -> None:
        super().__init__(name="cute", priority=10, kernels=[_step.SPEC], has_backward=False)
        self._path: str | None = None
        self._path_reason: str | None = None
        self._library = None
        self._runners: dict[tuple, Any] = {}

    # --- which path serves ---------------------------------------------------------------
    def _resolve(self) -> None:
        if self._path is not None or self._path_reason is not None:
            return
        from . import native

        forced = os.environ.get("MAMBA3_KERNELS_CUTE_PATH", "").strip().lower()
        if forced not in ("", "jit", "native"):
            self._path_reason = f"MAMBA3_KERNELS_CUTE_PATH={forced!r} is not 'jit' or 'native'"
            return
        if forced in ("", "jit") and _dsl_installed():
            self._path = "jit"
            return
        if forced == "jit":
            self._path_reason = "MAMBA3_KERNELS_CUTE_PATH=jit but nvidia-cutlass-dsl is missing"
            return
        lib = native.find_library()
        if lib is None:
            where = ", ".join(native.candidate_paths())
            self._path_reason = (
                "neither nvidia-cutlass-dsl (pip install 'mamba3-kernels[cute]') nor a prebuilt "
                f"{native.LIB_NAME} (cmake -S . -B build && cmake --build build; looked in "
                f"{where}) is available"
            )
            return
        try:
            self._library = native.NativeLibrary(lib)
        except OSError as e:
            self._path_reason = f"{lib} does not load: {e}"
            return
        self._path = "native"

    def path_info(self) -> dict:
        """{"path": "jit" | "native" | None, "detail": library path, DSL version or why not}."""
        self._resolve()
        if self._path == "jit":
            import cutlass

            return {"path": "jit", "detail": f"nvidia-cutlass-dsl {cutlass.__version__}"}
        if self._path == "native":
            n = len(self._library.variants)
            return {"path": "native", "detail": f"{self._library.path} ({n} kernels)"}
        return {"path": None, "detail": self._path_reason}

    def detail(self) -> str | None:
        info = self.path_info()
        return None if info["path"] is None else f"{info['path']}: {info['detail']}"

    def unavailable_reason(self) -> str | None:
        self._resolve()
        if self._path is None:
            return self._path_reason
        if not torch.cuda.is_available():
            return f"no CUDA GPU (path {self._path}: {self.path_info()['detail']})"
        major, _ = torch.cuda.get_device_capability()
        if major != 9:
            name = torch.cuda.get_device_name()
            return f"built for Hopper (sm_90a); this GPU ({name}) is sm_{major}x"
        return None

    def unsupported_reason(self, problem: Problem) -> str | None:
        if not problem.decode:
            return "prefill (scan) is not in this version of the cute backend: decode steps only"
        if problem.device_type != "cuda":
            return f"tensors on {problem.device_type}; cute needs CUDA"
        if problem.pooled:
            return "state_indices (a state pool) is not supported by the cute step"
        reason = wide_state_reason(problem)
        if reason is not None:
            return reason
        if problem.dtype not in _DTYPES:
            return f"dtype {problem.dtype} (cute runs bf16, fp16, fp32)"
        reason = size_reason(problem, SUPPORTED_N, SUPPORTED_P, SUPPORTED_R)
        if reason is not None:
            return reason
        reason = _step.constraint(problem, _step.default_config(problem), None)
        if reason is not None:
            return f"step: {reason}"
        self._resolve()
        if self._path == "native":
            variant = self.variant(problem)
            if not self._library.has(variant):
                name = variant.name(_step.default_config(problem))
                return (
                    f"the prebuilt library has no kernel {name} (install nvidia-cutlass-dsl to "
                    "compile it, or add it to the export's variants)"
                )
        return None

    def all_kernels(self) -> list[KernelSpec]:
        return self.kernels

    # --- the step -------------------------------------------------------------------------
    @staticmethod
    def variant(problem: Problem) -> _step.Variant:
        # MIMO requires mimo_v, and mimo_z whenever z is given (validated).
        return _step.variant_of(problem, _DTYPES[problem.dtype], problem.mimo,
                                problem.mimo and problem.has_z)  # fmt: skip

    def _runner(self, variant: _step.Variant, config: _step.StepConfig):
        key = (variant, config if self._path == "jit" else None)
        runner = self._runners.get(key)
        if runner is None:
            if self._path == "jit":
                from .jit import JitRunner

                runner = JitRunner(variant, config)
            else:
                from .native import NativeRunner

                runner = NativeRunner(self._library, variant)
            self._runners[key] = runner
        return runner

    def step(self, problem: Problem, inputs: ScanInputs, state: Mamba3State, configs=None,
             out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """One decode step in one launch; ``state`` is updated in place. Returns out (B, H, P)
        or (B, R, H, P) (written into ``out`` when given and contiguous)."""
        self._resolve()
        if self._path is None:
            raise RuntimeError(f"cute backend unavailable: {self._path_reason}")
        config = (configs or {}).get("step") or _step.default_config(problem)
        q, k, v, adt, dt, trap, qb, kb, ang, d, z, mv, mz, mo = inputs[:14]
        for name, t in zip(Mamba3State._fields, state, strict=True):
            if not t.is_contiguous():
                raise ValueError(f"state.{name}: the cute step needs a contiguous state")
        if state.ssm.data_ptr() % 16:
            raise ValueError("state.ssm: the cute step needs a 16-byte aligned state matrix")
        # Per-step tensors: packed inner axes (else copied); coefficients and parameters fp32.
        q, k, v, z = (
            t if t is None or packed_inner(t) else t.contiguous() for t in (q, k, v, z)
        )
        adt, dt, trap, ang = (
            t.float() if t.dtype != torch.float32 else (t if packed_inner(t) else t.contiguous())
            for t in (adt, dt, trap, ang)
        )
        qb, kb, d, mv, mz, mo = (
            None if t is None else t.to(torch.float32).contiguous()
            for t in (qb, kb, d, mv, mz, mo)
        )
        shape = _step_output_shape(problem)
        target = None
        if out is not None and not out.is_contiguous():
            target, out = out, None
        if out is None:
            out = torch.empty(shape, dtype=v.dtype, device=v.device)
        pv = v.data_ptr()
        ptrs = [
            q.data_ptr(), k.data_ptr(), pv, pv if z is None else z.data_ptr(), adt.data_ptr(),
            dt.data_ptr(), trap.data_ptr(), qb.data_ptr(), kb.data_ptr(), ang.data_ptr(),
            pv if d is None else d.data_ptr(), pv if mv is None else mv.data_ptr(),
            pv if mz is None else mz.data_ptr(), pv if mo is None else mo.data_ptr(),
            *(t.data_ptr() for t in state), out.data_ptr(),
        ]  # fmt: skip
        strides = [
            0 if t is None else (t.stride(0) if t.shape[0] > 1 else t[0].numel())
            for t in (q, k, v, z, adt, dt, trap, ang)
        ]
        if max(strides) > _INT32_MAX:
            raise ValueError("a per-step input's batch stride does not fit in int32")
        if problem.batch > 0:
            stream = torch.cuda.current_stream(v.device).cuda_stream
            with torch.cuda.device(v.device):
                self._runner(self.variant(problem), config)(ptrs, problem.batch, strides, stream)
        if target is not None:
            target.copy_(out)
            return target
        return out


def _step_output_shape(problem: Problem) -> tuple[int, ...]:
    b, h, p = problem.batch, problem.nheads, problem.headdim
    if problem.mimo and not problem.has_mimo_o:
        return (b, problem.rank, h, p)
    return (b, h, p)
