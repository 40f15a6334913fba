"""What runs here: every backend, whether it is available and why not, and auto's pick."""

from __future__ import annotations

import platform

import torch

from . import tuned_configs
from .backend import registered_backends
from .dispatch import choose_backend, why_not
from .testing import random_inputs
from .validate import validate_scan, validate_step


def info(inputs=None, rotary: str | None = None, step: bool = False) -> dict:
    """Describe the backends. With ``inputs`` (a ScanInputs of a call; step shapes when ``step``),
    also say which backends support that call and which one "auto" picks.

    Returns {"versions": {...}, "backends": {name: {"available", "reason", "priority"}},
    "tuned_files": [tuned_configs.file_reports' dicts], and with inputs "call": {name: reason or
    None}, "auto": name}.
    """
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "tilelang", "cutlass", "optuna"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # absent or broken: report as missing
            versions[mod] = None
    versions["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    result: dict = {"versions": versions, "backends": {}}
    for name, b in registered_backends().items():
        reason = b.unavailable_reason()
        result["backends"][name] = {
            "available": reason is None,
            "reason": reason,
            "priority": b.priority,
            "detail": b.detail() if reason is None else None,
        }
    device = versions["cuda_device"]
    result["tuned_files"] = tuned_configs.file_reports(device, _kernel_families())
    if inputs is not None:
        if step:
            problem, _ = validate_step(*inputs[:9], inputs.initial_state, *inputs[9:14], rotary)
        else:
            problem, _ = validate_scan(*inputs[:14], inputs.initial_state, False,
                                       inputs.cu_seqlens, rotary)  # fmt: skip
        result["call"] = {n: why_not(b, problem) for n, b in registered_backends().items()}
        result["auto"] = choose_backend(problem, "auto").name
    return result


def _kernel_families() -> dict:
    """(backend, family name) -> KernelSpec of every registered backend whose kernels load."""
    families = {}
    for name, b in registered_backends().items():
        try:
            specs = b.all_kernels()
        except Exception:  # a backend whose kernels cannot load has no families to match
            continue
        families.update({(name, k.name): k for k in specs})
    return families


def print_info() -> None:
    """Print ``info()`` as a table, with auto's pick for example SISO/MIMO calls on this device."""
    data = info()
    print("versions: " + ", ".join(f"{k}={v}" for k, v in data["versions"].items()))
    print(f"{'backend':<10} {'available':<9} reason")
    for name, row in data["backends"].items():
        say = row["reason"] or row["detail"] or ""
        print(f"{name:<10} {'yes' if row['available'] else 'no':<9} {say}")
    print("tuned config files:" if data["tuned_files"] else "tuned config files: none found")
    for f in data["tuned_files"]:
        where = "shipped" if f["shipped"] else "user"
        state = "used" if f["used"] else f"skipped ({f['reason']})"
        print(f"  {f['path']} [{where}]: {f.get('gpu')}, {f['entries']} entries, {state}")
        for line in f["skipped"]:
            print(f"    skipped entry {line}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    examples = {
        "SISO prefill": dict(rank=1, step=False),
        "MIMO R=4 prefill": dict(rank=4, step=False),
        "SISO decode step": dict(rank=1, step=True),
    }
    for label, kw in examples.items():
        inputs = random_inputs(batch=1, seqlen=16, nheads=4, d_state=64, headdim=32, dtype=dtype,
                               device=device, **kw)  # fmt: skip
        call = info(inputs, step=kw["step"])
        print(f"auto for {label} ({device}, {str(dtype).replace('torch.', '')}): {call['auto']}")
