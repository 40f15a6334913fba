"""The cross-check's cases, its result cells and their report (see ``mamba3_kernels.check``):
which calls are checked (sizes, layouts, features, dtypes), at which tolerance, and how a matrix of
results is printed and saved.
"""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass, field, replace

import torch

from .inputs import ScanInputs
from .testing import random_inputs

# The reference evaluated directly in its two forms, next to the registered backends.
REF_RECURRENT = "reference:recurrent"
REF_CHUNKED = "reference:chunked"
REF_CHUNK_SIZE = 16  # small, so that odd lengths end mid-chunk and several chunks are crossed

PASS, FAIL, NA, ERR = "pass", "FAIL", "n/a", "ERR"


@dataclass(frozen=True)
class Case:
    """One cross-check case: the arguments of ``random_inputs`` plus how the call is made.

    kind "scan" compares one scan call; kind "decode" runs ``seqlen`` step calls from a random
    initial state and compares them with the scan over the same tokens; kind "grad" compares the
    scan's output and the gradients of every input.
    """

    name: str
    kind: str = "scan"
    batch: int = 2
    seqlen: int = 33
    nheads: int = 4
    ngroups: int = 1
    rank: int = 1
    mimo: bool | None = None
    d_state: int = 16
    headdim: int = 8
    n_angles: int | None = None
    dtype: torch.dtype = torch.float32
    rotary: str | None = None
    with_D: bool = True
    with_z: bool = True
    with_mimo_o: bool = True
    with_initial_state: bool = False
    return_final_state: bool = False
    cu_seqlens: tuple[int, ...] | None = None
    chunk_size: int | None = None

    def make_inputs(self, device: torch.device, seed: int) -> ScanInputs:
        gen = torch.Generator().manual_seed(seed)
        return random_inputs(
            batch=self.batch,
            seqlen=self.seqlen,
            nheads=self.nheads,
            ngroups=self.ngroups,
            d_state=self.d_state,
            headdim=self.headdim,
            n_angles=self.n_angles,
            rank=self.rank,
            mimo=self.mimo,
            dtype=self.dtype,
            device=device,
            with_D=self.with_D,
            with_z=self.with_z,
            with_mimo_o=self.with_mimo_o,
            with_initial_state=self.with_initial_state or self.kind == "decode",
            cu_seqlens=list(self.cu_seqlens) if self.cu_seqlens else None,
            generator=gen,
        )

    def describe(self) -> dict:
        d = asdict(self)
        d["dtype"] = str(self.dtype).replace("torch.", "")
        return d


@dataclass
class Cell:
    """The result of one column on one case."""

    status: str
    err: float | None = None
    reason: str | None = None
    parts: dict[str, float] = field(default_factory=dict)

    def text(self) -> str:
        if self.status in (PASS, FAIL):
            return f"{self.status} {self.err:.1e}"
        return self.status


@dataclass
class Report:
    """All cells of a run, the disagreements between columns, and what could not run at all."""

    device: str
    columns: list[str]
    cases: list[Case]
    tolerances: dict[str, float]
    cells: dict[tuple[str, str], Cell]
    disagreements: list[dict]
    unavailable: dict[str, str]

    @property
    def failures(self) -> list[str]:
        """One line per failing cell or disagreement, naming the case and backends."""
        lines = []
        for case in self.cases:
            for col in self.columns:
                cell = self.cells[(case.name, col)]
                if cell.status == FAIL:
                    worst = max(cell.parts, key=cell.parts.get)
                    lines.append(
                        f"case {case.name}: {col} differs from the float64 reference: "
                        f"rel err {cell.err:.2e} > tol {self.tolerances[case.name]:.0e} "
                        f"(worst in {worst})"
                    )
                elif cell.status == ERR:
                    lines.append(f"case {case.name}: {col} raised: {cell.reason}")
        for d in self.disagreements:
            lines.append(
                f"case {d['case']}: {d['a']} and {d['b']} disagree: rel err {d['err']:.2e} "
                f"> tol {d['tol']:.0e} (in {d['part']})"
            )
        return lines

    @property
    def failed(self) -> bool:
        return bool(self.failures)

    def table(self) -> str:
        """The pass/fail matrix: rows cases, columns backends, worst relative error per cell."""
        w0 = max(len("case"), *(len(c.name) for c in self.cases)) + 2
        widths = [max(len(c), 13) + 2 for c in self.columns]
        lines = [
            "case".ljust(w0)
            + "".join(c.ljust(w) for c, w in zip(self.columns, widths, strict=True))
        ]
        lines.append("-" * len(lines[0]))
        for case in self.cases:
            cells = [self.cells[(case.name, c)].text() for c in self.columns]
            lines.append(
                case.name.ljust(w0)
                + "".join(t.ljust(w) for t, w in zip(cells, widths, strict=True))
            )
        # n/a reasons, one line per (column, reason) with the cases it applies to.
        reasons: dict[tuple[str, str], list[str]] = {}
        for case in self.cases:
            for col in self.columns:
                cell = self.cells[(case.name, col)]
                if cell.status == NA:
                    reasons.setdefault((col, cell.reason or "?"), []).append(case.name)
        if reasons:
            lines.append("")
            lines.append("n/a:")
            for (col, why), names in reasons.items():
                lines.append(f"  {col}: {why} ({', '.join(names)})")
        if self.unavailable:
            lines.append("")
            lines.append("not available here:")
            for name, why in self.unavailable.items():
                lines.append(f"  {name}: {why}")
        failures = self.failures
        lines.append("")
        if failures:
            lines.append(f"FAILED ({len(failures)}):")
            lines += [f"  {f}" for f in failures]
        else:
            n_pass = sum(c.status == PASS for c in self.cells.values())
            lines.append(f"all {n_pass} checked cells pass; no disagreements")
        return "\n".join(lines)

    def to_json(self) -> dict:
        from .info import info

        return {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": self.device,
            "versions": info()["versions"],
            "columns": self.columns,
            "unavailable": self.unavailable,
            "cases": [
                {
                    **case.describe(),
                    "tol": self.tolerances[case.name],
                    "cells": {c: asdict(self.cells[(case.name, c)]) for c in self.columns},
                }
                for case in self.cases
            ],
            "disagreements": self.disagreements,
            "failures": self.failures,
            "failed": self.failed,
        }


def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """Relative-error tolerance of a case: fp32 1e-4 (1e-3 on CUDA, tf32), bf16/fp16 2e-2."""
    if dtype in (torch.bfloat16, torch.float16):
        return 2e-2
    if dtype == torch.float32:
        return 1e-3 if device.type == "cuda" else 1e-4
    return 1e-8


def build_cases(quick: bool = False) -> list[Case]:
    """The case matrix. ``quick``: tiny sizes (N 16/32, P 8/16) and a subset, for CPU (and the
    Triton interpreter); otherwise GPU-sized heads (N 64..256, P 32..128) and every feature."""
    if quick:
        # P = 16 so that the Triton kernels (tiles of at least 16) run under the interpreter.
        base = Case(name="", batch=2, seqlen=33, nheads=4, d_state=16, headdim=16)
        big = dict(d_state=32, headdim=8)
        cu = (0, 5, 20, 33)
        steps = 6
    else:
        base = Case(name="", batch=2, seqlen=301, nheads=8, d_state=64, headdim=32)
        big = dict(d_state=128, headdim=64)
        cu = (0, 17, 150, 151, 301)
        steps = 16
    bf16, fp16 = torch.bfloat16, torch.float16
    N = base.d_state
    big_name = f"siso-N{big['d_state']}-P{big['headdim']}"

    def c(name: str, **kw) -> Case:
        return replace(base, name=name, **kw)

    siso = [
        c("siso"),
        c("siso-bf16", dtype=bf16),
        c("siso-fp16", dtype=fp16),
        c("siso-gqa", ngroups=2),
        c("siso-halves", rotary="halves"),
        c("siso-S=N/2", n_angles=N // 2),
        c("siso-noDz", with_D=False, with_z=False),
        c("siso-state", with_initial_state=True, return_final_state=True),
        c("siso-state-bf16", with_initial_state=True, return_final_state=True, dtype=bf16),
        c("siso-varlen", cu_seqlens=cu, return_final_state=True),
        c("siso-varlen-state", cu_seqlens=cu, with_initial_state=True, return_final_state=True),
        c("siso-L1", seqlen=1, return_final_state=True),
        c("siso-L7", seqlen=7),
        c(big_name, **big),
        c("siso-chunk16", chunk_size=16),
    ]
    if not quick:
        siso += [
            c("siso-N256-P128", d_state=256, headdim=128, nheads=4, seqlen=130),
            c("siso-L1000-bf16", seqlen=1000, batch=1, dtype=bf16),
        ]
    mimo = [
        c("mimo-r2", rank=2),
        c("mimo-r4", rank=4),
        c("mimo-r8", rank=8),
        c("mimo-r4-bf16", rank=4, dtype=bf16),
        c("mimo-r4-no-o", rank=4, with_mimo_o=False),
        c("mimo-r4-interleaved", rank=4, rotary="interleaved"),
        c("mimo-r4-S=N/2", rank=4, n_angles=N // 2),
        c("mimo-r4-gqa", rank=4, ngroups=2),
        c("mimo-r4-state", rank=4, with_initial_state=True, return_final_state=True),
        c(
            "mimo-r4-varlen",
            rank=4,
            cu_seqlens=cu,
            with_initial_state=True,
            return_final_state=True,
        ),
        c("mimo-r1", rank=1, mimo=True),
        c("mimo-r4-noDz", rank=4, with_D=False, with_z=False),
    ]
    decode = [
        c("decode-siso", kind="decode", seqlen=steps),
        c("decode-siso-bf16", kind="decode", seqlen=steps, dtype=bf16),
        c("decode-siso-gqa-halves", kind="decode", seqlen=steps, ngroups=2, rotary="halves"),
        c("decode-mimo-r4", kind="decode", seqlen=steps, rank=4),
        c("decode-mimo-r4-no-o", kind="decode", seqlen=steps, rank=4, with_mimo_o=False),
        c("decode-mimo-r2-bf16", kind="decode", seqlen=steps, rank=2, dtype=bf16),
    ]
    grad = [
        c("grad-siso", kind="grad", with_initial_state=True, return_final_state=True),
        c("grad-siso-bf16", kind="grad", dtype=bf16),
        c("grad-mimo-r2", kind="grad", rank=2, with_initial_state=True, return_final_state=True),
        c("grad-mimo-r4-no-o", kind="grad", rank=4, with_mimo_o=False),
        c("grad-siso-varlen", kind="grad", cu_seqlens=cu, with_initial_state=True),
    ]
    if quick:
        keep = {
            "siso",
            "siso-bf16",
            "siso-gqa",
            "siso-halves",
            "siso-state",
            "siso-varlen-state",
            "siso-L1",
            big_name,
            "siso-L7",
            "mimo-r2",
            "mimo-r4-no-o",
            "mimo-r4-state",
            "mimo-r4-varlen",
            "decode-siso",
            "decode-mimo-r4",
            "grad-siso",
            "grad-mimo-r2",
        }
        return [x for x in siso + mimo + decode + grad if x.name in keep]
    return siso + mimo + decode + grad


# ---------------------------------------------------------------------------------------------
# Running one column on one case
