"""Stubs shared by the CPU host-time scripts (host_time_step.py, host_time_scan.py).

They let a CPU-only machine time what Python does for one eager Triton call, on CPU tensors,
along the branches a CUDA call takes. Import this module after setting the environment (it
imports triton): the scripts set ``TRITON_INTERPRET=1`` (the Triton backend accepts CPU tensors
only under its interpreter) and unset ``MAMBA3_KERNELS_CHECK_VALUES`` first.

What is stubbed, and why (a CUDA call takes these branches; CPU tensors would take others):

* the launcher itself: the compiled kernel's ``run`` (Triton's C launcher, which would hand the
  pointers to the driver) is ``itertools.chain``, a C call that takes any arguments and does
  nothing with them; the first launch through Triton's binder (``launch._launch_generic``,
  which every launch plan's first launch goes through) is replaced by one that returns a fake
  compiled kernel carrying that ``run``. Not counted: the C launcher's own argument parsing and
  the driver's launch (a few us per launch on the GPU hosts).
* the launch plans' ``on_gpu`` flag is set (``force_gpu_plans``), so that calls take the
  direct-launch branch a CUDA call takes rather than the interpreter's (the scripts check that
  the timed call reaches it); ``torch._C._cuda_getCurrentRawStream`` (absent from CPU torch;
  ``launch._current_stream``) returns 0.
* the value-range check decision (``validate._check_values_enabled``) is asked about a CUDA
  device, so that it takes the GPU branch (off unless ``MAMBA3_KERNELS_CHECK_VALUES=1``), with
  ``torch.cuda.is_current_stream_capturing`` returning False. CPU calls would check the values
  on every call (a host-side reduction) instead. The wrapper doing this adds one Python call
  (~0.2 us) to every timed call.
* outputs and scratch buffers are allocated on the CPU. For small blocks that costs about what
  the CUDA caching allocator costs on the host (~2-4 us); blocks of megabytes glibc would map
  and unmap on every call (~20 us each for the MIMO (8, 2048) buffers), which the caching
  allocator does not do, so ``cache_cpu_allocations`` (host_time_scan.py calls it) restarts
  the script with glibc told to keep freed memory (``MALLOC_*`` variables below).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from mamba3_kernels.triton_impl import chunk_fwd as cf
from mamba3_kernels.triton_impl import launch as tlaunch
from mamba3_kernels.triton_impl import step as tstep

from mamba3_kernels import validate

# glibc's allocator keeps freed blocks of any size for reuse, as CUDA's caching allocator does:
# no block is mmap'd (each would be mapped and unmapped per call), the heap is never trimmed.
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def cache_cpu_allocations() -> None:
    """Restart this script with MALLOC_ENV set (glibc reads it at process start), unless set."""
    if all(os.environ.get(k) == val for k, val in MALLOC_ENV.items()):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})


class FakeCompiled:
    """Stands in for Triton's compiled kernel: ``run`` takes the launch arguments, does nothing."""

    run = staticmethod(itertools.chain)  # a C callable accepting any positional arguments
    function = None
    packed_metadata = None

    def launch_metadata(self, *args):  # only called when a launch-enter hook is installed
        return None


def install_stubs() -> None:
    """Patch the launches and the CUDA-only queries as described in the module docstring."""
    fake = FakeCompiled()
    tlaunch._launch_generic = lambda *args, **kwargs: fake
    torch._C._cuda_getCurrentRawStream = lambda index: 0
    tlaunch._current_stream = torch._C._cuda_getCurrentRawStream  # its own reference to it
    torch.cuda.is_current_stream_capturing = lambda: False
    cuda = torch.device("cuda", 0)
    enabled = validate._check_values_enabled
    # Asked with a device or a device type (the argument's kind differs between versions).
    validate._check_values_enabled = lambda dev: enabled(
        cuda if isinstance(dev, torch.device) else "cuda"
    )


def force_gpu_plans() -> None:
    """Make the launch plans built so far (decode step and prefill) take the CUDA branch."""
    for plan in tstep._PLANS.values():
        plan.on_gpu = True
    for plan in cf._PLANS.values():
        plan.on_gpu = True


def best_us(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """Best over ``repeats`` of the mean time of ``calls`` back-to-back calls, in microseconds."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def report_best_median(out: dict, times: dict[str, list[float]], json_path: str | None) -> None:
    """Print each label's best and median host time (us) of its repeats, record them in
    ``out['us_per_call']`` and write ``out`` to ``json_path`` when given."""
    width = max(len(k) for k in times)
    print(f"{'call':{width}} {'best us':>9} {'median us':>10}")
    for label, v in times.items():
        best, med = min(v), statistics.median(v)
        out["us_per_call"][label] = {"best": round(best, 1), "median": round(med, 1)}
        print(f"{label:{width}} {best:9.1f} {med:10.1f}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1)


def run_info(calls: int, repeats: int) -> dict:
    """What every host-time JSON records about its run: repeat counts and the software/CPU."""
    return {
        "calls": calls,
        "repeats": repeats,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "us_per_call": {},
    }
