"""Run one config of one kernel family: check it against the reference, then time it.

Both run the entry point that dispatch runs for the target's mode, with the configs dispatch
hands that mode (the tuned config of every other family it uses, else their heuristics) and the
candidate in place of its family's: an inference forward is ``Backend.scan``; a training call is
``scan_for_backward`` and then ``scan_backward`` with its residual, timed as one; a decode step
is ``step``. The check compares with the float64 reference (relative error of the norm) on
fresh random inputs.
Timing rotates several input sets (so no run finds the previous run's data in cache) and takes a
median: ``triton.testing.do_bench`` on a GPU (it also flushes L2 between runs), a median of
``perf_counter`` runs on the CPU (only sensible for tests under the Triton interpreter).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from mamba3_kernels.dispatch import kernel_configs
from mamba3_kernels.reference import reference_scan, reference_step
from mamba3_kernels.testing import cast_inputs, rel_err

from .space import Target

# The reference's chunk size for large scans: same function, much faster than the recurrence.
_REF_CHUNK = 64


def tolerance(dtype: torch.dtype, device_type: str) -> float:
    """Largest accepted relative error against the float64 reference."""
    if dtype == torch.float32:
        # On a GPU, fp32 matmuls may run in TF32.
        return 1e-3 if device_type == "cuda" else 1e-4
    return 2e-2


class Rejected(Exception):
    """A config that is invalid for the problem, fails, or computes a wrong answer."""


class Runner:
    """Inputs, reference results and callables for one target.

    ``n_sets`` input sets are drawn; the first ``n_check`` are checked against the reference
    for every candidate, all are rotated through when timing.
    """

    def __init__(
        self,
        target: Target,
        device: torch.device | str,
        n_sets: int = 3,
        n_check: int = 1,
        seed: int = 0,
    ) -> None:
        self.target = target
        self.device = torch.device(device)
        self.mode = target.mode
        gen = torch.Generator().manual_seed(seed)
        self.sets = [target.bucket.inputs(self.device, gen) for _ in range(n_sets)]
        self.problem = self.sets[0][0]
        self.tol = tolerance(self.problem.dtype, self.device.type)
        self.n_check = min(n_check, n_sets)
        self._grads = [self._grad_out(inp, gen) for _, inp in self.sets]
        self.truth = [self._reference(i) for i in range(self.n_check)]
        # Step timing updates states in place: each set gets its own scratch state.
        self._states = [
            inp.initial_state.clone() if inp.initial_state is not None else None
            for _, inp in self.sets
        ]

    # ----- the truth -----
    def _grad_out(self, inputs, gen) -> torch.Tensor | None:
        if self.mode != "training":
            return None
        out, _ = reference_scan(inputs, self.problem.rotary, _REF_CHUNK)
        g = torch.randn(out.shape, generator=gen, dtype=torch.float32)
        return g.to(out.dtype).to(self.device)

    def _reference(self, i: int) -> dict[str, torch.Tensor]:
        _, inputs = self.sets[i]
        rotary = self.problem.rotary
        x64 = cast_inputs(inputs, torch.float64)
        if self.mode == "decode":
            out, state = reference_step(x64, x64.initial_state, rotary)
            return {"out": out, "state.ssm": state.ssm, "state.angle": state.angle}
        if self.mode == "inference":
            chunk = _REF_CHUNK if self.problem.seqlen > _REF_CHUNK else None
            out, state = reference_scan(x64, rotary, chunk)
            res = {"out": out}
            if self.problem.return_final_state:
                res["state.ssm"] = state.ssm
            return res
        # training: gradients of every floating input by autograd through the reference.
        names = [n for n in x64._fields if _is_float(getattr(x64, n))]
        leaves = {n: getattr(x64, n).detach().requires_grad_(True) for n in names}
        x = x64._replace(**leaves)
        out, _ = reference_scan(x, rotary, _REF_CHUNK)
        grads = torch.autograd.grad(
            out, list(leaves.values()), self._grads[i].double(), allow_unused=True
        )
        return {n: g for n, g in zip(names, grads, strict=True) if g is not None}

    # ----- running a config -----
    def configs(self, config: Any) -> dict[str, Any]:
        """What dispatch hands this mode's call, with ``config`` for the target's family."""
        backend, problem = self.target.backend, self.problem
        return {**kernel_configs(backend, problem, self.mode), self.target.kernel.name: config}

    def call(self, config: Any, i: int, state=None) -> Callable[[], Any]:
        """A no-argument callable running ``config`` on input set ``i``."""
        problem, inputs = self.sets[i]
        backend, configs = self.target.backend, self.configs(config)
        return entry_point(backend, self.mode, problem, inputs, configs, self._grads[i],
                           state if state is not None else self._states[i])  # fmt: skip

    def check(self, config: Any) -> float:
        """Largest relative error of ``config`` over the checked sets; raises Rejected when a
        constraint, an exception or the tolerance rules it out."""
        props = _device_props(self.device)
        why = self.target.kernel.constraint(self.problem, config, props)
        if why:
            raise Rejected(f"constraint: {why}")
        worst = 0.0
        for i in range(self.n_check):
            _, inputs = self.sets[i]
            state = inputs.initial_state.clone() if inputs.initial_state is not None else None
            try:
                res = self.call(config, i, state)()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            except Exception as e:
                raise Rejected(f"error: {type(e).__name__}: {_short(e)}") from e
            got = self._collect(res, state)
            for name, ref in self.truth[i].items():
                if name not in got or got[name] is None:
                    raise Rejected(f"wrong: {name} missing from the result")
                err = rel_err(got[name], ref)
                if not err <= self.tol:  # also catches NaN
                    raise Rejected(f"wrong: {name} rel err {err:.3g} > {self.tol:g}")
                worst = max(worst, err)
        return worst

    def _collect(self, res, state) -> dict[str, torch.Tensor | None]:
        if self.mode == "decode":
            return {"out": res, "state.ssm": state.ssm, "state.angle": state.angle}
        if self.mode == "inference":
            out, final = res
            return {"out": out, "state.ssm": final.ssm if final is not None else None}
        return dict(res)

    def time_ms(self, config: Any, quick: bool = False) -> float:
        """Median milliseconds of one call, rotating the input sets. ``quick``: a short estimate
        (for pruning configs that cannot win)."""
        calls = [self.call(config, i) for i in range(len(self.sets))]
        return bench_ms(calls, self.device, quick)


def bench_ms(calls: list[Callable[[], Any]], device: torch.device, quick: bool = False) -> float:
    """Median milliseconds of one call, rotating through ``calls`` (one per input set, so no run
    finds the previous run's data in cache): ``triton.testing.do_bench`` on a GPU, a median of
    ``perf_counter`` runs on the CPU. ``quick``: a short estimate."""
    counter = [0]

    def fn():
        calls[counter[0] % len(calls)]()
        counter[0] += 1

    if device.type == "cuda":
        import triton

        rep = 10 if quick else 100
        return float(triton.testing.do_bench(fn, warmup=5, rep=rep, return_mode="median"))
    fn()  # warm-up (compilation under the interpreter, caches)
    times = []
    for _ in range(1 if quick else max(3, len(calls))):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_backends(bucket, mode: str, device: torch.device | str, n_sets: int = 3,
                  seed: int = 0) -> dict[str, float]:  # fmt: skip
    """Milliseconds of a ``mode`` call of ``bucket`` on every registered backend that "auto"
    could pick for it and that has tunable kernels, each with the configs dispatch hands it
    (their tuned configs are checked against the reference by their own studies)."""
    from mamba3_kernels.backend import registered_backends

    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    sets = [bucket.inputs(device, gen) for _ in range(n_sets)]
    problem = sets[0][0]
    times: dict[str, float] = {}
    for name, backend in sorted(registered_backends().items()):
        if backend.unavailable_reason() is not None or not backend.auto_eligible(problem):
            continue
        if backend.unsupported_reason(problem) is not None or not backend.all_kernels():
            continue
        if mode == "training" and not backend.has_backward:
            continue
        configs = kernel_configs(backend, problem, mode)
        calls = []
        for p, inputs in sets:
            state = inputs.initial_state.clone() if inputs.initial_state is not None else None
            grad = None
            if mode == "training":
                out, _ = backend.scan(p, inputs, configs=configs)
                grad = torch.randn(out.shape, generator=gen).to(out.dtype).to(device)
            calls.append(entry_point(backend, mode, p, inputs, configs, grad, state))
        times[name] = bench_ms(calls, device)
    return times


def entry_point(backend, mode: str, problem, inputs, configs, grad_out, state) -> Callable[[], Any]:
    """The call dispatch makes for ``mode`` (see the module docstring), as a no-argument
    callable; ``grad_out`` is the training call's cotangent, ``state`` the decode step's."""
    if mode == "decode":
        return lambda: backend.step(problem, inputs, state, configs=configs)
    if mode == "inference":
        return lambda: backend.scan(problem, inputs, configs=configs)

    def train():
        _, _, residual = backend.scan_for_backward(problem, inputs, configs=configs)
        return backend.scan_backward(problem, inputs, grad_out, None, configs=configs,
                                     residual=residual)  # fmt: skip

    return train


def _is_float(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _short(e: Exception, n: int = 300) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[: n - 3] + "..."


def _device_props(device: torch.device) -> dict | None:
    if device.type != "cuda":
        return None
    from mamba3_kernels.backend import device_properties

    return device_properties(device)
