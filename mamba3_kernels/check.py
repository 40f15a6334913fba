"""Cross-check every available backend against the float64 reference and against each other.

    python -m mamba3_kernels.check [--quick] [--device cuda] [--json out.json]

Each case (SISO/MIMO, rank, sizes, GQA, rotary layout, D/z, state in/out, varlen, dtype, odd
lengths, decode sequences) draws fresh random inputs (``testing.random_inputs``), computes the
truth as ``reference_scan`` of the inputs cast to float64, and runs every column on the same
inputs: each registered backend through ``mamba3_kernels.scan`` / ``step`` and the reference in
its two forms (literal recurrence, chunked) at the case's dtype. A decode case runs several
``step`` calls from an initial state and is compared with the scan over the same tokens. A grad
case also backpropagates a random cotangent of the output (and of the final ssm state) and
compares every input gradient, the initial state's included, with float64 autograd of the
reference; a backend without backward kernels is "n/a" there (its scan's backward would be the
reference's).

A cell is the worst relative error (``testing.rel_err``: norm of the difference over the norm of
the truth) over the output and, when returned, the final state (angle compared through its
cosine and sine, since an angle state may be reduced modulo 2 pi). It passes below the dtype's
tolerance (fp32 1e-4, 1e-3 on CUDA where matmuls may use tf32; bf16/fp16 2e-2). A backend that
cannot run a case (it says so, or raises NotImplementedError) shows "n/a" with its reason; any
other exception is "ERR" and fails. Pairs of columns that differ from each other by more than
the tolerance are listed as disagreements and fail too. The exit code is 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from .backend import BACKEND_NAMES, registered_backends
from .check_cases import (  # noqa: F401  (the check's public names live on here too)
    ERR,
    FAIL,
    NA,
    PASS,
    REF_CHUNK_SIZE,
    REF_CHUNKED,
    REF_RECURRENT,
    Case,
    Cell,
    Report,
    build_cases,
    tolerance,
)
from .inputs import ScanInputs
from .reference import reference_scan, reference_step
from .state import Mamba3State
from .testing import cast_inputs, rel_err


class Unsupported(Exception):
    """The column cannot run this case; the message says why."""


def _scan_args(inputs: ScanInputs) -> tuple:
    return tuple(inputs[:14])


def _step_inputs(inputs: ScanInputs, t: int) -> ScanInputs:
    """Token t of scan-shaped inputs, in step shapes (the L axis dropped), contiguous."""
    return inputs.token(t).along_tokens(lambda x: x.contiguous(), lambda x: x.contiguous())


def _why_not(name: str, case: Case, inputs: ScanInputs) -> str | None:
    """The backend's own reason for not running this case (None: it says it can)."""
    from .dispatch import why_not
    from .validate import validate_scan, validate_step

    backend = registered_backends()[name]
    if case.kind == "decode":
        first = _step_inputs(inputs, 0)
        problem, _ = validate_step(
            *first[:9], inputs.initial_state.clone(), *first[9:14], case.rotary
        )
        if not _overrides(backend, "step"):
            return "no decode step"
    else:
        problem, _ = validate_scan(
            *_scan_args(inputs),
            inputs.initial_state,
            case.return_final_state,
            inputs.cu_seqlens,
            case.rotary,
            case.chunk_size,
        )
    return why_not(backend, problem)


def _overrides(backend, method: str) -> bool:
    from .backend import Backend

    return getattr(type(backend), method) is not getattr(Backend, method)


def _call_scan(name: str, case: Case, inputs: ScanInputs):
    """Run backend ``name`` on a scan case: the public API for the known names, the registry
    object directly for any other registered backend (a plug-in or a test double)."""
    kw = dict(
        initial_state=inputs.initial_state,
        return_final_state=case.return_final_state,
        cu_seqlens=inputs.cu_seqlens,
        rotary=case.rotary,
        chunk_size=case.chunk_size,
    )
    if name in BACKEND_NAMES:
        import mamba3_kernels

        res = mamba3_kernels.scan(*_scan_args(inputs), **kw, backend=name)
    else:
        from .validate import validate_scan

        problem, vin = validate_scan(*_scan_args(inputs), *kw.values())
        out, state = registered_backends()[name].scan(problem, vin)
        res = (out, state) if case.return_final_state else out
    return res if case.return_final_state else (res, None)


def _call_steps(name: str, case: Case, inputs: ScanInputs):
    """Run ``case.seqlen`` decode steps of backend ``name`` from a copy of the initial state;
    returns the stacked outputs (B, T, ...) and the final state."""
    state = Mamba3State(*(t.clone().contiguous() for t in inputs.initial_state))
    outs = []
    for t in range(case.seqlen):
        x = _step_inputs(inputs, t)
        if name in BACKEND_NAMES:
            import mamba3_kernels

            out, state = mamba3_kernels.step(
                *x[:9], state, *x[9:14], rotary=case.rotary, inplace=True, backend=name
            )
        else:
            from .validate import validate_step

            problem, vin = validate_step(*x[:9], state, *x[9:14], case.rotary)
            out = registered_backends()[name].step(problem, vin, vin.initial_state)
            state = vin.initial_state
        outs.append(out)
    return torch.stack(outs, dim=1), state


def _run_reference_form(col: str, case: Case, inputs: ScanInputs):
    """The reference itself at the case's dtype: literal recurrence or chunked form."""
    if case.kind == "decode":
        if col == REF_CHUNKED:
            raise Unsupported("a decode step has no chunked form")
        state, outs = inputs.initial_state, []
        for t in range(case.seqlen):
            out, state = reference_step(_step_inputs(inputs, t), state, case.rotary)
            outs.append(out)
        return torch.stack(outs, dim=1), state
    chunk = None if col == REF_RECURRENT else REF_CHUNK_SIZE
    out, state = reference_scan(inputs, case.rotary, chunk)
    return out, (state if case.return_final_state else None)


GRAD_FIELDS = ScanInputs._fields[:14]
STATE_FIELDS = Mamba3State._fields


def _with_grad_leaves(inputs: ScanInputs) -> tuple[ScanInputs, dict[str, torch.Tensor]]:
    """Copies of every floating input (initial state included) as leaves requiring grad."""
    leaves: dict[str, torch.Tensor] = {}

    def leaf(name, t):
        if t is None or not t.is_floating_point():
            return t
        leaves[name] = t.detach().clone().requires_grad_(True)
        return leaves[name]

    fields = [leaf(n, getattr(inputs, n)) for n in GRAD_FIELDS]
    state = inputs.initial_state
    if state is not None:
        state = Mamba3State(*(leaf(f"initial_state.{n}", getattr(state, n)) for n in STATE_FIELDS))
    return ScanInputs(*fields, state, inputs.cu_seqlens), leaves


def _cotangents(case: Case, out_shape, ssm_shape, device, seed: int) -> dict[str, torch.Tensor]:
    """Fixed random float64 cotangents of the output and (when returned) the final ssm state."""
    gen = torch.Generator().manual_seed(seed + 7919)
    cot = {"out": torch.randn(out_shape, generator=gen, dtype=torch.float64).to(device)}
    if case.return_final_state:
        cot["ssm"] = torch.randn(ssm_shape, generator=gen, dtype=torch.float64).to(device)
    return cot


def _grad_run(fn, case: Case, inputs: ScanInputs, cot: dict[str, torch.Tensor]):
    """(out, state, {input name: grad}) of ``fn(inputs) -> (out, state)`` under the loss
    sum(out * cot_out) [+ sum(final ssm * cot_ssm)], computed in float64."""
    x, leaves = _with_grad_leaves(inputs)
    out, state = fn(x)
    loss = (out.double() * cot["out"]).sum()
    if "ssm" in cot:
        loss = loss + (state.ssm.double() * cot["ssm"]).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    result = {f"grad.{n}": g for n, g in zip(leaves, grads, strict=True)}
    return (
        out.detach(),
        (None if state is None else Mamba3State(*(t.detach() for t in state))),
        result,
    )


def _grad_column(col: str, case: Case, inputs: ScanInputs, cot):
    """Run a grad case for one column (the reference forms by autograd, backends via the API)."""
    if col in (REF_RECURRENT, REF_CHUNKED):
        chunk = None if col == REF_RECURRENT else REF_CHUNK_SIZE
        return _grad_run(lambda x: reference_scan(x, case.rotary, chunk), case, inputs, cot)
    if col not in BACKEND_NAMES:
        raise Unsupported("gradients are checked through the public API's backends only")
    backend = registered_backends()[col]
    if col != "reference" and not backend.has_backward:
        raise Unsupported("no backward kernels (its scan's backward would be the reference's)")
    reason = _why_not(col, case, inputs)
    if reason is not None:
        raise Unsupported(reason)

    def fn(x):
        import mamba3_kernels

        res = mamba3_kernels.scan(
            *_scan_args(x),
            initial_state=x.initial_state,
            return_final_state=True,
            cu_seqlens=x.cu_seqlens,
            rotary=case.rotary,
            chunk_size=case.chunk_size,
            backend=col,
        )
        return res

    try:
        return _grad_run(fn, case, inputs, cot)
    except NotImplementedError as e:
        raise Unsupported(f"not implemented: {e}") from e


def run_column(col: str, case: Case, inputs: ScanInputs, cot=None):
    """(out, final state or None[, grads]) of column ``col`` on ``case``; raises Unsupported."""
    if case.kind == "grad":
        return _grad_column(col, case, inputs, cot)
    if col in (REF_RECURRENT, REF_CHUNKED):
        return _run_reference_form(col, case, inputs)
    reason = _why_not(col, case, inputs)
    if reason is not None:
        raise Unsupported(reason)
    try:
        with torch.no_grad():
            if case.kind == "decode":
                return _call_steps(col, case, inputs)
            return _call_scan(col, case, inputs)
    except NotImplementedError as e:
        raise Unsupported(f"not implemented: {e}") from e


# ---------------------------------------------------------------------------------------------
# Comparing


def _angle_view(angle: torch.Tensor) -> torch.Tensor:
    """cos and sin of an angle state: equal for angles equal modulo 2 pi."""
    a = angle.double()
    return torch.stack([a.cos(), a.sin()])


def compare(result, truth) -> dict[str, float]:
    """Relative errors of each part of ``result`` against ``truth`` (both (out, state|None))."""
    out, state = result[:2]
    t_out, t_state = truth[:2]
    parts = {"out": rel_err(out, t_out)}
    if len(truth) > 2:  # gradients: every one the truth has must be there
        grads = result[2] if len(result) > 2 else {}
        for name, t_g in truth[2].items():
            if t_g is None:
                continue
            g = grads.get(name)
            parts[name] = float("inf") if g is None else rel_err(g, t_g)
    if state is not None and t_state is not None:
        parts["state.angle"] = rel_err(_angle_view(state.angle), _angle_view(t_state.angle))
        for fname in ("ssm", "k", "v"):
            parts[f"state.{fname}"] = rel_err(getattr(state, fname), getattr(t_state, fname))
    return parts


def _truth(case: Case, inputs: ScanInputs, cot=None):
    """The float64 reference: the literal recurrence over all tokens (the scan, for decode);
    for a grad case also float64 autograd of the loss defined by ``cot``."""
    x64 = cast_inputs(inputs, torch.float64)
    if case.kind == "grad":
        return _grad_run(lambda x: reference_scan(x, case.rotary, None), case, x64, cot)
    with torch.no_grad():
        out, state = reference_scan(x64, case.rotary, None)
    keep_state = case.return_final_state or case.kind == "decode"
    return out, (state if keep_state else None)


def run_check(
    cases: list[Case] | None = None,
    device: str | torch.device | None = None,
    backends: list[str] | None = None,
    seed: int = 0,
    reference_forms: bool = True,
    log=None,
) -> Report:
    """Run every column on every case and collect the matrix.

    backends: registered backend names to check (default: every available one).
    reference_forms: also check the reference's two forms directly (recurrent and chunked).
    log: optional callable taking a progress line.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cases = cases if cases is not None else build_cases(quick=device.type == "cpu")
    registry = registered_backends()
    unavailable = {}
    columns = []
    for name, b in registry.items():
        if backends is not None and name not in backends:
            continue
        why = b.unavailable_reason()
        if why is None:
            columns.append(name)
        else:
            unavailable[name] = why
    if backends is not None:
        unknown = [
            n for n in backends if n not in registry and n not in (REF_RECURRENT, REF_CHUNKED)
        ]
        if unknown:
            raise ValueError(f"unknown backends {unknown}; registered: {sorted(registry)}")
    if reference_forms:
        columns += [REF_RECURRENT, REF_CHUNKED]

    cells: dict[tuple[str, str], Cell] = {}
    disagreements: list[dict] = []
    tolerances: dict[str, float] = {}
    for i, case in enumerate(cases):
        tol = tolerance(case.dtype, device)
        tolerances[case.name] = tol
        inputs = case.make_inputs(device, seed + i)
        cot = None
        if case.kind == "grad":
            with torch.no_grad():
                shape_probe, st = reference_scan(inputs, case.rotary, REF_CHUNK_SIZE)
            cot = _cotangents(case, shape_probe.shape, st.ssm.shape, device, seed + i)
        truth = _truth(case, inputs, cot)
        results = {}
        for col in columns:
            try:
                res = run_column(col, case, inputs, cot)
            except Unsupported as e:
                cells[(case.name, col)] = Cell(NA, reason=str(e))
                continue
            except Exception as e:  # a backend that claims support and crashes is a failure
                cells[(case.name, col)] = Cell(ERR, reason=f"{type(e).__name__}: {e}")
                continue
            try:
                parts = compare(res, truth)
            except Exception as e:  # wrong shapes or dtypes
                cells[(case.name, col)] = Cell(ERR, reason=f"bad result: {type(e).__name__}: {e}")
                continue
            err = max(parts.values())
            ok = math.isfinite(err) and err <= tol
            cells[(case.name, col)] = Cell(PASS if ok else FAIL, err, parts=parts)
            results[col] = res
        names = list(results)
        for a_i, a in enumerate(names):
            for b in names[a_i + 1 :]:
                try:
                    parts = compare(results[a], results[b])
                except Exception:
                    continue  # shapes differ: already reported against the truth
                part = max(parts, key=parts.get)
                if not parts[part] <= tol:
                    disagreements.append(
                        {
                            "case": case.name,
                            "a": a,
                            "b": b,
                            "err": parts[part],
                            "part": part,
                            "tol": tol,
                        }
                    )
        if log is not None:
            row = ", ".join(f"{c}={cells[(case.name, c)].text()}" for c in columns)
            log(f"[{i + 1}/{len(cases)}] {case.name}: {row}")
    return Report(str(device), columns, cases, tolerances, cells, disagreements, unavailable)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mamba3_kernels.check",
        description="Cross-check every available backend against the float64 reference.",
    )
    parser.add_argument("--quick", action="store_true", help="small case set at tiny sizes (CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--json", metavar="PATH", help="write the matrix as JSON")
    parser.add_argument("--backends", help="comma-separated backend names (default: all available)")
    parser.add_argument("--cases", help="only cases whose name contains one of these (comma-sep.)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", "-v", action="store_true", help="print each case as it runs")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cases = build_cases(quick=args.quick)
    if args.cases:
        wanted = args.cases.split(",")
        cases = [c for c in cases if any(w in c.name for w in wanted)]
    backends = args.backends.split(",") if args.backends else None
    print(f"cross-check on {device} ({len(cases)} cases)", flush=True)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        print("(triton runs on CPU only with TRITON_INTERPRET=1)", flush=True)
    log = (lambda s: print(s, flush=True)) if args.verbose else None
    report = run_check(cases, device, backends, seed=args.seed, log=log)
    print(report.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_json(), f, indent=1)
        print(f"wrote {args.json}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
