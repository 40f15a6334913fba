"""The one small interface every backend implements, and the registry they join.

A backend declares, for a validated :class:`Problem`, whether it can run it (or why not), and
lists its kernels. Each kernel carries its tunable parameters as a config dataclass with a
default heuristic, a search space and constraints, so the autotuner can pass configs in and the
dispatcher can apply tuned ones without knowing any kernel by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .inputs import ScanInputs
from .problem import Problem
from .state import Mamba3State

# The call paths a kernel family can serve: an inference forward (``scan`` without autograd), a
# training call (the forward that a backward will follow, and that backward: tuned and timed as
# one), a decode step (``step``). Dispatch hands each path the configs of every family it uses.
MODES = ("inference", "training", "decode")


@dataclass(frozen=True)
class KernelSpec:
    """One tunable kernel of a backend.

    name:          unique within the backend, e.g. "chunk_fwd".
    modes:         the MODES whose calls run this family (its tuned configs are kept per mode:
                   one family may be tuned differently for inference and for training).
    config_cls:    a frozen dataclass of the tunable parameters: every choice the family makes,
                   the algorithm included, is a field of it.
    applies:       problem -> bool, whether this kernel runs for that problem.
    default:       problem -> config, the heuristic used when nothing is tuned.
    space:         problem -> {param: [candidate values]}, the search space.
    constraint:    (problem, config, device_props) -> reason the config is invalid, or None.
                   device_props is a dict (``device_properties()``) or None off-GPU.
    version:       the meaning of the config's fields; bump it when a field changes meaning (or a
                   tuned value would no longer be right): tuned entries of another version are
                   reported and skipped, whatever toolchain wrote them.
    """

    name: str
    modes: tuple[str, ...]
    config_cls: type
    applies: Callable[[Problem], bool]
    default: Callable[[Problem], Any]
    space: Callable[[Problem], dict[str, list]]
    constraint: Callable[[Problem, Any, dict | None], str | None] = lambda p, c, d: None
    version: int = 1

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if not self.modes or bad:
            raise ValueError(f"KernelSpec {self.name!r}: modes {self.modes} must be among {MODES}")

    def make_config(self, params: dict) -> Any:
        """Build a config from a dict, ignoring unknown keys (config files may be older)."""
        names = {f.name for f in dataclasses.fields(self.config_cls)}
        return self.config_cls(**{k: v for k, v in params.items() if k in names})


@dataclass
class Backend:
    """Base class of a backend. Subclasses override the methods they support.

    ``configs`` passed to scan/step/scan_backward maps kernel name -> config object; kernels
    missing from it use their default heuristic.
    """

    name: str = "base"
    priority: int = 0  # higher wins under backend="auto" when several support a call
    kernels: list[KernelSpec] = field(default_factory=list)
    has_backward: bool = False

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run on this machine at all (missing package, no GPU), or None."""
        return None

    def unsupported_reason(self, problem: Problem) -> str | None:
        """Why this backend cannot run this call, or None when it can."""
        return None

    def detail(self) -> str | None:
        """How this backend serves here when it is available (a build path, versions), for
        ``info``; None when there is nothing to say."""
        return None

    def auto_eligible(self, problem: Problem) -> bool:
        """Whether backend="auto" may pick this backend for ``problem`` (an explicit choice may
        still use it, e.g. Triton's interpreter on CPU tensors, which is for tests only)."""
        return True

    def scan(
        self, problem: Problem, inputs: ScanInputs, configs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, Mamba3State | None]:
        """Forward scan: out and the final state (None unless problem.return_final_state)."""
        raise NotImplementedError(f"backend {self.name!r} has no scan")

    def scan_for_backward(
        self, problem: Problem, inputs: ScanInputs, configs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, Mamba3State | None, Any]:
        """Forward scan of a call whose backward will run: scan's out and final state, plus a
        residual that this backend's scan_backward can reuse instead of recomputing it (a
        tensor, saved with the op's inputs, or any object, kept with the autograd node, of
        the backend's own meaning; or None; here: None)."""
        out, state = self.scan(problem, inputs, configs)
        return out, state, None

    def scan_backward(
        self,
        problem: Problem,
        inputs: ScanInputs,
        grad_out: torch.Tensor,
        grad_state: Mamba3State | None,
        configs: dict[str, Any] | None = None,
        residual: Any = None,
    ) -> dict[str, torch.Tensor | None]:
        """Gradients of the inputs (names of ScanInputs fields; initial_state as
        'initial_state.angle' etc.). Only called when has_backward is True. residual: what
        this backend's scan_for_backward returned for the same call, or None."""
        raise NotImplementedError(f"backend {self.name!r} has no backward")

    def step(
        self,
        problem: Problem,
        inputs: ScanInputs,
        state: Mamba3State,
        configs: dict[str, Any] | None = None,
        state_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One decode step: updates ``state`` in place and returns out (B, H, P) or (B, R, H, P).
        With ``state_indices`` (B,) (problem.pooled), ``state`` is a pool of slots and row b uses
        slot state_indices[b] (negative: a padding row, out zero); only passed to a backend whose
        unsupported_reason accepts pooled problems."""
        raise NotImplementedError(f"backend {self.name!r} has no step")

    def all_kernels(self) -> list[KernelSpec]:
        """Every kernel family of this backend (a backend may load its kernel modules lazily)."""
        return self.kernels

    def kernels_for(self, problem: Problem, mode: str) -> list[KernelSpec]:
        """The families a ``mode`` call of ``problem`` runs."""
        return [k for k in self.all_kernels() if mode in k.modes and k.applies(problem)]


def size_reason(problem: Problem, ns: tuple[int, ...], ps: tuple[int, ...],
                rs: tuple[int, ...]) -> str | None:  # fmt: skip
    """Why a backend whose kernels are built for d_state in ``ns``, headdim in ``ps`` and rank
    in ``rs`` cannot run ``problem`` (naming the size), or None."""
    for label, value, allowed in (("d_state N", problem.d_state, ns),
                                  ("headdim P", problem.headdim, ps),
                                  ("rank R", problem.rank, rs)):  # fmt: skip
        if value not in allowed:
            return f"{label}={value} not in {allowed}"
    return None


def wide_state_reason(problem: Problem) -> str | None:
    """Why a backend that keeps its state in fp32 (or fp64) cannot run ``problem``: a 16-bit
    ssm state; or None."""
    if problem.state_dtype in (torch.bfloat16, torch.float16):
        return f"ssm state in {str(problem.state_dtype).replace('torch.', '')} (needs fp32)"
    return None


def packed_inner(t: torch.Tensor) -> bool:
    """Whether every axis of ``t`` after the first is laid out contiguously (size-1 axes
    ignored): a kernel taking one batch stride can read it as it is."""
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:]), strict=True):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


_REGISTRY: dict[str, Backend] = {}
BACKEND_NAMES = ("reference", "triton", "tilelang", "cute")
# Called after the registry changes (the dispatcher drops its memoized choices).
_LISTENERS: list[Callable[[], None]] = []


def on_registry_change(fn: Callable[[], None]) -> None:
    """Call ``fn`` whenever a backend is registered or removed."""
    if fn not in _LISTENERS:
        _LISTENERS.append(fn)


def _changed() -> None:
    for fn in _LISTENERS:
        fn()


def register_backend(backend: Backend) -> Backend:
    """Add a backend to the registry (once; a second registration of a name is an error)."""
    if backend.name in _REGISTRY and _REGISTRY[backend.name] is not backend:
        raise ValueError(f"backend {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend
    _changed()
    return backend


def unregister_backend(name: str) -> Backend | None:
    """Remove a backend (tests, plugins); returns it, or None when it was not registered."""
    removed = _REGISTRY.pop(name, None)
    _changed()
    return removed


def is_registered(backend: Backend) -> bool:
    """Whether ``backend`` is the object registered under its name (memoized choices check it)."""
    return _REGISTRY.get(backend.name) is backend


def registered_backends() -> dict[str, Backend]:
    return dict(_REGISTRY)


def device_properties(device: torch.device | None = None) -> dict | None:
    """A plain dict of the CUDA device's limits (for kernel constraints), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    return {
        "name": props.name,
        "capability": (props.major, props.minor),
        "sm_count": props.multi_processor_count,
        "shared_memory_per_block_optin": getattr(props, "shared_memory_per_block_optin", 232448),
        "regs_per_multiprocessor": getattr(props, "regs_per_multiprocessor", 65536),
    }
