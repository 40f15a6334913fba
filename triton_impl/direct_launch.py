"""Kernel launches that skip Triton's argument binder after the first one (the backward's).

``kernel[grid](*args, **kwargs)`` binds every argument and works out its specialisation on each
call (tens of microseconds for the backward's 20-30 argument kernels, docs/performance.md); a
training call makes eight such launches. Here a launch is keyed by what Triton specialises a
compiled kernel on, worked out in a few tuple entries per argument, and every launch after the
first of its key hands that compiled kernel raw addresses through Triton's launcher directly (as
launch.py does for the forward's launch plans). The key is at least as fine as Triton's own:

* a tensor: its dtype and whether its address is 16-byte aligned;
* an integer: whether it equals 1, whether 16 divides it, whether it fits 32 bits;
* a bool, a float, None: their type;
* the keyword arguments (compile-time arguments and launch options): their values;
* the device of the first argument.

So a hit can only map to the kernel Triton itself would have picked; anything else (a grid
given as a function, an argument of another type, an interpreter run) takes Triton's launcher.
"""

from __future__ import annotations

import warnings

import torch

from .step import _hooks

__all__ = ["launch"]

_ENABLED = [True]  # switched off for good if this Triton's launcher has another signature
_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_MAX_ENTRIES = 512
# key -> (run, function, packed metadata, compiled kernel, compile-time tail)
_CACHE: dict[tuple, tuple] = {}
_INT32 = 2**31


def _arg_key(a) -> object:
    """What Triton's specialisation of a runtime argument depends on (see the module docstring);
    None for an argument this module does not handle."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, not a.data_ptr() & 15)
    if isinstance(a, bool):
        return "b"
    if isinstance(a, int):
        return (a == 1, not a % 16, -_INT32 <= a < _INT32)
    if isinstance(a, float):
        return "f"
    if a is None:
        return "n"
    return None


def _direct(args: tuple) -> bool:
    """Whether a launch may skip the binder: its first argument is a CUDA tensor (a module-level
    name, so that a CPU test can point it at its stand-in launches)."""
    return _ENABLED[0] and isinstance(args[0], torch.Tensor) and args[0].is_cuda


def launch(kernel, grid: tuple, args: tuple, kwargs: dict) -> None:
    """``kernel[grid](*args, **kwargs)``, through the compiled kernel's launcher directly when a
    launch of the same key has run before. grid: 1 to 3 ints."""
    if not _direct(args) or not isinstance(grid, tuple):
        kernel[grid](*args, **kwargs)
        return
    spec = tuple(_arg_key(a) for a in args)
    if None in spec:
        kernel[grid](*args, **kwargs)
        return
    device = args[0].get_device()
    key = (kernel, device, spec, *kwargs.items())
    hit = _CACHE.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **kwargs)
        names = kernel.arg_names[len(args) :]
        if compiled is not None and all(n in kwargs for n in names):
            if len(_CACHE) >= _MAX_ENTRIES:
                _CACHE.clear()
            run = compiled.run  # initialises the module handles; then .function is set
            tail = tuple(kwargs[n] for n in names)
            _CACHE[key] = (run, compiled.function, compiled.packed_metadata, compiled, tail)
        return
    run, function, packed, compiled, tail = hit
    # Raw addresses, not tensors: Triton's launcher asks the driver about every tensor it is
    # given; integers pass through.
    flat = (*(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args), *tail)
    gx, gy, gz = (*grid, 1, 1)[:3]
    stream = _current_stream(device)
    enter, leave = _hooks()
    try:
        meta = None if enter is None else compiled.launch_metadata(grid, stream, *flat)
        run(gx, gy, gz, stream, function, packed, meta, enter, leave, *flat)
    except (TypeError, AttributeError) as e:  # a Triton whose launcher differs
        _ENABLED[0] = False
        _CACHE.clear()
        warnings.warn(f"direct launch unavailable ({e}); using Triton's launcher", stacklevel=3)
        kernel[grid](*args, **kwargs)
