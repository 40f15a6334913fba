"""Timers: median milliseconds of a callable on CUDA (``triton.testing.do_bench``) or CPU
(``time.perf_counter``), back-to-back loop timing, CUDA graph capture, and the machine's copy and
matmul rates that define the floor."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(
    fn: Callable[[], object],
    device: torch.device,
    grad_to_none: Sequence[torch.Tensor] | None = None,
    cpu_budget_s: float = 0.3,
    cpu_max_reps: int = 50,
) -> float:
    """Median time of one ``fn()`` call in ms.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each call, median).
    CPU: ``perf_counter`` around each call after two warm-up calls, until ``cpu_budget_s`` or
    ``cpu_max_reps`` (at least 3 calls).
    """
    if device.type == "cuda":
        import triton.testing

        return float(
            triton.testing.do_bench(
                fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"
            )
        )
    for _ in range(2):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (
        len(times) < cpu_max_reps and time.perf_counter() - start < cpu_budget_s
    ):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def loop_ms(
    fn: Callable[[], object], device: torch.device, calls: int = 100, repeats: int = 5
) -> float:
    """Per-call time of ``calls`` back-to-back calls with one sync at the end (median of
    ``repeats``): what a simple generate loop pays, host launch overhead included."""
    fn()
    sync(device)
    per_call = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        per_call.append((time.perf_counter() - t0) / calls)
    return 1e3 * statistics.median(per_call)


def capture_graph(fn: Callable[[], object], warmup: int = 3) -> torch.cuda.CUDAGraph:
    """Capture ``fn`` in a CUDA graph after warm-up calls on a side stream (so lazy
    initialisation, allocator growth and compilation happen outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def l2_bytes(device: torch.device) -> int:
    """L2 cache size of the GPU (0 on CPU, where inputs are not rotated)."""
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 50 * 2**20))


def rotation_count(nbytes: int, device: torch.device, cap: int = 16) -> int:
    """How many distinct input copies to cycle through so that consecutive calls do not find
    their inputs in L2: enough copies to cover three L2 sizes, at most ``cap``."""
    l2 = l2_bytes(device)
    if l2 == 0 or nbytes <= 0 or nbytes >= 3 * l2:
        return 1
    return max(1, min(cap, -(-3 * l2 // nbytes)))


def measure_rates(device: torch.device, quick: bool = False) -> dict:
    """The machine's copy rate (GB/s, read + write counted) and matmul rate (TFLOP/s).

    CUDA: a 1 GiB device-to-device copy and an 8192^3 bf16 matmul. CPU: a 64 MiB copy and a
    1024^3 (quick: 512^3) fp32 matmul (bf16 matmuls are not representative on CPU).
    """
    if device.type == "cuda":
        n_copy = (2**30 if not quick else 2**26) // 4
        n_mm, mm_dtype = (8192 if not quick else 2048), torch.bfloat16
    else:
        n_copy, n_mm, mm_dtype = 2**24, (1024 if not quick else 512), torch.float32
    torch.manual_seed(0)
    src = torch.randn(n_copy, device=device)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device)
    a = torch.randn(n_mm, n_mm, device=device).to(mm_dtype)
    b = torch.randn(n_mm, n_mm, device=device).to(mm_dtype)
    mm_ms = median_ms(lambda: a @ b, device)
    copy_bytes = 2 * src.numel() * src.element_size()
    rates = {
        "copy_gbps": copy_bytes / (copy_ms * 1e-3) / 1e9,
        "matmul_tflops": 2 * n_mm**3 / (mm_ms * 1e-3) / 1e12,
        "copy_bytes": copy_bytes,
        "matmul_n": n_mm,
        "matmul_dtype": str(mm_dtype).replace("torch.", ""),
    }
    return rates
