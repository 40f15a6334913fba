"""``python -m mamba3_kernels.autotune.sweep``: is TPE worth it? Exhaustive grid versus Optuna.

For each selected kernel and bucket it measures every config of the grid (one grid study), then
runs a real TPE study with a quarter of the grid's size as budget (``--fraction``), and replays
TPE on the measured table over many seeds (no GPU time: the table is the objective) to say how
often, and after how many evaluations, TPE gets within 5% (``--within``) of the grid's best.

    python -m mamba3_kernels.autotune.sweep --kernel chunk_fwd --shape 1,16384,64,1,128,64,32,1

Prints a summary per target and writes it as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

from .study import A_DEFAULT, A_DUPLICATE, A_PRUNED, make_sampler


def measured_table(study) -> dict[tuple, float]:
    """params -> ms from a grid study: rejected configs are absent; configs pruned as too slow
    keep their short estimate (they cannot win anyway)."""
    import optuna

    table: dict[tuple, float] = {}
    for t in study.get_trials(deepcopy=False):
        if not t.params or A_DUPLICATE in t.user_attrs:
            continue
        key = tuple(sorted(t.params.items()))
        if t.state == optuna.trial.TrialState.COMPLETE:
            table[key] = t.value
        elif A_PRUNED in t.user_attrs and t.intermediate_values:
            table[key] = min(t.intermediate_values.values())
    return table


def replay(
    choices: dict[str, list],
    table: dict[tuple, float],
    default: dict,
    budget: int,
    seed: int,
) -> list[float]:
    """Best-so-far ms after each distinct evaluation of a TPE search over ``table`` (the tuner's
    sampler settings and default-first rule; configs missing from the table are rejected)."""
    import optuna

    study = optuna.create_study(direction="minimize", sampler=make_sampler(False, budget, seed))
    study.enqueue_trial(default)
    seen: dict[tuple, float | None] = {}
    best, curve = math.inf, []
    while len(seen) < budget and len(study.trials) < 3 * budget and len(seen) < len(table) + 1:
        trial = study.ask()
        params = {n: trial.suggest_categorical(n, c) for n, c in choices.items()}
        key = tuple(sorted(params.items()))
        repeat = key in seen
        value = seen[key] if repeat else table.get(key)
        if not repeat:
            seen[key] = value
        if value is None:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, value)
        if not repeat:
            best = min(best, value if value is not None else math.inf)
            curve.append(best)
    return curve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mamba3-autotune-sweep", description=__doc__.split("\n")[0])
    p.add_argument("--shape", action="append", default=[], metavar="B,L,H,G,N,P[,S[,R]]")
    p.add_argument("--step", action="append", default=[], metavar="B,H,G,N,P[,S[,R]]")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--backend", action="append")
    p.add_argument("--kernel", action="append")
    p.add_argument("--device")
    p.add_argument("--storage", help="Optuna storage (default: a SQLite file in the config dir)")
    p.add_argument("--fraction", type=float, default=0.25, help="TPE budget / grid size")
    p.add_argument("--within", type=float, default=0.05, help="success: best within this")
    p.add_argument("--seeds", type=int, default=20, help="TPE replays on the measured table")
    p.add_argument("--import", dest="imports", action="append", default=[])
    p.add_argument("--out", help="write the summary as JSON here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    import optuna
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(device))
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import mamba3_kernels  # noqa: F401  (registers the backends)
    from mamba3_kernels import tuned_configs
    from mamba3_kernels.backend import device_properties

    from .__main__ import load_plugin
    from .buckets import default_buckets, parse_dtype, parse_shape
    from .space import find_targets
    from .study import open_storage, tune_target

    for mod in args.imports:
        load_plugin(mod)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dtype = parse_dtype(args.dtype)
    buckets = [parse_shape(s, dtype) for s in args.shape]
    buckets += [parse_shape(s, dtype, kind="step") for s in args.step]
    buckets = buckets or default_buckets(dtype)[:1]
    gpu = (device_properties(torch.device(device)) or {}).get("name", "cpu")
    if device == "cpu":
        gpu = "cpu"
    slug = tuned_configs.gpu_slug(gpu)
    storage = open_storage(
        args.storage, tuned_configs.user_config_dir() / "studies" / f"{slug}-sweep.db"
    )
    targets, skipped = find_targets(
        buckets, torch.device(device).type, args.backend, args.kernel, None
    )
    if not targets:
        print("nothing to sweep:", *skipped, sep="\n  ", file=sys.stderr)
        return 1
    summaries = []
    for target in targets:
        space = target.space()
        common = dict(device=device, progress=not args.no_progress)
        grid = tune_target(target, storage, f"{slug}-grid", n_trials=space.size, **common)
        table = measured_table(grid.study)
        if not table:
            print(f"{target.study_name(slug)}: no valid config", file=sys.stderr)
            continue
        best = min(table.values())
        budget = max(1, math.ceil(space.size * args.fraction))
        tpe = tune_target(
            target, storage, f"{slug}-tpe", n_trials=budget, search="tpe", seed=0, **common
        )
        tpe_best = tpe.entry["tuned_ms"] if tpe.entry else math.inf
        default = next(
            (t.params for t in grid.study.trials if t.user_attrs.get(A_DEFAULT) and t.params),
            space.labels_of(target.default_params()),
        )
        curves = [replay(space.choices, table, default, budget, s) for s in range(args.seeds)]
        goal = best * (1 + args.within)
        hits = [next((i + 1 for i, v in enumerate(c) if v <= goal), None) for c in curves]
        ok = [h for h in hits if h is not None]
        summary = {
            "study": target.study_name(slug),
            "grid_size": space.size,
            "valid_configs": len(table),
            "grid_best_ms": best,
            "default_ms": grid.entry["default_ms"] if grid.entry else None,
            "tpe_budget": budget,
            "tpe_best_ms": tpe_best,
            "tpe_within": tpe_best <= goal,
            "replay_success_rate": len(ok) / len(hits),
            "replay_median_evals_to_within": statistics.median(ok) if ok else None,
        }
        summaries.append(summary)
        print(
            f"{summary['study']}: grid best {best:.4g} ms over {space.size} configs "
            f"({len(table)} valid); TPE with {budget} evaluations: {tpe_best:.4g} ms "
            f"({'within' if summary['tpe_within'] else 'NOT within'} {args.within:.0%}); "
            f"replays within {args.within:.0%}: {len(ok)}/{len(hits)}, median "
            f"{summary['replay_median_evals_to_within']} evaluations"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(summaries, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
