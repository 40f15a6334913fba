"""The prebuilt path of the CuTe backend: libmamba3_native (CMakeLists.txt) through ctypes.

Used where nvidia-cutlass-dsl is not installed. The library holds the kernels exported ahead of
time (export.DEFAULT_SET, each with its default config) behind native/mamba3_native.h. It is
looked for at ``$MAMBA3_KERNELS_NATIVE_LIB``, then in ``cute_impl/lib/`` (``cmake --install``),
then in ``build/`` at the root of a source checkout.
"""

from __future__ import annotations

import ctypes
import os

from .step import POINTER_ARGS, STRIDE_ARGS, Variant

LIB_NAME = "libmamba3_native.so"
ABI_VERSION = 1
_HERE = os.path.dirname(os.path.abspath(__file__))
_DESC_FIELDS = (
    "nheads", "ngroups", "rank", "d_state", "headdim", "n_angles", "interleaved", "has_D",
    "has_z", "has_mimo_v", "has_mimo_z", "has_mimo_o", "dtype",
)  # fmt: skip
_DTYPE_CODES = {"bf16": 0, "fp16": 1, "fp32": 2}


class StepDesc(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in _DESC_FIELDS]


class StepArgs(ctypes.Structure):
    _fields_ = (
        [(name, ctypes.c_void_p) for name in POINTER_ARGS]
        + [("batch", ctypes.c_int32)]
        + [(f"stride_{name}", ctypes.c_int32) for name in STRIDE_ARGS]
    )


def candidate_paths() -> list[str]:
    env = os.environ.get("MAMBA3_KERNELS_NATIVE_LIB")
    if env:
        return [env]
    return [os.path.join(_HERE, "lib", LIB_NAME), os.path.join(os.path.dirname(_HERE), "build",
                                                                LIB_NAME)]  # fmt: skip


def find_library() -> str | None:
    for path in candidate_paths():
        if os.path.isfile(path):
            return path
    return None


def _desc(variant: Variant) -> StepDesc:
    return StepDesc(
        variant.nheads, variant.ngroups, variant.rank, variant.d_state, variant.headdim,
        variant.n_angles, int(variant.interleaved), int(variant.has_D), int(variant.has_z),
        int(variant.has_mimo_v), int(variant.has_mimo_z), int(variant.has_mimo_o),
        _DTYPE_CODES[variant.dtype],
    )  # fmt: skip


class NativeLibrary:
    """The loaded library: its variant table and step handles."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        lib.mamba3_native_abi_version.restype = ctypes.c_int
        version = lib.mamba3_native_abi_version()
        if version != ABI_VERSION:
            raise OSError(f"{path}: ABI version {version}, expected {ABI_VERSION}")
        lib.mamba3_native_variant_count.restype = ctypes.c_int
        lib.mamba3_native_variant.argtypes = [
            ctypes.c_int, ctypes.POINTER(StepDesc), ctypes.POINTER(ctypes.c_char_p)
        ]  # fmt: skip
        lib.mamba3_step_create.argtypes = [
            ctypes.POINTER(StepDesc), ctypes.POINTER(ctypes.c_void_p)
        ]  # fmt: skip
        lib.mamba3_step_run.argtypes = [ctypes.c_void_p, ctypes.POINTER(StepArgs), ctypes.c_void_p]
        lib.mamba3_step_name.argtypes = [ctypes.c_void_p]
        lib.mamba3_step_name.restype = ctypes.c_char_p
        lib.mamba3_step_destroy.argtypes = [ctypes.c_void_p]
        lib.mamba3_last_error.restype = ctypes.c_char_p
        self.path = path
        self.lib = lib
        self.variants: dict[tuple, str] = {}
        for i in range(lib.mamba3_native_variant_count()):
            desc, name = StepDesc(), ctypes.c_char_p()
            if lib.mamba3_native_variant(i, ctypes.byref(desc), ctypes.byref(name)) == 0:
                key = tuple(getattr(desc, f) for f in _DESC_FIELDS)
                self.variants[key] = name.value.decode()

    def has(self, variant: Variant) -> bool:
        d = _desc(variant)
        return tuple(getattr(d, f) for f in _DESC_FIELDS) in self.variants

    def error(self) -> str:
        return self.lib.mamba3_last_error().decode(errors="replace")


class NativeRunner:
    """One step handle of the library (its kernel loaded on every device)."""

    def __init__(self, library: NativeLibrary, variant: Variant) -> None:
        self.library = library
        handle = ctypes.c_void_p()
        desc = _desc(variant)
        if library.lib.mamba3_step_create(ctypes.byref(desc), ctypes.byref(handle)) != 0:
            raise RuntimeError(f"mamba3_step_create: {library.error()}")
        self.handle = handle
        self.name = library.lib.mamba3_step_name(handle).decode()
        self._args = StepArgs()
        self._run = library.lib.mamba3_step_run

    def __call__(self, ptrs, batch: int, strides, stream: int) -> None:
        a = self._args
        for name, p in zip(POINTER_ARGS, ptrs, strict=True):
            setattr(a, name, p)
        a.batch = batch
        for name, s in zip(STRIDE_ARGS, strides, strict=True):
            setattr(a, f"stride_{name}", s)
        if self._run(self.handle, ctypes.byref(a), stream) != 0:
            raise RuntimeError(f"mamba3_step_run: {self.library.error()}")

    def __del__(self) -> None:
        try:
            self.library.lib.mamba3_step_destroy(self.handle)
        except Exception:  # interpreter shutdown
            pass
