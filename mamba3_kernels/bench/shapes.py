"""Benchmark shapes: the H100 target shapes, the latency sweeps, and parsing of the CLI flags."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import torch

# Ops a benchmark row times.
OPS = ("fwd", "fwdbwd", "decode")


@dataclass(frozen=True)
class Shape:
    """Sizes of one benchmarked call (docs/spec.md symbols).

    batch B, seqlen L (ignored for decode), nheads H, ngroups G, rank R (1: SISO), d_state N,
    headdim P, n_angles S; dtype of q/k/v/z; which optional inputs are present.
    """

    batch: int
    seqlen: int
    nheads: int = 64
    ngroups: int = 1
    rank: int = 1
    d_state: int = 128
    headdim: int = 64
    n_angles: int = 32
    dtype: torch.dtype = torch.bfloat16
    has_D: bool = True
    has_z: bool = False
    has_mimo_o: bool = True

    @property
    def mimo(self) -> bool:
        return self.rank > 1

    @property
    def elt(self) -> int:
        """Bytes per element of q/k/v/z/out."""
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def variant(self) -> str:
        return f"mimo R={self.rank}" if self.mimo else "siso"

    def as_dict(self) -> dict:
        return {
            "B": self.batch,
            "L": self.seqlen,
            "H": self.nheads,
            "G": self.ngroups,
            "R": self.rank,
            "N": self.d_state,
            "P": self.headdim,
            "S": self.n_angles,
            "dtype": str(self.dtype).replace("torch.", ""),
            "D": self.has_D,
            "z": self.has_z,
        }


@dataclass(frozen=True)
class Item:
    """One thing to time: an op ("fwd", "fwdbwd" or "decode") at a shape."""

    op: str
    shape: Shape
    group: str = "targets"  # "targets", "prefill_sweep" or "decode_sweep" (used by the plots)


# Model sizes a user can name with --model (the layer's mixer dims; H = d_inner / P).
MODELS: dict[str, dict] = {
    # The Triton backend issue's target configuration.
    "target": dict(nheads=64, ngroups=1, d_state=128, headdim=64, n_angles=32),
    # Typical published Mamba-3 sizes (d_model 768 / 1536 / 2048, expand 2, P = 64).
    "mamba3-130m": dict(nheads=24, ngroups=1, d_state=128, headdim=64, n_angles=32),
    "mamba3-780m": dict(nheads=48, ngroups=1, d_state=128, headdim=64, n_angles=32),
    "mamba3-1.5b": dict(nheads=64, ngroups=1, d_state=128, headdim=64, n_angles=32),
    # Tiny sizes for CPU demos (--quick).
    "tiny": dict(nheads=4, ngroups=1, d_state=16, headdim=16, n_angles=4),
}

SWEEP_SEQLENS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
SWEEP_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUICK_SEQLENS = (32, 64, 128)
QUICK_BATCHES = (1, 2, 4)


def model_dims(model: str | None) -> dict:
    """Head sizes from a --model name or a JSON file with nheads/ngroups/d_state/headdim/n_angles
    (a JSON may instead give d_model, expand and headdim; n_angles defaults to d_state // 4)."""
    if model is None:
        return dict(MODELS["target"])
    if model in MODELS:
        return dict(MODELS[model])
    with open(model) as f:
        cfg = json.load(f)
    headdim = int(cfg.get("headdim", 64))
    if "nheads" in cfg:
        nheads = int(cfg["nheads"])
    else:
        nheads = int(cfg["d_model"]) * int(cfg.get("expand", 2)) // headdim
    d_state = int(cfg.get("d_state", 128))
    dims = dict(
        nheads=nheads,
        ngroups=int(cfg.get("ngroups", 1)),
        d_state=d_state,
        headdim=headdim,
        n_angles=int(cfg.get("n_angles", d_state // 4)),
    )
    if "mimo_rank" in cfg:
        dims["rank"] = int(cfg["mimo_rank"])
    return dims


def target_items(dims: dict, dtype: torch.dtype) -> list[Item]:
    """The speed targets of the Triton backend issue (H100, bf16, H=64, P=64, N=128, G=1, S=32)."""
    siso = Shape(batch=1, seqlen=1, dtype=dtype, **{**dims, "rank": 1})
    mimo = replace(siso, rank=dims.get("rank", 4) if dims.get("rank", 1) > 1 else 4)
    items = [
        Item("fwd", replace(siso, batch=1, seqlen=2048)),
        Item("fwd", replace(siso, batch=1, seqlen=16384)),
        Item("fwd", replace(siso, batch=8, seqlen=2048)),
        Item("fwdbwd", replace(siso, batch=1, seqlen=16384)),
        Item("fwd", replace(mimo, batch=1, seqlen=16384)),
        Item("fwd", replace(mimo, batch=8, seqlen=2048)),
    ]
    items += [Item("decode", replace(siso, batch=b)) for b in (1, 16, 128)]
    return items


def sweep_items(
    dims: dict, dtype: torch.dtype, seqlens, batches, rank: int | None = None
) -> list[Item]:
    """Prefill forward at B=1 over ``seqlens`` (SISO, and MIMO when ``rank`` > 1), and SISO decode
    over ``batches``: the data of the two plots."""
    siso = Shape(batch=1, seqlen=1, dtype=dtype, **{**dims, "rank": 1})
    items = [Item("fwd", replace(siso, seqlen=L), "prefill_sweep") for L in seqlens]
    if rank and rank > 1:
        items += [Item("fwd", replace(siso, rank=rank, seqlen=L), "prefill_sweep") for L in seqlens]
    items += [Item("decode", replace(siso, batch=b), "decode_sweep") for b in batches]
    return items


def custom_items(dims: dict, dtype: torch.dtype, batches, seqlens, ops) -> list[Item]:
    """Every (op, batch, seqlen) combination asked for with --batch/--seqlen (decode ignores L)."""
    base = Shape(batch=1, seqlen=1, dtype=dtype, **dims)
    items = []
    for op in ops:
        for b in batches:
            if op == "decode":
                items.append(Item(op, replace(base, batch=b), "custom"))
                continue
            for L in seqlens:
                items.append(Item(op, replace(base, batch=b, seqlen=L), "custom"))
    return items
