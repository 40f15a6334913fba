"""The Mamba-3 layer (mamba3_kernels.nn.Mamba3): prefill/decode consistency, shapes, gradients,
varlen, the published layer's formulas, and input errors. CPU, small sizes."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import mamba3_kernels
from mamba3_kernels.inputs import ScanInputs
from mamba3_kernels.nn import Mamba3, Mamba3Cache
from mamba3_kernels.reference import reference_scan
from mamba3_kernels.testing import rel_err

F64 = torch.float64
D_MODEL = 32
# (mimo_rank, rope_fraction): SISO and MIMO, S = N/4 and S = N/2.
CONFIGS = [(1, 0.5), (1, 1.0), (2, 0.5), (2, 1.0)]
CONFIG_IDS = [f"R{r}-rope{f}" for r, f in CONFIGS]


def make_layer(
    mimo_rank: int = 1,
    rope_fraction: float = 0.5,
    ngroups: int = 2,
    dtype: torch.dtype = F64,
    seed: int = 0,
    **kwargs,
) -> Mamba3:
    """A small layer (H = 4 heads of P = 16, N = 16) with every parameter randomized away from its
    constant initial value, so that no term of the layer can silently drop out of a test."""
    torch.manual_seed(seed)
    layer = Mamba3(
        D_MODEL,
        d_state=16,
        expand=2,
        headdim=16,
        ngroups=ngroups,
        rope_fraction=rope_fraction,
        mimo_rank=mimo_rank,
        backend=kwargs.pop("backend", "reference"),
        **kwargs,
    ).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            scale = 1.0 if name in ("dt_bias",) else 0.3
            p.add_(noise * scale)
    return layer


def randn(*shape, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)


def assert_states_close(a, b, tol=1e-10):
    """States agree; angles compared on the circle (a state may reduce them modulo 2 pi)."""
    assert torch.allclose(torch.cos(a.angle), torch.cos(b.angle), atol=tol)
    assert torch.allclose(torch.sin(a.angle), torch.sin(b.angle), atol=tol)
    for name in ("ssm", "k", "v"):
        assert rel_err(getattr(a, name), getattr(b, name)) < tol, name


# ---------------------------------------------------------------- prefill / decode


@pytest.mark.parametrize("rank,rope", CONFIGS, ids=CONFIG_IDS)
def test_prefill_then_decode_equals_one_prefill(rank, rope):
    layer = make_layer(rank, rope)
    L, k = 7, 4
    x = randn(2, L + k, D_MODEL)
    with torch.no_grad():
        full_cache = layer.allocate_inference_cache(2)
        full = layer(x, cache=full_cache)
        cache = layer.allocate_inference_cache(2)
        outs = [layer(x[:, :L], cache=cache)]
        for t in range(L, L + k):
            outs.append(layer.step(x[:, t : t + 1], cache))
    got = torch.cat(outs, dim=1)
    assert got.shape == full.shape
    assert rel_err(got, full) < 1e-10
    # Each decoded token on its own, not only the whole sequence.
    for t in range(L, L + k):
        assert rel_err(got[:, t], full[:, t]) < 1e-10
    assert cache.seqlen_offset == L + k
    assert_states_close(cache.state, full_cache.state)


@pytest.mark.parametrize("rank,rope", [(1, 0.5), (2, 1.0)], ids=["SISO", "MIMO"])
def test_pooled_cache_serves_requests_like_alone(rank, rope):
    """Two requests on slots of one pooled cache (prefilled in chunks at different times,
    decoded in one padded batch) give each request's outputs run alone."""
    layer = make_layer(rank, rope)
    a, b = randn(1, 12, D_MODEL, seed=1), randn(1, 9, D_MODEL, seed=2)
    with torch.no_grad():
        want_a, want_b = layer(a), layer(b)
        cache = layer.allocate_inference_cache(4)
        cache.state.ssm.normal_()  # stale slots: reset_slots must clear the new requests'
        cache.reset_slots(torch.tensor([3, 0]))
        got_a = [layer(a[:, :5], cache=cache, state_indices=torch.tensor([3])),
                 layer(a[:, 5:8], cache=cache, state_indices=torch.tensor([3]))]  # fmt: skip
        got_b = [layer(b[:, :6], cache=cache, state_indices=torch.tensor([0]))]
        idx = torch.tensor([3, -1, 0])
        for t in range(3):  # a's tokens 8..10 and b's 6..8 in one batch with a padding row
            x = torch.cat([a[:, 8 + t], torch.zeros_like(a[:, 0]), b[:, 6 + t]])
            y = layer.step(x, cache, state_indices=idx)
            got_a.append(y[:1])
            got_b.append(y[2:])
        got_a.append(layer(a[:, 11:], cache=cache, state_indices=torch.tensor([3])))
    assert rel_err(torch.cat(got_a, 1), want_a) < 1e-10
    assert rel_err(torch.cat(got_b, 1), want_b) < 1e-10


@pytest.mark.parametrize("outproj_norm", [False, True], ids=["gate", "outproj_norm"])
@pytest.mark.parametrize("rank,rope", [(1, 0.5), (2, 1.0)], ids=["SISO", "MIMO"])
def test_chunked_prefill_then_decode(rank, rope, outproj_norm):
    """Prefill in two pieces (the second continues from the cached state), then decode."""
    layer = make_layer(rank, rope, is_outproj_norm=outproj_norm)
    x = randn(3, 12, D_MODEL, seed=1)
    with torch.no_grad():
        full = layer(x)
        cache = layer.allocate_inference_cache(3)
        a = layer(x[:, :5], cache=cache)
        b = layer(x[:, 5:9], cache=cache)
        rest = [layer.step(x[:, t], cache) for t in range(9, 12)]  # (B, d_model) input form
    got = torch.cat([a, b, *rest], dim=1)
    assert rel_err(got, full) < 1e-10


def test_cache_reset_starts_fresh():
    layer = make_layer(1, 0.5)
    x = randn(2, 6, D_MODEL, seed=2)
    with torch.no_grad():
        cache = layer.allocate_inference_cache(2)
        layer(randn(2, 5, D_MODEL, seed=3), cache=cache)
        cache.reset()
        assert cache.seqlen_offset == 0
        assert all(bool((t == 0).all()) for t in cache.state)
        got = layer(x, cache=cache)
        assert rel_err(got, layer(x)) < 1e-12


def test_inference_params_generation_loop():
    """A generation loop in the published style: a dict of caches keyed by layer_idx, and a
    seqlen_offset the loop advances; one-token calls past the prompt decode."""
    layer = make_layer(2, 0.5, layer_idx=3)
    x = randn(2, 9, D_MODEL, seed=4)
    params = SimpleNamespace(key_value_memory_dict={}, seqlen_offset=0)
    with torch.no_grad():
        full = layer(x)
        outs = [layer(x[:, :6], inference_params=params)]
        params.seqlen_offset = 6
        for t in range(6, 9):
            outs.append(layer(x[:, t : t + 1], inference_params=params))
            params.seqlen_offset += 1
    assert isinstance(params.key_value_memory_dict[3], Mamba3Cache)
    assert rel_err(torch.cat(outs, dim=1), full) < 1e-10
    # A new prompt (offset back to 0) starts from a zero state, not from the old one.
    params.seqlen_offset = 0
    with torch.no_grad():
        again = layer(x[:, :4], inference_params=params)
    assert rel_err(again, full[:, :4]) < 1e-12


# ---------------------------------------------------------------- shapes, dtypes, names


@pytest.mark.parametrize("rank,rope", CONFIGS, ids=CONFIG_IDS)
def test_shapes(rank, rope):
    layer = make_layer(rank, rope, dtype=torch.float32)
    H, P, N = layer.nheads, layer.headdim, layer.d_state
    S = N // 4 if rope == 0.5 else N // 2
    assert layer.num_rope_angles == S
    assert layer.rotary == ("halves" if rank > 1 else "interleaved")
    x = randn(3, 5, D_MODEL, dtype=torch.float32)
    cache = layer.allocate_inference_cache(3)
    st = cache.state
    assert st.angle.shape == (3, H, S) and st.angle.dtype == torch.float32
    assert st.ssm.shape == (3, H, P, N) and st.ssm.dtype == torch.float32
    assert st.k.shape == (3, rank, H, N) and st.v.shape == (3, H, P)
    with torch.no_grad():
        assert layer(x).shape == (3, 5, D_MODEL)
        assert layer(x, cache=cache).shape == (3, 5, D_MODEL)
        assert layer.step(x[:, :1], cache).shape == (3, 1, D_MODEL)
        assert layer.step(x[:, 1], cache).shape == (3, 1, D_MODEL)


def test_parameter_names_follow_published_layer():
    siso = {n: tuple(p.shape) for n, p in make_layer(1, 0.5).named_parameters()}
    mimo = {n: tuple(p.shape) for n, p in make_layer(2, 0.5).named_parameters()}
    H, N, P = 4, 16, 16
    common = {"in_proj.weight", "dt_bias", "B_bias", "C_bias", "B_norm.weight", "C_norm.weight"}
    common |= {"D", "out_proj.weight"}
    assert set(siso) == common
    assert set(mimo) == common | {"mimo_x", "mimo_z", "mimo_o"}
    assert siso["B_bias"] == (H, 1, N) and mimo["C_bias"] == (H, 2, N)
    assert mimo["mimo_x"] == (H, 2, P)
    normed = {
        n: tuple(p.shape) for n, p in make_layer(2, 0.5, is_outproj_norm=True).named_parameters()
    }
    assert set(normed) == set(mimo) | {"norm.weight"} and normed["norm.weight"] == (64,)
    # in_proj rows: z, x (2 * d_inner), B, C (2 * G * R * N), dt, A, trap (3 * H), angles (S).
    assert mimo["in_proj.weight"] == (2 * 64 + 2 * 2 * 2 * N + 3 * H + N // 4, D_MODEL)


def test_bfloat16_layer_close_to_float64():
    """A bf16 layer runs (SSM parameters enter the scan in fp32) and agrees with the same
    weights in float64 to bf16 accuracy; its cache keeps k/v in bf16 and the state in fp32."""
    layer64 = make_layer(2, 0.5)
    layer16 = make_layer(2, 0.5)
    layer16.in_proj.to(torch.bfloat16)
    layer16.out_proj.to(torch.bfloat16)
    layer16.B_norm.to(torch.bfloat16)
    layer16.C_norm.to(torch.bfloat16)
    with torch.no_grad():
        layer64.in_proj.weight.copy_(layer16.in_proj.weight)
        layer64.out_proj.weight.copy_(layer16.out_proj.weight)
        layer64.B_norm.weight.copy_(layer16.B_norm.weight)
        layer64.C_norm.weight.copy_(layer16.C_norm.weight)
    x = randn(2, 10, D_MODEL, dtype=torch.bfloat16, seed=5)
    cache = layer16.allocate_inference_cache(2)
    assert cache.state.k.dtype == torch.bfloat16 and cache.state.ssm.dtype == torch.float32
    with torch.no_grad():
        out16 = layer16(x, cache=cache)
        out64 = layer64(x.double())
    assert out16.dtype == torch.bfloat16
    assert rel_err(out16, out64) < 5e-2


# ---------------------------------------------------------------- the layer's formulas


def _manual_layer(layer: Mamba3, u: torch.Tensor) -> torch.Tensor:
    """The published layer written out step by step (float64), with the reference scan."""
    H, P, G, N, R = layer.nheads, layer.headdim, layer.ngroups, layer.d_state, layer.mimo_rank
    S, d_inner = layer.num_rope_angles, layer.d_inner
    Bsz, L, _ = u.shape
    proj = u @ layer.in_proj.weight.T
    sizes = [d_inner, d_inner, R * G * N, R * G * N, H, H, H, S]
    z, x, Bm, Cm, dd_dt, dd_A, trap, ang = proj.split(sizes, dim=-1)

    def rms(t, w):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    Bm = rms(Bm.reshape(Bsz, L, R, G, N), layer.B_norm.weight)
    Cm = rms(Cm.reshape(Bsz, L, R, G, N), layer.C_norm.weight)
    A = torch.minimum(-F.softplus(dd_A), torch.tensor(-layer.A_floor, dtype=F64))
    dt = F.softplus(dd_dt + layer.dt_bias)
    q_bias, k_bias = layer.C_bias, layer.B_bias
    mimo = {}
    if R == 1:
        Bm, Cm, q_bias, k_bias = Bm[:, :, 0], Cm[:, :, 0], q_bias[:, 0], k_bias[:, 0]
    else:
        mimo = {"mimo_v": layer.mimo_x, "mimo_z": layer.mimo_z, "mimo_o": layer.mimo_o}
    z = z.reshape(Bsz, L, H, P)
    gated = layer.is_outproj_norm
    if gated:  # the scan leaves out the gate and (MIMO) the rank reduction
        mimo.pop("mimo_o", None)
    inputs = ScanInputs(
        q=Cm,
        k=Bm,
        v=x.reshape(Bsz, L, H, P),
        adt=(A * dt).transpose(1, 2),
        dt=dt.transpose(1, 2),
        trap=trap.transpose(1, 2),
        q_bias=q_bias,
        k_bias=k_bias,
        angles=ang[:, :, None, :].expand(Bsz, L, H, S),
        D=layer.D,
        z=None if gated else z,
        **mimo,
    )
    y, _ = reference_scan(inputs, "halves" if R > 1 else "interleaved")
    if gated:
        # Per-head RMSNorm of y (per rank for MIMO), scaled, gated by silu(z), then mimo_o.
        if R > 1:
            z = torch.einsum("blhp,hrp->blrhp", z, layer.mimo_z)
        y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)
        y = y * layer.norm.weight.reshape(H, P) * F.silu(z)
        if R > 1:
            y = torch.einsum("blrhp,hrp->blhp", y, layer.mimo_o)
    return y.reshape(Bsz, L, d_inner) @ layer.out_proj.weight.T


@pytest.mark.parametrize("outproj_norm", [False, True], ids=["gate", "outproj_norm"])
@pytest.mark.parametrize("rank,rope", CONFIGS, ids=CONFIG_IDS)
def test_forward_matches_written_out_layer(rank, rope, outproj_norm):
    layer = make_layer(rank, rope, ngroups=1 if rank > 1 else 2, is_outproj_norm=outproj_norm)
    u = randn(2, 9, D_MODEL, seed=6)
    with torch.no_grad():
        assert rel_err(layer(u), _manual_layer(layer, u)) < 1e-12


def test_A_floor_clamps_decay():
    """With the A projection pushed to -inf-like values, softplus -> 0 and A sits at -A_floor:
    the layer still runs and matches the written-out form."""
    layer = make_layer(1, 0.5, A_floor=0.05)
    a_rows = slice(2 * layer.d_inner + 2 * layer.d_state * 2 + layer.nheads, None)
    with torch.no_grad():
        layer.in_proj.weight[a_rows][: layer.nheads] = -50.0
    u = randn(1, 6, D_MODEL, seed=7).abs() + 0.5  # positive inputs: the A logits are << 0
    with torch.no_grad():
        out = layer(u)
        assert torch.isfinite(out).all()
        assert rel_err(out, _manual_layer(layer, u)) < 1e-12


def test_auto_backend_matches_reference():
    layer = make_layer(1, 0.5, dtype=torch.float32, backend="auto")
    ref = make_layer(1, 0.5, dtype=torch.float32, backend="reference")
    x = randn(2, 8, D_MODEL, dtype=torch.float32, seed=8)
    with torch.no_grad():
        assert rel_err(layer(x), ref(x)) < 1e-5


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("outproj_norm", [False, True], ids=["gate", "outproj_norm"])
@pytest.mark.parametrize("rank", [1, 2], ids=["SISO", "MIMO"])
def test_gradients_reach_every_parameter(rank, outproj_norm):
    layer = make_layer(rank, 0.5, dtype=torch.float32, is_outproj_norm=outproj_norm)
    x = randn(2, 10, D_MODEL, dtype=torch.float32, seed=9).requires_grad_(True)
    loss = layer(x).square().mean()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gradient_matches_finite_difference():
    """d loss / d dt_bias[h] against a central difference in float64 (checks that the gradient is
    right, not only present)."""
    layer = make_layer(2, 1.0)
    x = randn(1, 6, D_MODEL, seed=10)
    layer(x).pow(2).sum().backward()
    g = layer.dt_bias.grad.clone()
    eps = 1e-6
    with torch.no_grad():
        for h in range(layer.nheads):
            layer.dt_bias[h] += eps
            up = layer(x).pow(2).sum()
            layer.dt_bias[h] -= 2 * eps
            down = layer(x).pow(2).sum()
            layer.dt_bias[h] += eps
            fd = (up - down) / (2 * eps)
            assert math.isclose(g[h].item(), fd.item(), rel_tol=1e-5, abs_tol=1e-8)


# ---------------------------------------------------------------- varlen


@pytest.mark.parametrize("rank,rope", [(1, 0.5), (2, 1.0)], ids=["SISO", "MIMO"])
def test_varlen_equals_per_sequence(rank, rope):
    layer = make_layer(rank, rope)
    lengths = [5, 1, 8]
    seqs = [randn(1, n, D_MODEL, seed=20 + i) for i, n in enumerate(lengths)]
    cu = torch.tensor([0, 5, 6, 14], dtype=torch.int32)
    packed = torch.cat(seqs, dim=1)
    with torch.no_grad():
        cache = layer.allocate_inference_cache(len(lengths))
        out = layer(packed, cu_seqlens=cu, cache=cache)
        singles, caches = [], []
        for s in seqs:
            c = layer.allocate_inference_cache(1)
            singles.append(layer(s, cache=c))
            caches.append(c)
        assert rel_err(out, torch.cat(singles, dim=1)) < 1e-10
        # The packed call leaves one state per sequence; decoding from it matches each sequence.
        nxt = randn(len(lengths), 1, D_MODEL, seed=30)
        stepped = layer.step(nxt, cache)
        for i, c in enumerate(caches):
            assert rel_err(stepped[i : i + 1], layer.step(nxt[i : i + 1], c)) < 1e-10


# ---------------------------------------------------------------- errors


def test_wrong_d_model_raises():
    layer = make_layer(1, 0.5)
    cache = layer.allocate_inference_cache(2)
    with pytest.raises(ValueError, match=r"d_model=32"):
        layer(randn(2, 4, D_MODEL + 1))
    with pytest.raises(ValueError, match=r"d_model=32"):
        layer.step(randn(2, 1, D_MODEL - 1), cache)


def test_bad_inputs_raise():
    layer = make_layer(1, 0.5)
    cache = layer.allocate_inference_cache(2)
    with pytest.raises(ValueError, match=r"\(batch, seqlen, d_model\)"):
        layer(randn(4, D_MODEL))
    with pytest.raises(ValueError, match=r"cu_seqlens needs batch 1"):
        layer(randn(2, 4, D_MODEL), cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cache holds 2 sequences, the input has 3"):
        layer(randn(3, 4, D_MODEL), cache=cache)
    with pytest.raises(ValueError, match=r"one token per sequence, got seqlen 2"):
        layer.step(randn(2, 2, D_MODEL), cache)
    with pytest.raises(ValueError, match=r"layer_idx"):
        layer(randn(2, 4, D_MODEL), inference_params=SimpleNamespace(key_value_memory_dict={}))


def test_input_dtype_mismatch_names_the_fix():
    layer = make_layer(1, 0.5, dtype=torch.float32)
    cache = layer.allocate_inference_cache(2)
    x = randn(2, 4, D_MODEL, dtype=torch.bfloat16)
    match = r"hidden_states has dtype bfloat16 but the layer's weights are float32.*\.to\("
    with pytest.raises(TypeError, match=match):
        layer(x)
    with pytest.raises(TypeError, match=match):
        layer.step(x[:, :1], cache)
    with pytest.raises(TypeError, match=r"Mamba3\.step: hidden_states has dtype float64"):
        layer.step(randn(2, D_MODEL, dtype=F64), cache)
    assert cache.seqlen_offset == 0  # nothing ran


def test_input_dtype_mismatch_allowed_under_autocast():
    """Autocast picks the projections' dtype itself: a bf16 input to an fp32 layer is its case."""
    layer = make_layer(1, 0.5, dtype=torch.float32)
    x = randn(2, 4, D_MODEL, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.shape == (2, 4, D_MODEL)


def test_input_rank_and_width_errors():
    layer = make_layer(1, 0.5)
    cache = layer.allocate_inference_cache(2)
    with pytest.raises(ValueError, match=r"Mamba3\.forward: .*\(batch, seqlen, d_model\), got"):
        layer(randn(2, 4, 1, D_MODEL))
    with pytest.raises(ValueError, match=r"\(batch, 1, d_model\) or \(batch, d_model\)"):
        layer.step(randn(2, 1, 1, D_MODEL), cache)
    with pytest.raises(ValueError, match=r"last dim is 31, expected d_model=32"):
        layer.step(randn(2, D_MODEL - 1), cache)
    with pytest.raises(TypeError, match=r"hidden_states must be a tensor, got list"):
        layer([[0.0] * D_MODEL])


def test_input_on_another_device_raises():
    layer = make_layer(1, 0.5)
    with pytest.raises(ValueError, match=r"is on meta but the layer's weights are on cpu"):
        layer(torch.empty(2, 4, D_MODEL, dtype=F64, device="meta"))


def test_step_without_a_cache_says_how_to_make_one():
    layer = make_layer(1, 0.5)
    x = randn(2, 1, D_MODEL)
    for bad, got in ((None, "None"), (layer.allocate_inference_cache(2).state, "Mamba3State")):
        with pytest.raises(TypeError, match=rf"allocate_inference_cache\(batch_size\), got {got}"):
            layer.step(x, bad)
    with pytest.raises(TypeError, match=r"Mamba3Cache"):
        layer.step(x)
    with pytest.raises(TypeError, match=r"Mamba3\.forward: cache must be a Mamba3Cache"):
        layer(randn(2, 4, D_MODEL), cache={"state": None})


def test_cache_of_wrong_size_raises():
    layer = make_layer(1, 0.5)
    small = layer.allocate_inference_cache(1)
    with pytest.raises(ValueError, match=r"cache holds 1 sequences, the input has 2.*\(2\)"):
        layer.step(randn(2, 1, D_MODEL), small)
    with pytest.raises(ValueError, match=r"cache holds 1 sequences, the input has 3"):
        layer(randn(1, 6, D_MODEL), cu_seqlens=torch.tensor([0, 2, 4, 6], dtype=torch.int32),
              cache=small)  # fmt: skip
    other = make_layer(2, 1.0).allocate_inference_cache(2)  # MIMO, S = N/2: other shapes
    with pytest.raises(ValueError, match=r"does not fit this layer"):
        layer.step(randn(2, 1, D_MODEL), other)
    with pytest.raises(ValueError, match=r"does not fit this layer"):
        layer(randn(2, 4, D_MODEL), cache=other)
    ranked = make_layer(2, 0.5).allocate_inference_cache(2)  # only the rank differs
    with pytest.raises(ValueError, match=r"rank 1\)"):
        layer.step(randn(2, 1, D_MODEL), ranked)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rope_fraction": 0.25}, "rope_fraction"),
        ({"headdim": 24}, "headdim"),
        ({"ngroups": 3}, "ngroups"),
        ({"mimo_rank": 0}, "mimo_rank"),
    ],
)
def test_bad_constructor_args_raise(kwargs, match):
    args = {"d_state": 16, "headdim": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        Mamba3(D_MODEL, **args)


def test_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) of prefill and of the decode step (the scan and step are
    registered ops with fake implementations), matching the eager layer."""
    layer = make_layer(2, 0.5, dtype=torch.float32)
    x = randn(2, 10, D_MODEL, dtype=torch.float32, seed=50)
    forward = torch.compile(layer, fullgraph=True, backend="aot_eager")
    step = torch.compile(layer.step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        full = layer(x)
        cache = layer.allocate_inference_cache(2)
        outs = [forward(x[:, :7], cache=cache)]
        outs += [step(x[:, t : t + 1], cache) for t in range(7, 10)]
    assert rel_err(torch.cat(outs, dim=1), full) < 1e-5
    assert cache.seqlen_offset == 10


# ---------------------------------------------------------------- other backends


def _available(backend: str) -> bool:
    return bool(mamba3_kernels.info()["backends"][backend]["available"])


def _prefill_then_decode(layer: Mamba3, x: torch.Tensor, prompt: int) -> torch.Tensor:
    cache = layer.allocate_inference_cache(x.shape[0])
    outs = [layer(x[:, :prompt], cache=cache)]
    outs += [layer.step(x[:, t : t + 1], cache) for t in range(prompt, x.shape[1])]
    return torch.cat(outs, dim=1)


def _float64_twin(layer: Mamba3) -> Mamba3:
    """The same weights in float64 on CPU, through the reference: the truth for other backends."""
    twin = copy.deepcopy(layer).to("cpu", F64)
    twin.backend = "reference"
    return twin


@pytest.mark.parametrize(
    "rank,outproj_norm", [(1, False), (2, True)], ids=["SISO-gate", "MIMO-outproj_norm"]
)
def test_triton_layer_matches_reference(rank, outproj_norm):
    """The layer through the Triton backend (its interpreter on CPU): prefill then decode equals
    the float64 reference over the whole sequence."""
    if not _available("triton"):
        pytest.skip("triton backend unavailable here")
    layer = make_layer(
        rank, 0.5, dtype=torch.float32, backend="triton", is_outproj_norm=outproj_norm
    )
    x = randn(2, 11, D_MODEL, dtype=torch.float32, seed=40)
    with torch.no_grad():
        got = _prefill_then_decode(layer, x, 8)
        ref = _float64_twin(layer)(x.double())
    assert rel_err(got, ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("rank", [1, 2], ids=["SISO", "MIMO"])
def test_gpu_layer_prefill_decode_matches_reference(rank, dtype, tol):
    torch.manual_seed(0)
    layer = Mamba3(256, d_state=64, headdim=64, ngroups=1, mimo_rank=rank, device="cuda")
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    layer = layer.to(dtype)
    x = torch.randn(2, 100, 256, device="cuda").to(dtype)
    with torch.no_grad():
        got = _prefill_then_decode(layer, x, 96)
        ref = _float64_twin(layer)(x.cpu().double())
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert rel_err(got, ref) < tol
