"""Pick the backend and its kernel configs for a validated call.

An explicit backend name that cannot run the call fails loudly with the reason; ``"auto"`` (or the
``MAMBA3_KERNELS_BACKEND`` override) takes the backend the tuner measured fastest for the call's
mode and bucket on this GPU (the config files' backend records) where that one can run it, else
the highest-priority backend that can, falling back to the reference. Each call path (mode: an
inference forward, a training call, a decode step) gets the tuned config of every kernel family it
runs. Choices and configs are memoized per :class:`Problem`: the hot path is dict hits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

from . import tuned_configs
from .backend import (
    BACKEND_NAMES,
    MODES,
    Backend,
    is_registered,
    on_registry_change,
    registered_backends,
)
from .problem import Problem

ENV_BACKEND = "MAMBA3_KERNELS_BACKEND"

# (backend, family) -> config fields pinned by pin(): applied over the tuned or default config.
_pinned: dict[tuple[str, str], dict[str, Any]] = {}
_choice_cache: dict[tuple[Problem, str, str | None], Backend] = {}
_config_cache: dict[tuple[str, Problem, str], dict[str, Any]] = {}


def why_not(backend: Backend, problem: Problem) -> str | None:
    """The reason ``backend`` cannot run ``problem`` here, or None when it can."""
    return backend.unavailable_reason() or backend.unsupported_reason(problem)


def _requested(name: str) -> str:
    if name == "auto":
        return os.environ.get(ENV_BACKEND, "auto") or "auto"
    return name


def choose_backend(problem: Problem, backend: str = "auto", mode: str | None = None) -> Backend:
    """The backend that runs a ``mode`` call of ``problem`` (None: the tuner's records are not
    consulted); ValueError for an unknown or unusable explicit name."""
    key = (problem, _requested(backend), mode)
    hit = _choice_cache.get(key)
    if hit is not None and is_registered(hit):  # the registry may have changed since
        return hit
    name = key[1]
    backends = registered_backends()
    if name != "auto":
        if name not in BACKEND_NAMES and name not in backends:
            known = ("auto",) + tuple(dict.fromkeys((*BACKEND_NAMES, *backends)))
            raise ValueError(f"backend: expected one of {known}, got {name!r}")
        chosen = backends.get(name)
        if chosen is None:
            raise ValueError(f"backend: {name!r} is not registered in this installation")
        reason = why_not(chosen, problem)
        if reason is not None:
            raise ValueError(f"backend: {name!r} cannot run this call: {reason}")
    else:
        ranked = sorted(backends.values(), key=lambda b: -b.priority)
        eligible = [
            b
            for b in ranked
            if b.name == "reference" or (b.auto_eligible(problem) and why_not(b, problem) is None)
        ]
        chosen = eligible[0]
        if mode is not None and len(eligible) > 1:
            fastest = tuned_configs.backend_choice(problem, mode, _device(problem))
            chosen = next((b for b in eligible if b.name == fastest), chosen)
    _choice_cache[key] = chosen
    return chosen


def _device(problem: Problem) -> str:
    return tuned_configs.device_name(problem.device_type)


def kernel_configs(backend: Backend, problem: Problem, mode: str) -> dict[str, Any]:
    """Tuned configs (kernel name -> config) of every kernel family a ``mode`` call of
    ``problem`` runs on ``backend``, for this GPU (or, on CPU tensors, the files tuned under the
    interpreter) and the call's bucket; families with no usable tuned entry are left out and use
    their own heuristic."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    key = (backend.name, problem, mode)
    hit = _config_cache.get(key)
    if hit is not None:
        return hit
    configs: dict[str, Any] = {}
    if backend.name != "reference":
        device = _device(problem)
        for spec in backend.kernels_for(problem, mode):
            cfg = tuned_configs.lookup(backend.name, spec, problem, mode, device)
            fields = _pinned.get((backend.name, spec.name))
            if fields:
                cfg = dataclasses.replace(cfg if cfg is not None else spec.default(problem),
                                          **fields)  # fmt: skip
            if cfg is not None:
                configs[spec.name] = cfg
    _config_cache[key] = configs
    return configs


def pin(backend: str, family: str, **fields: Any) -> None:
    """Fix config fields of one kernel family for every later call of this process, over the
    tuned or heuristic config (e.g. ``pin("triton", "chunk_bwd", record_forward=0)``: training
    forwards through the fused kernels, which keep less activation memory). Unknown fields are
    a TypeError at once."""
    spec = _family(backend, family)
    names = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise TypeError(
            f"{backend}/{family} has no config field {unknown}; fields: {sorted(names)}"
        )
    _pinned[(backend, family)] = {**_pinned.get((backend, family), {}), **fields}
    clear_caches()


def unpin(backend: str, family: str) -> None:
    """Drop what pin() fixed for this family."""
    _pinned.pop((backend, family), None)
    clear_caches()


@contextlib.contextmanager
def pinned(backend: str, family: str, **fields: Any) -> Iterator[None]:
    """pin() for the body of a ``with`` block (the family's earlier pins come back after it)."""
    before = dict(_pinned.get((backend, family), {}))
    pin(backend, family, **fields)
    try:
        yield
    finally:
        _pinned[(backend, family)] = before
        if not before:
            del _pinned[(backend, family)]
        clear_caches()


def _family(backend: str, family: str):
    chosen = registered_backends().get(backend)
    if chosen is None:
        raise ValueError(f"backend: {backend!r} is not registered")
    specs = {k.name: k for k in chosen.all_kernels()}
    if family not in specs:
        raise ValueError(f"{backend!r} has no kernel family {family!r}; it has {sorted(specs)}")
    return specs[family]


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
    chosen = choose_backend(problem, backend, mode)
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


on_registry_change(clear_caches)
