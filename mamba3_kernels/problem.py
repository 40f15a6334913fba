"""The problem description: everything a backend needs to know about one call, computed once."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

_T = TypeVar("_T")

ROTARY_LAYOUTS = ("interleaved", "halves")


@dataclass(frozen=True)
class Problem:
    """Sizes and flags of one validated ``scan`` or ``step`` call.

    Sizes follow docs/spec.md: B batch (1 with cu_seqlens), L length (1 for a step), H value heads,
    G q/k groups, R MIMO rank (1 for SISO), N state size, P value head dim, S rotary angles.
    ``nseq`` is the number of sequences (B, or len(cu_seqlens) - 1 when varlen).
    ``pooled``: a step whose state is a pool of slots addressed by ``state_indices`` (B,);
    ``state_dtype``: the dtype of the given state's ssm tensor (None without a state), which a
    backend may not support in 16 bits.
    """

    batch: int
    seqlen: int
    nheads: int
    ngroups: int
    rank: int
    d_state: int
    headdim: int
    n_angles: int
    nseq: int
    dtype: torch.dtype
    device_type: str
    mimo: bool
    rotary: str
    has_D: bool
    has_z: bool
    has_mimo_o: bool
    has_initial_state: bool
    return_final_state: bool
    varlen: bool
    decode: bool = False
    chunk_size: int | None = None
    pooled: bool = False
    state_dtype: torch.dtype | None = None

    @property
    def heads_per_group(self) -> int:
        return self.nheads // self.ngroups

    def bucket_key(self) -> str:
        """A stable string naming the shape bucket (used by config files)."""
        kind = "step" if self.decode else "scan"
        return (
            f"{kind}-B{_pow2_bucket(self.batch)}-L{_pow2_bucket(self.seqlen)}-H{self.nheads}"
            f"-G{self.ngroups}-R{self.rank}-N{self.d_state}-P{self.headdim}-S{self.n_angles}"
            f"-{str(self.dtype).replace('torch.', '')}"
        )


def _pow2_bucket(x: int) -> int:
    """Round up to a power of two, so nearby sizes share a tuned config."""
    b = 1
    while b < x:
        b *= 2
    return b


def memo_by_identity(fn: Callable[[Problem], _T], maxsize: int = 256) -> Callable[[Problem], _T]:
    """``fn(problem)`` memoized by the Problem object's identity: the validation memo hands back
    the same Problem for a repeated call signature, so a hot-path lookup is one dict hit instead
    of hashing the dataclass by value. Each entry holds its Problem, which keeps the id from
    being reused while the entry lives; a hit is confirmed with ``is``."""
    cache: dict[int, tuple[Problem, _T]] = {}

    @functools.wraps(fn)
    def wrapper(problem: Problem) -> _T:
        hit = cache.get(id(problem))
        if hit is not None and hit[0] is problem:
            return hit[1]
        if len(cache) >= maxsize:
            cache.clear()
        result = fn(problem)
        cache[id(problem)] = (problem, result)
        return result

    return wrapper
