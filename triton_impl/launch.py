"""Low-overhead kernel launches for the prefill kernels.

Triton's launcher binds and specialises every argument on every call (tens of microseconds per
launch with this many arguments); the chunk-parallel forward makes three launches per call, so
short calls were bound by the host. After the first launch of a call signature, the compiled
kernel is kept and later launches hand it raw pointers directly (the decode step does the same
in step.py). The cache key must hold everything Triton specialises on: the caller passes the
problem and config (sizes, dtypes, flags, launch options) and the compile-time arguments; the
pointers' 16-byte alignment is checked here on every call.
"""

from __future__ import annotations

import warnings

import torch
from triton import knobs

__all__ = ["launch", "cdiv"]

_CACHE: dict[tuple, tuple] = {}
_CACHE_MAX = 512
_DIRECT = [True]  # switched off for good if this Triton's launcher has another signature


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (triton.cdiv is a JIT function: slow to call from Python)."""
    return -(-a // b)


def launch(kernel, key: tuple, grid: tuple, args: list, consts: dict, options: dict) -> None:
    """``kernel[grid](*args, **consts, **options)``, through the cached compiled kernel when
    ``key`` (hashable; with ``consts`` it must determine Triton's specialisation) was seen.

    args: the runtime arguments in signature order (tensors and ints); consts: the
    compile-time arguments by name (any order).
    """
    first = args[0]
    if not (_DIRECT[0] and isinstance(first, torch.Tensor) and first.is_cuda):
        kernel[grid](*args, **consts, **options)
        return
    is_tensor = [isinstance(a, torch.Tensor) for a in args]
    ptrs = [a.data_ptr() if t else a for a, t in zip(args, is_tensor, strict=True)]
    aligned = all(p % 16 == 0 for p, t in zip(ptrs, is_tensor, strict=True) if t)
    dtypes = tuple(a.dtype for a, t in zip(args, is_tensor, strict=True) if t)
    full_key = (kernel.fn.__name__, first.get_device(), key, dtypes, tuple(consts.items()))
    entry = _CACHE.get(full_key) if aligned else None
    if entry is not None:
        compiled, run, function, packed, names = entry
        stream = torch._C._cuda_getCurrentRawStream(first.get_device())
        full = (*ptrs, *(consts[n] for n in names))
        gx, gy, gz = (*grid, 1, 1)[:3]
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        try:
            meta = None if enter is None else compiled.launch_metadata(grid, stream, *full)
            run(gx, gy, gz, stream, function, packed, meta, enter, leave, *full)
            return
        except (TypeError, AttributeError) as e:  # a Triton whose launcher differs
            _DIRECT[0] = False
            _CACHE.clear()
            warnings.warn(f"direct launch unavailable ({e}); using Triton's launcher", stacklevel=2)
    compiled = kernel[grid](*args, **consts, **options)
    if aligned and _DIRECT[0]:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        names = kernel.arg_names[len(args) :]
        run = compiled.run  # initialises the module handles; then .function is set
        _CACHE[full_key] = (compiled, run, compiled.function, compiled.packed_metadata, names)
