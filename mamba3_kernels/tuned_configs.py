"""The store of tuned kernel configs: one JSON file per GPU, read at import cost only.

A config file (written by ``python -m mamba3_kernels.autotune``) looks like::

    {"format": 1, "gpu": "NVIDIA H100 80GB HBM3", "capability": [9, 0],
     "versions": {"torch": "2.11.0", "triton": "3.6.0", "mamba3_kernels": "0.1.0"},
     "entries": [{"backend": "triton", "kernel": "siso_chunk_fwd",
                  "bucket": "scan-B1-L2048-H64-G1-R1-N128-P64-S32-bfloat16",
                  "config": {"chunk_size": 64, "num_warps": 4}, "tuned_ms": 0.1, "default_ms": 0.2,
                  "trials": 40, "rejected": 3, "date": "2026-01-01T00:00:00Z"}]}

Files are searched in the user directory (``$MAMBA3_KERNELS_CONFIG_DIR``, default
``~/.cache/mamba3_kernels``) and then in the package's ``configs/`` folder; a user entry wins over
a shipped one for the same key. A file tuned with other toolchain versions (torch or triton
major.minor) is stale: it is reported once with ``warnings.warn`` and not used.

Lookup order for a call: the exact bucket, then the nearest tuned bucket of the same kernel, kind,
head dims and dtype (distance in log2 of batch and length), else None (the kernel's heuristic).
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

from .backend import KernelSpec
from .problem import Problem

FORMAT = 1
ENV_CONFIG_DIR = "MAMBA3_KERNELS_CONFIG_DIR"
ENV_DISABLE = "MAMBA3_KERNELS_NO_TUNED_CONFIGS"
SHIPPED_DIR = Path(__file__).resolve().parent / "configs"

# Bucket keys are Problem.bucket_key(): kind-B..-L..-H..-G..-R..-N..-P..-S..-dtype.
_BUCKET_RE = re.compile(
    r"^(?P<kind>[a-z]+)-B(?P<B>\d+)-L(?P<L>\d+)-H(?P<H>\d+)-G(?P<G>\d+)-R(?P<R>\d+)"
    r"-N(?P<N>\d+)-P(?P<P>\d+)-S(?P<S>\d+)-(?P<dtype>\w+)$"
)

# (gpu name) -> {(backend, kernel, bucket): entry}; built once per process (or reload()).
_index: dict[str, dict[tuple[str, str, str], dict]] | None = None
# Memo of lookups: (backend, kernel, bucket, gpu) -> entry or None.
_memo: dict[tuple[str, str, str, str], dict | None] = {}
_warned: set[str] = set()
_stale: dict[str, list[tuple[str, str]]] = {}  # gpu name -> (file, message) of stale files


def user_config_dir() -> Path:
    """Where the tuner writes config files (and keeps its studies) for this user."""
    env = os.environ.get(ENV_CONFIG_DIR)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "mamba3_kernels"


def gpu_slug(name: str) -> str:
    """File-name form of a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def current_versions() -> dict[str, str | None]:
    """Toolchain versions of this process (the staleness check compares major.minor)."""
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


def _major_minor(v: str | None) -> str | None:
    if v is None:
        return None
    m = re.match(r"(\d+)\.(\d+)", v)
    return f"{m.group(1)}.{m.group(2)}" if m else v


def stale_reason(file_versions: dict, versions: dict) -> str | None:
    """Why a file tuned with ``file_versions`` must not be used under ``versions``, or None."""
    for tool in ("torch", "triton"):
        want, have = _major_minor(file_versions.get(tool)), _major_minor(versions.get(tool))
        if want is not None and have is not None and want != have:
            return f"tuned with {tool} {file_versions.get(tool)}, running {versions.get(tool)}"
    return None


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


def _load_index(versions: dict) -> dict[str, dict[tuple[str, str, str], dict]]:
    index: dict[str, dict[tuple[str, str, str], dict]] = {}
    for path in _config_files():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            _warn_once(str(path), f"mamba3_kernels: ignoring unreadable config file {path}: {e}")
            continue
        if not isinstance(data, dict) or data.get("format") != FORMAT or "gpu" not in data:
            _warn_once(str(path), f"mamba3_kernels: ignoring config file {path}: unknown format")
            continue
        why = stale_reason(data.get("versions", {}), versions)
        if why is not None:
            # Reported when this GPU's configs are asked for, not for other GPUs' files.
            _stale.setdefault(data["gpu"], []).append(
                (
                    str(path),
                    f"mamba3_kernels: config file {path} is stale ({why}); using heuristics "
                    "instead. Re-run `python -m mamba3_kernels.autotune` to tune for this "
                    "toolchain.",
                )
            )
            continue
        table = index.setdefault(data["gpu"], {})
        for e in data.get("entries", []):
            table[(e["backend"], e["kernel"], e["bucket"])] = e
    return index


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def reload() -> None:
    """Forget loaded files and memoized lookups (after writing a config file, in tests)."""
    global _index
    _index = None
    _memo.clear()
    _warned.clear()


def _nearest(table: dict, backend: str, kernel: str, bucket: str) -> dict | None:
    want = parse_bucket(bucket)
    if want is None:
        return None
    same = ("kind", "H", "G", "R", "N", "P", "S", "dtype")
    best, best_d = None, math.inf
    for (b, k, key), entry in table.items():
        if b != backend or k != kernel:
            continue
        have = parse_bucket(key)
        if have is None or any(have[f] != want[f] for f in same):
            continue
        d = abs(math.log2(have["B"]) - math.log2(want["B"])) + abs(
            math.log2(have["L"]) - math.log2(want["L"])
        )
        # Ties go to the larger bucket (its tiles are the safer choice), then by key for stability.
        rank = (d, -(have["B"] * have["L"]), key)
        if best is None or rank < best_d:
            best, best_d = entry, rank
    return best


def lookup_entry(
    backend: str, kernel: str, bucket: str, device_name: str, versions: dict | None = None
) -> dict | None:
    """The config-file entry for this kernel and bucket on this GPU (exact or nearest), or None."""
    global _index
    key = (backend, kernel, bucket, device_name)
    if key in _memo:
        return _memo[key]
    if os.environ.get(ENV_DISABLE, "0") == "1":
        return None
    if _index is None:
        _stale.clear()
        _index = _load_index(versions if versions is not None else current_versions())
    for path, message in _stale.get(device_name, ()):
        _warn_once(path, message)
    table = _index.get(device_name, {})
    entry = table.get((backend, kernel, bucket))
    if entry is None:
        entry = _nearest(table, backend, kernel, bucket)
    _memo[key] = entry
    return entry


def lookup(
    backend: str,
    kernel: KernelSpec,
    problem: Problem,
    device_name: str,
    versions: dict | None = None,
) -> Any | None:
    """The tuned config object of ``kernel`` for ``problem`` on ``device_name``, or None.

    ``versions`` defaults to this process's toolchain (``current_versions()``); it only matters
    on the first call, when the files are loaded. Fields missing from a stored config (an older
    file) come from the kernel's heuristic.
    """
    entry = lookup_entry(backend, kernel.name, problem.bucket_key(), device_name, versions)
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


_props_cache: dict[str, dict | None] = {}


def _device_props(problem: Problem) -> dict | None:
    if problem.device_type != "cuda":
        return None
    if "cuda" not in _props_cache:
        from .backend import device_properties

        _props_cache["cuda"] = device_properties()
    return _props_cache["cuda"]


def write_config_file(
    path: str | os.PathLike,
    gpu: str,
    capability: list[int] | tuple[int, int] | None,
    entries: list[dict],
    versions: dict | None = None,
    merge: bool = True,
) -> Path:
    """Write (or, with ``merge``, update) a config file; entries replace those of the same
    (backend, kernel, bucket). Returns the path. Call ``reload()`` to see it in this process."""
    path = Path(path)
    versions = versions if versions is not None else current_versions()
    old: dict[tuple[str, str, str], dict] = {}
    if merge and path.exists():
        try:
            data = json.loads(path.read_text())
            if data.get("gpu") == gpu and stale_reason(data.get("versions", {}), versions) is None:
                old = {(e["backend"], e["kernel"], e["bucket"]): e for e in data.get("entries", [])}
        except (OSError, ValueError):
            old = {}
    for e in entries:
        e = dict(e)
        e.setdefault("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        old[(e["backend"], e["kernel"], e["bucket"])] = e
    data = {
        "format": FORMAT,
        "gpu": gpu,
        "capability": list(capability) if capability is not None else None,
        "versions": versions,
        "entries": [old[k] for k in sorted(old)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)  # atomic: a reader never sees half a file
    return path
