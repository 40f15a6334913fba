"""Pick the backend and its kernel configs for a validated call.

An explicit backend name that cannot run the call fails loudly with the reason; ``"auto"`` (or the
``MAMBA3_KERNELS_BACKEND`` override) takes the highest-priority backend that can, falling back to
the reference. Choices and configs are memoized per :class:`Problem`: the hot path is dict hits.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .backend import BACKEND_NAMES, Backend, is_registered, registered_backends
from .problem import Problem

ENV_BACKEND = "MAMBA3_KERNELS_BACKEND"

_choice_cache: dict[tuple[Problem, str], Backend] = {}
_config_cache: dict[tuple[str, Problem, str], dict[str, Any]] = {}


def why_not(backend: Backend, problem: Problem) -> str | None:
    """The reason ``backend`` cannot run ``problem`` here, or None when it can."""
    return backend.unavailable_reason() or backend.unsupported_reason(problem)


def _requested(name: str) -> str:
    if name == "auto":
        return os.environ.get(ENV_BACKEND, "auto") or "auto"
    return name


def choose_backend(problem: Problem, backend: str = "auto") -> Backend:
    """The backend that runs ``problem``; ValueError for an unknown or unusable explicit name."""
    key = (problem, _requested(backend))
    hit = _choice_cache.get(key)
    if hit is not None and is_registered(hit):  # the registry may have changed since
        return hit
    name = key[1]
    backends = registered_backends()
    if name != "auto":
        if name not in BACKEND_NAMES:
            raise ValueError(f"backend: expected one of {('auto',) + BACKEND_NAMES}, got {name!r}")
        chosen = backends.get(name)
        if chosen is None:
            raise ValueError(f"backend: {name!r} is not registered in this installation")
        reason = why_not(chosen, problem)
        if reason is not None:
            raise ValueError(f"backend: {name!r} cannot run this call: {reason}")
    else:
        ranked = sorted(backends.values(), key=lambda b: -b.priority)
        chosen = next(
            b
            for b in ranked
            if b.name == "reference" or (b.auto_eligible(problem) and why_not(b, problem) is None)
        )
    _choice_cache[key] = chosen
    return chosen


def kernel_configs(backend: Backend, problem: Problem, mode: str) -> dict[str, Any]:
    """Tuned configs (kernel name -> config) for this GPU and problem bucket; kernels with no tuned
    entry are left out and use their own heuristic."""
    key = (backend.name, problem, mode)
    hit = _config_cache.get(key)
    if hit is not None:
        return hit
    configs: dict[str, Any] = {}
    if problem.device_type == "cuda" and backend.name != "reference":
        try:
            from . import tuned_configs
        except ImportError:  # the store is optional: heuristics then
            tuned_configs = None
        if tuned_configs is not None:
            kernels = getattr(backend, "all_kernels", lambda: backend.kernels)()
            device_name = torch.cuda.get_device_name()
            for spec in kernels:
                if spec.mode == mode and spec.applies(problem):
                    cfg = tuned_configs.lookup(backend.name, spec, problem, device_name)
                    if cfg is not None:
                        configs[spec.name] = cfg
    _config_cache[key] = configs
    return configs


# Plans by Problem identity (the validation memo hands back the same Problem for a repeated call
# signature, and hashing a Problem by value costs ~1 us): each entry holds its Problem, which keeps
# the id from being reused and lets a hit be confirmed with ``is``.
_plan_cache: dict[tuple[int, str, str], tuple[Problem, tuple[Backend, dict[str, Any]]]] = {}
_PLAN_CACHE_MAX = 256


def plan(problem: Problem, backend: str, mode: str) -> tuple[Backend, dict[str, Any]]:
    """The backend and its kernel configs for one call, in one memoized lookup (the hot path)."""
    # The env override is read on every call of "auto".
    key = (id(problem), _requested(backend) if backend == "auto" else backend, mode)
    hit = _plan_cache.get(key)
    if hit is not None and hit[0] is problem and is_registered(hit[1][0]):
        return hit[1]
    chosen = choose_backend(problem, backend)
    if len(_plan_cache) >= _PLAN_CACHE_MAX:
        _plan_cache.clear()
    result = (chosen, kernel_configs(chosen, problem, mode))
    _plan_cache[key] = (problem, result)
    return result


def clear_caches() -> None:
    """Forget memoized choices and configs (after registering a backend or new config files)."""
    _choice_cache.clear()
    _config_cache.clear()
    _plan_cache.clear()
