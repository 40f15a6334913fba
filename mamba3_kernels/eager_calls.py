"""Host-cheap eager calls of autograd Functions and torch.library custom ops.

Both are needed where torch.compile and functorch transforms (vmap, grad, vjp) reach the
backend: Functions in the ``setup_context`` style, kernels wrapped as custom ops so that a trace
sees them as opaque calls. In plain eager calls each costs Python work that does nothing there
(docs/performance.md, "Training-call host time"):

* ``Function.apply`` binds its arguments against ``inspect.signature(forward)`` on every call of
  a setup_context Function, to fill in defaults. With every argument given positionally to a
  forward without defaults there is nothing to fill; outside functorch transforms ``apply`` then
  only unwraps dead functorch wrappers and calls autograd's C ``apply``, which is what
  ``apply_positional`` does directly.
* A custom op's call goes through the dispatcher, torch's autograd wrapper for custom ops and
  its argument re-binding before it reaches the Python implementation. ``eager_custom_op``
  registers the op as ``torch.library.custom_op`` does and returns a callable that runs the
  implementation directly when nothing needs the op: grad mode off (the op has no autograd
  formula of its own; it is called inside Functions' forward and backward), not compiling, no
  functorch transform active.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

try:
    from torch._functorch.utils import unwrap_dead_wrappers
except ImportError:  # a torch without it: every call takes Function.apply
    unwrap_dead_wrappers = None

__all__ = ["apply_positional", "eager_custom_op", "EagerCustomOp"]

# Functions checked for a forward whose binding never changes positional arguments (no
# defaults, no keyword-only parameters): class -> (fixed argument count, takes *args), or None.
_SHAPES: dict[type, tuple[int, bool] | None] = {}


def _shape(fn: type[torch.autograd.Function]) -> tuple[int, bool] | None:
    if fn not in _SHAPES:
        params = list(inspect.signature(fn.forward).parameters.values())
        fixed = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
        plain = all(p.default is p.empty for p in fixed) and len(fixed) + varargs == len(params)
        _SHAPES[fn] = (len(fixed), varargs) if plain else None
    return _SHAPES[fn]


def apply_positional(fn: type[torch.autograd.Function], *args: Any) -> Any:
    """``fn.apply(*args)``, for a Function whose forward has no defaults to fill.

    Outside functorch transforms (vmap, grad, vjp: those need Function.apply's own path) and
    torch.compile's tracing, the call skips the signature binding and goes to autograd's C
    ``apply``. Any other call (a forward with defaults or keyword-only parameters, a wrong
    argument count) takes ``fn.apply`` unchanged.
    """
    if torch.compiler.is_compiling():  # a trace wants Function.apply (Dynamo knows it)
        return fn.apply(*args)
    shape = _shape(fn)
    if (
        shape is None
        or unwrap_dead_wrappers is None
        or torch._C._are_functorch_transforms_active()
        or not (len(args) == shape[0] or (shape[1] and len(args) > shape[0]))
    ):
        return fn.apply(*args)
    # The C apply of torch._C._FunctionBase, bound to fn (Function.apply's own final step).
    return super(torch.autograd.Function, fn).apply(*unwrap_dead_wrappers(args))


def _needs_op() -> bool:
    return (
        torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
    )


class EagerCustomOp:
    """A functional torch.library custom op (``op``) and its Python implementation (``impl``).

    Calling it calls the op where anything needs the op (see the module docstring) and the
    implementation otherwise; ``register_fake`` registers the op's fake implementation."""

    def __init__(self, name: str, impl: Callable) -> None:
        self.op = torch.library.custom_op(name, impl, mutates_args=())
        self.impl = impl
        self.register_fake = self.op.register_fake

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if unwrap_dead_wrappers is None or _needs_op():
            return self.op(*args, **kwargs)
        # Tensors saved under a functorch transform that has ended (a Function's backward run by
        # torch.func.vjp's vjp_fn) are dead wrappers: the dispatcher would unwrap them for the
        # op; the implementation gets the tensors inside.
        args = unwrap_dead_wrappers(args)
        if kwargs:
            kwargs = dict(zip(kwargs, unwrap_dead_wrappers(tuple(kwargs.values())), strict=True))
        return self.impl(*args, **kwargs)


def eager_custom_op(name: str) -> Callable[[Callable], EagerCustomOp]:
    """Decorator: ``torch.library.custom_op(name, mutates_args=())`` (functional ops only: a
    mutating op's calls need the op's bookkeeping) whose plain eager calls skip the dispatcher."""
    return lambda impl: EagerCustomOp(name, impl)
