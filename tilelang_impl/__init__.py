"""TileLang backend: chunked prefill forwards for SISO and MIMO (``backend="tilelang"``).

Registered once on import of :mod:`mamba3_kernels`. Runs on CUDA tensors (built for sm_90);
importing this package does not import tilelang, which is loaded when a kernel is first built.
"""

from .backend import TileLangBackend

__all__ = ["TileLangBackend"]
