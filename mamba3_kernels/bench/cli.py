"""``python -m mamba3_kernels.bench``: time prefill and decode of every backend next to peers.

python -m mamba3_kernels.bench                       # H100 target shapes + latency sweeps
python -m mamba3_kernels.bench --shapes targets      # only the target shapes
python -m mamba3_kernels.bench --batch 1,8 --seqlen 2048,8192 --ops fwd
python -m mamba3_kernels.bench --quick               # tiny shapes, runs on CPU
python -m mamba3_kernels.bench --json out.json --plots out_dir/
"""

from __future__ import annotations

import argparse
import sys

import torch

from ..backend import registered_backends
from . import report, runner, shapes, timing
from .peers import PEERS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mamba3_kernels.bench",
        description="Benchmark the Mamba-3 scan (prefill fwd, fwd+bwd, decode) against peers.",
    )
    p.add_argument(
        "--shapes",
        default="targets,sweep",
        help="presets: targets (the H100 speed targets), sweep (prefill 1K..64K, decode batch "
        "1..256); comma-separated (default: targets,sweep)",
    )
    p.add_argument("--batch", type=_ints, help="custom batch sizes (replaces --shapes)")
    p.add_argument("--seqlen", type=_ints, help="custom sequence lengths (replaces --shapes)")
    p.add_argument("--ops", default="fwd,fwdbwd,decode", help="ops for custom shapes")
    p.add_argument("--model", help=f"head sizes: one of {sorted(shapes.MODELS)} or a JSON file")
    p.add_argument(
        "--rank", type=int, help="MIMO rank: of the presets' MIMO rows (default 4) and of the "
        "custom shapes (default 1: SISO)"
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 (fp32 on CPU)")
    p.add_argument("--z", action="store_true", help="include the z gate (default: none)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU demo)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if present)")
    p.add_argument("--backends", help="comma-separated (default: every available one; on CPU "
                   "the reference only)")  # fmt: skip
    p.add_argument(
        "--peers", default="all", help=f"comma-separated peers of {list(PEERS)}, 'all' or 'none'"
    )
    p.add_argument("--json", metavar="PATH", help="write rows and environment as JSON")
    p.add_argument("--plots", metavar="DIR", help="write the PNG latency plots into DIR")
    p.add_argument("--markdown", metavar="PATH", help="write a Markdown summary table")
    return p.parse_args(argv)


def _backends(args, device: torch.device) -> list[str]:
    registry = registered_backends()
    if args.backends:
        names = args.backends.split(",")
        unknown = [n for n in names if n not in registry]
        if unknown:
            raise SystemExit(f"unknown backends {unknown}; registered: {sorted(registry)}")
        return names
    names = [n for n, b in registry.items() if b.unavailable_reason() is None]
    if device.type == "cpu":
        # Timing the Triton interpreter measures Python, not a kernel.
        names = [n for n in names if n == "reference"]
    return names


def _items(args, device: torch.device) -> tuple[list[shapes.Item], dict]:
    dtype = DTYPES[args.dtype] if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32
    )  # fmt: skip
    dims = shapes.model_dims("tiny" if args.quick and not args.model else args.model)
    model_rank = dims.pop("rank", None)
    rank = model_rank or args.rank or 4
    items: list[shapes.Item] = []
    if args.batch or args.seqlen:
        ops = args.ops.split(",")
        custom = {**dims, "rank": args.rank or model_rank or 1}
        items = shapes.custom_items(custom, dtype, args.batch or [1], args.seqlen or [2048], ops)
    else:
        presets = args.shapes.split(",")
        if "targets" in presets:
            items += shapes.target_items({**dims, "rank": rank}, dtype)
            if args.quick:  # the targets' lengths, shrunk to CPU scale
                items = [_shrink(it) for it in items]
        if "sweep" in presets:
            seqlens = shapes.QUICK_SEQLENS if args.quick else shapes.SWEEP_SEQLENS
            batches = shapes.QUICK_BATCHES if args.quick else shapes.SWEEP_BATCHES
            items += shapes.sweep_items(dims, dtype, seqlens, batches, rank=rank)
    if args.z:
        items = [shapes.Item(it.op, _with(it.shape, has_z=True), it.group) for it in items]
    seen, unique = set(), []
    for it in items:  # shrunk or overlapping presets may repeat a shape
        if (it.op, it.shape, it.group) not in seen:
            seen.add((it.op, it.shape, it.group))
            unique.append(it)
    return unique, {**dims, "rank": rank, "dtype": str(dtype).replace("torch.", "")}


def _with(shape: shapes.Shape, **kw) -> shapes.Shape:
    return shapes.Shape(**{**shape.__dict__, **kw})


def _shrink(item: shapes.Item) -> shapes.Item:
    s = item.shape
    return shapes.Item(
        item.op, _with(s, batch=min(s.batch, 2), seqlen=min(s.seqlen, 64)), "targets"
    )


# The optional package behind --plots, and the extra that installs it.
PLOTS_NEED = 'mamba3_kernels.bench --plots needs matplotlib: pip install "mamba3-kernels[bench]"'


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plots and not _has_matplotlib():
        # Before any timing: a long run should not end without the plots it was asked for.
        print(PLOTS_NEED, file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backends = _backends(args, device)
    peer_names = (
        []
        if args.peers == "none"
        else list(PEERS)
        if args.peers == "all"
        else args.peers.split(",")
    )
    items, dims = _items(args, device)
    env = report.environment(device)
    print(f"device: {env['gpu'] or env['cpu']} ({device}); backends: {', '.join(backends)}; "
          f"peers: {', '.join(peer_names) or 'none'}", flush=True)  # fmt: skip
    # Peers that cannot run here at all (not installed, no GPU) are listed once, not per row.
    probe = shapes.Shape(batch=1, seqlen=1024, dtype=torch.bfloat16)
    peer_status = {n: PEERS[n].why_not("fwd", probe, device) for n in peer_names}
    for name, why in peer_status.items():
        if why:
            print(f"peer {name}: not run ({why})", flush=True)
    rates = timing.measure_rates(device, quick=args.quick)
    print(f"measured: copy {rates['copy_gbps']:.0f} GB/s, {rates['matmul_dtype']} matmul "
          f"{rates['matmul_tflops']:.3g} TFLOP/s", flush=True)  # fmt: skip
    # One table: each shape's rows as soon as they (and their ratios to the peers) are known.
    print(report.table_head(), flush=True)
    rows = []
    for item in items:
        item_rows = runner.run_item(item, device, backends, peer_names, rates)
        print("\n".join(report.table_lines(item_rows)), flush=True)
        rows += item_rows
    title = f"{env['gpu'] or 'CPU'}, H={dims['nheads']} N={dims['d_state']} P={dims['headdim']}"
    if args.json:
        report.write_json(args.json, env, rates, {**vars(args), "dims": dims}, rows, peer_status)
        print(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown(rows, env, rates))
        print(f"wrote {args.markdown}")
    if args.plots:
        for path in report.plot(rows, args.plots, title):
            print(f"wrote {path}")
    errors = [r for r in rows if r["status"] == "error"]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
