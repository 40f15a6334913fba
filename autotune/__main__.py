"""``python -m mamba3_kernels.autotune`` (or ``mamba3-autotune``): tune every kernel on this GPU.

    python -m mamba3_kernels.autotune                       # the benchmark buckets, this GPU
    python -m mamba3_kernels.autotune --dry-run             # list what would be tuned
    python -m mamba3_kernels.autotune --model '{"d_model": 2048, "mimo_rank": 4}'
    python -m mamba3_kernels.autotune --shape 2,4096,32,1,128,64,32,1 --step 16,32,1,128,64
    python -m mamba3_kernels.autotune --storage postgresql://user@db/tune   # on every worker

Several workers (processes, GPUs of one kind, machines) tune the same studies together when
given the same ``--storage``; a re-run resumes where an interrupted one stopped. The result is
merged into ``<config dir>/<gpu>.json`` (``$MAMBA3_KERNELS_CONFIG_DIR``, default
``~/.cache/mamba3_kernels``) and, with ``--ship``, into the package's ``configs/`` folder.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

NEEDS_OPTUNA = 'mamba3_kernels.autotune needs optuna: pip install "mamba3-kernels[tune]"'


def load_plugin(spec: str) -> None:
    """Import ``module`` or ``module:function`` and call the function (a backend registering
    itself)."""
    mod, _, func = spec.partition(":")
    module = importlib.import_module(mod)
    if func:
        getattr(module, func)()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mamba3-autotune",
        description="Tune the Mamba-3 kernels' tile configs for this GPU with Optuna.",
    )
    p.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="B,L,H,G,N,P[,S[,R]]",
        help="a scan bucket (repeatable); S defaults to N/4, R to 1",
    )
    p.add_argument(
        "--step",
        action="append",
        default=[],
        metavar="B,H,G,N,P[,S[,R]]",
        help="a decode-step bucket (repeatable)",
    )
    p.add_argument(
        "--model",
        help="Mamba-3 layer sizes as JSON text or a JSON file (d_model, expand, headdim, d_state, "
        "ngroups, mimo_rank, rope_fraction): tunes that layer at the default batch/lengths",
    )
    p.add_argument("--dtype", default="bf16", help="bf16 (default), fp16 or fp32")
    p.add_argument("--backend", action="append", help="only this backend (repeatable)")
    p.add_argument("--kernel", action="append", help="only this kernel name (repeatable)")
    p.add_argument(
        "--mode", action="append", choices=("inference", "training", "decode"),
        help="only this call path (an inference forward, a training forward+backward, a decode "
        "step)"
    )
    p.add_argument("--n-trials", type=int, default=40, help="trial budget per study (default 40)")
    p.add_argument(
        "--search",
        choices=("auto", "grid", "tpe"),
        default="auto",
        help="auto (default): grid when the space fits in --n-trials, else TPE",
    )
    p.add_argument(
        "--storage",
        help="Optuna storage: SQLAlchemy URL (sqlite:///f.db, postgresql://...), journal:PATH, "
        "or a file path (SQLite). Default: a SQLite file in the config dir",
    )
    p.add_argument("--device", help="cuda (default when available) or cpu (Triton interpreter)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--prune-factor",
        type=float,
        default=3.0,
        help="stop timing a config whose first estimate exceeds this x the best (default 3)",
    )
    p.add_argument("--out-dir", help="where to write the config file (default: the config dir)")
    p.add_argument(
        "--ship", action="store_true", help="also merge into the package's configs/ folder"
    )
    p.add_argument("--plots", help="folder for PNG plots (default <config dir>/plots/<gpu>)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--fail-running",
        action="store_true",
        help="mark every RUNNING trial failed first (after workers died on other hosts)",
    )
    p.add_argument(
        "--study-tag",
        default="",
        help="suffix of the study names (a separate set of studies in the same storage)",
    )
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE[:FUNC]",
        help="import MODULE (and call FUNC) first: registers an out-of-tree backend",
    )
    p.add_argument("--dry-run", action="store_true", help="list what would be tuned and exit")
    return p


def _backend_records(targets, device: str) -> list[dict]:
    """Per (bucket, mode) of the tuned targets: every backend that could serve it timed with
    its tuned configs, and the fastest recorded (``backend="auto"`` follows the record)."""
    from .measure import time_backends

    records, seen = [], set()
    for t in targets:
        key = (t.bucket_key, t.mode)
        if key in seen:
            continue
        seen.add(key)
        times = time_backends(t.bucket, t.mode, device)
        if times:
            fastest = min(times, key=times.get)
            records.append({"mode": t.mode, "bucket": t.bucket_key, "backend": fastest,
                            "times_ms": {k: round(v, 6) for k, v in times.items()}})  # fmt: skip
            print(f"fastest for {t.mode} {t.bucket_key}: {fastest} "
                  + ", ".join(f"{k} {v:.4g} ms" for k, v in sorted(times.items())))
    return records


def _buckets(args, dtype):
    from .buckets import default_buckets, layer_from_model, parse_shape

    buckets = [parse_shape(s, dtype) for s in args.shape]
    buckets += [parse_shape(s, dtype, kind="step") for s in args.step]
    if args.model:
        buckets += default_buckets(dtype, layer_from_model(args.model))
    if not buckets:
        buckets = default_buckets(dtype)
    return buckets


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import optuna
    except ImportError:
        print(NEEDS_OPTUNA, file=sys.stderr)
        return 2
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda:"):
        # Triton launches on the current device, not on the tensors' device.
        torch.cuda.set_device(torch.device(device))
    if device == "cpu":
        # Triton kernels run on CPU tensors only under the interpreter; set it before any kernel
        # module is loaded (they are loaded lazily by their backends).
        os.environ.setdefault("TRITON_INTERPRET", "1")

    import mamba3_kernels  # noqa: F401  (registers the built-in backends)
    from mamba3_kernels import tuned_configs
    from mamba3_kernels.backend import device_properties

    from .buckets import parse_dtype
    from .report import markdown_table, save_plots, table, write_configs
    from .space import find_targets
    from .study import open_storage, tune_target

    for mod in args.imports:
        load_plugin(mod)

    dtype = parse_dtype(args.dtype)
    buckets = _buckets(args, dtype)
    if device.startswith("cuda"):
        props = device_properties(torch.device(device)) or {}
        gpu, capability = props.get("name", "cuda"), props.get("capability")
    else:
        gpu, capability = "cpu", None
    slug = tuned_configs.gpu_slug(gpu)
    study_slug = f"{slug}-{args.study_tag}" if args.study_tag else slug
    targets, skipped = find_targets(
        buckets, torch.device(device).type, args.backend, args.kernel, args.mode
    )

    if args.dry_run:
        print(f"device: {gpu} ({device}); {len(targets)} studies")
        for t in targets:
            space = t.space()
            grid = args.search == "grid" or (args.search == "auto" and space.size <= args.n_trials)
            how = "grid" if grid else "TPE"
            print(f"  {t.study_name(study_slug)}  [{space.size} configs, {how}]")
            for name, labels in space.choices.items():
                print(f"      {name}: {labels}")
        for s in skipped:
            print(f"  skipped {s}")
        return 0
    if not targets:
        print("nothing to tune:", *skipped, sep="\n  ", file=sys.stderr)
        return 1

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config_dir = tuned_configs.user_config_dir()
    storage = open_storage(args.storage, config_dir / "studies" / f"{slug}.db")
    results = []
    t0 = time.time()
    out_dirs = [Path(args.out_dir) if args.out_dir else config_dir]
    if args.ship:
        out_dirs.append(tuned_configs.SHIPPED_DIR)
    versions = tuned_configs.current_versions()
    paths: list[Path] = []
    for target in targets:
        res = tune_target(
            target,
            storage,
            study_slug,
            device=device,
            n_trials=args.n_trials,
            seed=args.seed,
            prune_factor=args.prune_factor,
            progress=not args.no_progress,
            fail_running=args.fail_running,
            search=args.search,
        )
        results.append(res)
        # Written at once: the next family's study of the same mode times with this config.
        paths = write_configs([res], gpu, capability, out_dirs, versions) or paths
    choices = _backend_records(targets, device)
    if choices:
        paths = write_configs([], gpu, capability, out_dirs, versions, choices=choices) or paths

    print()
    print(table(results))
    print(f"\n{len(results)} studies in {time.time() - t0:.0f} s on {gpu}")
    for p in paths:
        print(f"config file: {p}")
    if args.ship:
        notes = tuned_configs.SHIPPED_DIR / f"{slug}.md"
        notes.write_text(f"# Tuned configs for {gpu}\n\n{markdown_table(results)}\n")
        print(f"table: {notes}")
    if not args.no_plots:
        folder = Path(args.plots) if args.plots else config_dir / "plots" / slug
        n = sum(len(save_plots(r, folder)) for r in results)
        if n:
            print(f"plots: {folder} ({n} PNG)")
    for s in skipped:
        print(f"skipped {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
