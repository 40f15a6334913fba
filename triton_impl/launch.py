"""Every kernel launch of the Triton backend, and the compiles of a call's first launches.

Triton's launcher, ``kernel[grid](*args, **kwargs)``, binds and specialises every argument on
every call: tens of microseconds per launch with this many arguments (the forward makes up to
three launches per call, a training call's backward eight, the decode step one of 36 arguments),
which bound short calls by the host. Here the first launch of each specialisation goes through
Triton's launcher, which compiles the kernel and returns it; later launches hand that compiled
kernel raw addresses through its own launcher (``run_compiled``). What the compiled kernel was
specialised on must then be fixed by the caller's key, in one of two ways:

* launch plans (chunk_fwd's prefill plans, the decode step's): a :class:`Launch` describes one
  launch of a call signature once (kernel, grid, which entry of the call's argument table each
  pointer is, the trailing integers, the compile-time arguments, the launch options). The
  plan's owner keys it on sizes, dtypes, flags and options; ``launch_all`` checks the pointers'
  16-byte alignment per call. The decode step's hot path calls ``Launch.run_direct`` itself.
* ``run_kernel(kernel, grid, *args, **kwargs)`` (the backward's kernels, the rotary, angle and
  gate passes): each call keyed by what Triton specialises a compiled kernel on, a few tuple
  entries per argument: a tensor's dtype and whether its address is 16-byte aligned; an
  integer's being 1, divisible by 16, within 32 bits; the type of a bool, a float, None; the
  keyword arguments' values (compile-time arguments, launch options); the first argument's
  device. The key is at least as fine as Triton's own, so a hit can only map to the kernel
  Triton itself would have picked; anything else (a grid given as a function, an argument of
  another type, an interpreter run) takes Triton's launcher.

A call's first launches compile their kernels side by side: Triton's compile pipeline releases
the GIL (MLIR passes, LLVM, ptxas) and ``triton.AsyncCompileMode`` runs ``warmup`` compiles on
an executor, so a first call waits for its slowest kernel rather than the sum of them
(docs/performance.md, "Host time"). ``compile_launches`` takes a launch plan's kernels, from the
call's argument table, before its first launches; inside ``compile_only()``, ``run_kernel``
queues its kernel's compile instead of launching it, so one dry run of the backward (whose
launches come from several functions, each allocating what the next one reads; its results are
dropped) queues every kernel with the specialisations of the real run. Only what the launches
would compile anyway is compiled earlier; a failure leaves the kernel to its launch, which
compiles it (and reports its error) as before.

A Triton whose compiled-kernel launcher takes other arguments switches the direct launches off
for good (with a warning): every launch then goes through Triton's launcher.
"""

from __future__ import annotations

import contextlib
import contextvars
import operator
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import reduce
from operator import or_

import torch
import triton
from triton import knobs

__all__ = [
    "ENV_SERIAL", "Launch", "available", "cdiv", "compile_launches", "compile_only",
    "interpreting", "launch_all", "launch_generic", "run_kernel",
]  # fmt: skip

_ENABLED = [True]  # direct launches; switched off for good if this Triton's launcher differs
# The raw handle of a device's current CUDA stream (absent from CPU builds of torch, where only
# the interpreter launches; a module-level name, so a CPU benchmark of the host path can stub it).
_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (triton.cdiv is a JIT function: slow to call from Python)."""
    return -(-a // b)


# os.environ's own mapping and the encoded name and value: a dict lookup per interpreting() call
# (os.environ.get encodes the name and decodes the value on every call).
try:
    _ENVIRON = os.environ._data
    _INTERPRET_KEY = os.environ.encodekey("TRITON_INTERPRET")
    _ONE = os.environ.encodevalue("1")
except AttributeError:  # (an os.environ without them)
    _ENVIRON = None


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (TRITON_INTERPRET=1), read on every call:
    the launch plans key on it, and the kernels' constants follow it (the interpreter has no
    16-bit dots or hardware math)."""
    if _ENVIRON is not None:
        return _ENVIRON.get(_INTERPRET_KEY) == _ONE
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# Triton's launcher, and the compiled kernel's own
# --------------------------------------------------------------------------------------------


def _launch_generic(kernel, grid: tuple, args: Sequence, consts: dict, options: dict):
    """Triton's own launch, ``kernel[grid](*args, **consts, **options)``: binds and specialises
    every argument (compiling on first use) and returns the compiled kernel. A module-level
    name, so that tests can record it and a CPU benchmark can stub it."""
    return kernel[grid](*args, **consts, **options)


def _hooks() -> tuple:
    """Triton's launch enter and exit hooks, None where there is nothing to call. Newer Tritons
    keep a HookChain there even when no hook is installed; handing the launcher an empty chain
    would cost a launch-metadata build (and two calls into the chain) on every launch for nothing.
    """
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    if enter is not None and not getattr(enter, "calls", True):
        enter = None
    if leave is not None and not getattr(leave, "calls", True):
        leave = None
    return enter, leave


def _keep(compiled) -> tuple:
    """What a direct launch needs of a compiled kernel: (run, function, packed metadata,
    compiled)."""
    run = compiled.run  # initialises the module handles; then .function is set
    return (run, compiled.function, compiled.packed_metadata, compiled)


def run_compiled(kept: tuple, grid: tuple, grid3: tuple, device_index: int, args: tuple) -> bool:
    """One launch of a kept compiled kernel (_keep) on the current stream of the device: grid as
    the launch was given it, grid3 the same as three ints; args its runtime arguments (pointers
    as raw addresses, not tensors: Triton's launcher asks the driver about every tensor argument
    it is given, a driver call per pointer, and passes plain integers through), then the
    compile-time arguments in signature order. False where this Triton's launcher takes other
    arguments: direct launches are then off, and the caller goes through Triton's launcher."""
    run, function, packed, compiled = kept
    stream = _current_stream(device_index)
    enter, leave = _hooks()
    try:
        meta = None if enter is None else compiled.launch_metadata(grid, stream, *args)
        run(grid3[0], grid3[1], grid3[2], stream, function, packed, meta, enter, leave, *args)
        return True
    except (TypeError, AttributeError) as e:  # a Triton whose launcher differs
        _ENABLED[0] = False
        _CACHE.clear()
        warnings.warn(f"direct launch unavailable ({e}); using Triton's launcher", stacklevel=3)
        return False


# --------------------------------------------------------------------------------------------
# Launch plans
# --------------------------------------------------------------------------------------------


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
        # _keep's (run, function, packed metadata, compiled) after the first GPU launch.
        self.compiled = None
        self.tried = False  # whether compile_launches took this launch

    def generic(self, table: Sequence):
        """This launch through Triton's launcher, with tensors from ``table``; returns the
        compiled kernel."""
        return _launch_generic(
            self.kernel, self.grid, [*self.pick(table), *self.ints], self.consts, self.options
        )

    def run_direct(self, args: tuple, device_index: int) -> bool:
        """This launch through its kept compiled kernel (``compiled`` set): args the pointers'
        addresses in the kernel's order, then ``tail``. False (and ``compiled`` dropped) where
        the direct launch is unavailable."""
        if run_compiled(self.compiled, self.grid, self.grid3, device_index, args):
            return True
        self.compiled = None
        return False


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
    table = None
    for ln in launches:
        if ln.compiled is not None and aligned and _ENABLED[0]:
            if ln.run_direct((*ln.pick(ptrs), *ln.tail), device_index):
                continue
        if table is None:
            table = tensors()
            # A first call: its kernels compile side by side, then each launch finds its own.
            compile_launches(launches, table)
        compiled = ln.generic(table)
        if aligned and _ENABLED[0]:
            ln.compiled = _keep(compiled)


# --------------------------------------------------------------------------------------------
# Launches keyed per call (run_kernel)
# --------------------------------------------------------------------------------------------

_MAX_ENTRIES = 512
# key -> (_keep's tuple, the compile-time tail)
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


def _launch_keyed(kernel, grid: tuple, args: tuple, kwargs: dict) -> None:
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
            _CACHE[key] = (_keep(compiled), tuple(kwargs[n] for n in names))
        return
    kept, tail = hit
    flat = (*(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args), *tail)
    if not run_compiled(kept, grid, (*grid, 1, 1)[:3], device, flat):
        kernel[grid](*args, **kwargs)


def run_kernel(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` (past a launch's first, without Triton's argument
    binder); inside ``compile_only()`` only its compile is queued."""
    if _DRY_RUN.get():
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        _launch_keyed(kernel, grid, args, kwargs)


# --------------------------------------------------------------------------------------------
# First calls compile side by side
# --------------------------------------------------------------------------------------------

_ASYNC = getattr(triton, "AsyncCompileMode", None)  # Triton >= 3.4
ENV_SERIAL = "MAMBA3_KERNELS_SERIAL_COMPILE"
_MAX_WORKERS = 8
# Inside compile_only(), in this thread (or task) only: run_kernel queues compiles.
_DRY_RUN: contextvars.ContextVar[bool] = contextvars.ContextVar("mamba3_dry_run", default=False)


def available() -> bool:
    """Whether kernels compile side by side here: a Triton with AsyncCompileMode, not its
    interpreter, and not switched off (``MAMBA3_KERNELS_SERIAL_COMPILE=1``: every kernel at its
    launch, as Triton does by itself; for comparing, or for reading one compile error at a time)."""
    return _ASYNC is not None and not interpreting() and os.environ.get(ENV_SERIAL, "0") != "1"


@contextlib.contextmanager
def _async_compiles(n: int) -> Iterator[None]:
    workers = max(1, min(n, os.cpu_count() or 1, _MAX_WORKERS))
    # ignore_errors: a kernel that fails to compile is left to its launch, which says why.
    with ThreadPoolExecutor(workers) as pool, _ASYNC(pool, ignore_errors=True):
        yield


def compile_launches(launches: Sequence[Launch], table: Sequence, workers: int | None = None):
    """Compile, side by side (on up to ``workers`` threads), the kernels of ``launches`` not yet
    compiled or tried, with the call's argument table ``table`` (tensors, as their launches
    take them)."""
    pending = [ln for ln in launches if ln.compiled is None and not ln.tried]
    for ln in pending:
        ln.tried = True
    if len(pending) < 2 or not available():
        return
    try:
        with _async_compiles(workers or len(pending)):
            for ln in pending:
                ln.kernel.warmup(*ln.pick(table), *ln.ints, grid=ln.grid, **ln.consts,
                                 **ln.options)  # fmt: skip
    except Exception as e:  # the launches compile their kernels themselves
        warnings.warn(f"compiling a call's kernels in parallel failed ({e})", stacklevel=3)


@contextlib.contextmanager
def compile_only(n_kernels: int = _MAX_WORKERS) -> Iterator[None]:
    """Within the block (in this thread), ``run_kernel`` launches nothing: it queues each
    kernel's compile, and leaving the block waits for them all (side by side on up to
    ``n_kernels`` threads). What the kernels would have written stays unwritten: for dry runs
    whose results are dropped. Needs ``available()``; not nestable."""
    if not available():
        raise RuntimeError("compile_only needs triton.AsyncCompileMode and no interpreter")
    if _DRY_RUN.get():
        raise RuntimeError("compile_only is already active")
    with _async_compiles(n_kernels):
        token = _DRY_RUN.set(True)
        try:
            yield
        finally:
            _DRY_RUN.reset(token)
