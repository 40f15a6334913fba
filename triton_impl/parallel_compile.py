"""First calls compile all their kernels at once.

A call's kernels are compiled by Triton on their first launch, one after the other: the
forward's three kernels, the backward's six. Triton's compile pipeline releases the GIL (MLIR
passes, LLVM, ptxas), and ``triton.AsyncCompileMode`` runs ``warmup`` compiles on an executor, so
a first call can compile them side by side and wait for the slowest rather than the sum
(docs/performance.md, "First calls compile in parallel": the sm_90 builds of the SISO backward's six
kernels took 6-8 s one after the other and 5-6 s side by side on a 2-core machine; more cores
leave the slowest kernel as the bound). Everything here only ever compiles
earlier what the launches would compile anyway; a failure leaves the kernel to its launch, which
compiles it (and reports its error) as before.

* ``compile_launches``: the kernels of a launch plan (chunk_fwd), from the call's argument
  table, before its first launches.
* ``compile_only`` + ``run_kernel``: the backward launches its kernels from several functions,
  each allocating what the next one reads; inside ``compile_only()``, ``run_kernel`` queues the
  kernel's compile instead of launching it, so one dry run of the backward (its results dropped)
  queues every kernel with the specializations of the real run.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import triton

from . import direct_launch

__all__ = ["ENV_SERIAL", "available", "compile_launches", "compile_only", "run_kernel"]

_ASYNC = getattr(triton, "AsyncCompileMode", None)  # Triton >= 3.4
ENV_SERIAL = "MAMBA3_KERNELS_SERIAL_COMPILE"
_MAX_WORKERS = 8
# Inside compile_only(), in this thread (or task) only: run_kernel queues compiles.
_DRY_RUN: contextvars.ContextVar[bool] = contextvars.ContextVar("mamba3_dry_run", default=False)


def available() -> bool:
    """Whether kernels compile side by side here: a Triton with AsyncCompileMode, not its
    interpreter, and not switched off (``MAMBA3_KERNELS_SERIAL_COMPILE=1``: every kernel at its
    launch, as Triton does by itself; for comparing, or for reading one compile error at a time)."""
    return (
        _ASYNC is not None
        and os.environ.get("TRITON_INTERPRET", "0") != "1"
        and os.environ.get(ENV_SERIAL, "0") != "1"
    )


@contextlib.contextmanager
def _async_compiles(n: int) -> Iterator[None]:
    workers = max(1, min(n, os.cpu_count() or 1, _MAX_WORKERS))
    # ignore_errors: a kernel that fails to compile is left to its launch, which says why.
    with ThreadPoolExecutor(workers) as pool, _ASYNC(pool, ignore_errors=True):
        yield


def compile_launches(launches: Sequence, table: Sequence, workers: int | None = None) -> None:
    """Compile, side by side (on up to ``workers`` threads), the kernels of ``launches``
    (launch.Launch) not yet compiled or tried, with the call's argument table ``table``
    (tensors, as their launches take them)."""
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


def run_kernel(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` (past a launch's first, without Triton's argument
    binder: direct_launch); inside ``compile_only()`` only its compile is queued."""
    if _DRY_RUN.get():
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        direct_launch.launch(kernel, grid, args, kwargs)


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
