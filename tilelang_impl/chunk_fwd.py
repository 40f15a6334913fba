"""Chunked prefill forward of the Mamba-3 scan in TileLang (SISO and MIMO), for Hopper.

The elementwise work (rotary angles and rotation, biases, rank weights, trapezoid weights, the
chunk-local decay sums) runs in PyTorch before the kernel (prep.prepare), the output stage after
it (prep.finish). The kernel does the chunked matrix form of docs/spec.md, section 6, on the
tensor cores. One program owns one (sequence, head) pair and one block of ``block_p`` value
columns, keeps that block's fp32 P x N state in registers and walks the chunks in order. A MIMO
chunk of C tokens is a block of C*R rows, row i being token i // R, rank i % R. Per chunk:

    S    = Q K^T                                     (rows x rows, fp32 accumulation)
    S_ij = S_ij * exp(cum_i - cum_j) * w_j   if token(i) > token(j)
           S_ij * g_j                        if token(i) = token(j)   (every pair of ranks)
           0                                 otherwise
    Y    = exp(cum) * (Q Hs^T) + S V                 (Hs: the state entering the chunk)
    Hs  <- exp(cum_last) Hs + V^T (K * exp(cum_last - cum) * w)

Q, K, V and the per-row coefficients stream through shared memory (TileLang turns the chunk
loop into a TMA producer warp group feeding ``threads`` consumer threads, ``num_stages`` chunks
deep); the three products are wgmma on sm_90. S goes from the accumulator to a 16-bit register
fragment that feeds S V directly; the state is rounded to the 16-bit dtype in shared memory for
the Q Hs^T product, while the state itself stays fp32 throughout. y is written in fp32.

Batch (times heads) and length are symbolic in the kernel (T.dynamic), so one build serves every
batch size and sequence length; a build is specialised on N, P, R, the chunk, the tiles, the
dtype and the target architecture (``KernelKey``). Builds are cached in this process
(``compile_kernel``); TileLang also keeps each build on disk (under TILELANG_CACHE_DIR, by
default ~/.tilelang/cache) keyed by the kernel's TIR text, which spells out every specialised
value, together with the TileLang version, the target and the compiler options, so a later
process loads the built kernel instead of lowering and running nvcc again.
"""

import dataclasses
import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from mamba3_kernels.backend import KernelSpec
from mamba3_kernels.inputs import ScanInputs
from mamba3_kernels.problem import Problem
from mamba3_kernels.state import Mamba3State

from . import prep as _prep

__all__ = [
    "SPEC",
    "ChunkFwdConfig",
    "KernelKey",
    "chunk_fwd",
    "compile_kernel",
    "constraint",
    "default_config",
    "emulate_kernel",
    "kernel_key",
    "lower_kernel",
    "search_space",
    "smem_bytes",
]

SMEM_SM90 = 232448  # bytes of shared memory one block may opt into on sm_90 (227 KiB)
# fp32 values per consumer thread the kernel's fragments may hold (the accumulators S, Y and the
# state, plus S in 16 bits): above this ptxas spills under TileLang's register split (measured at
# sm_90: 208 and 224 build without spills, 240 spills).
FRAGMENT_LIMIT = 224
_ROWS_PER_WARPGROUP = 64  # wgmma: 64 rows of every product per consumer warp group
DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class ChunkFwdConfig:
    """Tunable parameters of the TileLang chunked forward.

    chunk_size: tokens per chunk (C); a chunk holds C*R rows, which must be a multiple of 64
                per consumer warp group (64 for 128 threads, 128 for 256).
                problem.chunk_size overrides it.
    block_p:    value columns per program (P / block_p programs per sequence and head; each
                recomputes the chunk's scores).
    threads:    consumer threads per program (128 or 256: one or two warp groups); TileLang adds
                one producer warp group of 128 threads for the loads.
    num_stages: chunks in flight in shared memory (the loads of later chunks overlap the
                products of the current one).
    """

    chunk_size: int = 16
    block_p: int = 64
    threads: int = 128
    num_stages: int = 2


class KernelKey(NamedTuple):
    """Everything a kernel build is specialised on (batch and length are symbolic)."""

    d_state: int
    headdim: int
    rank: int
    chunk: int
    block_p: int
    threads: int
    num_stages: int
    dtype: str  # "bfloat16" or "float16"


def _chunk(problem: Problem, config: ChunkFwdConfig) -> int:
    return problem.chunk_size if problem.chunk_size is not None else config.chunk_size


def kernel_key(problem: Problem, config: ChunkFwdConfig) -> KernelKey:
    """The build a call of ``problem`` under ``config`` runs (the rotary layout, heads, groups
    and optional inputs are handled around the kernel and do not change it)."""
    return KernelKey(
        d_state=problem.d_state,
        headdim=problem.headdim,
        rank=problem.rank,
        chunk=_chunk(problem, config),
        block_p=config.block_p,
        threads=config.threads,
        num_stages=config.num_stages,
        dtype=DTYPES.get(problem.dtype, str(problem.dtype).replace("torch.", "")),
    )


def smem_bytes(key: KernelKey) -> int:
    """Shared memory of one program in bytes: Q, K, V and the three per-row coefficients of
    ``num_stages`` chunks, the scaled keys and the 16-bit state of one, each buffer rounded up
    to 1 KiB (TileLang aligns its TMA buffers so), plus 1 KiB of static shared memory (barriers).
    Never below TileLang's figure and within 4 KiB of it (measured over the search space at
    N=128, P=64, R=4; tests/test_tilelang_compile.py checks the default builds)."""
    rows = key.chunk * key.rank
    esize = 2  # the 16-bit dtypes

    def buf(nbytes: int) -> int:
        return -(-nbytes // 1024) * 1024

    per_stage = 2 * buf(rows * key.d_state * esize) + buf(rows * key.block_p * esize)
    coefs = 3 * buf(key.num_stages * rows * 4)
    single = buf(rows * key.d_state * esize) + buf(key.block_p * key.d_state * esize)
    return key.num_stages * per_stage + coefs + single + 1024


def fragment_floats(key: KernelKey) -> int:
    """fp32-equivalent values per consumer thread held in register fragments."""
    rows = key.chunk * key.rank
    values = rows * rows + rows * key.block_p + key.block_p * key.d_state + rows * rows // 2
    return -(-values // key.threads)


@functools.lru_cache(maxsize=256)
def default_config(problem: Problem) -> ChunkFwdConfig:
    """Heuristic config: chunks of 64 rows (C = 64 / R tokens), 64-wide value blocks, one
    consumer warp group, two pipeline stages where their shared memory fits (every supported
    N, P at sm_90), else one. Not tuned yet (correctness first)."""
    chunk = max(1, _ROWS_PER_WARPGROUP // problem.rank)
    block_p = min(64, problem.headdim)
    config = ChunkFwdConfig(chunk_size=chunk, block_p=block_p, threads=128, num_stages=2)
    if smem_bytes(kernel_key(problem, config)) > SMEM_SM90:
        config = dataclasses.replace(config, num_stages=1)
    return config


def search_space(problem: Problem) -> dict[str, list]:
    """Candidate values per parameter (constraint() removes invalid combinations)."""
    return {
        "chunk_size": [c for c in (8, 16, 32, 64, 128) if c * problem.rank in (64, 128)],
        "block_p": [b for b in (32, 64, 128) if b <= problem.headdim],
        "threads": [128, 256],
        "num_stages": [1, 2, 3],
    }


def constraint(problem: Problem, config: ChunkFwdConfig, device_props: dict | None) -> str | None:
    """Why ``config`` cannot run ``problem`` (tile shapes, registers, shared memory), or None.
    Shared memory is checked against ``device_props["shared_memory_per_block_optin"]``, or the
    sm_90 limit (227 KiB) off-GPU."""
    key = kernel_key(problem, config)
    rows = key.chunk * key.rank
    if key.threads not in (128, 256):
        return f"threads {key.threads} not 128 or 256"
    if key.chunk < 1:
        return f"chunk_size {key.chunk} < 1"
    per_group = _ROWS_PER_WARPGROUP * (key.threads // 128)
    if rows % per_group:
        return (
            f"chunk_size*R = {rows} rows is not a multiple of {per_group} (threads {key.threads})"
        )
    if key.block_p < 16 or key.block_p % 16 or problem.headdim % key.block_p:
        return f"block_p {key.block_p} must be a multiple of 16 dividing P={problem.headdim}"
    if problem.d_state % 16:
        return f"d_state N={problem.d_state} is not a multiple of 16"
    if key.num_stages < 1 or key.num_stages > 4:
        return f"num_stages {key.num_stages} not in 1..4"
    frag = fragment_floats(key)
    if frag > FRAGMENT_LIMIT:
        return (
            f"register fragments of {frag} values per thread > {FRAGMENT_LIMIT} "
            f"({rows} rows, block_p {key.block_p}, N={key.d_state}, {key.threads} threads)"
        )
    limit = SMEM_SM90
    if device_props is not None:
        limit = int(device_props.get("shared_memory_per_block_optin", SMEM_SM90))
    need = smem_bytes(key)
    if need > limit:
        return f"shared memory {need} bytes > {limit} bytes per block"
    return None


def _applies(problem: Problem) -> bool:
    return not problem.decode


SPEC = KernelSpec(
    name="chunk_fwd",
    modes=("inference",),
    version=1,
    config_cls=ChunkFwdConfig,
    applies=_applies,
    default=default_config,
    space=search_space,
    constraint=constraint,
)


# ----------------------------------------------------------------------------------------------
# The kernel


def build_kernel(key: KernelKey):
    """The TileLang PrimFunc of one build. Arguments, with BH = batch * heads (symbolic) and
    nrows = padded length * R (symbolic, a multiple of the chunk's rows):
    q, k (BH, nrows, N) and v (BH, nrows, P) in the 16-bit dtype; cum, w, g (BH, nrows) fp32;
    h0 (BH, P, N) fp32 (the state entering the first chunk); outputs y (BH, nrows, P) fp32 and
    hf (BH, P, N) fp32 (the state after the last chunk)."""
    import tilelang.language as T

    N, P, R = key.d_state, key.headdim, key.rank
    CR = key.chunk * R  # rows per chunk
    BP = key.block_p
    dtype = key.dtype
    acc = "float32"
    bh = T.dynamic("bh")
    nrows = T.dynamic("nrows")
    full_row = T.GemmWarpPolicy.FullRow

    @T.prim_func
    def mamba3_chunk_fwd(
        Q: T.Tensor((bh, nrows, N), dtype),
        K: T.Tensor((bh, nrows, N), dtype),
        V: T.Tensor((bh, nrows, P), dtype),
        Cum: T.Tensor((bh, nrows), acc),
        W: T.Tensor((bh, nrows), acc),
        G: T.Tensor((bh, nrows), acc),
        H0: T.Tensor((bh, P, N), acc),
        Y: T.Tensor((bh, nrows, P), acc),
        HF: T.Tensor((bh, P, N), acc),
    ):
        with T.Kernel(P // BP, bh, threads=key.threads) as (pb, ib):
            q_s = T.alloc_shared((CR, N), dtype)
            k_s = T.alloc_shared((CR, N), dtype)
            v_s = T.alloc_shared((CR, BP), dtype)
            kd_s = T.alloc_shared((CR, N), dtype)  # keys scaled by their weight to the chunk end
            h_s = T.alloc_shared((BP, N), dtype)  # the state entering the chunk, 16-bit
            cum_s = T.alloc_shared((CR,), acc)
            w_s = T.alloc_shared((CR,), acc)
            g_s = T.alloc_shared((CR,), acc)
            s_f = T.alloc_fragment((CR, CR), acc)
            s_c = T.alloc_fragment((CR, CR), dtype)
            o_f = T.alloc_fragment((CR, BP), acc)
            h_f = T.alloc_fragment((BP, N), acc)  # the fp32 state
            p0 = pb * BP

            T.copy(H0[ib, p0 : p0 + BP, :], h_f)
            for c in T.Pipelined(T.ceildiv(nrows, CR), num_stages=key.num_stages):
                r0 = c * CR
                T.copy(Q[ib, r0 : r0 + CR, :], q_s)
                T.copy(K[ib, r0 : r0 + CR, :], k_s)
                T.copy(V[ib, r0 : r0 + CR, p0 : p0 + BP], v_s)
                T.copy(Cum[ib, r0 : r0 + CR], cum_s)
                T.copy(W[ib, r0 : r0 + CR], w_s)
                T.copy(G[ib, r0 : r0 + CR], g_s)

                # Intra-chunk scores, masked and weighted (rows of one token share the decay).
                T.gemm(q_s, k_s, s_f, transpose_B=True, clear_accum=True, policy=full_row)
                for i, j in T.Parallel(CR, CR):
                    s_f[i, j] = T.if_then_else(
                        i // R > j // R,
                        s_f[i, j] * (T.exp(cum_s[i] - cum_s[j]) * w_s[j]),
                        T.if_then_else(i // R == j // R, s_f[i, j] * g_s[j], 0.0),
                    )
                T.copy(s_f, s_c)

                # Y = exp(cum) * (Q Hs^T) + S V
                T.copy(h_f, h_s)
                T.gemm(q_s, h_s, o_f, transpose_B=True, clear_accum=True, policy=full_row)
                for i, p in T.Parallel(CR, BP):
                    o_f[i, p] = o_f[i, p] * T.exp(cum_s[i])
                T.gemm(s_c, v_s, o_f, policy=full_row)
                T.copy(o_f, Y[ib, r0 : r0 + CR, p0 : p0 + BP])

                # Hs <- exp(cum_last) Hs + V^T (K * exp(cum_last - cum) * w)
                for i, n in T.Parallel(CR, N):
                    kd_s[i, n] = k_s[i, n] * (T.exp(cum_s[CR - 1] - cum_s[i]) * w_s[i])
                for p, n in T.Parallel(BP, N):
                    h_f[p, n] = h_f[p, n] * T.exp(cum_s[CR - 1])
                T.gemm(v_s, kd_s, h_f, transpose_A=True)
            T.copy(h_f, HF[ib, p0 : p0 + BP, :])

    return mamba3_chunk_fwd


def target_for(arch: str) -> dict:
    """TileLang's target for a CUDA architecture such as "sm_90a"."""
    return {"kind": "cuda", "arch": arch}


def device_arch(device: torch.device | None = None) -> str:
    """The architecture name TileLang builds for on this GPU (sm_90a on H100/H200: wgmma needs
    the architecture-specific "a" target)."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}" + ("a" if major >= 9 else "")


_KERNELS: dict[tuple[KernelKey, str], object] = {}


def compile_kernel(key: KernelKey, arch: str = "sm_90a"):
    """The built kernel (a TileLang JITKernel) of ``key`` for ``arch``, cached in this process
    (and by TileLang on disk). Needs no GPU: the build runs TileLang's lowering and nvcc."""
    hit = _KERNELS.get((key, arch))
    if hit is None:
        import tilelang

        hit = tilelang.compile(build_kernel(key), target=target_for(arch))
        _KERNELS[(key, arch)] = hit
    return hit


def lower_kernel(key: KernelKey, arch: str = "sm_90a", compile_device: bool = True):
    """TileLang's lowering of ``key`` (a CompiledArtifact: kernel_source, device_mod), with the
    device code compiled by nvcc when ``compile_device``; for tests and inspection, uncached by
    this module (nvcc's output is cached on disk by TileLang, keyed by the CUDA source)."""
    import tilelang
    from tilelang import tvm

    target = tvm.target.Target(target_for(arch))
    with target:
        return tilelang.lower(build_kernel(key), target=target,
                              enable_device_compile=compile_device)  # fmt: skip


def lowered_smem_bytes(artifact) -> int:
    """The dynamic shared memory TileLang's lowering gives the kernel, in bytes."""
    sizes = [
        int(f.attrs["dyn_shared_memory_buf"])
        for f in artifact.device_mod.functions.values()
        if f.attrs is not None and "dyn_shared_memory_buf" in f.attrs
    ]
    return max(sizes, default=0)


def emulate_kernel(key: KernelKey, prepared: _prep.Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's computation in PyTorch, chunk by chunk, with its roundings (16-bit scores,
    16-bit state in the Q Hs^T product, 16-bit scaled keys; fp32 accumulation): (y, hf) as the
    kernel returns them. For tests on machines without a GPU, and as its executable description.
    """
    q, k, v = prepared.q, prepared.k, prepared.v
    bh, nrows, n = q.shape
    low = q.dtype
    CR = key.chunk * key.rank
    tok = torch.arange(CR, device=q.device) // key.rank
    later = tok[:, None] > tok[None, :]
    same = tok[:, None] == tok[None, :]
    f32 = torch.float32
    h = prepared.h0.clone()
    y = torch.empty(bh, nrows, v.shape[-1], dtype=f32, device=q.device)
    for r0 in range(0, nrows, CR):
        qc, kc, vc = (x[:, r0 : r0 + CR].to(f32) for x in (q, k, v))
        cum, w, g = (x[:, r0 : r0 + CR] for x in (prepared.cum, prepared.w, prepared.g))
        s = qc @ kc.transpose(1, 2)
        decay = torch.exp((cum[:, :, None] - cum[:, None, :]).masked_fill(~later, 0.0))
        s = torch.where(later, s * (decay * w[:, None, :]), torch.where(same, s * g[:, None, :], 0))
        s = s.to(low).to(f32)
        inter = (qc @ h.to(low).to(f32).transpose(1, 2)) * torch.exp(cum)[:, :, None]
        y[:, r0 : r0 + CR] = inter + s @ vc
        last = cum[:, -1:]
        kd = (kc * (torch.exp(last - cum) * w)[:, :, None]).to(low).to(f32)
        h = h * torch.exp(last)[:, :, None] + vc.transpose(1, 2) @ kd
    return y, h


def chunk_fwd(
    problem: Problem, inputs: ScanInputs, config: ChunkFwdConfig
) -> tuple[torch.Tensor, Mamba3State | None]:
    """Prefill forward of one fixed-length call on a CUDA device: (out, final state or None)."""
    if problem.seqlen == 0:
        return _prep.empty_call(problem, inputs)
    key = kernel_key(problem, config)
    device = inputs.v.device
    with torch.cuda.device(device):
        kernel = compile_kernel(key, device_arch(device))
        prepared = _prep.prepare(problem, inputs, key.chunk)
        bh, nrows, _ = prepared.q.shape
        y = torch.empty(bh, nrows, problem.headdim, dtype=torch.float32, device=device)
        hf = torch.empty(bh, problem.headdim, problem.d_state, dtype=torch.float32, device=device)
        kernel(prepared.q, prepared.k, prepared.v, prepared.cum, prepared.w, prepared.g,
               prepared.h0, y, hf)  # fmt: skip
        return _prep.finish(problem, inputs, prepared, y, hf)
