"""The Mamba-3 layer (``nn.Module``) for model code: projections around the scan.

One input projection produces, per token, the gate z, the values x, the keys B and queries C
(``ngroups`` heads of size ``d_state``, times the MIMO rank), and per head the raw dt, the raw A
and the trapezoid mix, plus the shared rotary angle rates. The scan itself (prefill) and the
decode step run through :func:`mamba3_kernels.scan` and :func:`mamba3_kernels.step`, so every
backend serves the layer. Parameter names follow the published Mamba-3 layer so its weights load
with ``load_state_dict``.

SSM naming: the scan's q is C, its k is B and its v is x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import mamba3_kernels

from ..state import Mamba3State

_ROPE_FRACTIONS = (0.5, 1.0)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class Mamba3Cache:
    """Inference cache of one :class:`Mamba3` layer.

    state: the recurrent state, one row per sequence (``Mamba3State``: angle (B, H, S),
        ssm (B, H, P, N), k (B, R, H, N), v (B, H, P)).
    seqlen_offset: tokens already absorbed into ``state`` (0: the next forward is a fresh
        prefill; > 0: it continues from ``state``).
    """

    state: Mamba3State
    seqlen_offset: int = 0

    @property
    def batch_size(self) -> int:
        return self.state.ssm.shape[0]

    def reset(self) -> None:
        """Zero the state in place (the buffers are kept, e.g. for CUDA graphs)."""
        for t in self.state:
            t.zero_()
        self.seqlen_offset = 0

    def reset_slots(self, state_indices: torch.Tensor) -> None:
        """Zero the slots ``state_indices`` of a pooled cache in place (a new request's slot,
        before its prefill); negative indices (padding) are skipped."""
        idx = state_indices.long().to(self.state.ssm.device)
        idx = idx[idx >= 0]
        for t in self.state:
            t.index_fill_(0, idx, 0)

    def _store(self, new_state: Mamba3State, ntokens: int) -> None:
        # Copy rather than rebind: the cache's buffers stay the same tensors across calls, and
        # the stored state carries no autograd history.
        with torch.no_grad():
            for dst, src in zip(self.state, new_state, strict=True):
                if dst is not src:  # an in-place step hands back the cache's own tensors
                    dst.copy_(src)
        self.seqlen_offset += ntokens


class _RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learned scale, computed in fp32 (or float64)."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(cdt)
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(cdt)).to(x.dtype)


class _GatedRMSNorm(nn.Module):
    """RMSNorm per group of ``group_size`` channels, then a SiLU gate: norm(y) * w * silu(z).

    The optional output norm of the layer (``is_outproj_norm``), with one group per head.
    """

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z (..., dim) -> (..., dim) in y's dtype."""
        cdt = torch.float64 if y.dtype == torch.float64 else torch.float32
        yg = y.to(cdt).unflatten(-1, (-1, self.group_size))
        yn = (yg * torch.rsqrt(yg.square().mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return (yn * self.weight.to(cdt) * F.silu(z.to(cdt))).to(y.dtype)


@dataclass
class _Projected:
    """The scan's inputs for one call, in docs/spec.md shapes (with the L axis)."""

    q: torch.Tensor  # SISO (B, L, G, N); MIMO (B, L, R, G, N)
    k: torch.Tensor
    v: torch.Tensor  # (B, L, H, P)
    z: torch.Tensor  # (B, L, H, P)
    adt: torch.Tensor  # (B, H, L)
    dt: torch.Tensor  # (B, H, L)
    trap: torch.Tensor  # (B, H, L)
    angles: torch.Tensor  # (B, L, H, S)


class Mamba3(nn.Module):
    """Mamba-3 sequence mixer: ``(B, L, d_model) -> (B, L, d_model)``.

    Args:
        d_model: model width.
        d_state: state size N per head (head dim of B and C).
        expand: inner width ``d_inner = expand * d_model``.
        headdim: value head dim P; ``nheads = d_inner // headdim``.
        ngroups: B/C heads G (grouped like GQA); ``nheads % ngroups == 0``.
        rope_fraction: 0.5 or 1.0, the fraction of each B/C head that is rotated
            (S = N/4 or N/2 angles).
        dt_min, dt_max, dt_init_floor: range of the initial dt (log-uniform), via ``dt_bias``.
        A_floor: A = -softplus(raw) is clamped to at most -A_floor (a floor on the decay rate).
        mimo_rank: MIMO rank R (1: SISO).
        is_mimo: MIMO on/off; defaults to ``mimo_rank > 1``. When False the rank is 1.
        is_outproj_norm: gate the output with a per-head RMSNorm (``norm(y) * silu(z)``) after
            the scan, instead of the scan's own ``y * silu(z)``; MIMO then normalizes each rank
            before the rank reduction by ``mimo_o``.
        chunk_size: chunk length of the prefill scan (None: the backend chooses).
        backend: backend name passed to ``scan``/``step`` ("auto", "reference", "triton", ...).
        layer_idx: key of this layer's cache in ``inference_params.key_value_memory_dict``.
        device, dtype: of the projections and norms (the SSM parameters stay fp32).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        rope_fraction: float = 0.5,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        A_floor: float = 1e-4,
        mimo_rank: int = 1,
        is_mimo: bool | None = None,
        is_outproj_norm: bool = False,
        chunk_size: int | None = None,
        backend: str = "auto",
        layer_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if is_mimo is None:
            is_mimo = mimo_rank > 1
        if mimo_rank < 1:
            raise ValueError(f"mimo_rank must be >= 1, got {mimo_rank}")
        if rope_fraction not in _ROPE_FRACTIONS:
            raise ValueError(f"rope_fraction must be 0.5 or 1.0, got {rope_fraction}")
        d_inner = int(expand * d_model)
        if d_inner % headdim != 0:
            raise ValueError(f"expand * d_model = {d_inner} is not a multiple of headdim={headdim}")
        nheads = d_inner // headdim
        if nheads % ngroups != 0:
            raise ValueError(f"nheads={nheads} is not a multiple of ngroups={ngroups}")
        # An even number of rotated coordinates, paired into S angles.
        rotated = int(d_state * rope_fraction) // 2 * 2
        if rotated < 2:
            raise ValueError(
                f"d_state={d_state} leaves no rotary angle at rope_fraction={rope_fraction}"
            )

        self.d_model = d_model
        self.d_state = d_state
        self.expand = expand
        self.headdim = headdim
        self.d_inner = d_inner
        self.nheads = nheads
        self.ngroups = ngroups
        self.num_bc_heads = ngroups  # the published layer's name for G
        self.rope_fraction = rope_fraction
        self.num_rope_angles = rotated // 2
        self.A_floor = A_floor
        self.is_mimo = bool(is_mimo)
        self.mimo_rank = mimo_rank if self.is_mimo else 1
        self.is_outproj_norm = is_outproj_norm
        # The SISO layer rotates adjacent pairs, the MIMO layer pairs the two halves (docs/spec.md).
        self.rotary = "halves" if self.is_mimo else "interleaved"
        self.chunk_size = chunk_size
        self.backend = backend
        self.layer_idx = layer_idx

        R, H, N, P = self.mimo_rank, nheads, d_state, headdim
        bc = N * ngroups * R
        # Order of the projection's outputs: z, x, B, C, dt, A, trap, angles.
        self._split_sizes = [d_inner, d_inner, bc, bc, H, H, H, self.num_rope_angles]
        self.in_proj = nn.Linear(d_model, sum(self._split_sizes), bias=False, **factory)

        # dt_bias = softplus^-1(dt) for dt log-uniform in [dt_min, dt_max], so that the
        # initial step sizes span several time scales.
        log_dt = torch.rand(H, device=device) * (math.log(dt_max) - math.log(dt_min))
        dt = torch.exp(log_dt + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.dt_bias._no_weight_decay = True

        # B/C biases (the scan's k_bias/q_bias), kept (H, R, N) as published, also for SISO.
        self.B_bias = nn.Parameter(torch.ones(H, R, N, device=device))
        self.C_bias = nn.Parameter(torch.ones(H, R, N, device=device))
        self.B_norm = _RMSNorm(N, eps=1e-5, **factory)
        self.C_norm = _RMSNorm(N, eps=1e-5, **factory)

        if self.is_mimo:
            # Up-projections of x and z to R ranks and the down-projection of the output.
            self.mimo_x = nn.Parameter(torch.full((H, R, P), 1.0 / R, device=device))
            self.mimo_z = nn.Parameter(torch.ones(H, R, P, device=device))
            self.mimo_o = nn.Parameter(torch.full((H, R, P), 1.0 / R, device=device))

        self.D = nn.Parameter(torch.ones(H, device=device))
        self.D._no_weight_decay = True
        if is_outproj_norm:
            self.norm = _GatedRMSNorm(d_inner, group_size=headdim, eps=1e-5, **factory)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False, **factory)

    # ------------------------------------------------------------------ helpers

    def _check_hidden(self, hidden_states: torch.Tensor, what: str, layout: str) -> None:
        """The input's type, rank, width, dtype and device, each with its own message (instead of
        a matmul error deep inside the projection). ``layout``: the accepted shapes, in words."""
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(
                f"{what}: hidden_states must be a tensor, got {type(hidden_states).__name__}"
            )
        if hidden_states.dim() != 3:
            raise ValueError(
                f"{what}: hidden_states must be {layout}, got shape {tuple(hidden_states.shape)}"
            )
        if hidden_states.shape[-1] != self.d_model:
            raise ValueError(
                f"{what}: hidden_states last dim is {hidden_states.shape[-1]}, "
                f"expected d_model={self.d_model}"
            )
        weight = self.in_proj.weight
        if hidden_states.dtype != weight.dtype and not torch.is_autocast_enabled(
            hidden_states.device.type
        ):  # under autocast the projections choose their own dtype
            x_dt, w_dt = _dtype_name(hidden_states.dtype), _dtype_name(weight.dtype)
            raise TypeError(
                f"{what}: hidden_states has dtype {x_dt} but the layer's weights are {w_dt}; "
                f"cast the input (hidden_states.to(torch.{w_dt})) or the layer "
                f"(layer.to(torch.{x_dt}))"
            )
        if hidden_states.device != weight.device:
            raise ValueError(
                f"{what}: hidden_states is on {hidden_states.device} but the layer's weights are "
                f"on {weight.device}; move one of them (hidden_states.to(\"{weight.device}\"))"
            )

    def _check_cache(self, cache: Any, nseq: int | None, what: str) -> None:
        """A cache of this layer's shapes for ``nseq`` sequences (None: a pool of any size)."""
        if not isinstance(cache, Mamba3Cache):
            got = "None" if cache is None else type(cache).__name__
            raise TypeError(
                f"{what}: cache must be a Mamba3Cache from "
                f"layer.allocate_inference_cache(batch_size), got {got}"
            )
        if nseq is not None and cache.batch_size != nseq:
            raise ValueError(
                f"{what}: cache holds {cache.batch_size} sequences, the input has {nseq} "
                f"(allocate_inference_cache({nseq}) makes a fitting one)"
            )
        ssm, angle, k = cache.state.ssm, cache.state.angle, cache.state.k
        expected = (self.nheads, self.headdim, self.d_state)
        if (
            tuple(ssm.shape[1:]) != expected
            or angle.shape[-1] != self.num_rope_angles
            or k.shape[1] != self.mimo_rank
        ):
            raise ValueError(
                f"{what}: the cache's state (ssm {tuple(ssm.shape)}, angle {tuple(angle.shape)}, "
                f"k {tuple(k.shape)}) does not fit this layer (ssm (B, "
                f"{', '.join(map(str, expected))}), {self.num_rope_angles} angles, rank "
                f"{self.mimo_rank}): it comes from another layer's allocate_inference_cache"
            )

    def _param(self, p: torch.Tensor, pdt: torch.dtype) -> torch.Tensor:
        # SSM parameters enter the scan in fp32 (float64 in a float64 model), whatever dtype
        # the module was cast to.
        return p.to(pdt)

    def _ssm_params(self, pdt: torch.dtype) -> dict[str, Any]:
        """Parameters of the scan/step call; with the output norm, the gate and the rank
        reduction happen after the scan (``_gate_out``), so z and mimo_o stay out of it."""
        q_bias, k_bias = self._param(self.C_bias, pdt), self._param(self.B_bias, pdt)
        if not self.is_mimo:
            q_bias, k_bias = q_bias[:, 0], k_bias[:, 0]
        params = {"q_bias": q_bias, "k_bias": k_bias, "D": self._param(self.D, pdt)}
        if self.is_mimo:
            params["mimo_v"] = self._param(self.mimo_x, pdt)
            params["mimo_z"] = self._param(self.mimo_z, pdt)
            if not self.is_outproj_norm:
                params["mimo_o"] = self._param(self.mimo_o, pdt)
        return params

    def _gate_out(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The output norm (``is_outproj_norm``): y (..., H, P), or (..., R, H, P) for MIMO,
        and z (..., H, P) -> (..., H, P)."""
        if not self.is_mimo:
            return self.norm(y.flatten(-2), z.flatten(-2)).unflatten(-1, (self.nheads, -1))
        pdt = torch.float64 if y.dtype == torch.float64 else torch.float32
        # (H, R, P) weights broadcast against the rank axis at -3.
        z_r = z.to(pdt).unsqueeze(-3) * self._param(self.mimo_z, pdt).transpose(0, 1)
        y_r = self.norm(y.to(pdt).flatten(-2), z_r.flatten(-2)).unflatten(-1, (self.nheads, -1))
        return (y_r * self._param(self.mimo_o, pdt).transpose(0, 1)).sum(-3).to(y.dtype)

    def _project(self, u: torch.Tensor) -> _Projected:
        """in_proj and the elementwise maps: u (B, L, d_model) -> the scan's inputs."""
        batch, seqlen, _ = u.shape
        H, P, G, N, R = self.nheads, self.headdim, self.ngroups, self.d_state, self.mimo_rank
        pdt = torch.float64 if u.dtype == torch.float64 else torch.float32
        z, x, B, C, dd_dt, dd_A, trap, ang = torch.split(self.in_proj(u), self._split_sizes, -1)

        z = z.unflatten(-1, (H, P))
        x = x.unflatten(-1, (H, P))
        # RMSNorm per group and rank, over the N coordinates of each B/C head.
        B = self.B_norm(B.unflatten(-1, (R, G, N)))
        C = self.C_norm(C.unflatten(-1, (R, G, N)))
        if not self.is_mimo:
            B, C = B[:, :, 0], C[:, :, 0]

        # A < 0 with a heavy-tailed magnitude, bounded away from 0 so every head decays.
        A = (-F.softplus(dd_A.to(pdt))).clamp(max=-self.A_floor)
        dt = F.softplus(dd_dt.to(pdt) + self._param(self.dt_bias, pdt))
        adt = (A * dt).transpose(1, 2)
        dt = dt.transpose(1, 2)
        trap = trap.to(pdt).transpose(1, 2)
        # One set of angle rates shared by every head.
        angles = ang.to(pdt)[:, :, None, :].expand(batch, seqlen, H, self.num_rope_angles)
        return _Projected(
            q=C.contiguous(),
            k=B.contiguous(),
            v=x.contiguous(),
            z=z.contiguous(),
            adt=adt.contiguous(),
            dt=dt.contiguous(),
            trap=trap.contiguous(),
            angles=angles.contiguous(),
        )

    def _cache_from_params(self, inference_params: Any, nseq: int, dtype: torch.dtype):
        """This layer's cache in a generation loop's ``inference_params`` (created on first use).

        ``inference_params`` needs ``key_value_memory_dict`` (dict) and ``seqlen_offset`` (int,
        advanced by the caller).
        """
        if self.layer_idx is None:
            raise ValueError("inference_params needs the layer built with layer_idx")
        store = inference_params.key_value_memory_dict
        cache = store.get(self.layer_idx)
        if cache is None:
            cache = self.allocate_inference_cache(nseq, dtype=dtype)
            store[self.layer_idx] = cache
        offset = int(inference_params.seqlen_offset)
        if offset == 0 and cache.seqlen_offset != 0:
            cache.reset()
        cache.seqlen_offset = offset
        return cache

    # ------------------------------------------------------------------ public API

    def allocate_inference_cache(
        self,
        batch_size: int,
        max_seqlen: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        state_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> Mamba3Cache:
        """A zero cache for ``batch_size`` sequences (or slots of a pool, see forward's
        ``state_indices``).

        ``max_seqlen`` is accepted for generation loops that pass it and is unused: the state
        has a fixed size. ``dtype`` is that of the cached k/v (default: in_proj's dtype); the
        angle and matrix state are fp32 (float64 for a float64 model); ``state_dtype`` may make
        the matrix state bf16 or fp16.
        """
        weight = self.in_proj.weight
        dtype = weight.dtype if dtype is None else dtype
        device = weight.device if device is None else device
        state = Mamba3State.zeros(
            batch_size,
            self.nheads,
            self.headdim,
            self.d_state,
            self.num_rope_angles,
            rank=self.mimo_rank,
            dtype=dtype,
            device=device,
            state_dtype=state_dtype or (torch.float64 if dtype == torch.float64 else torch.float32),
        )
        return Mamba3Cache(state=state)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        inference_params: Any = None,
        cache: Mamba3Cache | None = None,
        state_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prefill (or training) over a whole sequence.

        Args:
            hidden_states: (B, L, d_model).
            cu_seqlens: (nseq + 1,) int32 boundaries of sequences packed along L (B must be 1).
            cache: a :class:`Mamba3Cache` for nseq sequences: the scan starts from its state
                when ``cache.seqlen_offset > 0`` (chunked prefill) and its final state is
                stored back, ready for :meth:`step`.
            inference_params: generation-loop object (``key_value_memory_dict``,
                ``seqlen_offset``); the cache then lives there under ``layer_idx``, and a
                one-token call with ``seqlen_offset > 0`` runs :meth:`step`.
            state_indices: (nseq,) slots of a pooled ``cache`` (any number of slots): sequence
                b continues slot ``state_indices[b]`` and leaves its final state there
                (``cache.reset_slots`` zeroes a new request's slot first; -1 pads). Inference
                only.
        Returns:
            (B, L, d_model), in hidden_states' dtype.
        """
        self._check_hidden(hidden_states, "Mamba3.forward", "(batch, seqlen, d_model)")
        batch, seqlen, _ = hidden_states.shape
        if cu_seqlens is not None and batch != 1:
            raise ValueError(f"Mamba3.forward: cu_seqlens needs batch 1, got batch {batch}")
        nseq = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else batch
        pooled = state_indices is not None
        if pooled and (cache is None or inference_params is not None):
            raise ValueError("Mamba3.forward: state_indices needs cache (a pool), not "
                             "inference_params")  # fmt: skip
        if inference_params is not None:
            if cache is not None:
                raise ValueError("Mamba3.forward: pass either cache or inference_params, not both")
            cache = self._cache_from_params(inference_params, nseq, hidden_states.dtype)
            if cache.seqlen_offset > 0 and seqlen == 1 and cu_seqlens is None:
                return self.step(hidden_states, cache)
        if cache is not None:
            self._check_cache(cache, None if pooled else nseq, "Mamba3.forward")

        p = self._project(hidden_states)
        pdt = p.dt.dtype
        initial_state = None
        if pooled:
            initial_state = cache.state
        elif cache is not None and cache.seqlen_offset > 0:
            # Autograd may keep the initial state for the backward pass, and the cache is
            # overwritten below: hand the scan a copy when gradients are on.
            initial_state = cache.state.clone() if torch.is_grad_enabled() else cache.state
        res = mamba3_kernels.scan(
            p.q,
            p.k,
            p.v,
            p.adt,
            p.dt,
            p.trap,
            angles=p.angles,
            z=None if self.is_outproj_norm else p.z,
            initial_state=initial_state,
            return_final_state=cache is not None and not pooled,
            cu_seqlens=cu_seqlens,
            rotary=self.rotary,
            chunk_size=self.chunk_size,
            backend=self.backend,
            state_indices=state_indices,
            **self._ssm_params(pdt),
        )
        if cache is not None and not pooled:
            y, final_state = res
            cache._store(final_state, seqlen)
        else:
            y = res
        if self.is_outproj_norm:
            y = self._gate_out(y, p.z)
        y = y.reshape(batch, seqlen, self.d_inner)
        return self.out_proj(y.to(hidden_states.dtype))

    def step(
        self,
        hidden_states: torch.Tensor,
        cache: Mamba3Cache | None = None,
        state_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One decode step for every cached sequence, updating ``cache`` in place.

        Args:
            hidden_states: (B, 1, d_model) or (B, d_model), B = cache.batch_size.
            cache: from :meth:`allocate_inference_cache`, usually filled by a prefill
                (required: the default None only makes its absence a clear error).
            state_indices: (B,) slots of a pooled ``cache``; -1 pads a row (output of the
                scan part zero, no slot touched).
        Returns:
            (B, 1, d_model).
        """
        if isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 2:
            hidden_states = hidden_states[:, None]
        self._check_hidden(hidden_states, "Mamba3.step", "(batch, 1, d_model) or (batch, d_model)")
        batch, seqlen, _ = hidden_states.shape
        if seqlen != 1:
            raise ValueError(f"Mamba3.step: takes one token per sequence, got seqlen {seqlen}")
        self._check_cache(cache, None if state_indices is not None else batch, "Mamba3.step")

        p = self._project(hidden_states)
        y, new_state = mamba3_kernels.step(
            p.q[:, 0],
            p.k[:, 0],
            p.v[:, 0],
            p.adt[..., 0],
            p.dt[..., 0],
            p.trap[..., 0],
            angles=p.angles[:, 0],
            state=cache.state,
            z=None if self.is_outproj_norm else p.z[:, 0],
            rotary=self.rotary,
            inplace=True,
            backend=self.backend,
            state_indices=state_indices,
            **self._ssm_params(p.dt.dtype),
        )
        if state_indices is None:
            cache._store(new_state, 1)
        if self.is_outproj_norm:
            y = self._gate_out(y, p.z[:, 0])
        y = y.reshape(batch, 1, self.d_inner)
        return self.out_proj(y.to(hidden_states.dtype))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_state={self.d_state}, nheads={self.nheads}, "
            f"headdim={self.headdim}, ngroups={self.ngroups}, mimo_rank={self.mimo_rank}, "
            f"rope_angles={self.num_rope_angles}, rotary={self.rotary!r}, "
            f"outproj_norm={self.is_outproj_norm}, backend={self.backend!r}"
        )
