"""The autotuner: finds the fastest correct config of every kernel on this GPU with Optuna.

Kernels are known only through their declared search spaces (``KernelSpec`` in
``mamba3_kernels.backend``). Run ``python -m mamba3_kernels.autotune --help``; from Python::

    from mamba3_kernels.autotune import Bucket, find_targets, open_storage, tune_target
"""

from .buckets import Bucket, default_buckets, layer_from_model, parse_shape
from .measure import Rejected, Runner, tolerance
from .space import Space, Target, find_targets
from .study import StudyResult, open_storage, summarize, tune_target

__all__ = [
    "Bucket",
    "Rejected",
    "Runner",
    "Space",
    "StudyResult",
    "Target",
    "default_buckets",
    "find_targets",
    "layer_from_model",
    "open_storage",
    "parse_shape",
    "summarize",
    "tolerance",
    "tune_target",
]
