"""CuTe DSL decode step (SISO and MIMO): one launch per step, the state updated in place.

One CTA per (head, batch row): grid (H, B), B a runtime argument, so one compiled kernel serves
every batch size. The CTA works in three phases:

1. Prologue. The first state tile is requested into registers first (its DRAM latency overlaps
   the rest of the prologue). Then the CTA's threads, striding over the N coordinates, advance
   the angles, rotate q and k (biases added) for every rank and gather the previous rotated k
   from the state, all in fp32 into shared memory; old and new v (and z) go there too. One
   barrier: from here on the old angle, k and v of this head are never read again from global
   memory, so the CTA may overwrite them.
2. The state. The fp32 P x N state is walked in passes of ``block_p`` rows. A thread owns
   ``cols`` columns of a row, as ``cols / 4`` 16-byte vectors strided by the row's thread count
   (so a warp's vector loads of one row are contiguous), and ``block_p / rows_of_threads`` rows
   of each pass. Every state element is read, updated and written by the thread that owns it.
   The row sums of the output (Hs q_r) are reduced over the row's threads with warp shuffles,
   then the row's first thread applies D, the z gate and mimo_o and writes out.
3. Epilogue: the new angle, rotated k (every rank) and v are written into the state.

The per-step tensors (q, k, v, z, adt, dt, trap, angles) have packed inner axes and a batch
stride given at run time (in elements); q_bias, k_bias, D, mimo_* and the state are contiguous.
The parameters and the per-step coefficients are fp32 here (the host converts others).
"""

from __future__ import annotations

from dataclasses import dataclass

from mamba3_kernels.backend import KernelSpec
from mamba3_kernels.problem import Problem, memo_by_identity

WARP = 32
# Register budget of a thread's state tile (fp32 values held for one pass, twice with prefetch).
MAX_TILE_REGS = 128


@dataclass(frozen=True)
class StepConfig:
    """Tunable parameters of the CuTe step kernel.

    threads:  threads per CTA (a multiple of 32).
    cols:     state columns a thread owns in a row: a multiple of 4 (16-byte fp32 vectors); the
              N / cols threads of a row must fit in a warp.
    block_p:  state rows per pass (held in registers); a multiple of the rows of threads
              (threads / (N / cols)) that divides P.
    prefetch: 1: each pass requests the next pass's tile before computing its own (twice the
              registers); 0: each pass loads its tile when it starts.
    """

    threads: int = 128
    cols: int = 4
    block_p: int = 64
    prefetch: int = 1


def _applies(problem: Problem) -> bool:
    return problem.decode


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@memo_by_identity
def default_config(problem: Problem) -> StepConfig:
    """The heuristic's config (memoized by the Problem's identity, as the Triton step's)."""
    return heuristic(problem.d_state, problem.headdim, problem.rank)


def heuristic(n: int, p: int, rank: int = 1) -> StepConfig:
    """A full warp per row (cols = N / 32, at least one vector), 128 threads, and as many rows
    per pass as keep a thread's tile within 64 registers (the prefetched next tile doubles it)."""
    cols = max(4, n // WARP)
    threads = 128
    row_threads = n // cols
    rows = threads // row_threads
    per_thread = max(1, 64 // cols)
    block_p = min(p, rows * per_thread)
    prefetch = 1 if p // block_p > 1 else 0
    return StepConfig(threads=threads, cols=cols, block_p=block_p, prefetch=prefetch)


def search_space(problem: Problem) -> dict[str, list]:
    n, p = problem.d_state, problem.headdim
    return {
        "threads": [64, 128, 256],
        "cols": [c for c in (4, 8, 16) if n % c == 0 and n // c <= WARP],
        "block_p": [b for b in (8, 16, 32, 64, 128) if b <= p],
        "prefetch": [0, 1],
    }


def constraint(problem: Problem, config: StepConfig, device_props: dict | None) -> str | None:
    """Why ``config`` cannot run ``problem``, or None."""
    return check_config(problem.d_state, problem.headdim, config)


def check_config(n: int, p: int, config: StepConfig) -> str | None:
    t, c, bp = config.threads, config.cols, config.block_p
    if t % WARP or not 32 <= t <= 1024:
        return f"threads={t} must be a multiple of 32 in [32, 1024]"
    if c % 4 or n % c:
        return f"cols={c} must be a multiple of 4 dividing N={n}"
    row_threads = n // c
    if not _pow2(row_threads) or row_threads > WARP:
        return f"N / cols = {row_threads} threads per row must be a power of two <= {WARP}"
    if (c // 4) * 4 * row_threads != n:
        return f"cols={c} does not tile N={n}"
    rows = t // row_threads
    if bp < rows or bp % rows or p % bp:
        return f"block_p={bp} must be a multiple of threads / (N / cols) = {rows} dividing P={p}"
    if config.prefetch not in (0, 1):
        return f"prefetch={config.prefetch} not 0 or 1"
    regs = (bp // rows) * c * (2 if config.prefetch and p // bp > 1 else 1)
    if regs > MAX_TILE_REGS:
        return f"{regs} state registers per thread (more than {MAX_TILE_REGS}: would spill)"
    return None


SPEC = KernelSpec(
    name="step",
    modes=("decode",),
    config_cls=StepConfig,
    applies=_applies,
    default=default_config,
    space=search_space,
    constraint=constraint,
)


@dataclass(frozen=True)
class Variant:
    """Everything a compiled step kernel is specialised on (besides its config): the sizes other
    than the batch, the rotary pairing, which optional tensors are given, and the dtype of
    q, k, v, z, the state's k and v and the output ("bf16", "fp16" or "fp32")."""

    nheads: int
    ngroups: int
    rank: int
    d_state: int
    headdim: int
    n_angles: int
    interleaved: bool
    has_D: bool
    has_z: bool
    has_mimo_v: bool
    has_mimo_z: bool
    has_mimo_o: bool
    dtype: str = "bf16"

    @property
    def keep_ranks(self) -> bool:
        """MIMO without mimo_o: out keeps its rank axis, (B, R, H, P)."""
        return self.has_mimo_v and not self.has_mimo_o

    def name(self, config: StepConfig) -> str:
        """A C identifier naming this variant and config (the export's symbol prefix)."""
        flags = "".join(
            ch for ch, on in (("d", self.has_D), ("z", self.has_z), ("v", self.has_mimo_v),
                              ("y", self.has_mimo_z), ("o", self.has_mimo_o)) if on
        )  # fmt: skip
        return (
            f"mamba3_step_h{self.nheads}g{self.ngroups}r{self.rank}n{self.d_state}p{self.headdim}"
            f"s{self.n_angles}_{'il' if self.interleaved else 'hv'}_{flags or 'x'}_{self.dtype}"
            f"_t{config.threads}c{config.cols}b{config.block_p}f{config.prefetch}"
        )


def variant_of(problem: Problem, dtype: str, has_mimo_v: bool, has_mimo_z: bool) -> Variant:
    return Variant(
        nheads=problem.nheads, ngroups=problem.ngroups, rank=problem.rank,
        d_state=problem.d_state, headdim=problem.headdim, n_angles=problem.n_angles,
        interleaved=problem.rotary == "interleaved", has_D=problem.has_D, has_z=problem.has_z,
        has_mimo_v=has_mimo_v, has_mimo_z=has_mimo_z, has_mimo_o=problem.has_mimo_o,
        dtype=dtype,
    )  # fmt: skip


# The arguments of the compiled host function, in order (the C ABI of the export follows them):
# 19 pointers, the batch size, the 8 batch strides (elements) of the per-step tensors, a stream.
POINTER_ARGS = (
    "q", "k", "v", "z", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "D", "mimo_v",
    "mimo_z", "mimo_o", "state_angle", "state_ssm", "state_k", "state_v", "out",
)  # fmt: skip
STRIDE_ARGS = ("q", "k", "v", "z", "adt", "dt", "trap", "angles")
# Pointers whose element type is the call's dtype; every other one is fp32.
DTYPE_POINTERS = frozenset({"q", "k", "v", "z", "state_k", "state_v", "out"})
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def pointer_align(name: str, dtype: str) -> int:
    """The alignment (bytes) the kernel assumes of a pointer: 16 for the state matrix (its
    tiles move as 16-byte vectors), the element's size for every other one."""
    if name == "state_ssm":
        return 16
    return DTYPE_BYTES[dtype] if name in DTYPE_POINTERS else 4
