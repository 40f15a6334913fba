"""Triton backend: chunked prefill and decode for SISO and MIMO (``backend="triton"``).

Registered once on import of :mod:`mamba3_kernels`. Runs on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1`` (small shapes, for CI).
"""

from .backend import TritonBackend

__all__ = ["TritonBackend"]
