"""The benchmark's outputs: a text table, a JSON document and PNG plots."""

from __future__ import annotations

import datetime
import json
import os
import platform

import torch

PREFILL_PLOT = "harness_prefill_latency.png"
DECODE_PLOT = "harness_decode_latency.png"


def environment(device: torch.device) -> dict:
    """GPU name, versions and date for the JSON header."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "tilelang", "cutlass", "mamba_ssm"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # absent: recorded as such
            versions[mod] = None
    versions["cuda"] = torch.version.cuda
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(device),
        "gpu": gpu,
        "cpu": platform.processor() or platform.machine(),
        "versions": versions,
    }


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    """One line per row under the header; decode rows show eager, back-to-back loop and
    graph-replay times."""
    return "\n".join([table_head(), *table_lines(rows)])


def table_head() -> str:
    """The table's header and rule (printed once; table_lines then streams the rows)."""
    head = (
        f"{'op':<7} {'impl':<14} {'variant':<9} {'B':>4} {'L':>6} {'ms':>9} {'loop ms':>9} "
        f"{'graph ms':>9} {'GB/s':>8} {'TFLOP/s':>8} {'floor ms':>9} {'of floor':>8}  "
        f"vs peers / target"
    )
    return head + "\n" + "-" * len(head)


def table_lines(rows: list[dict]) -> list[str]:
    """The table's line of each row."""
    lines = []
    for r in rows:
        base = f"{r['op']:<7} {r['impl']:<14} {r['variant']:<9} {r['B']:>4} {r['L']:>6} "
        if r["status"] != "ok":
            lines.append(base + f"{r['status']}: {r['reason']}")
            continue
        notes = [f"x{v:.2f} vs {k}" for k, v in (r.get("speedup") or {}).items()]
        t = r.get("target")
        if t:
            got = r.get(t["metric"])
            verdict = "met" if t.get("met") else "missed"
            notes.append(
                f"target {t['target_ms']} ms ({t['metric']}, public {t['public_ms']}): "
                + (f"{verdict}" if got is not None else "not measured")
            )
        if r.get("note"):
            notes.append(r["note"])
        lines.append(
            base
            + f"{_fmt(r.get('ms'), '9.4f')} {_fmt(r.get('ms_loop'), '9.4f'):>9} "
            + f"{_fmt(r.get('ms_graph'), '9.4f'):>9} {_fmt(r.get('gbps'), '8.1f'):>8} "
            + f"{_fmt(r.get('tflops'), '8.2f'):>8} {_fmt(r.get('floor_ms'), '9.4f'):>9} "
            + f"{_fmt(r.get('floor_frac_best'), '8.0%'):>8}  "
            + "; ".join(notes)
        )
    return lines


def write_json(
    path: str, env: dict, rates: dict, args: dict, rows: list[dict], peers: dict | None = None
) -> None:
    """The run as one JSON document: environment, measured rates, arguments, peers (name ->
    None or why it did not run), rows."""
    doc = {**env, "rates": rates, "args": args, "peers": peers or {}, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)


def plot(rows: list[dict], out_dir: str, title: str) -> list[str]:
    """Prefill latency vs sequence length (B = 1, forward) per backend, peer and variant, and
    decode latency vs batch (eager solid, CUDA graph dashed). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []

    prefill = [r for r in rows if r["op"] == "fwd" and r["B"] == 1 and r.get("ms")]
    sweep = [r for r in prefill if r["group"] == "prefill_sweep"]
    prefill = sweep or prefill
    fig, ax = plt.subplots(figsize=(7, 4.5))

    def series(r: dict) -> tuple[str, str]:
        # Attention and Mamba-2 do not depend on the MIMO rank: one line each, not one per variant.
        peer_like = r["impl"].startswith("sdpa") or r["impl"] == "mamba2"
        return (r["impl"], "" if peer_like else r["variant"])

    for key in sorted({series(r) for r in prefill}):
        by_len = {}
        for r in prefill:
            if series(r) == key:
                by_len.setdefault(r["L"], r["ms"])
        pts = sorted(by_len.items())
        label = f"{key[0]} ({key[1]})" if key[1] else key[0]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens, batch 1)")
    ax.set_ylabel("forward latency (ms, median)")
    ax.set_title(f"Prefill latency vs length: {title}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, PREFILL_PLOT)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    decode = [r for r in rows if r["op"] == "decode" and r.get("ms")]
    sweep = [r for r in decode if r["group"] == "decode_sweep"]
    decode = sweep or decode
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(r["impl"], r["variant"]) for r in decode}):
        sel = sorted((r for r in decode if (r["impl"], r["variant"]) == key), key=lambda r: r["B"])
        line = ax.plot([r["B"] for r in sel], [r["ms"] for r in sel], marker="o",
                       label=f"{key[0]} ({key[1]}) eager")  # fmt: skip
        graph = [(r["B"], r["ms_graph"]) for r in sel if r.get("ms_graph")]
        if graph:
            ax.plot([g[0] for g in graph], [g[1] for g in graph], marker="s", linestyle="--",
                    color=line[0].get_color(), label=f"{key[0]} ({key[1]}) CUDA graph")  # fmt: skip
    floor_pts = sorted({(r["B"], r["floor_ms"]) for r in decode})
    if floor_pts:
        ax.plot([p[0] for p in floor_pts], [p[1] for p in floor_pts], color="gray",
                linestyle=":", label="floor (state read+write)")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (sequences decoded together)")
    ax.set_ylabel("step latency (ms, median)")
    ax.set_title(f"Decode step latency vs batch: {title}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, DECODE_PLOT)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written


def markdown(rows: list[dict], env: dict, rates: dict) -> str:
    """A Markdown summary: environment, measured rates, and one table row per timed backend row
    (peers as speedups), with the targets where they apply."""
    gpu = env.get("gpu") or env.get("cpu")
    v = env["versions"]
    lines = [
        f"Measured on {gpu}, {env['date']} (torch {v.get('torch')}, triton {v.get('triton')}).",
        f"Copy rate {rates['copy_gbps']:.0f} GB/s, {rates['matmul_dtype']} matmul "
        f"{rates['matmul_tflops']:.0f} TFLOP/s; floor = max(bytes / copy rate, FLOPs / matmul "
        "rate).",
        "",
        "| op | impl | variant | B | L | ms | graph ms | floor ms | of floor | vs peers | target |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        if r["kind"] != "backend":
            continue
        head = f"| {r['op']} | {r['impl']} | {r['variant']} | {r['B']} | {r['L']} |"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']}: {r['reason']} | | | | | |")
            continue
        peers = ", ".join(f"x{s:.2f} {k}" for k, s in (r.get("speedup") or {}).items())
        t = r.get("target")
        target = ""
        if t:
            target = f"{t['target_ms']} ({'met' if t.get('met') else 'missed'})"
        lines.append(
            f"{head} {_fmt(r.get('ms'), '.4f')} | {_fmt(r.get('ms_graph'), '.4f')} | "
            f"{_fmt(r.get('floor_ms'), '.4f')} | {_fmt(r.get('floor_frac_best'), '.0%')} | "
            f"{peers} | {target} |"
        )
    return "\n".join(lines) + "\n"
