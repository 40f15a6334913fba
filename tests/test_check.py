"""The cross-check harness: it runs for real, passes the reference, and catches wrong backends."""

from __future__ import annotations

import json

import pytest
import torch

import mamba3_kernels
from mamba3_kernels import backend as backend_mod
from mamba3_kernels import check
from mamba3_kernels.backend import Backend
from mamba3_kernels.reference import reference_scan, reference_step


class WrongBackend(Backend):
    """Computes the reference, then spoils the output by a few percent (a planted bug)."""

    def __init__(self, name: str = "fake-wrong", siso_only: bool = False) -> None:
        super().__init__(name=name, priority=-5)
        self.siso_only = siso_only

    def unsupported_reason(self, problem):
        if self.siso_only and problem.mimo:
            return "fake backend runs SISO only"
        return None

    def scan(self, problem, inputs, configs=None):
        out, state = reference_scan(inputs, problem.rotary, 16)
        return out * 1.05, (state if problem.return_final_state else None)

    def step(self, problem, inputs, state, configs=None):
        out, new = reference_step(inputs, state, problem.rotary)
        for dst, src in zip(state, new, strict=True):
            dst.copy_(src)
        return out * 1.05


class CrashingBackend(Backend):
    """Says it supports everything, then raises."""

    def __init__(self) -> None:
        super().__init__(name="fake-crash", priority=-5)

    def scan(self, problem, inputs, configs=None):
        raise RuntimeError("kernel launch failed")


class ZeroGradBackend(Backend):
    """Right forward, wrong backward (every gradient zero), under a name the public API knows."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, priority=-5, has_backward=True)

    def scan(self, problem, inputs, configs=None):
        out, state = reference_scan(inputs, problem.rotary, 16)
        return out, (state if problem.return_final_state else None)

    def scan_backward(self, problem, inputs, grad_out, grad_state, configs=None):
        return {}


def _cases(*names):
    by_name = {c.name: c for c in check.build_cases(quick=True)}
    return [by_name[n] for n in names]


def test_quick_runs_and_reference_passes(tmp_path):
    path = tmp_path / "check.json"
    rc = check.main(["--quick", "--device", "cpu", "--json", str(path)])
    assert rc == 0
    data = json.loads(path.read_text())
    assert not data["failed"] and data["failures"] == []
    assert {"reference", check.REF_RECURRENT, check.REF_CHUNKED} <= set(data["columns"])
    kinds = {c["kind"] for c in data["cases"]}
    assert kinds == {"scan", "decode", "grad"}
    assert any(c["rank"] > 1 for c in data["cases"]) and any(c["cu_seqlens"] for c in data["cases"])
    for case in data["cases"]:
        ref = case["cells"]["reference"]
        assert ref["status"] == "pass", case["name"]
        assert 0 <= ref["err"] <= case["tol"]
        assert case["cells"][check.REF_RECURRENT]["status"] == "pass"
        chunked = case["cells"][check.REF_CHUNKED]
        # A decode step has no chunked form: the case says so instead of passing.
        if case["kind"] != "decode":
            assert chunked["status"] == "pass"
        else:
            assert chunked["status"] == "n/a" and chunked["reason"]
        if case["return_final_state"] or case["kind"] == "decode":
            assert "state.ssm" in ref["parts"] and "state.angle" in ref["parts"]
        if case["kind"] == "grad":  # every input's gradient was compared
            assert {"grad.q", "grad.dt", "grad.angles", "grad.trap"} <= set(ref["parts"])
    # A real (not planted) error is never exactly zero for fp32/bf16 against float64.
    assert all(c["cells"]["reference"]["err"] > 0 for c in data["cases"])


def test_planted_wrong_backend_fails_naming_case(monkeypatch, capsys):
    monkeypatch.setitem(backend_mod._REGISTRY, "fake-wrong", WrongBackend(siso_only=True))
    cases = _cases("siso", "siso-state", "mimo-r2", "decode-siso")
    report = check.run_check(cases, "cpu", backends=["reference", "fake-wrong"])
    assert report.failed
    for name in ("siso", "siso-state", "decode-siso"):
        cell = report.cells[(name, "fake-wrong")]
        assert cell.status == check.FAIL and cell.err > 0.04
        assert report.cells[(name, "reference")].status == check.PASS
        assert any(f"case {name}: fake-wrong" in line for line in report.failures)
        # Compared with each other too: the disagreement names both backends.
        assert any(
            d["case"] == name and {d["a"], d["b"]} == {"reference", "fake-wrong"}
            for d in report.disagreements
        )
    # A case the backend declines is n/a with its reason, never a pass.
    cell = report.cells[("mimo-r2", "fake-wrong")]
    assert cell.status == check.NA and "SISO only" in cell.reason
    assert "FAIL" in report.table() and "fake-wrong" in report.table()

    # Through the command line: nonzero exit and the case named in the output.
    rc = check.main(["--quick", "--backends", "reference,fake-wrong", "--cases", "siso-L7"])
    assert rc == 1
    assert "case siso-L7: fake-wrong" in capsys.readouterr().out


def test_crashing_backend_is_an_error_not_a_pass(monkeypatch):
    monkeypatch.setitem(backend_mod._REGISTRY, "fake-crash", CrashingBackend())
    report = check.run_check(_cases("siso", "decode-siso"), "cpu", backends=["fake-crash"])
    assert report.cells[("siso", "fake-crash")].status == check.ERR
    assert "kernel launch failed" in report.cells[("siso", "fake-crash")].reason
    # No step method: the decode case is not applicable rather than passing.
    assert report.cells[("decode-siso", "fake-crash")].status == check.NA
    assert report.failed


def test_planted_wrong_gradient_fails(monkeypatch):
    from mamba3_kernels import dispatch

    monkeypatch.setitem(backend_mod._REGISTRY, "tilelang", ZeroGradBackend("tilelang"))
    dispatch.clear_caches()
    try:
        report = check.run_check(_cases("grad-siso", "siso"), "cpu", backends=["tilelang"])
    finally:
        dispatch.clear_caches()
    assert report.cells[("siso", "tilelang")].status == check.PASS  # the forward is right
    cell = report.cells[("grad-siso", "tilelang")]
    assert cell.status == check.FAIL and cell.parts["out"] < 1e-4
    assert cell.parts["grad.q"] == pytest.approx(1.0) and "grad.initial_state.ssm" in cell.parts
    assert any("case grad-siso: tilelang" in line for line in report.failures)


def test_tolerances():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert check.tolerance(torch.float32, cpu) == 1e-4
    assert check.tolerance(torch.float32, cuda) == 1e-3
    assert check.tolerance(torch.bfloat16, cpu) == check.tolerance(torch.float16, cuda) == 2e-2


def test_full_case_matrix_covers_features():
    cases = check.build_cases(quick=False)
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    assert {c.rank for c in cases} >= {1, 2, 4, 8}
    assert {c.dtype for c in cases} >= {torch.float32, torch.bfloat16, torch.float16}
    assert {c.rotary for c in cases} >= {"interleaved", "halves"}
    assert any(c.ngroups > 1 for c in cases) and any(c.cu_seqlens for c in cases)
    assert any(not c.with_D and not c.with_z for c in cases)
    assert any(c.seqlen % 2 == 1 for c in cases) and any(c.kind == "decode" for c in cases)
    assert {c.d_state for c in cases} >= {64, 128, 256} and {c.headdim for c in cases} >= {
        32,
        64,
        128,
    }


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cross_check_all_backends():
    report = check.run_check(device="cuda")
    print(report.table())
    assert not report.failed, "\n".join(report.failures)
    assert "reference" in report.columns and mamba3_kernels.info()["backends"]
