"""Benchmark harness: ``python -m mamba3_kernels.bench`` (see :mod:`.cli`).

Modules: :mod:`.shapes` (what to time), :mod:`.floor` (bytes and FLOPs of each call, the floor),
:mod:`.timing` (timers, CUDA graphs, machine rates), :mod:`.peers` (SDPA, Mamba-2, public
Mamba-3), :mod:`.runner` (rows), :mod:`.report` (table, JSON, Markdown, plots).
"""
