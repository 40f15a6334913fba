"""Low-overhead kernel launches for the prefill kernels.

Triton's launcher binds and specialises every argument on every call (tens of microseconds per
launch with this many arguments); the chunk-parallel forward makes three launches per call, so
short calls were bound by the host. A launch plan (chunk_fwd._Plan) describes each launch of a
call signature once, as a :class:`Launch`: the kernel, its grid, which entry of the call's
argument table each runtime argument is, the trailing integers and the compile-time arguments.
The first GPU launch of each goes through Triton's launcher, which compiles and returns the
kernel; later launches hand that compiled kernel raw pointers directly (the decode step does the
same in step.py). What the compiled kernel was specialised on must then be fixed by the plan's
key (sizes, dtypes, flags, launch options: the plan's owner keys it so) or checked per call (the
pointers' 16-byte alignment, here).
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Sequence
from functools import reduce
from operator import or_

import torch

from .parallel_compile import compile_launches
from .step import _hooks

__all__ = ["Launch", "cdiv", "launch_all", "launch_generic"]

_DIRECT = [True]  # switched off for good if this Triton's launcher has another signature
# The raw handle of a device's current CUDA stream (absent from CPU builds of torch, where only
# the interpreter launches; a module-level name, so a CPU benchmark of the host path can stub it).
_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (triton.cdiv is a JIT function: slow to call from Python)."""
    return -(-a // b)


def _launch_generic(kernel, grid: tuple, args: list, consts: dict, options: dict):
    """Triton's own launch, ``kernel[grid](*args, **consts, **options)``: binds and specialises
    every argument (compiling on first use) and returns the compiled kernel. A module-level
    name, so that tests can record it and a CPU benchmark can stub it."""
    return kernel[grid](*args, **consts, **options)


class Launch:
    """One kernel launch of a launch plan, worked out once.

    kernel: the @triton.jit function; grid: its grid (1 to 3 ints); slots: for each pointer
    argument, in the kernel's order, its index in the call's argument table (tensors, or their
    addresses on the direct path); ints: the integer arguments that follow the pointers;
    consts: every compile-time argument by name (they follow the integers in the signature);
    options: launch options (num_warps, ...). ``compiled`` is set after the first GPU launch.
    """

    __slots__ = ("kernel", "grid", "grid3", "slots", "pick", "ints", "consts", "options", "tail",
                 "compiled", "tried")  # fmt: skip

    def __init__(
        self,
        kernel,
        grid: Sequence[int],
        slots: Sequence[int],
        ints: Sequence[int],
        consts: dict,
        options: dict,
    ) -> None:
        if len(slots) < 2:  # itemgetter of one index returns the item, not a 1-tuple
            raise ValueError("a Launch needs at least two pointer arguments")
        names = kernel.arg_names[len(slots) + len(ints) :]
        if sorted(names) != sorted(consts):
            raise ValueError(
                f"{kernel.fn.__name__}: compile-time arguments {sorted(consts)} are not the "
                f"signature's trailing arguments {names}"
            )
        self.kernel = kernel
        self.grid = tuple(grid)
        self.grid3 = (*self.grid, 1, 1)[:3]
        self.slots = tuple(slots)
        self.pick = operator.itemgetter(*self.slots)
        self.ints = tuple(ints)
        self.consts = dict(consts)
        self.options = dict(options)
        # What follows the pointers in Triton's launcher call: the integers, then the
        # compile-time arguments in signature order (as its binder orders them).
        self.tail = (*self.ints, *(self.consts[n] for n in names))
        # (run, function, packed metadata, compiled kernel) after the first GPU launch.
        self.compiled = None
        self.tried = False  # whether parallel_compile.compile_launches took this launch

    def generic(self, table: Sequence):
        """This launch through Triton's launcher, with tensors from ``table``; returns the
        compiled kernel."""
        return _launch_generic(
            self.kernel, self.grid, [*self.pick(table), *self.ints], self.consts, self.options
        )


def launch_generic(launches: Sequence[Launch], table: Sequence) -> None:
    """Every launch through Triton's launcher (the interpreter's path: CPU tensors)."""
    for ln in launches:
        ln.generic(table)


def launch_all(
    launches: Sequence[Launch],
    ptrs: Sequence[int],
    tensors: Callable[[], Sequence],
    device_index: int,
) -> None:
    """Run ``launches`` in order on the GPU: each through its compiled kernel with raw
    addresses once known, else through Triton's launcher (which compiles it; kept when every
    pointer is 16-byte aligned).

    ptrs: the call's argument table as addresses; tensors: builds the same table as tensors
    (entry i's ``data_ptr()`` is ptrs[i]), called only when a launch needs Triton's launcher.
    """
    # The compiled kernels assume 16-byte aligned pointers; other calls go through the binder.
    aligned = not reduce(or_, ptrs) & 15
    stream = enter = leave = None
    if aligned and _DIRECT[0]:
        stream = _current_stream(device_index)
        enter, leave = _hooks()
    table = None
    for ln in launches:
        compiled = ln.compiled
        if compiled is not None and aligned and _DIRECT[0]:
            run, function, packed, kernel = compiled
            # Raw addresses, not tensors: Triton's launcher asks the driver about every tensor
            # argument it is given (a driver call per pointer), plain integers it passes through.
            args = (*ln.pick(ptrs), *ln.tail)
            gx, gy, gz = ln.grid3
            try:
                meta = None if enter is None else kernel.launch_metadata(ln.grid, stream, *args)
                run(gx, gy, gz, stream, function, packed, meta, enter, leave, *args)
                continue
            except (TypeError, AttributeError) as e:  # a Triton whose launcher differs
                _DIRECT[0] = False
                ln.compiled = None
                warnings.warn(
                    f"direct launch unavailable ({e}); using Triton's launcher", stacklevel=3
                )
        if table is None:
            table = tensors()
            # A first call: its kernels compile side by side, then each launch finds its own.
            compile_launches(launches, table)
        compiled = ln.generic(table)
        if aligned and _DIRECT[0]:
            run = compiled.run  # initialises the module handles; then .function is set
            ln.compiled = (run, compiled.function, compiled.packed_metadata, compiled)
