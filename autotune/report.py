"""What a tuning run leaves behind: the config files, a table, and Optuna's plots."""

from __future__ import annotations

import warnings
from pathlib import Path

from mamba3_kernels import tuned_configs
from mamba3_kernels.dispatch import clear_caches

from .study import StudyResult

SHIPPED_DIR = tuned_configs.SHIPPED_DIR


def write_configs(
    results: list[StudyResult],
    gpu: str,
    capability,
    out_dirs: list[Path],
    versions: dict | None = None,
    choices: list[dict] | None = None,
) -> list[Path]:
    """Merge the entries of ``results`` (and the backend records ``choices``) into
    ``<dir>/<gpu-slug>.json`` for each dir."""
    entries = [r.entry for r in results if r.entry is not None]
    if not entries and not choices:
        return []
    paths = []
    for d in out_dirs:
        path = Path(d) / f"{tuned_configs.gpu_slug(gpu)}.json"
        paths.append(tuned_configs.write_config_file(path, gpu, capability, entries, versions,
                                                     choices=choices))  # fmt: skip
    # Later studies (and dispatch in this process) see what was written.
    tuned_configs.reload()
    clear_caches()
    return paths


def table(results: list[StudyResult]) -> str:
    """A plain-text table: kernel, bucket, default ms, tuned ms, speed-up, trials, rejected."""
    head = ("backend/kernel/mode", "bucket", "default ms", "tuned ms", "speed-up", "trials",
            "rejected")  # fmt: skip
    rows = [head]
    for r in results:
        e = r.entry
        name = _name(r)
        if e is None:
            rows.append((name, r.target.bucket_key, "-", "-", "-", "-", r.note))
            continue
        d, t = e["default_ms"], e["tuned_ms"]
        speed = f"{d / t:.2f}x" if d and t else "-"
        rows.append(
            (
                name,
                e["bucket"],
                f"{d:.4f}" if d is not None else "rejected",
                f"{t:.4f}",
                speed,
                str(e["trials"]),
                str(e["rejected"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    why = rejections(results)
    return "\n".join(lines + (["", "rejected trials, why (count x reason):", *why] if why else []))


def _name(r: StudyResult) -> str:
    return f"{r.target.backend.name}/{r.target.kernel.name}/{r.target.mode}"


def rejections(results: list[StudyResult]) -> list[str]:
    """One line per study and rejection reason: the study, the count, the reason."""
    lines = []
    for r in results:
        for reason, n in ((r.entry or {}).get("rejected_why") or {}).items():
            lines.append(f"  {_name(r)} {r.target.bucket_key}: {n} x {reason}")
    return lines


def markdown_table(results: list[StudyResult]) -> str:
    """The same table in Markdown (for notes committed next to a shipped config file)."""
    out = [
        "| kernel | bucket | default ms | tuned ms | speed-up | trials | rejected |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        e = r.entry
        name = _name(r)
        if e is None:
            out.append(f"| {name} | {r.target.bucket_key} | - | - | - | - | {r.note} |")
            continue
        d, t = e["default_ms"], e["tuned_ms"]
        speed = f"{d / t:.2f}x" if d and t else "-"
        dd = f"{d:.4f}" if d is not None else "rejected"
        out.append(
            f"| {name} | {e['bucket']} | {dd} | {t:.4f} | {speed} | {e['trials']} "
            f"| {e['rejected']} |"
        )
    return "\n".join(out)


def save_plots(result: StudyResult, folder: Path) -> list[Path]:
    """Optimization history and parameter importances as PNG; nothing when matplotlib is missing
    or the study has too few trials for a plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    stem = result.study.study_name.replace("/", "__")
    saved = []
    plots = (
        ("history", ovm.plot_optimization_history),
        ("importances", ovm.plot_param_importances),
    )
    for what, plot in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna marks these plots experimental
                ax = plot(result.study)
            path = folder / f"{stem}-{what}.png"
            ax.figure.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(ax.figure)
            saved.append(path)
        except Exception:  # e.g. importances need two completed trials with varying params
            plt.close("all")
    return saved
