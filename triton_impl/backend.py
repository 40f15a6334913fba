"""The Triton backend object: what it supports and which kernel serves which call."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from mamba3_kernels.backend import (
    Backend,
    KernelSpec,
    device_properties,
    size_reason,
    wide_state_reason,
)
from mamba3_kernels.inputs import ScanInputs
from mamba3_kernels.problem import Problem
from mamba3_kernels.state import Mamba3State

SUPPORTED_N = (64, 128, 256)
SUPPORTED_P = (32, 64, 128)
# Under the interpreter (CPU), small power-of-two sizes are allowed so CI can run every kernel.
INTERPRET_N = (16, 32) + SUPPORTED_N
INTERPRET_P = (8, 16) + SUPPORTED_P


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(Backend):
    # scan() returns fresh allocations of its own: out in v's dtype, the final state's angle and
    # ssm in fp32, k and v in the inputs' dtype, each contiguous and not a view (chunk_fwd), so
    # the eager path need not copy them (ops.scan_eager).
    scan_outputs_owned = True

    def __init__(self) -> None:
        super().__init__(name="triton", priority=20, kernels=[], has_backward=True)
        self._loaded = False

    # Kernel modules are imported lazily so `import mamba3_kernels` stays cheap without triton.
    def _load(self) -> None:
        if self._loaded:
            return
        from . import chunk_bwd, chunk_fwd, core_rotary, step

        self._chunk_fwd, self._step, self._chunk_bwd = chunk_fwd, step, chunk_bwd
        self._rotary = core_rotary
        self.kernels = [chunk_fwd.SPEC, step.SPEC, chunk_bwd.SPEC, core_rotary.SPEC]
        self._loaded = True

    def all_kernels(self) -> list[KernelSpec]:
        self._load()
        return self.kernels

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'mamba3-kernels[triton]')"
        if not torch.cuda.is_available() and not interpreting():
            return "no CUDA GPU (set TRITON_INTERPRET=1 to run on CPU tensors, slowly)"
        return None

    def unsupported_reason(self, problem: Problem) -> str | None:
        if problem.device_type != "cuda" and not (interpreting() and problem.device_type == "cpu"):
            return f"tensors on {problem.device_type}; triton needs CUDA (or TRITON_INTERPRET=1)"
        if problem.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"dtype {problem.dtype} (triton runs fp16, bf16, fp32)"
        wide = None if problem.decode else wide_state_reason(problem)
        if wide is not None:
            return f"{wide}: 16-bit states are read by triton's step only"
        ns, ps = (INTERPRET_N, INTERPRET_P) if interpreting() else (SUPPORTED_N, SUPPORTED_P)
        reason = size_reason(problem, ns, ps, (1, 2, 4, 8))
        if reason is not None:
            return reason
        # The kernel's own constraints on its default config (tile divisibility and the like).
        self._load()
        mode = "decode" if problem.decode else "inference"
        props = device_properties() if problem.device_type == "cuda" else None
        # (the family that leads the mode: an inference forward whose heuristic path is "fused"
        # runs no core kernel, so the core's tile limits must not refuse it)
        for spec in self.kernels_for(problem, mode):
            if spec.modes[0] != mode:
                continue
            reason = spec.constraint(problem, spec.default(problem), props)
            if reason is not None:
                return f"{spec.name}: {reason}"
        return None

    def auto_eligible(self, problem: Problem) -> bool:
        return problem.device_type == "cuda"  # the interpreter is for tests, not for auto

    def _config(self, spec: KernelSpec, problem: Problem, configs: dict[str, Any] | None):
        cfg = (configs or {}).get(spec.name)
        return cfg if cfg is not None else spec.default(problem)

    def scan(self, problem: Problem, inputs: ScanInputs, configs=None):
        """Prefill forward without autograd: (out, final state or None), through the fused
        kernels (chunk_fwd.chunk_fwd) or, where chunk_fwd's config says path="core", through
        the core family's graph on its own config (chunk_bwd.core_forward)."""
        self._load()
        cfg = self._config(self._chunk_fwd.SPEC, problem, configs)
        if cfg.path == "core" and problem.seqlen > 0 and not problem.varlen:
            core = self._config(self._chunk_bwd.SPEC, problem, configs)
            rot = self._config(self._rotary.SPEC, problem, configs)
            return self._chunk_bwd.core_forward(problem, inputs, core, rot)
        return self._chunk_fwd.chunk_fwd(problem, inputs, cfg)

    def scan_for_backward(self, problem: Problem, inputs: ScanInputs, configs=None):
        """Prefill forward of a training call: (out, final state or None, residual). The core
        family's config picks the path: record_forward=1 records the backward's own graph
        (chunk_bwd.record_forward, the residual); else the fused forward, keeping the core's y
        as the residual where save_y is set and the backward's epilogue reads it
        (chunk_fwd.chunk_fwd_saving_y), or None."""
        self._load()
        from .core_prep import epilogue_reads_y

        core = self._config(self._chunk_bwd.SPEC, problem, configs)
        # The backward's limits, checked before the forward runs (a forward it could run would
        # otherwise fail only at backward time, after the whole forward pass).
        reason = self._chunk_bwd.constraint(problem, core, None)
        if reason is not None:
            raise ValueError(
                f"backend: 'triton' cannot run the backward of this call ({reason}; an input "
                "requires grad); run the forward under torch.no_grad(), change the size or "
                "chunk_size named, or use backend='reference'"
            )
        if core.record_forward and problem.seqlen > 0 and not problem.varlen:
            rot = self._config(self._rotary.SPEC, problem, configs)
            return self._chunk_bwd.record_forward(problem, inputs, core, rot)
        cfg = self._config(self._chunk_fwd.SPEC, problem, configs)
        keep = bool(core.save_y) and epilogue_reads_y(problem, inputs)
        return self._chunk_fwd.chunk_fwd_saving_y(problem, inputs, cfg, keep)

    def scan_backward(
        self, problem: Problem, inputs: ScanInputs, grad_out, grad_state, configs=None,
        residual=None,
    ):  # fmt: skip
        """Gradients of every input (see chunk_bwd.chunk_bwd): keys are ScanInputs field names and
        'initial_state.<field>'. residual: what scan_for_backward returned, or None."""
        self._load()
        if isinstance(residual, self._chunk_bwd.RecordedForward):
            grads = residual.backward(inputs, grad_out, grad_state)
            if grads is not None:
                return grads
            residual = None  # (its graph was used by an earlier backward: recompute)
        cfg = self._config(self._chunk_bwd.SPEC, problem, configs)
        rot = self._config(self._rotary.SPEC, problem, configs)
        return self._chunk_bwd.chunk_bwd(problem, inputs, grad_out, grad_state, cfg, residual,
                                         rot)  # fmt: skip

    def step(self, problem: Problem, inputs: ScanInputs, state: Mamba3State, configs=None,
             state_indices: torch.Tensor | None = None):  # fmt: skip
        """One decode step (triton_impl/step.py); ``state`` updated in place (a pool of slots
        with ``state_indices`` (B,): the kernel addresses the slots directly, no gather or
        scatter). B = 0 returns an empty out (state unchanged) without a launch. Not
        differentiable: with grad mode on, an input or state tensor that requires grad is a clear
        error (the kernel would silently detach it and write into a grad-requiring state)."""
        if torch.is_grad_enabled():
            _reject_grad(inputs, state)
        if problem.batch == 0:
            v = inputs.v
            mimo_out = problem.mimo and not problem.has_mimo_o
            shape = (0, problem.rank, *v.shape[1:]) if mimo_out else tuple(v.shape)
            return v.new_empty(shape)
        self._load()
        cfg = self._config(self._step.SPEC, problem, configs)
        return self._step.step(problem, inputs, state, cfg, state_indices=state_indices)


def _reject_grad(inputs: ScanInputs, state: Mamba3State) -> None:
    """RuntimeError naming the first input or state tensor that requires grad (step has no backward
    on this backend)."""
    named = zip(ScanInputs._fields[:14], inputs[:14], strict=True)
    for name, t in (*named, *(("state." + f, t) for f, t in zip(Mamba3State._fields, state,
                                                                 strict=True))):  # fmt: skip
        if t is not None and t.requires_grad:
            raise RuntimeError(
                f"{name}: requires grad, but the Triton backend's step is not differentiable; "
                "run it under torch.no_grad() / torch.inference_mode(), detach the inputs, or "
                "use backend='reference' (differentiable)"
            )
