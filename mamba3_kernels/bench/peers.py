"""What a user would run instead, timed next to the backends when importable.

* ``sdpa``: PyTorch's ``scaled_dot_product_attention``, causal, with the Mamba-3 call's head
  count and q, k, v all of head dim P (the usual attention layer of the same width; flash
  attention takes it).
* ``sdpa-qkN``: the same with q/k of head dim N and v of head dim P, matching the scan's
  ``(B, H, L, N)`` queries/keys and ``(B, H, L, P)`` values.
* ``mamba2``: Mamba-2's chunked scan (``mamba_ssm``'s ``mamba_chunk_scan_combined``), same B, L,
  H, G, N, P, chunk 256.
* ``mamba3-public``: the public Mamba-3 kernels (``mamba_ssm``): the Triton SISO prefill and the
  TileLang MIMO prefill.

Each peer builds a closure over fresh random inputs (never zeros) for one op at one shape, or
says why it cannot.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import floor
from .shapes import Shape

Maker = Callable[[str, Shape, torch.device, int], tuple[Callable[[], object], list]]


@dataclass
class Peer:
    """A peer implementation: ``make(op, shape, device, seed) -> (fn, grad_to_none)``."""

    name: str
    why_not: Callable[[str, Shape, torch.device], str | None]
    make: Maker
    nbytes: Callable[[str, Shape], int]
    flops: Callable[[str, Shape], int]


def _import(module: str, attr: str):
    """An attribute of an optional module, or the reason it cannot be had."""
    try:
        return getattr(importlib.import_module(module), attr), None
    except Exception as e:  # not installed, or installed but broken (e.g. no GPU build)
        return None, f"{module}.{attr} not importable ({type(e).__name__}: {e})"


def _randn(*shape, gen, dtype, device, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)


def _backward_closure(fn_out: Callable[[], torch.Tensor], leaves: list, gen, device):
    """fn running forward then backward with a fixed random output gradient."""
    with torch.no_grad():
        probe = fn_out()
    dout = torch.randn(probe.shape, generator=gen).to(device=device, dtype=probe.dtype)
    del probe

    def fn():
        fn_out().backward(dout)

    return fn, leaves


# --- SDPA -------------------------------------------------------------------------------------


def _sdpa_why(op: str, s: Shape, device: torch.device) -> str | None:
    if op == "decode":
        return "decode is not compared with attention"
    return None


def _sdpa_dims(s: Shape, qk_is_n: bool) -> tuple[int, int]:
    return (s.d_state if qk_is_n else s.headdim), s.headdim


def _sdpa_make(op: str, s: Shape, device: torch.device, seed: int, qk_is_n: bool = False):
    gen = torch.Generator().manual_seed(seed)
    d_qk, d_v = _sdpa_dims(s, qk_is_n)
    B, H, L = s.batch, s.nheads, s.seqlen
    q = _randn(B, H, L, d_qk, gen=gen, dtype=s.dtype, device=device)
    k = _randn(B, H, L, d_qk, gen=gen, dtype=s.dtype, device=device)
    v = _randn(B, H, L, d_v, gen=gen, dtype=s.dtype, device=device)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fwd():
        return sdpa(q, k, v, is_causal=True)

    with torch.no_grad():
        fwd()  # fails here (not in the timer) when no SDPA kernel takes these head dims
    if op == "fwd":

        def fn():
            with torch.no_grad():
                return fwd()

        return fn, []
    for t in (q, k, v):
        t.requires_grad_(True)
    return _backward_closure(fwd, [q, k, v], gen, device)


def _sdpa_peer(name: str, qk_is_n: bool) -> Peer:
    def make(op, s, device, seed):
        return _sdpa_make(op, s, device, seed, qk_is_n)

    def nbytes(op, s):
        d_qk, d_v = _sdpa_dims(s, qk_is_n)
        return floor.attention_bytes(
            s.batch, s.nheads, s.seqlen, d_qk, d_v, s.elt, backward=op == "fwdbwd"
        )

    def flops(op, s):
        d_qk, d_v = _sdpa_dims(s, qk_is_n)
        return floor.attention_flops(
            s.batch, s.nheads, s.seqlen, d_qk, d_v, backward=op == "fwdbwd"
        )

    return Peer(name, _sdpa_why, make, nbytes, flops)


# --- Mamba-2 ----------------------------------------------------------------------------------

_MAMBA2 = ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")


def _mamba2_why(op: str, s: Shape, device: torch.device) -> str | None:
    if device.type != "cuda":
        return "needs CUDA"
    if op == "decode":
        return "decode not compared"
    if s.mimo:
        return "Mamba-2 has no MIMO form (compared on SISO shapes)"
    return _import(*_MAMBA2)[1]


def _mamba2_make(op: str, s: Shape, device: torch.device, seed: int):
    scan, _ = _import(*_MAMBA2)
    gen = torch.Generator().manual_seed(seed)
    B, L, H, G, N, P = s.batch, s.seqlen, s.nheads, s.ngroups, s.d_state, s.headdim
    x = _randn(B, L, H, P, gen=gen, dtype=s.dtype, device=device)
    dt = torch.nn.functional.softplus(_randn(B, L, H, gen=gen, dtype=torch.float32, device=device))
    A = -torch.exp(_randn(H, gen=gen, dtype=torch.float32, device=device, scale=0.5))
    Bm = _randn(B, L, G, N, gen=gen, dtype=s.dtype, device=device, scale=N**-0.5)
    Cm = _randn(B, L, G, N, gen=gen, dtype=s.dtype, device=device, scale=N**-0.5)
    D = _randn(H, gen=gen, dtype=torch.float32, device=device)

    def fwd():
        return scan(x, dt, A, Bm, Cm, chunk_size=256, D=D)

    if op == "fwd":

        def fn():
            with torch.no_grad():
                return fwd()

        return fn, []
    leaves = [x, dt, A, Bm, Cm, D]
    for t in leaves:
        t.requires_grad_(True)
    return _backward_closure(fwd, leaves, gen, device)


# --- public Mamba-3 ---------------------------------------------------------------------------

_M3_SISO = ("mamba_ssm.ops.triton.mamba3.mamba3_siso_combined", "mamba3_siso_combined")
_M3_MIMO = ("mamba_ssm.ops.tilelang.mamba3.mamba3_mimo", "mamba3_mimo")


def _m3_why(op: str, s: Shape, device: torch.device) -> str | None:
    if device.type != "cuda":
        return "needs CUDA"
    if op == "decode":
        return "public decode step not wired in this harness"
    return _import(*(_M3_MIMO if s.mimo else _M3_SISO))[1]


def _m3_make(op: str, s: Shape, device: torch.device, seed: int):
    from ..testing import random_inputs

    gen = torch.Generator().manual_seed(seed)
    x = random_inputs(
        batch=s.batch,
        seqlen=s.seqlen,
        nheads=s.nheads,
        ngroups=s.ngroups,
        d_state=s.d_state,
        headdim=s.headdim,
        n_angles=s.n_angles,
        rank=s.rank,
        dtype=s.dtype,
        device=device,
        with_D=s.has_D,
        with_z=s.has_z,
        with_mimo_o=s.has_mimo_o,
        generator=gen,
    )
    if s.mimo:
        fn_mimo, _ = _import(*_M3_MIMO)
        trap = x.trap.to(s.dtype)  # (the public MIMO kernel takes it in the activations' dtype)

        def fwd():
            return fn_mimo(
                x.q, x.k, x.v, x.adt, x.dt, trap, x.q_bias, x.k_bias,
                x.mimo_v, x.mimo_z, x.mimo_o, x.angles, x.D, x.z,
                chunk_size=max(64 // s.rank, 8), rotary_dim_divisor=s.d_state // s.n_angles,
                dtype=s.dtype,
            )  # fmt: skip
    else:
        fn_siso, _ = _import(*_M3_SISO)

        def fwd():
            return fn_siso(
                x.q, x.k, x.v, x.adt, x.dt, x.trap, x.q_bias, x.k_bias, x.angles, x.D, x.z
            )

    if op == "fwd":

        def fn():
            with torch.no_grad():
                return fwd()

        return fn, []
    leaves = [t for t in x[:14] if t is not None and t.is_floating_point()]
    for t in leaves:
        t.requires_grad_(True)
    return _backward_closure(fwd, leaves, gen, device)


PEERS: dict[str, Peer] = {
    "mamba3-public": Peer("mamba3-public", _m3_why, _m3_make, floor.op_bytes, floor.op_flops),
    "mamba2": Peer(
        "mamba2",
        _mamba2_why,
        _mamba2_make,
        lambda op, s: floor.mamba2_bytes(s, backward=op == "fwdbwd"),
        lambda op, s: floor.mamba2_flops(s, backward=op == "fwdbwd"),
    ),
    "sdpa": _sdpa_peer("sdpa", qk_is_n=False),
    "sdpa-qkN": _sdpa_peer("sdpa-qkN", qk_is_n=True),
}
