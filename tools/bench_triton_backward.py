"""Benchmark of the Triton prefill forward+backward (SISO and MIMO) on a CUDA GPU.

For each case and (B, L): do_bench medians (ms) of
  fwd_ms     mamba3_kernels.scan(..., backend="triton") alone,
  fwdbwd_ms  the same plus loss.backward() (every input's gradient),
  bwd_ms     their difference,
and the floor of forward+backward (mamba3_kernels.bench.floor: bytes at the measured copy rate,
matmul FLOPs at the measured bf16 matmul rate). ``--profile`` prints the per-kernel CUDA time of
one forward+backward at the first shape (what the time is spent on).

    python tools/bench_triton_backward.py --shapes 1x2048 1x16384 8x2048 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json

import torch
import triton
import triton.testing

import mamba3_kernels
from mamba3_kernels.bench.floor import floor_ms, scan_bytes, scan_flops
from mamba3_kernels.bench.shapes import Shape
from mamba3_kernels.testing import random_inputs

CASES = {"siso": 1, "mimo4": 4}
SIZES = dict(nheads=64, ngroups=1, d_state=128, headdim=64, n_angles=32)


def copy_gbps() -> float:
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 4 / ms / 1e6


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return 2 * 8192**3 / ms / 1e9


def make_call(batch: int, seqlen: int, rank: int, with_z: bool = False):
    """(forward closure, forward+backward closure, leaves) on fresh random bf16 inputs (with
    the z gate: the backward then recomputes the core's output, which the gate reads)."""
    g = torch.Generator().manual_seed(batch * 7 + seqlen + rank)
    inputs = random_inputs(
        batch=batch, seqlen=seqlen, rank=rank, dtype=torch.bfloat16, device="cuda",
        with_D=True, with_z=with_z, with_mimo_o=True, generator=g, **SIZES,
    )  # fmt: skip
    fields = [t.requires_grad_() if t is not None else None for t in inputs[:14]]
    leaves = [t for t in fields if t is not None]
    rotary = "interleaved" if rank == 1 else "halves"

    def fwd():
        return mamba3_kernels.scan(*fields, rotary=rotary, backend="triton")

    out = fwd()
    grad = torch.randn_like(out)

    def fwdbwd():
        fwd().backward(grad)

    return fwd, fwdbwd, leaves


def bench_one(
    batch: int, seqlen: int, case: str, gbps: float, tflops: float, with_z: bool = False
) -> dict:
    rank = CASES[case]
    fwd, fwdbwd, leaves = make_call(batch, seqlen, rank, with_z)
    with torch.no_grad():
        fwd_ms = triton.testing.do_bench(fwd, return_mode="median")
    fb_ms = triton.testing.do_bench(fwdbwd, grad_to_none=leaves, return_mode="median")
    shape = Shape(batch=batch, seqlen=seqlen, rank=rank, has_z=with_z, **SIZES)
    nbytes, flops = scan_bytes(shape, backward=True), scan_flops(shape, backward=True)
    floor = floor_ms(nbytes, flops, gbps, tflops)
    return dict(
        case=case, B=batch, L=seqlen, R=rank, z=with_z, fwd_ms=fwd_ms, fwdbwd_ms=fb_ms,
        bwd_ms=fb_ms - fwd_ms, floor_fwdbwd_ms=floor, fwdbwd_bytes=nbytes, fwdbwd_flops=flops,
        fwdbwd_gbps=nbytes / fb_ms / 1e6, fwdbwd_tflops=flops / fb_ms / 1e9,
    )  # fmt: skip


def profile(
    batch: int, seqlen: int, rank: int, top: int = 18, with_z: bool = False,
    forward_only: bool = False,
) -> list:  # fmt: skip
    """Per-kernel CUDA time (ms) of one forward+backward (forward_only: of one inference
    forward)."""
    fwd, fwdbwd, leaves = make_call(batch, seqlen, rank, with_z)

    def fresh_fwdbwd():
        if forward_only:
            with torch.no_grad():
                fwd()
            return
        # as do_bench's grad_to_none: no accumulation into .grad (an add kernel per leaf)
        for t in leaves:
            t.grad = None
        fwdbwd()

    for _ in range(2):
        fresh_fwdbwd()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        fresh_fwdbwd()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t > 0:
            rows.append(dict(name=ev.key[:90], ms=t / 1e3, calls=ev.count))
    rows.sort(key=lambda r: -r["ms"])
    return rows[:top]


def sweep_core_bwd(batch: int, seqlen: int, rank: int) -> list[dict]:
    """do_bench median of the core's backward kernel alone (both sweeps, one launch) per config,
    on random core inputs (bf16 qr, kr, vr as the rotary pass and the prep give them)."""
    from mamba3_kernels.triton_impl import core_scan as cs

    H, N, P = SIZES["nheads"], SIZES["d_state"], SIZES["headdim"]
    dev = "cuda"
    bf16 = torch.bfloat16
    qr = (torch.randn(batch, seqlen, rank, H, N, device=dev) * N**-0.5).to(bf16)
    kr = (torch.randn(batch, seqlen, rank, H, N, device=dev) * N**-0.5).to(bf16)
    vr = torch.randn(batch, seqlen, rank, H, P, device=dev).to(bf16)
    adt = -torch.rand(batch, H, seqlen, device=dev) * 0.3
    w, gam = torch.rand_like(adt), torch.rand_like(adt)
    s0 = torch.randn(batch, H, P, N, device=dev) * 0.1
    dy, dsf = torch.randn_like(vr), torch.randn_like(s0)
    rows = []
    for nrows, warps, split_n in itertools.product((16, 32, 64), (4, 8), (1, 2)):
        meta = (max(nrows // rank, 1), torch.bfloat16, warps, 1, batch, split_n)
        try:
            ms = triton.testing.do_bench(
                lambda meta=meta: cs.core_bwd(qr, kr, vr, adt, w, gam, s0, None, meta, dy, dsf),
                return_mode="median",
            )
            fms = triton.testing.do_bench(
                # core_fwd's meta has no split_n (its sixth entry is the segment length)
                lambda meta=meta: cs.core_fwd(qr, kr, vr, adt, w, gam, s0, None, meta[:5]),
                return_mode="median",
            )
        except Exception as e:  # a config that fails to compile or run is reported, not fatal
            ms = fms = float("nan")
            print("  failed", nrows, warps, type(e).__name__, str(e)[:200])
        rows.append(dict(R=rank, rows=nrows, num_warps=warps, split_n=split_n, core_bwd_ms=ms,
                         core_fwd_ms=fms))  # fmt: skip
        print(f"  core R={rank} rows={nrows} warps={warps} split_n={split_n}: bwd {ms:.3f} ms"
              f"  fwd {fms:.3f} ms")  # fmt: skip
    return rows


def parse_knobs(text: str) -> dict:
    """'fast_trig=1,angle_pairs=8' -> {'fast_trig': True, 'angle_pairs': 8}; '' or 'default'
    -> {}."""
    out = {}
    for item in filter(None, text.split(",")):
        if item == "default":
            continue
        key, value = item.split("=")
        out[key] = bool(int(value)) if key == "fast_trig" else int(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", nargs="+", default=["1x2048", "1x16384", "8x2048"])
    ap.add_argument("--cases", nargs="+", default=list(CASES))
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--z", action="store_true", help="inputs with the z gate")
    ap.add_argument(
        "--variants", nargs="+", default=[""],
        help="rotary/angle pass settings to time in turn, each 'field=value,...' over "
        "core_rotary.RotaryConfig (e.g. fast_trig=1,angle_pairs=8); '' = the defaults",
    )  # fmt: skip
    ap.add_argument(
        "--segments", nargs="+", type=int, default=None,
        help="core-backward segment lengths to time in turn (ChunkBwdConfig.segment: 0 = "
        "chosen per device, a length >= L = no segments); default: the config's own",
    )  # fmt: skip
    ap.add_argument(
        "--configs", nargs="+", default=None,
        help="backward config changes to time in turn, each 'field=value,...' over "
        "ChunkBwdConfig (e.g. num_stages=1,fwd_chunk_size=32); 'default' = the default config",
    )  # fmt: skip
    ap.add_argument(
        "--inference-forward", nargs="+", default=[None], choices=["fused", "core"],
        help="ChunkFwdConfig.path values to time in turn (default: the heuristic's)",
    )  # fmt: skip
    ap.add_argument(
        "--sweep", action="store_true",
        help="time the core backward per config at the first shape, then use the fastest one",
    )  # fmt: skip
    args = ap.parse_args()
    gbps, tflops = copy_gbps(), matmul_tflops()
    sweep, chosen = [], {}
    if args.sweep:

        b, l_ = (int(x) for x in args.shapes[min(1, len(args.shapes) - 1)].split("x"))
        for case in args.cases:
            rank = CASES[case]
            res = sweep_core_bwd(b, l_, rank)
            sweep += res
            ok = [r for r in res if r["core_bwd_ms"] == r["core_bwd_ms"]]
            if ok:
                best = min(ok, key=lambda r: r["core_bwd_ms"])
                chosen[rank] = (max(best["rows"] // rank, 1), best["num_warps"], best["split_n"])
        print("chosen backward configs (rank: chunk, warps, split_n):", chosen)
    from mamba3_kernels import dispatch

    rows, prof = [], {}
    combos = itertools.product(args.variants, args.segments or [None], args.configs or [""],
                               args.inference_forward)  # fmt: skip
    for variant, segment, config, inference in combos:
        # every setting is a config field: pinned over the heuristic for this combination
        for family in ("rotary", "chunk_bwd", "chunk_fwd"):
            dispatch.unpin("triton", family)
        knobs = parse_knobs(variant)
        changes = {} if segment is None else {"segment": segment}
        changes.update(parse_knobs(config))
        if knobs:
            dispatch.pin("triton", "rotary", **knobs)
        if inference:
            dispatch.pin("triton", "chunk_fwd", path=inference)
        print(f"== rotary settings: {knobs}; core-backward changes: {changes}; inference "
              f"path: {inference or 'heuristic'}")  # fmt: skip
        for case in args.cases:
            dispatch.unpin("triton", "chunk_bwd")
            swept = {}
            if CASES[case] in chosen:
                c, wp, sn = chosen[CASES[case]]
                swept = dict(chunk_size=c, num_warps=wp, num_stages=1, split_n=sn)
            if swept or changes:
                dispatch.pin("triton", "chunk_bwd", **{**swept, **changes})
            for s in args.shapes:
                b, l_ = (int(x) for x in s.split("x"))
                rows.append(dict(bench_one(b, l_, case, gbps, tflops, args.z),
                                 knobs=knobs, segment=segment, bwd_changes=changes,
                                 inference_forward=inference))  # fmt: skip
                r = rows[-1]
                print(f"{case:6s} B={b:2d} L={l_:6d}  fwd {r['fwd_ms']:.3f} ms  fwd+bwd "
                      f"{r['fwdbwd_ms']:.3f} ms  (bwd {r['bwd_ms']:.3f})  floor "
                      f"{r['floor_fwdbwd_ms']:.3f} ms", flush=True)  # fmt: skip
        if args.profile:
            for case in args.cases:
                b, l_ = (int(x) for x in args.shapes[min(1, len(args.shapes) - 1)].split("x"))
                key = (f"{case}_{b}x{l_}_{variant or 'default'}_seg{segment}"
                       f"_{config or 'cfg'}_{inference or 'heuristic'}")  # fmt: skip
                for fwd_only in (False, True):
                    name = key + ("_fwd" if fwd_only else "")
                    prof[name] = profile(b, l_, CASES[case], with_z=args.z, forward_only=fwd_only)
                    what = "inference fwd" if fwd_only else "fwd+bwd"
                    print(f"-- kernels of one {what}, {case} B={b} L={l_}")
                    for r in prof[name]:
                        print(f"  {r['ms']:8.3f} ms  x{r['calls']:<3d} {r['name']}")
    result = dict(
        device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
        torch=torch.__version__, triton=triton.__version__, copy_gbps=gbps,
        matmul_tflops=tflops, sizes=SIZES, dtype="bfloat16", rows=rows, profile=prof,
        core_bwd_sweep=sweep, chosen_bwd_config={str(k): v for k, v in chosen.items()},
    )  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
