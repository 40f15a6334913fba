"""Benchmark of the Triton chunked prefill forward (SISO and MIMO) on a CUDA GPU.

For each shape (bf16, H=64, P=64, N=128, G=1, S=32, with D and z; MIMO R=4 with mimo_o):
a correctness check against the fp32 reference on the same device (small shapes), then the
do_bench median of one launch for the default config and for a few candidate configs, next to
the memory floor (every input read once, the output written once, at the measured copy rate)
and the tensor-core FLOP count of the chunked form.

    python tools/bench_triton_prefill.py --json results.json [--sweep] [--cases siso_1x2048 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time

import torch
import triton
import triton.testing
from bench_triton_backward import parse_knobs
from mamba3_kernels.triton_impl import chunk_fwd as cf

import mamba3_kernels
from mamba3_kernels.reference import reference_scan
from mamba3_kernels.testing import cast_inputs, random_inputs, rel_err
from mamba3_kernels.validate import validate_scan

SHAPE = dict(nheads=64, ngroups=1, d_state=128, headdim=64, n_angles=32)
# name: (rank, batch, seqlen, target ms on H100)
CASES = {
    "siso_1x2048": (1, 1, 2048, 0.12),
    "siso_1x16384": (1, 1, 16384, 1.0),
    "siso_8x2048": (1, 8, 2048, 0.55),
    "mimo4_1x16384": (4, 1, 16384, 4.0),
    "mimo4_8x2048": (4, 8, 2048, 1.0),
}
# Candidate configs (chunk_size, block_p, num_warps, num_stages) per rank.
SWEEP = {
    1: [(128, 32, 8, 1), (128, 32, 8, 2), (64, 32, 8, 2), (128, 64, 8, 1), (256, 32, 8, 1),
        (32, 32, 4, 1), (32, 32, 4, 2), (64, 32, 4, 2), (64, 64, 8, 1)],
    4: [(8, 32, 4, 1), (8, 32, 4, 2), (4, 32, 4, 1), (16, 32, 8, 1), (16, 64, 8, 1),
        (16, 64, 8, 2), (8, 64, 4, 1), (8, 64, 8, 1)],
}  # fmt: skip
# Chunk-parallel (split=1) candidates per rank: (rows = chunk * R, block_p, num_warps,
# num_stages, segment tokens).
SPLIT_SWEEP = {
    1: [(64, 64, 8, 1, 64), (64, 64, 8, 1, 256), (64, 64, 8, 1, 1024), (64, 64, 4, 1, 64),
        (64, 64, 4, 1, 1024), (32, 64, 4, 1, 32), (32, 64, 4, 1, 256), (32, 64, 8, 1, 256),
        (128, 64, 8, 1, 128), (128, 64, 8, 1, 512), (64, 32, 8, 1, 256)],
    4: [(32, 64, 4, 1, 8), (32, 64, 4, 1, 128), (32, 64, 8, 1, 128), (64, 64, 8, 1, 16),
        (64, 64, 8, 1, 128), (32, 64, 4, 1, 256), (16, 64, 4, 1, 128)],
}  # fmt: skip


# Block-parallel (split=2) candidates, as SPLIT_SWEEP: rows per block, block_p, warps, stages,
# segment tokens (segment / (rows / R) blocks per segment).
BLOCK_SWEEP = {
    1: [(64, 64, 4, 1, 128), (64, 64, 4, 1, 256), (64, 64, 4, 1, 512), (64, 64, 8, 1, 256),
        (64, 64, 4, 2, 256), (32, 64, 4, 1, 128), (32, 64, 4, 1, 256), (128, 64, 8, 1, 256),
        (128, 64, 8, 1, 512), (64, 32, 4, 1, 256)],
    4: [(64, 64, 4, 1, 32), (64, 64, 4, 1, 64), (64, 64, 4, 1, 128), (64, 64, 8, 1, 64),
        (64, 64, 4, 2, 64), (32, 64, 4, 1, 32), (32, 64, 4, 1, 64), (128, 64, 8, 1, 64),
        (128, 64, 8, 1, 128), (64, 32, 4, 1, 64)],
}  # fmt: skip


def split_configs(rank: int, split: int = 1) -> list:
    sweep = SPLIT_SWEEP if split == 1 else BLOCK_SWEEP
    return [cf.ChunkFwdConfig(rows // rank, bp, w, s, split=split, segment=seg)
            for rows, bp, w, s, seg in sweep[rank]]  # fmt: skip


def make_call(rank: int, batch: int, seqlen: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    inputs = random_inputs(
        batch=batch, seqlen=seqlen, rank=rank, dtype=torch.bfloat16, device="cuda",
        generator=g, with_mimo_o=True, **SHAPE,
    )  # fmt: skip
    rotary = "halves" if rank > 1 else "interleaved"
    problem, inputs = validate_scan(*inputs[:14], rotary=rotary)
    return problem, inputs


def floor_bytes(problem) -> int:
    """Fewest bytes moved: q, k, v, z, angles, adt/dt/trap read once; out written once."""
    B, L, H, G, R = problem.batch, problem.seqlen, problem.nheads, problem.ngroups, problem.rank
    N, P, S = problem.d_state, problem.headdim, problem.n_angles
    e = 2  # bf16
    qk = 2 * B * L * R * G * N * e
    vzo = 3 * B * L * H * P * e
    return qk + vzo + B * L * H * S * 4 + 3 * B * H * L * 4


def chunk_flops(problem, chunk: int) -> float:
    """Tensor-core FLOPs of the chunked form: per chunk of C*R rows and head, QK^T (rows^2 N),
    scores V (rows^2 P), Q S^T (rows N P), state update (rows N P)."""
    rows = chunk * problem.rank
    nchunks = problem.batch * problem.nheads * triton.cdiv(problem.seqlen, chunk)
    n, p = problem.d_state, problem.headdim
    return 2.0 * nchunks * (rows * rows * (n + p) + 2 * rows * n * p)


def copy_gbps() -> float:
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 4 / ms / 1e6


def check(rank: int, split: int | None = None) -> dict:
    """Default config (split: forced to that algorithm) vs the fp32 reference at (2, 2048), bf16
    inputs, with initial/final state."""
    g = torch.Generator().manual_seed(1)
    inputs = random_inputs(batch=2, seqlen=2048, rank=rank, dtype=torch.bfloat16, device="cuda",
                           generator=g, with_initial_state=True, **SHAPE)  # fmt: skip
    rotary = "halves" if rank > 1 else "interleaved"
    problem, inputs = validate_scan(*inputs[:14], initial_state=inputs.initial_state,
                                    return_final_state=True, rotary=rotary)  # fmt: skip
    config = cf.default_config(problem)
    if split is not None:
        config = cf.with_split(problem, config, split)
    out, state = cf.chunk_fwd(problem, inputs, config)
    ref, rstate = reference_scan(cast_inputs(inputs, torch.float32), rotary, chunk_size=64)
    return {
        "out_rel_err": rel_err(out, ref),
        "ssm_rel_err": rel_err(state.ssm, rstate.ssm),
        "k_rel_err": rel_err(state.k, rstate.k),
    }


def api_times(problem, inputs) -> tuple[float, float]:
    """(do_bench median ms, host microseconds per call) of the public call with the default
    config: ``mamba3_kernels.scan(..., backend="triton")`` without autograd. Host time: calls
    enqueued while the GPU is kept busy, so the wall time is validation + dispatch + launches."""
    rotary = "halves" if problem.rank > 1 else "interleaved"

    def call():
        return mamba3_kernels.scan(*inputs[:14], rotary=rotary, backend="triton")

    with torch.no_grad():
        ms = triton.testing.do_bench(call, return_mode="median")
        call()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(3):
            torch.cuda._sleep(200_000_000)  # longer than the calls below take to enqueue
            t0 = time.perf_counter()
            for _ in range(50):
                call()
            best = min(best, (time.perf_counter() - t0) / 50 * 1e6)
            torch.cuda.synchronize()
    return ms, best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true", help="time the candidate configs too")
    ap.add_argument("--split-sweep", action="store_true", help="time the split=1 candidates")
    ap.add_argument("--block-sweep", action="store_true", help="time the split=2 candidates")
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument(
        "--configs",
        nargs="*",
        default=None,
        help="time only these configs, each chunk,block_p,warps,stages[,maxnreg,split_rot,split]",
    )
    ap.add_argument(
        "--changes", nargs="*", default=None,
        help="also time the default config with these changes, each 'field=value,...' over "
        "ChunkFwdConfig (e.g. prefetch=2 or num_stages=1,prefetch=1)",
    )  # fmt: skip
    ap.add_argument("--seqlen", type=int, default=None, help="override the cases' length")
    ap.add_argument("--no-check", action="store_true", help="skip the reference checks")
    args = ap.parse_args()

    gbps = copy_gbps()
    result = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_GBps": gbps,
        "checks": {},
        "cases": {},
    }
    for rank in [] if args.no_check else sorted({CASES[c][0] for c in args.cases}):
        for split in (0, 1, 2):
            key = f"rank{rank}_split{split}"
            result["checks"][key] = check(rank, split)
            print(f"check {key}: {result['checks'][key]}", flush=True)

    rows = []
    for name in args.cases:
        rank, batch, seqlen, target = CASES[name]
        problem, inputs = make_call(rank, batch, args.seqlen or seqlen)
        default = cf.default_config(problem)
        configs = [default]
        if args.configs:
            configs = [cf.ChunkFwdConfig(*map(int, c.split(","))) for c in args.configs]
        elif args.sweep:
            configs += [cf.ChunkFwdConfig(*c) for c in SWEEP[rank]] + split_configs(rank)
        for change in args.changes or []:
            configs.append(dataclasses.replace(default, **parse_knobs(change)))
        if args.split_sweep:
            configs += split_configs(rank)
        if args.block_sweep:
            configs += split_configs(rank, split=2)
        floor_ms = floor_bytes(problem) / gbps / 1e6
        entry = {"target_ms": target, "floor_ms": floor_ms, "bytes": floor_bytes(problem),
                 "default": dataclasses.asdict(default), "configs": []}  # fmt: skip
        seen = set()
        for cfg in configs:
            if cfg in seen:
                continue
            seen.add(cfg)
            reason = cf.constraint(problem, cfg, None)
            if reason is not None:
                entry["configs"].append({**dataclasses.asdict(cfg), "rejected": reason})
                continue
            try:
                ms = triton.testing.do_bench(
                    lambda p=problem, x=inputs, c=cfg: cf.chunk_fwd(p, x, c), return_mode="median"
                )
            except Exception as exc:  # a config that fails to compile or launch is recorded
                entry["configs"].append({**dataclasses.asdict(cfg), "error": repr(exc)[:300]})
                print(f"{name} {cfg}: {exc!r}"[:300], flush=True)
                continue
            chunk = problem.chunk_size or cfg.chunk_size
            tflops = chunk_flops(problem, chunk) / ms / 1e9
            entry["configs"].append({**dataclasses.asdict(cfg), "ms": ms, "tflops": tflops})
            print(f"{name} {cfg}: {ms:.4f} ms ({tflops:.0f} TFLOP/s)", flush=True)
        api_ms, api_host = api_times(problem, inputs)
        entry["api_ms"], entry["api_host_us"] = api_ms, api_host
        print(f"{name} through mamba3_kernels.scan: {api_ms:.4f} ms, host {api_host:.1f} us/call")
        timed = [c for c in entry["configs"] if "ms" in c]
        best = min(timed, key=lambda c: c["ms"]) if timed else None
        entry["default_ms"] = timed[0]["ms"] if timed else None
        entry["best"] = best
        result["cases"][name] = entry
        rows.append((name, target, floor_ms, entry["default_ms"], best))
        inputs = None  # free before the next shape
        torch.cuda.empty_cache()

    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(f"\n{result['device']}  copy {gbps:.0f} GB/s")
    print(f"{'case':16} {'target':>8} {'floor':>8} {'default':>9} {'best':>9}  best config")
    for name, target, floor_ms, dms, best in rows:
        bms = best["ms"] if best else float("nan")
        cfg = (
            {
                k: best[k]
                for k in (
                    "chunk_size",
                    "block_p",
                    "num_warps",
                    "num_stages",
                    "split",
                    "segment",
                    "prefetch",
                )
            }
            if best
            else {}
        )
        dms = dms if dms is not None else float("nan")
        print(f"{name:16} {target:8.3f} {floor_ms:8.3f} {dms:9.4f} {bms:9.4f}  {cfg}")


if __name__ == "__main__":
    main()
