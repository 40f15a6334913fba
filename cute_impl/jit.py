"""The just-in-time path of the CuTe backend: compile on first use, cached in memory and on disk.

A kernel (variant + config) is compiled by the DSL the first time a process needs it, then
exported (``export_to_c``: an object file with the embedded cubin) into the cache folder under
a key of the kernel's source, the variant, the config, the DSL version and the architecture;
another process loads that object instead of compiling (``cute.runtime.load_module``).

The cache folder is ``$MAMBA3_KERNELS_CUTE_CACHE``, else ``~/.cache/mamba3_kernels/cute``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import threading

from .step import POINTER_ARGS, StepConfig, Variant

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = ("step.py", "step_kernel.py", "jit.py")
_LOCK = threading.Lock()
_LOADED: dict[tuple, object] = {}


def cache_dir() -> str:
    return os.environ.get("MAMBA3_KERNELS_CUTE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "mamba3_kernels", "cute"
    )


def source_digest() -> str:
    """A digest of the kernel's source files (a change of any of them recompiles)."""
    h = hashlib.sha256()
    for name in _SOURCES:
        with open(os.path.join(_HERE, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def target_arch() -> str:
    """CUTE_DSL_ARCH where set, else the current GPU's (sm_90a for a Hopper)."""
    arch = os.environ.get("CUTE_DSL_ARCH")
    if arch:
        return arch
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}{'a' if major >= 9 else ''}"


def cache_key(variant: Variant, config: StepConfig, arch: str) -> str:
    import cutlass

    text = repr(
        (
            source_digest(), dataclasses.astuple(variant), dataclasses.astuple(config),
            getattr(cutlass, "__version__", "?"), arch,
        )
    )  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _load_object(path: str, prefix: str):
    import cutlass.cute as cute

    return getattr(cute.runtime.load_module(path), prefix)


def get_kernel(variant: Variant, config: StepConfig):
    """The callable compiled kernel of (variant, config): from memory, the disk cache, or the
    compiler (then stored). Its arguments are step.POINTER_ARGS as DSL pointers, the batch,
    the batch strides and a CUstream."""
    arch = target_arch()
    mem_key = (variant, config, arch)
    fn = _LOADED.get(mem_key)
    if fn is not None:
        return fn
    with _LOCK:
        fn = _LOADED.get(mem_key)
        if fn is not None:
            return fn
        prefix = variant.name(config)
        key = cache_key(variant, config, arch)
        folder = cache_dir()
        obj = os.path.join(folder, f"{prefix}-{key}.o")
        fn = None
        if os.path.isfile(obj):
            try:
                fn = _load_object(obj, prefix)
            except Exception:  # a damaged or foreign file: compile again and replace it
                fn = None
        if fn is None:
            from .step_kernel import compile_variant

            fn = compile_variant(variant, config)
            _store(fn, folder, obj, prefix)
        _LOADED[mem_key] = fn
        return fn


def _store(fn, folder: str, obj: str, prefix: str) -> None:
    """Export ``fn`` into the cache (atomically: written aside, then renamed into place)."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            fn.export_to_c(file_path=tmp, file_name=prefix, function_prefix=prefix)
            os.replace(os.path.join(tmp, prefix + ".o"), obj)
    except OSError:
        pass  # an unwritable cache only costs a compile in the next process


class JitRunner:
    """Launches one compiled kernel through the DSL's runtime."""

    def __init__(self, variant: Variant, config: StepConfig) -> None:
        import cuda.bindings.driver as cuda
        import cutlass
        import cutlass.cute as cute
        from cutlass.cute.runtime import make_ptr

        self.fn = get_kernel(variant, config)
        dtype = {"bf16": cutlass.BFloat16, "fp16": cutlass.Float16, "fp32": cutlass.Float32}[
            variant.dtype
        ]
        from .step import DTYPE_POINTERS, pointer_align

        self._types = [
            (dtype if n in DTYPE_POINTERS else cutlass.Float32, pointer_align(n, variant.dtype))
            for n in POINTER_ARGS
        ]
        self._make_ptr = make_ptr
        self._gmem = cute.AddressSpace.gmem
        self._stream = cuda.CUstream

    def __call__(self, ptrs, batch: int, strides, stream: int) -> None:
        mk, gmem = self._make_ptr, self._gmem
        args = [
            mk(t, p, gmem, assumed_align=a) for (t, a), p in zip(self._types, ptrs, strict=True)
        ]
        self.fn(*args, batch, *strides, self._stream(stream))
