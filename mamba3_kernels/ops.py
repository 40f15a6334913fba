"""The registered ops: ``torch.ops.mamba3.scan`` (with autograd) and ``torch.ops.mamba3.step``.

Ops take flat tensors (a state is four tensors; absent optionals are None) so torch.library can
describe them. Their arguments are declared once, in schema.py (SCAN, SCAN_BWD, STEP): each op is
registered with the schema string made there, and its body, fake and autograd read its
arguments through it. They re-derive the Problem from shapes, pick the backend and run it.
Without a final state, the four state outputs are empty tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .dispatch import plan
from .eager_calls import apply_positional
from .inputs import ScanInputs
from .problem import Problem
from .schema import SCAN, SCAN_BWD, SCAN_OUTPUTS, STEP
from .state import Mamba3State
from .validate import check_op_inputs, describe

# Names of the differentiable inputs of mamba3::scan, in op-argument order.
GRAD_INPUTS = SCAN.grad_names
# The same inputs as Backend.scan_backward names them (ScanInputs fields, initial_state.<field>).
BACKEND_GRAD_KEYS = SCAN.grad_fields
_N = SCAN.n_tensors  # mamba3::scan's tensor arguments come first, its options after them
_N_OUT = len(SCAN_OUTPUTS)
_BACKEND = SCAN.names.index("backend")


def scan_args(problem: Problem, inputs: ScanInputs, backend: str) -> tuple:
    """mamba3::scan's arguments for a validated call (options in SCAN.options order)."""
    rfs, chunk_size = problem.return_final_state, problem.chunk_size or 0
    return SCAN.call_args(inputs, rfs, problem.rotary, chunk_size, backend)


def step_args(
    problem: Problem, inputs: ScanInputs, backend: str, state_indices: Tensor | None = None
) -> tuple:
    """mamba3::step's arguments for a validated call (``inputs.initial_state``: the state to
    update, a pool with ``state_indices`` (B,); options in STEP.options order)."""
    return STEP.call_args(inputs, state_indices, problem.rotary, backend)


def _state_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _scan_problem(inputs: ScanInputs, a: Any) -> Problem:
    """The Problem of mamba3::scan's arguments ``a`` (SCAN.bind), their ScanInputs ``inputs``."""
    chunk_size = a.chunk_size if a.chunk_size > 0 else None
    return describe(inputs, False, a.rotary, a.return_final_state, chunk_size)


@torch.library.custom_op(SCAN.name, mutates_args=SCAN.mutated, schema=SCAN.schema)
def scan_op(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward scan on validated inputs (arguments: schema.SCAN); chunk_size <= 0 means the
    backend's choice."""
    a = SCAN.bind(args)
    problem, inputs = _checked_scan(SCAN.inputs(args), a)
    return run_scan(problem, inputs, a.backend)


def _checked_scan(inputs: ScanInputs, a: Any, fake: bool = False) -> tuple[Problem, ScanInputs]:
    """validate_scan's checks on mamba3::scan's arguments ``a`` (a direct op call skips the
    API's validation; the fake impl runs the same shape checks, so torch.compile raises the same
    errors)."""
    chunk_size = a.chunk_size if a.chunk_size > 0 else None
    return check_op_inputs(False, inputs, a.rotary, a.return_final_state, chunk_size, fake)


def run_scan(
    problem: Problem, inputs: ScanInputs, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Dispatch one validated forward scan (the op's body).

    Returns out and the final state's angle, ssm, k, v (empty tensors without a final state),
    each owning its memory.
    """
    chosen, configs = plan(problem, backend, "inference")
    out, state = chosen.scan(problem, inputs, configs)
    return owned_outputs(inputs, out, state)


def run_scan_for_backward(
    problem: Problem, inputs: ScanInputs, backend: str
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor, Tensor], Any, str]:
    """run_scan for a call whose backward will run: its five outputs, the backend's residual
    for its backward (Backend.scan_for_backward; None when it keeps nothing) and the backend's
    name (a residual only means something to the backend that made it)."""
    chosen, configs = plan(problem, backend, "training")
    out, state, residual = chosen.scan_for_backward(problem, inputs, configs)
    return owned_outputs(inputs, out, state), residual, chosen.name


def scan_eager(
    problem: Problem, inputs: ScanInputs, backend: str
) -> tuple[Tensor, Mamba3State | None]:
    """api.scan's eager path without autograd: run_scan's dispatch and results as (out, final
    state), the state None without problem.return_final_state (no empty placeholders).

    Shapes as run_scan's. A backend whose ``scan_outputs_owned`` is True promises what
    owned_outputs would otherwise ensure (fresh contiguous allocations, not views, in the op's
    dtypes), so its outputs are returned as they are.
    """
    chosen, configs = plan(problem, backend, "inference")
    out, state = chosen.scan(problem, inputs, configs)
    if getattr(chosen, "scan_outputs_owned", False):
        return out, state
    out, *final = owned_outputs(inputs, out, state)
    return out, (Mamba3State(*final) if problem.return_final_state else None)


def owned_outputs(
    inputs: ScanInputs, out: Tensor, state: Mamba3State | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A backend's scan results as the op returns them (see run_scan)."""
    q, v, init = inputs.q, inputs.v, inputs.initial_state
    # An output sharing memory with an input (a final v that is a slice of v, an untouched
    # initial state for L == 0) must be copied: op outputs may not alias inputs.
    taken = {
        a.untyped_storage().data_ptr()
        for a in (q, inputs.k, v, inputs.z, *(init if init is not None else ()))
        if a is not None
    }
    out = _owned(out, v.dtype, taken)
    if state is None:
        empty = q.new_empty((0,))
        return out, empty, empty.clone(), empty.clone(), empty.clone()
    sd = _state_dtype(q)
    return (
        out,
        _owned(state.angle, sd, taken),
        _owned(state.ssm, sd, taken),
        _owned(state.k, q.dtype, taken),
        _owned(state.v, v.dtype, taken),
    )


def _owned(t: Tensor, dtype: torch.dtype, taken: set[int]) -> Tensor:
    """``t`` in ``dtype``, contiguous (as the fake impl promises) and not a view of anything: an
    op's outputs must not alias its inputs (a final v can be a slice of the input v)."""
    t = t.to(dtype).contiguous()
    shared = t._is_view() or t.storage_offset() != 0 or t.untyped_storage().data_ptr() in taken
    return t.clone() if shared else t


@scan_op.register_fake
def _scan_fake(*args):
    a = SCAN.bind(args)
    _checked_scan(SCAN.inputs(args), a, fake=True)
    q, v = a.q, a.v
    mimo = q.dim() == 5
    B, L, H, P = v.shape
    R = q.shape[2] if mimo else 1
    N, S = q.shape[-1], a.angles.shape[-1]
    out_shape = (B, L, R, H, P) if mimo and a.mimo_o is None else (B, L, H, P)
    out = v.new_empty(out_shape)
    if not a.return_final_state:
        empty = q.new_empty((0,))
        return out, empty, q.new_empty((0,)), q.new_empty((0,)), q.new_empty((0,))
    nseq = B if a.cu_seqlens is None else a.cu_seqlens.shape[0] - 1
    sd = _state_dtype(q)
    return (
        out,
        q.new_empty((nseq, H, S), dtype=sd),
        q.new_empty((nseq, H, P, N), dtype=sd),
        q.new_empty((nseq, R, H, N)),
        v.new_empty((nseq, H, P)),
    )


@torch.library.custom_op(SCAN_BWD.name, mutates_args=SCAN_BWD.mutated, schema=SCAN_BWD.schema)
def scan_bwd_op(*args: Any) -> list[Tensor]:
    """Gradients of mamba3::scan's inputs, in GRAD_INPUTS order (an empty tensor for an absent
    input); arguments: schema.SCAN_BWD (the gradients of the scan's results, then the scan's
    arguments). Backends without their own backward go through the differentiable reference."""
    return run_scan_bwd(args)


def run_scan_bwd(args: tuple, residual: tuple[str, Any] | None = None) -> list[Tensor]:
    """The body of mamba3::scan_bwd (``args``: its arguments; same result). Called directly from
    the scan's autograd backward outside torch.compile: there, unlike inside an op's kernel,
    plain autograd records, which costs a backend's recompute far less host time than functorch.
    residual: (backend name, residual) from run_scan_for_backward, or None; passed on to the
    backward's backend when it is the one that made it."""
    grad_out, *grad_final = args[:_N_OUT]
    fwd = args[_N_OUT:]  # mamba3::scan's arguments
    inputs = SCAN.inputs(fwd)
    a = SCAN.bind(fwd)
    problem = _scan_problem(inputs, a)
    chosen, configs = plan(problem, a.backend, "training")
    grad_state = Mamba3State(*grad_final) if a.return_final_state else None
    if chosen.has_backward:
        kept = residual[1] if residual is not None and residual[0] == chosen.name else None
        if kept is None:
            grads = chosen.scan_backward(problem, inputs, grad_out, grad_state, configs)
        else:
            grads = chosen.scan_backward(problem, inputs, grad_out, grad_state, configs, kept)
        return [
            _or_empty(grads.get(key), fwd[i], a.q)
            for key, i in zip(BACKEND_GRAD_KEYS, SCAN.grad_index, strict=True)
        ]
    return _reference_backward(problem, fwd, grad_out, grad_state)


def _or_empty(g: Tensor | None, a: Tensor | None, like: Tensor) -> Tensor:
    if a is None:
        return like.new_empty((0,))
    return torch.zeros_like(a) if g is None else g


def _reference_backward(problem, fwd, grad_out, grad_state) -> list[Tensor]:
    # torch.func.vjp, not torch.autograd.grad: inside the op's kernel (torch.compile) plain
    # autograd records nothing, while functorch's transform works there and in eager calls.
    from .reference import reference_scan

    present = [i for i in SCAN.grad_index if fwd[i] is not None and fwd[i].is_floating_point()]

    def forward(*tensors):
        full = list(fwd)
        for i, t in zip(present, tensors, strict=True):
            full[i] = t
        out, state = reference_scan(
            SCAN.inputs(full), problem.rotary, chunk_size=problem.chunk_size or 64
        )
        return (out, *state) if grad_state is not None else (out,)

    _, vjp = torch.func.vjp(forward, *(fwd[i] for i in present))
    cotangents = (grad_out, *grad_state) if grad_state is not None else (grad_out,)
    grads = dict(zip(present, vjp(cotangents), strict=True))
    return [_or_empty(grads.get(i), fwd[i], fwd[0]) for i in SCAN.grad_index]


@scan_bwd_op.register_fake
def _scan_bwd_fake(*args):
    fwd = args[_N_OUT:]
    return [t.new_empty(t.shape) if t is not None else fwd[0].new_empty((0,))
            for t in SCAN.grad_args(fwd)]  # fmt: skip


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:_N])
    ctx.flags = inputs[_N:]


def _backward(ctx, *grads):
    saved = ctx.saved_tensors
    fwd = saved[:_N]
    # torch.compile traces the op; eager calls run its body directly (see run_scan_bwd)
    if torch.compiler.is_compiling():
        result = torch.ops.mamba3.scan_bwd(*grads, *fwd, *ctx.flags)
    else:
        result = run_scan_bwd((*grads, *fwd, *ctx.flags), _residual(ctx, saved))
    return SCAN.per_argument(result, fwd)


def _residual(ctx, saved) -> tuple[str, Any] | None:
    """The forward backend's residual (_EagerScan), or None."""
    name = getattr(ctx, "residual_backend", None)
    if name is None:
        return None
    return (name, saved[_N] if len(saved) > _N else ctx.residual_object)


scan_op.register_autograd(_backward, setup_context=_setup_context)


_NO_DOUBLE_BACKWARD = (
    "mamba3_kernels.scan: double backward is not supported (backward with create_graph=True, "
    "for a gradient of the scan's gradient): its backward is not differentiable; run the "
    "backward without create_graph, or detach the scan's inputs from the part that needs it"
)


class _EagerScan(torch.autograd.Function):
    """mamba3::scan's autograd for eager calls (no torch.compile, no functorch transform): the
    op's forward body (run_scan) on the already validated inputs, the op's saved inputs and its
    backward (_backward), without the op's dispatch. The op's registered autograd re-binds its
    23 arguments against the schema on every call (torch's ``fill_defaults``: ~0.3 ms of host
    time per training call on this project's CPU machine, docs/performance.md)."""

    @staticmethod
    def forward(problem, *args):  # args: the op's arguments
        outputs, residual, name = run_scan_for_backward(problem, SCAN.inputs(args), args[_BACKEND])
        if residual is None:
            return (*outputs, None, None)
        return (*outputs, residual, name)

    @staticmethod
    def setup_context(ctx, inputs, output):
        residual, name = output[_N_OUT], output[_N_OUT + 1]
        if residual is None:
            _setup_context(ctx, inputs[1:], output)
            return
        # The backend's residual for its own backward: a tensor is saved after the op's inputs
        # (the Triton backend's core output y, which its backward then does not recompute);
        # any other object (the Triton backend's recorded autograd graph of the forward) is
        # kept on ctx, freed with it.
        if isinstance(residual, Tensor):
            ctx.save_for_backward(*inputs[1 : 1 + _N], residual)
            ctx.mark_non_differentiable(residual)
        else:
            ctx.save_for_backward(*inputs[1 : 1 + _N])
            ctx.residual_object = residual
        ctx.flags = inputs[1 + _N :]
        ctx.residual_backend = name
        # No zero-filled gradient for the residual (the size of y: a fill of R times v's
        # bytes per backward); the outputs' gradients are then zero-filled here when absent.
        ctx.set_materialize_grads(False)
        ctx.outputs = [(t.shape, t.dtype, t.device) for t in output[:_N_OUT]]

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():
            # create_graph=True: the backends' backwards are not differentiable, and returning
            # gradients without a graph would make a gradient of them silently zero or unused.
            raise RuntimeError(_NO_DOUBLE_BACKWARD)
        return _EagerScan._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx, *grads):
        grads = grads[:_N_OUT]
        if getattr(ctx, "outputs", None) is not None:
            grads = [
                g if g is not None else torch.zeros(shape, dtype=dtype, device=device)
                for g, (shape, dtype, device) in zip(grads, ctx.outputs, strict=True)
            ]
        return (None, *_backward(ctx, *grads))


def scan_autograd(
    problem: Problem, inputs: ScanInputs, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """What ``torch.ops.mamba3.scan`` returns, for a validated eager call that autograd records
    (outside torch.compile and functorch transforms, which need the op): out and the final
    state's angle, ssm, k, v (empty tensors without a final state)."""
    return apply_positional(_EagerScan, problem, *scan_args(problem, inputs, backend))[:_N_OUT]


@torch.library.custom_op(STEP.name, mutates_args=STEP.mutated, schema=STEP.schema)
def step_op(*args: Any) -> Tensor:
    """One decode step on validated inputs (arguments: schema.STEP); updates the four state
    tensors in place."""
    a = STEP.bind(args)
    problem, inputs = check_op_inputs(
        True, STEP.inputs(args), a.rotary, True, None, state_indices=a.state_indices
    )
    return run_step(problem, inputs, inputs.initial_state, a.backend, a.state_indices)


def run_step(
    problem: Problem,
    inputs: ScanInputs,
    state: Mamba3State,
    backend: str,
    state_indices: Tensor | None = None,
) -> Tensor:
    """Dispatch one validated decode step (the eager path calls this directly); with
    ``state_indices`` (B,) ``state`` is a pool of slots (only backends that support it get it)."""
    chosen, configs = plan(problem, backend, "decode")
    if state_indices is None:
        return chosen.step(problem, inputs, state, configs)
    return chosen.step(problem, inputs, state, configs, state_indices=state_indices)


@step_op.register_fake
def _step_fake(*args):
    a = STEP.bind(args)
    check_op_inputs(
        True, STEP.inputs(args), a.rotary, True, None, fake=True, state_indices=a.state_indices
    )
    q, v = a.q, a.v
    mimo = q.dim() == 4
    B, H, P = v.shape
    shape = (B, q.shape[1], H, P) if mimo and a.mimo_o is None else (B, H, P)
    return v.new_empty(shape)
