"""The autotuner: finds the fastest correct config of every kernel on this GPU with Optuna.

Kernels are known only through their declared search spaces (``KernelSpec`` in
``mamba3_kernels.backend``). Run ``python -m mamba3_kernels.autotune --help``; from Python::

    from mamba3_kernels.autotune import Bucket, find_targets, open_storage, tune_target
"""

from .buckets import Bucket, default_buckets, layer_from_model, parse_shape
from .measure import Rejected, Runner, tolerance
from .space import Space, Target, find_targets

# The studies need optuna (the [tune] extra): they load on first use, so that the command line
# answers --help, and says in one line what to install, where optuna is missing.
_STUDY_NAMES = ("StudyResult", "open_storage", "summarize", "tune_target")


def __getattr__(name: str):
    if name in _STUDY_NAMES:
        from . import study

        return getattr(study, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
