"""Time every backend and peer on each benchmark item and turn the times into report rows.

A row is a dict: what ran (op, impl, kind "backend" or "peer", variant, sizes), its median ms
(decode: eager ``ms``, ``ms_loop`` of back-to-back eager calls, ``ms_graph`` of a CUDA graph
replay), bytes, FLOPs, GB/s, TFLOP/s, the floor and the fraction of it achieved, speedups against
each peer at the same op and sizes, and the issue's target where one exists. A row that could not
run has status "n/a" (with the reason) or "error".
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
from collections.abc import Callable

import torch

from ..backend import registered_backends
from ..testing import random_inputs
from . import floor, timing
from .peers import PEERS
from .shapes import Item, Shape

# The Triton backend issue's H100 numbers: (op, variant, B, L) -> (metric, public ms, target ms),
# at the heads below (bf16) only.
TARGET_DIMS = {"H": 64, "G": 1, "N": 128, "P": 64, "S": 32, "dtype": "bfloat16"}
TARGETS: dict[tuple[str, str, int, int], tuple[str, float, float]] = {
    ("fwd", "siso", 1, 2048): ("ms", 0.72, 0.12),
    ("fwd", "siso", 1, 16384): ("ms", 2.72, 1.0),
    ("fwd", "siso", 8, 2048): ("ms", 1.38, 0.55),
    ("fwdbwd", "siso", 1, 16384): ("ms", 7.90, 4.0),
    ("fwd", "mimo R=4", 1, 16384): ("ms", 7.31, 4.0),
    ("fwd", "mimo R=4", 8, 2048): ("ms", 2.04, 1.0),
    ("decode", "siso", 16, 1): ("ms", 0.179, 0.06),
    ("decode", "siso", 1, 1): ("ms_graph", 0.0091, 0.008),
    ("decode", "siso", 128, 1): ("ms", 0.208, 0.19),
}


class Rotor:
    """Calls ``fns`` in turn, so consecutive timed calls touch different inputs."""

    def __init__(self, fns: list[Callable[[], object]]) -> None:
        self.fns = fns
        self._next = itertools.cycle(range(len(fns)))

    def __call__(self):
        return self.fns[next(self._next)]()


def make_inputs(shape: Shape, device: torch.device, seed: int, step: bool = False):
    """Fresh random ScanInputs at ``shape`` (step shapes and an initial state when ``step``)."""
    return random_inputs(
        batch=shape.batch,
        seqlen=shape.seqlen,
        nheads=shape.nheads,
        ngroups=shape.ngroups,
        d_state=shape.d_state,
        headdim=shape.headdim,
        n_angles=shape.n_angles,
        rank=shape.rank,
        dtype=shape.dtype,
        device=device,
        with_D=shape.has_D,
        with_z=shape.has_z,
        with_mimo_o=shape.has_mimo_o,
        step=step,
        generator=torch.Generator().manual_seed(seed),
    )


def _why_not_backend(name: str, op: str, shape: Shape, device: torch.device) -> str | None:
    """The backend's own reason for not running this op (probed on a tiny-L call)."""
    from ..dispatch import why_not
    from ..validate import validate_scan, validate_step

    backend = registered_backends()[name]
    reason = backend.unavailable_reason()
    if reason:
        return reason
    probe = Shape(**{**shape.__dict__, "batch": min(shape.batch, 1), "seqlen": 2})
    x = make_inputs(probe, device, 0, step=op == "decode")
    if op == "decode":
        problem, _ = validate_step(*x[:9], x.initial_state, *x[9:14])
    else:
        problem, _ = validate_scan(*x[:14])
    # Sizes that the probe shrank: restore them so size limits are judged on the real call.
    problem = dataclasses.replace(
        problem,
        batch=shape.batch,
        nseq=shape.batch,
        seqlen=1 if op == "decode" else shape.seqlen,
    )
    return why_not(backend, problem)


def backend_closures(name: str, op: str, shape: Shape, device: torch.device, copies: int):
    """(list of fns, one per input copy, grad_to_none) running backend ``name`` on ``op``."""
    import mamba3_kernels

    fns, leaves = [], []
    for c in range(copies):
        x = make_inputs(shape, device, seed=1000 + c, step=op == "decode")
        if op == "decode":
            state = x.initial_state

            def fn(x=x, state=state):
                return mamba3_kernels.step(*x[:9], state, *x[9:14], inplace=True, backend=name)[0]

        elif op == "fwd":

            def fn(x=x):
                with torch.no_grad():
                    return mamba3_kernels.scan(*x[:14], backend=name)

        else:
            grads = [t for t in x[:14] if t is not None and t.is_floating_point()]
            for t in grads:
                t.requires_grad_(True)
            leaves += grads
            with torch.no_grad():
                probe = mamba3_kernels.scan(*x[:14], backend=name)
            gen = torch.Generator().manual_seed(2000 + c)
            dout = torch.randn(probe.shape, generator=gen).to(device=device, dtype=probe.dtype)
            del probe

            def fn(x=x, dout=dout):
                mamba3_kernels.scan(*x[:14], backend=name).backward(dout)

        fns.append(fn)
    return fns, leaves


def _base_row(item: Item, impl: str, kind: str, nbytes: int, flops: int) -> dict:
    s = item.shape
    return {
        "op": item.op,
        "impl": impl,
        "kind": kind,
        "group": item.group,
        "variant": s.variant,
        **s.as_dict(),
        "L": 1 if item.op == "decode" else s.seqlen,
        "bytes": nbytes,
        "flops": flops,
        "status": "ok",
        "reason": None,
        "note": None,
    }


def _finish(row: dict, rates: dict) -> dict:
    fl = floor.floor_ms(row["bytes"], row["flops"], rates["copy_gbps"], rates["matmul_tflops"])
    row["floor_ms"] = fl
    ms = row.get("ms")
    if ms:
        row["gbps"] = row["bytes"] / (ms * 1e-3) / 1e9
        row["tflops"] = row["flops"] / (ms * 1e-3) / 1e12
        row["floor_frac"] = fl / ms
    best = min((row.get(k) or float("inf")) for k in ("ms", "ms_graph"))
    if best < float("inf"):
        row["floor_frac_best"] = fl / best
    key = (row["op"], row["variant"], row["B"], row["L"])
    at_target_dims = all(row[k] == v for k, v in TARGET_DIMS.items())
    if row["kind"] == "backend" and key in TARGETS and at_target_dims:
        metric, public, target = TARGETS[key]
        row["target"] = {"metric": metric, "public_ms": public, "target_ms": target}
        if row.get(metric):
            row["target"]["met"] = row[metric] <= target
    return row


def _time_backend(name: str, item: Item, device: torch.device, row: dict) -> None:
    nbytes = row["bytes"]
    copies = timing.rotation_count(nbytes, device, cap=16 if item.op == "decode" else 4)
    fns, leaves = backend_closures(name, item.op, item.shape, device, copies)
    rotor = Rotor(fns)
    row["copies"] = copies
    row["ms"] = timing.median_ms(rotor, device, grad_to_none=leaves or None)
    if item.op == "fwdbwd" and name != "reference" and not registered_backends()[name].has_backward:
        row["note"] = "backward by the reference (backend has no backward)"
    if item.op != "decode":
        return
    row["ms_loop"] = timing.loop_ms(rotor, device)
    if device.type != "cuda":
        row["ms_graph"] = None
        row["graph_reason"] = "CUDA graphs need a GPU"
        return
    try:
        graphs = [timing.capture_graph(f) for f in fns[:8]]
    except Exception as e:  # the step is not capturable: say why, keep the eager numbers
        row["ms_graph"] = None
        row["graph_reason"] = f"capture failed: {type(e).__name__}: {e}"
        return
    row["ms_graph"] = timing.median_ms(Rotor([g.replay for g in graphs]), device)


def run_item(
    item: Item,
    device: torch.device,
    backends: list[str],
    peers: list[str],
    rates: dict,
) -> list[dict]:
    """Rows of every backend and peer on one item."""
    rows = []
    s = item.shape
    for name in backends:
        row = _base_row(
            item, name, "backend", floor.op_bytes(item.op, s), floor.op_flops(item.op, s)
        )
        why = _why_not_backend(name, item.op, s, device)
        if why:
            row.update(status="n/a", reason=why)
        else:
            try:
                _time_backend(name, item, device, row)
            except torch.OutOfMemoryError as e:  # a size limit of this machine, not a bug
                row.update(status="n/a", reason=f"out of memory: {str(e).splitlines()[0]}")
            except Exception as e:  # one failing row must not stop the run
                row.update(status="error", reason=f"{type(e).__name__}: {e}")
        rows.append(_finish(row, rates))
        _cleanup(device)
    for pname in peers:
        peer = PEERS[pname]
        row = _base_row(item, pname, "peer", peer.nbytes(item.op, s), peer.flops(item.op, s))
        why = peer.why_not(item.op, s, device)
        if why:
            continue  # peers only appear where they apply
        try:
            fn, leaves = peer.make(item.op, s, device, 3000)
            row["ms"] = timing.median_ms(fn, device, grad_to_none=leaves or None)
        except torch.OutOfMemoryError as e:
            row.update(status="n/a", reason=f"out of memory: {str(e).splitlines()[0]}")
        except Exception as e:
            row.update(status="error", reason=f"{type(e).__name__}: {e}")
        rows.append(_finish(row, rates))
        _cleanup(device)
    add_speedups(rows)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """For each backend row, peer ms / backend ms for every peer row of the same op and sizes
    (> 1: the backend is faster). Decode rows compare eager with eager."""
    peers = [r for r in rows if r["kind"] == "peer" and r.get("ms")]
    for r in rows:
        if r["kind"] != "backend" or not r.get("ms"):
            continue
        r["speedup"] = {
            p["impl"]: p["ms"] / r["ms"]
            for p in peers
            if (p["op"], p["B"], p["L"], p["H"], p["N"], p["P"])
            == (r["op"], r["B"], r["L"], r["H"], r["N"], r["P"])
            and (p["impl"] != "mamba3-public" or p["R"] == r["R"])
        }


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
