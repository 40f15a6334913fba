"""Shape buckets to tune: parsing from the command line or a model config, and the defaults.

A bucket is one representative call; the tuned config applies to every call whose
``Problem.bucket_key()`` matches (batch and length are rounded up to powers of two), and to
nearby buckets through the store's nearest-bucket rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import torch

from mamba3_kernels.inputs import ScanInputs
from mamba3_kernels.problem import Problem
from mamba3_kernels.testing import random_inputs

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}

# The benchmark shapes of the Triton backend (bf16, H=64, P=64, N=128, G=1, S=32).
DEFAULT_LAYER = {"nheads": 64, "ngroups": 1, "d_state": 128, "headdim": 64, "n_angles": 32}
DEFAULT_BATCH_LENGTHS = ((1, 2048), (1, 16384), (8, 2048))
DEFAULT_STEP_BATCHES = (1, 16, 128)
DEFAULT_RANKS = (1, 4)


@dataclass(frozen=True)
class Bucket:
    """One representative call: a prefill scan (kind "scan") or a decode step (kind "step")."""

    kind: str
    batch: int
    seqlen: int
    nheads: int
    ngroups: int
    d_state: int
    headdim: int
    n_angles: int
    rank: int
    dtype: torch.dtype

    @property
    def mimo(self) -> bool:
        return self.rank > 1

    def problem(self, device_type: str) -> Problem:
        """The Problem a validated call of this bucket gets (built without tensors, for listing).

        Flags are those of the common model call: D and z given, MIMO with mimo_o, default rotary
        layout, no state in or out for a scan; a step reads and updates a state.
        """
        step = self.kind == "step"
        return Problem(
            batch=self.batch,
            seqlen=1 if step else self.seqlen,
            nheads=self.nheads,
            ngroups=self.ngroups,
            rank=self.rank,
            d_state=self.d_state,
            headdim=self.headdim,
            n_angles=self.n_angles,
            nseq=self.batch,
            dtype=self.dtype,
            device_type=device_type,
            mimo=self.mimo,
            rotary="halves" if self.mimo else "interleaved",
            has_D=True,
            has_z=True,
            has_mimo_o=self.mimo,
            has_initial_state=step,
            return_final_state=step,
            varlen=False,
            decode=step,
        )

    def inputs(
        self, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[Problem, ScanInputs]:
        """Fresh random inputs of this bucket on ``device``, validated like a user call.

        For a step, ``inputs.initial_state`` is the state to update.
        """
        step = self.kind == "step"
        inp = random_inputs(
            batch=self.batch,
            seqlen=self.seqlen,
            nheads=self.nheads,
            ngroups=self.ngroups,
            d_state=self.d_state,
            headdim=self.headdim,
            n_angles=self.n_angles,
            rank=self.rank,
            dtype=self.dtype,
            device=device,
            step=step,
            generator=generator,
        )
        problem = self.problem(torch.device(device).type)
        try:
            from mamba3_kernels import validate
        except ImportError:  # validation not available: the hand-built description is exact
            return problem, inp
        rotary = problem.rotary
        if step:
            state = inp.initial_state
            problem, inp = validate.validate_step(*inp[:9], state, *inp[9:14], rotary=rotary)
        else:
            problem, inp = validate.validate_scan(*inp[:14], rotary=rotary)
        return problem, inp

    def describe(self) -> str:
        head = f"H={self.nheads} G={self.ngroups} N={self.d_state} P={self.headdim}"
        head += f" S={self.n_angles} R={self.rank} {str(self.dtype).replace('torch.', '')}"
        if self.kind == "step":
            return f"step B={self.batch} {head}"
        return f"scan B={self.batch} L={self.seqlen} {head}"


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {name!r}") from None


def parse_shape(text: str, dtype: torch.dtype, kind: str = "scan") -> Bucket:
    """'B,L,H,G,N,P,S,R' (scan) or 'B,H,G,N,P,S,R' (step) -> Bucket. S and R may be left out
    (S = N/4, R = 1)."""
    vals = [int(x) for x in text.replace("x", ",").split(",") if x.strip()]
    if kind == "step":
        vals = vals[:1] + [1] + vals[1:]
    if not 6 <= len(vals) <= 8:
        form = "B,H,G,N,P[,S[,R]]" if kind == "step" else "B,L,H,G,N,P[,S[,R]]"
        raise ValueError(f"shape {text!r}: expected {form}")
    B, L, H, G, N, P = vals[:6]
    S = vals[6] if len(vals) > 6 else N // 4
    R = vals[7] if len(vals) > 7 else 1
    if H % G:
        raise ValueError(f"shape {text!r}: H={H} must be a multiple of G={G}")
    return Bucket(kind, B, L, H, G, N, P, S, R, dtype)


def layer_from_model(model: str | dict) -> dict:
    """Layer sizes from a Mamba-3 model config (JSON text, a JSON file path, or a dict).

    Keys (defaults): d_model (required unless nheads), expand (2), headdim (64), d_state (128),
    ngroups (1), mimo_rank or rank (1), rope_fraction (0.5) or n_angles, nheads
    (d_model * expand // headdim).
    """
    if isinstance(model, str):
        text = model
        if not text.lstrip().startswith("{"):
            with open(text) as f:
                text = f.read()
        model = json.loads(text)
    headdim = int(model.get("headdim", 64))
    d_state = int(model.get("d_state", 128))
    if "nheads" in model:
        nheads = int(model["nheads"])
    else:
        nheads = int(model["d_model"]) * int(model.get("expand", 2)) // headdim
    rank = int(model.get("mimo_rank", model.get("rank", 1)))
    if "n_angles" in model:
        n_angles = int(model["n_angles"])
    else:
        n_angles = int(d_state * float(model.get("rope_fraction", 0.5))) // 2
    return {
        "nheads": nheads,
        "ngroups": int(model.get("ngroups", 1)),
        "d_state": d_state,
        "headdim": headdim,
        "n_angles": n_angles,
        "rank": rank,
    }


def default_buckets(
    dtype: torch.dtype = torch.bfloat16,
    layer: dict | None = None,
    batch_lengths=DEFAULT_BATCH_LENGTHS,
    step_batches=DEFAULT_STEP_BATCHES,
) -> list[Bucket]:
    """Scan buckets at ``batch_lengths`` and step buckets at ``step_batches`` for one layer
    (``layer`` from ``layer_from_model``; default: the benchmark layer, SISO and MIMO R=4)."""
    if layer is None:
        layers = [{**DEFAULT_LAYER, "rank": r} for r in DEFAULT_RANKS]
    else:
        layers = [layer]
    out: list[Bucket] = []
    for lay in layers:
        base = Bucket(
            "scan",
            1,
            1,
            lay["nheads"],
            lay["ngroups"],
            lay["d_state"],
            lay["headdim"],
            lay["n_angles"],
            lay["rank"],
            dtype,
        )
        out += [replace(base, batch=b, seqlen=L) for b, L in batch_lengths]
        out += [replace(base, kind="step", batch=b) for b in step_batches]
    return out
