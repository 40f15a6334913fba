"""CuTe DSL backend: the Mamba-3 decode step for Hopper (``backend="cute"``).

Registered once on import of :mod:`mamba3_kernels`. Importing this package imports neither the
DSL nor the prebuilt library: the first step (or ``CuteBackend.path_info()``) picks the path,
just in time (nvidia-cutlass-dsl) or libmamba3_native (CMakeLists.txt, ``export.py``).
"""

from .backend import CuteBackend

__all__ = ["CuteBackend"]
