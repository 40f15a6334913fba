"""Random valid inputs for tests, the cross-check harness, benchmarks and the autotuner."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from .inputs import ScanInputs
from .state import Mamba3State


def random_inputs(
    batch: int = 2,
    seqlen: int = 64,
    nheads: int = 4,
    ngroups: int = 1,
    d_state: int = 16,
    headdim: int = 8,
    n_angles: int | None = None,
    rank: int = 1,
    mimo: bool | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    with_D: bool = True,
    with_z: bool = True,
    with_mimo_o: bool = True,
    with_initial_state: bool = False,
    cu_seqlens: list[int] | None = None,
    step: bool = False,
    generator: torch.Generator | None = None,
) -> ScanInputs:
    """Fresh random inputs in the value ranges of docs/spec.md (never zeros).

    ``mimo`` defaults to ``rank > 1``; a MIMO call with rank 1 is allowed (``mimo=True``).
    ``step=True`` drops the L axis (decode-step shapes); ``seqlen`` is then ignored.
    With ``cu_seqlens`` (list of boundaries), batch must be 1 and seqlen is taken from it.
    fp32 parameters (adt, dt, trap, biases, angles, D, mimo_*) stay fp32 unless dtype is float64.
    """
    if mimo is None:
        mimo = rank > 1
    if n_angles is None:
        n_angles = d_state // 4
    if cu_seqlens is not None:
        batch, seqlen = 1, cu_seqlens[-1]
    L = 1 if step else seqlen
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    g = generator

    def rn(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * scale).to(dt).to(device)

    qk_shape = (batch, L, rank, ngroups, d_state) if mimo else (batch, L, ngroups, d_state)
    q = rn(*qk_shape, scale=d_state**-0.5)
    k = rn(*qk_shape, scale=d_state**-0.5)
    v = rn(batch, L, nheads, headdim)
    dt = torch.nn.functional.softplus(rn(batch, nheads, L, dt=pdt) - 1.0)
    A = -torch.exp(rn(nheads, dt=pdt, scale=0.5))
    adt = A[None, :, None] * dt
    trap = rn(batch, nheads, L, dt=pdt)
    bias_shape = (nheads, rank, d_state) if mimo else (nheads, d_state)
    q_bias = rn(*bias_shape, dt=pdt, scale=0.1)
    k_bias = rn(*bias_shape, dt=pdt, scale=0.1)
    angles = rn(batch, L, nheads, n_angles, dt=pdt)
    D = rn(nheads, dt=pdt) if with_D else None
    z = rn(batch, L, nheads, headdim) if with_z else None
    mimo_v = rn(nheads, rank, headdim, dt=pdt, scale=0.5) + 1.0 if mimo else None
    mimo_z = rn(nheads, rank, headdim, dt=pdt, scale=0.5) + 1.0 if mimo else None
    mimo_o = rn(nheads, rank, headdim, dt=pdt, scale=0.5) if (mimo and with_mimo_o) else None
    state = None
    nseq = len(cu_seqlens) - 1 if cu_seqlens is not None else batch
    if with_initial_state or step:
        state = Mamba3State(
            angle=rn(nseq, nheads, n_angles, dt=pdt),
            ssm=rn(nseq, nheads, headdim, d_state, dt=pdt, scale=0.1),
            k=rn(nseq, rank, nheads, d_state, scale=d_state**-0.5),
            v=rn(nseq, nheads, headdim),
        )
    cu = (
        torch.tensor(cu_seqlens, dtype=torch.int32, device=device)
        if cu_seqlens is not None
        else None
    )
    if step:
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
        z = z[:, 0] if z is not None else None
        adt, dt, trap = adt[..., 0], dt[..., 0], trap[..., 0]
        angles = angles[:, 0]
    return ScanInputs(
        q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o, state, cu
    )


def cast_inputs(inputs: ScanInputs, dtype: torch.dtype, device: torch.device | str | None = None):
    """Copy of ``inputs`` with every floating tensor in ``dtype`` (e.g. float64 for the truth).

    Integer tensors (cu_seqlens) keep their dtype. ``device`` moves everything when given.
    """

    def cast(t):
        if t is None:
            return None
        t = t.to(device) if device is not None else t
        return t.to(dtype) if t.is_floating_point() else t

    state = inputs.initial_state
    if state is not None:
        state = Mamba3State(*(cast(t) for t in state))
    fields = [cast(t) for t in inputs[:14]]
    return ScanInputs(*fields, state, cast(inputs.cu_seqlens))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| computed in float64 (NaN anywhere gives inf)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / (denom if denom > 0 else 1.0)


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype == torch.uint8:
        t.fill_(255)  # byte workspaces: every float viewed through them is NaN
    elif t.dtype != torch.bool:
        t.fill_(-12345)
    return t


def poison_empty(monkeypatch) -> None:
    """Make ``torch.empty``, ``torch.empty_like`` and ``Tensor.new_empty`` return tensors filled
    with poison (NaN; 0xFF bytes; -12345 for other integers) until ``monkeypatch`` is undone:
    code that reads memory it never wrote then carries NaN into its results. ``monkeypatch``:
    pytest's fixture (anything with its ``setattr``)."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(empty_like(*a, **k)))
    monkeypatch.setattr(
        torch.Tensor, "new_empty", lambda t, *a, **k: _poison(new_empty(t, *a, **k))
    )


def run_compiled(source: str, timeout: int = 300, env: dict[str, str] | None = None) -> str:
    """Run ``python -c source`` with Triton's real compiler (TRITON_INTERPRET=0, plus ``env``),
    as the sm_90 build tests do on a machine without a GPU; fail with the end of its stderr
    unless it exits 0. Returns its stdout."""
    full_env = {**os.environ, "TRITON_INTERPRET": "0", **(env or {})}
    res = subprocess.run([sys.executable, "-c", source], env=full_env, capture_output=True,
                         text=True, timeout=timeout)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout
