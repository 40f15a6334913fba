"""What to tune: (backend, kernel, bucket) targets and their search spaces, read from the kernels'
declarations only (``KernelSpec.space/constraint/default/make_config``); no kernel is known here
by name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from mamba3_kernels.backend import Backend, KernelSpec, registered_backends
from mamba3_kernels.problem import Problem

from .buckets import Bucket

_PRIMITIVE = (bool, int, float, str, type(None))

# Which call paths (modes) a bucket kind exercises.
KIND_MODES = {"scan": ("inference", "training"), "step": ("decode",)}


def all_kernels(backend: Backend) -> list[KernelSpec]:
    """The backend's kernel families (a backend may load its kernel modules lazily)."""
    return list(backend.all_kernels())


@dataclass
class Space:
    """A kernel's search space for one problem, as Optuna categorical choices.

    Optuna stores categorical choices as primitives; other values (tuples...) are stored under
    their repr and mapped back through ``values``.
    """

    choices: dict[str, list]  # param -> labels given to Optuna
    values: dict[str, dict]  # param -> label -> value

    @classmethod
    def build(cls, space: dict[str, list], default_params: dict[str, Any]) -> Space:
        choices, values = {}, {}
        for name, vals in space.items():
            vals = list(vals)
            # The default is always a candidate, so the tuned config can only match or beat it.
            if name in default_params and default_params[name] not in vals:
                vals.append(default_params[name])
            labels = [v if isinstance(v, _PRIMITIVE) else repr(v) for v in vals]
            choices[name] = labels
            values[name] = dict(zip(labels, vals, strict=True))
        return cls(choices, values)

    @property
    def size(self) -> int:
        return math.prod(len(v) for v in self.choices.values())

    def label(self, name: str, value: Any) -> Any:
        return value if isinstance(value, _PRIMITIVE) else repr(value)

    def labels_of(self, params: dict[str, Any]) -> dict[str, Any]:
        return {k: self.label(k, v) for k, v in params.items() if k in self.choices}

    def decode(self, labels: dict[str, Any]) -> dict[str, Any]:
        return {k: self.values[k][v] for k, v in labels.items()}

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of labels (only sensible when ``size`` is small)."""
        combos: list[dict[str, Any]] = [{}]
        for name, labels in self.choices.items():
            combos = [{**c, name: lab} for c in combos for lab in labels]
        return combos


@dataclass
class Target:
    """One study: a kernel family of a backend, on one call path (mode), at a bucket. It is
    timed through the mode's entry point (``Backend.scan``, ``scan_for_backward`` plus
    ``scan_backward``, or ``step``), with the other families' configs as dispatch hands them."""

    backend: Backend
    kernel: KernelSpec
    bucket: Bucket
    problem: Problem
    mode: str

    @property
    def bucket_key(self) -> str:
        return self.problem.bucket_key()

    def study_name(self, gpu_slug: str) -> str:
        return f"{gpu_slug}/{self.backend.name}/{self.kernel.name}/{self.mode}/{self.bucket_key}"

    def default_config(self, problem: Problem | None = None) -> Any:
        return self.kernel.default(problem or self.problem)

    def default_params(self) -> dict[str, Any]:
        cfg = self.default_config()
        return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)

    def space(self) -> Space:
        defaults = self.default_params()
        space = self.kernel.space(self.problem)
        return Space.build(space, {k: v for k, v in defaults.items() if k in space})

    def make_config(self, params: dict[str, Any]) -> Any:
        """Config from tuned params; parameters outside the space keep their heuristic value."""
        return self.kernel.make_config({**self.default_params(), **params})


def find_targets(
    buckets: list[Bucket],
    device_type: str,
    backends: list[str] | None = None,
    kernels: list[str] | None = None,
    modes: list[str] | None = None,
) -> tuple[list[Target], list[str]]:
    """Targets to tune, and the reasons others were skipped (for --dry-run and the log).

    Every registered backend with kernels is considered (import ``mamba3_kernels`` first so the
    backends register); ``backends``/``kernels``/``modes`` filter by name.
    """
    targets: list[Target] = []
    skipped: list[str] = []
    for name, backend in sorted(registered_backends().items()):
        if backends is not None and name not in backends:
            continue
        why = backend.unavailable_reason()
        if why is not None:
            skipped.append(f"{name}: {why}")
            continue
        try:
            specs = all_kernels(backend)
        except Exception as e:  # a backend whose kernels fail to load must not stop the others
            skipped.append(f"{name}: kernels failed to load: {type(e).__name__}: {e}")
            continue
        for bucket in buckets:
            problem = bucket.problem(device_type)
            unsupported = backend.unsupported_reason(problem)
            for mode in KIND_MODES[bucket.kind]:
                if modes is not None and mode not in modes:
                    continue
                if mode == "training" and not backend.has_backward:
                    continue
                # The family that leads the mode first (its config picks the path the others
                # serve: chunk_fwd's for an inference forward); the others then time with it.
                for spec in sorted(specs, key=lambda k: k.modes[0] != mode):
                    if kernels is not None and spec.name not in kernels:
                        continue
                    if mode not in spec.modes or not spec.applies(problem):
                        continue
                    if unsupported is not None:
                        skipped.append(f"{name}/{spec.name} {bucket.describe()}: {unsupported}")
                        continue
                    targets.append(Target(backend, spec, bucket, problem, mode))
    return targets, skipped
