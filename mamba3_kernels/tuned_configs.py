"""The store of tuned kernel configs: one JSON file per GPU, read once per process.

A config file (written by ``python -m mamba3_kernels.autotune``) looks like::

    {"format": 2, "gpu": "NVIDIA H100 80GB HBM3", "capability": [9, 0],
     "versions": {"torch": "2.11.0", "triton": "3.6.0", "mamba3_kernels": "0.1.0"},
     "entries": [{"backend": "triton", "kernel": "chunk_fwd", "mode": "inference",
                  "kernel_version": 2, "bucket": "scan-B1-L2048-H64-G1-R1-N128-P64-S32-bfloat16",
                  "config": {"chunk_size": 64, "num_warps": 4}, "tuned_ms": 0.1,
                  "default_ms": 0.2, "trials": 40, "rejected": 3, "date": "2026-01-01T00:00:00Z"}],
     "backends": [{"mode": "inference", "bucket": "scan-B1-...", "backend": "triton",
                   "times_ms": {"triton": 0.1, "reference": 9.0}, "date": "..."}]}

An entry is keyed by GPU name, backend, kernel family, mode (the call path it was tuned on:
inference, training or decode) and bucket. It is used while its ``kernel_version`` equals the
family's ``KernelSpec.version``; an entry of another version is reported (once, and by
``python -m mamba3_kernels info``) and skipped. The toolchain versions are recorded for the
reader, not checked: a file tuned under another torch or Triton is still used. ``backends``
records which backend the tuner measured fastest per mode and bucket; ``backend="auto"`` follows
it where that backend can run the call.

Files are searched in the package's ``configs/`` folder, then in the user directory
(``$MAMBA3_KERNELS_CONFIG_DIR``, default ``~/.cache/mamba3_kernels``); a user entry wins over a
shipped one of the same key. Format-1 files (no mode, no kernel version) are read as entries of
the family's first mode, version 1.

Lookup order for a call: the exact bucket, then the nearest tuned bucket of the same kernel, mode,
kind, head dims and dtype (distance in log2 of batch and length), else None (the heuristic).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

from .backend import KernelSpec, device_properties
from .problem import Problem

FORMAT = 2
READ_FORMATS = (1, 2)
ENV_CONFIG_DIR = "MAMBA3_KERNELS_CONFIG_DIR"
ENV_DISABLE = "MAMBA3_KERNELS_NO_TUNED_CONFIGS"
SHIPPED_DIR = Path(__file__).resolve().parent / "configs"

# Bucket keys are Problem.bucket_key(): kind-B..-L..-H..-G..-R..-N..-P..-S..-dtype.
_BUCKET_RE = re.compile(
    r"^(?P<kind>[a-z]+)-B(?P<B>\d+)-L(?P<L>\d+)-H(?P<H>\d+)-G(?P<G>\d+)-R(?P<R>\d+)"
    r"-N(?P<N>\d+)-P(?P<P>\d+)-S(?P<S>\d+)-(?P<dtype>\w+)$"
)

EntryKey = tuple[str, str, str | None, str]  # backend, kernel, mode (None: format 1), bucket


@dataclasses.dataclass
class _Store:
    """Everything read from the files: entries and backend records per GPU, and per file what
    was read (for ``file_reports``)."""

    entries: dict[str, dict[EntryKey, dict]] = dataclasses.field(default_factory=dict)
    choices: dict[str, dict[tuple[str, str], dict]] = dataclasses.field(default_factory=dict)
    files: list[dict] = dataclasses.field(default_factory=list)


_store: _Store | None = None
_memo: dict[tuple, Any] = {}
_warned: set[str] = set()


def user_config_dir() -> Path:
    """Where the tuner writes config files (and keeps its studies) for this user."""
    env = os.environ.get(ENV_CONFIG_DIR)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "mamba3_kernels"


def gpu_slug(name: str) -> str:
    """File-name form of a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def device_name(device_type: str) -> str:
    """The name tuned files are keyed by: the CUDA device's name, or "cpu" (the tuner's files
    for the Triton interpreter)."""
    if device_type == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return device_type


def current_versions() -> dict[str, str | None]:
    """Toolchain versions of this process (recorded in the files the tuner writes)."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        from importlib.metadata import version

        pkg = version("mamba3-kernels")
    except Exception:  # not installed as a distribution (source checkout)
        pkg = None
    return {"torch": torch.__version__, "triton": triton_version, "mamba3_kernels": pkg}


def parse_bucket(key: str) -> dict[str, Any] | None:
    """Bucket key -> {'kind', 'B', 'L', 'H', 'G', 'R', 'N', 'P', 'S', 'dtype'}, or None."""
    m = _BUCKET_RE.match(key)
    if m is None:
        return None
    d: dict[str, Any] = m.groupdict()
    for k in ("B", "L", "H", "G", "R", "N", "P", "S"):
        d[k] = int(d[k])
    return d


def _config_files() -> list[Path]:
    """Shipped files first, user files last (later files override earlier entries)."""
    files: list[Path] = []
    for folder in (SHIPPED_DIR, user_config_dir()):
        if folder.is_dir():
            files.extend(sorted(folder.glob("*.json")))
    return files


def _entry_key(e: dict) -> EntryKey:
    return (e["backend"], e["kernel"], e.get("mode"), e["bucket"])


def _read_file(path: Path) -> tuple[dict | None, str | None]:
    """(data, None) for a usable file, else (None, why not)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return None, f"unreadable: {e}"
    if not isinstance(data, dict) or data.get("format") not in READ_FORMATS or "gpu" not in data:
        return None, f"unknown format (expected one of {READ_FORMATS})"
    try:
        for e in data.get("entries", []):
            _entry_key(e)
    except (KeyError, TypeError) as e:
        return None, f"malformed entry: {e!r}"
    return data, None


def _load() -> _Store:
    store = _Store()
    for path in _config_files():
        data, why = _read_file(path)
        report = {"path": str(path), "shipped": path.parent == SHIPPED_DIR, "reason": why}
        store.files.append(report)
        if data is None:
            _warn_once(str(path), f"mamba3_kernels: ignoring config file {path}: {why}")
            continue
        gpu = data["gpu"]
        report.update(gpu=gpu, entries=len(data.get("entries", [])),
                      versions=data.get("versions", {}))  # fmt: skip
        table = store.entries.setdefault(gpu, {})
        for e in data.get("entries", []):
            table[_entry_key(e)] = e
        records = store.choices.setdefault(gpu, {})
        for r in data.get("backends", []):
            if isinstance(r, dict) and {"mode", "bucket", "backend"} <= r.keys():
                records[(r["mode"], r["bucket"])] = r
    return store


def _get_store() -> _Store:
    global _store
    if _store is None:
        _store = _load()
    return _store


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def reload() -> None:
    """Forget loaded files and memoized lookups (after writing a config file, in tests)."""
    global _store
    _store = None
    _memo.clear()
    _warned.clear()
    _props_cache.clear()


def _same_shape_family(have: dict, want: dict) -> bool:
    return all(have[f] == want[f] for f in ("kind", "H", "G", "R", "N", "P", "S", "dtype"))


def _nearest(items, bucket: str):
    """The value of the (bucket key, value) pair nearest ``bucket`` (same kind, head dims and
    dtype; distance in log2 of batch and length), or None."""
    want = parse_bucket(bucket)
    if want is None:
        return None
    best, best_rank = None, None
    for key, value in items:
        have = parse_bucket(key)
        if have is None or not _same_shape_family(have, want):
            continue
        d = abs(math.log2(have["B"]) - math.log2(want["B"])) + abs(
            math.log2(have["L"]) - math.log2(want["L"])
        )
        # Ties go to the larger bucket (its tiles are the safer choice), then by key for stability.
        rank = (d, -(have["B"] * have["L"]), key)
        if best_rank is None or rank < best_rank:
            best, best_rank = value, rank
    return best


def _disabled() -> bool:
    return os.environ.get(ENV_DISABLE, "0") == "1"


def lookup_entry(
    backend: str, kernel: KernelSpec, mode: str, bucket: str, device: str
) -> dict | None:
    """The file entry of ``kernel`` for ``mode`` and ``bucket`` on GPU ``device`` (exact bucket,
    else the nearest), or None. Entries of another kernel version are skipped (and reported)."""
    key = ("entry", backend, kernel.name, kernel.version, mode, bucket, device)
    if key in _memo:
        return _memo[key]
    entry = None
    if not _disabled():
        table = _get_store().entries.get(device, {})
        # Format-1 entries carry no mode: they were tuned on the family's first mode.
        modes = (mode, None) if mode == kernel.modes[0] else (mode,)
        candidates = [
            (k[3], e) for k, e in table.items()
            if k[0] == backend and k[1] == kernel.name and k[2] in modes
        ]  # fmt: skip
        exact = [e for b, e in candidates if b == bucket]
        entry = exact[-1] if exact else _nearest(candidates, bucket)
        if entry is not None:
            have = int(entry.get("kernel_version", 1))
            if have != kernel.version:
                why = (f"tuned for {backend}/{kernel.name} version {have}, the kernel is at "
                       f"version {kernel.version}")  # fmt: skip
                _warn_once(f"version/{device}/{backend}/{kernel.name}/{entry['bucket']}",
                           f"mamba3_kernels: skipping a tuned config of bucket {entry['bucket']} "
                           f"on {device}: {why}; re-run `python -m mamba3_kernels.autotune`.")
                entry = None
    _memo[key] = entry
    return entry


def lookup(
    backend: str, kernel: KernelSpec, problem: Problem, mode: str, device: str
) -> Any | None:
    """The tuned config object of ``kernel`` for a ``mode`` call of ``problem`` on GPU ``device``,
    or None. Fields missing from a stored config (an older file) come from the heuristic; a
    stored config that breaks the kernel's constraint for this exact call gives None."""
    entry = lookup_entry(backend, kernel, mode, problem.bucket_key(), device)
    if entry is None:
        return None
    params = entry["config"]
    try:
        base = kernel.default(problem)
        if dataclasses.is_dataclass(base):
            params = {**dataclasses.asdict(base), **params}
        config = kernel.make_config(params)
    except Exception as e:  # a config the kernel no longer accepts: fall back to the heuristic
        _warn_once(
            f"{backend}/{kernel.name}/{entry['bucket']}",
            f"mamba3_kernels: tuned config {params} of {backend}/{kernel.name} is unusable: {e}",
        )
        return None
    # A config tuned for a bucket (or a neighbouring one) may not fit this exact call, e.g. a
    # chunk longer than the sequence: then the heuristic applies.
    if kernel.constraint(problem, config, _device_props(problem)) is not None:
        return None
    return config


def backend_choice(problem: Problem, mode: str, device: str) -> str | None:
    """The backend the tuner measured fastest for this mode and bucket (exact, else nearest) on
    GPU ``device``, or None."""
    key = ("choice", mode, problem.bucket_key(), device)
    if key in _memo:
        return _memo[key]
    name = None
    if not _disabled():
        records = _get_store().choices.get(device, {})
        items = [(b, r) for (m, b), r in records.items() if m == mode]
        exact = records.get((mode, problem.bucket_key()))
        record = exact if exact is not None else _nearest(items, problem.bucket_key())
        name = None if record is None else record["backend"]
    _memo[key] = name
    return name


def file_reports(device: str | None, kernels: dict[tuple[str, str], KernelSpec]) -> list[dict]:
    """What each config file found holds and whether it is used here: dicts of path, shipped,
    gpu, entries, versions, used (bool), reason (why not, or None) and skipped (entries of
    another kernel version: "backend/kernel bucket: why"). ``kernels``: (backend, kernel name)
    -> spec of the registered families (entries of unknown families count as skipped)."""
    store = _get_store()
    out = []
    for f in store.files:
        report = dict(f)
        report.setdefault("entries", 0)
        skipped = []
        if f["reason"] is None:
            data, _ = _read_file(Path(f["path"]))
            for e in (data or {}).get("entries", []):
                spec = kernels.get((e["backend"], e["kernel"]))
                have = int(e.get("kernel_version", 1))
                label = f"{e['backend']}/{e['kernel']} {e.get('mode') or ''} {e['bucket']}"
                if spec is None:
                    skipped.append(f"{label}: no such kernel family here")
                elif have != spec.version:
                    skipped.append(f"{label}: kernel version {have}, the kernel is at "
                                   f"{spec.version}")  # fmt: skip
            if device is None or f.get("gpu") != device:
                report["reason"] = f"for {f.get('gpu')}, this device is {device or 'no GPU'}"
        report["skipped"] = skipped
        report["used"] = report["reason"] is None and len(skipped) < report["entries"]
        if report["reason"] is None and not report["used"]:
            report["reason"] = "every entry is of another kernel version"
        out.append(report)
    return out


_props_cache: dict[str, dict | None] = {}


def _device_props(problem: Problem) -> dict | None:
    if problem.device_type != "cuda":
        return None
    if "cuda" not in _props_cache:
        _props_cache["cuda"] = device_properties()
    return _props_cache["cuda"]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_config_file(
    path: str | os.PathLike,
    gpu: str,
    capability: list[int] | tuple[int, int] | None,
    entries: list[dict],
    versions: dict | None = None,
    merge: bool = True,
    choices: list[dict] | None = None,
) -> Path:
    """Write (or, with ``merge``, update) a config file: entries replace those of the same
    (backend, kernel, mode, bucket), backend records (``choices``) those of the same (mode,
    bucket). Returns the path. Call ``reload()`` to see it in this process."""
    path = Path(path)
    versions = versions if versions is not None else current_versions()
    old: dict[EntryKey, dict] = {}
    old_choices: dict[tuple[str, str], dict] = {}
    if merge and path.exists():
        data, _ = _read_file(path)
        if data is not None and data.get("gpu") == gpu:
            old = {_entry_key(e): e for e in data.get("entries", [])}
            old_choices = {(r["mode"], r["bucket"]): r for r in data.get("backends", [])}
    for e in entries:
        e = dict(e)
        e.setdefault("date", _now())
        old.pop((e["backend"], e["kernel"], None, e["bucket"]), None)  # (its format-1 twin)
        old[_entry_key(e)] = e
    for r in choices or []:
        r = dict(r)
        r.setdefault("date", _now())
        old_choices[(r["mode"], r["bucket"])] = r
    data = {
        "format": FORMAT,
        "gpu": gpu,
        "capability": list(capability) if capability is not None else None,
        "versions": versions,
        "entries": [old[k] for k in sorted(old, key=lambda k: tuple(str(x) for x in k))],
        "backends": [old_choices[k] for k in sorted(old_choices)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)  # atomic: a reader never sees half a file
    return path
