"""Backends whose kernels are not in this release yet: listed by ``info()`` with the reason."""

from __future__ import annotations

from .backend import Backend


class PlannedBackend(Backend):
    """A named backend that is registered (so ``info()`` lists it) but has no kernels yet."""

    def __init__(self, name: str, plan: str) -> None:
        super().__init__(name=name, priority=-1)
        self.plan = plan

    def unavailable_reason(self) -> str | None:
        return f"not implemented in this release ({self.plan})"

