"""Inference forwards through the training forward's graph without autograd
(chunk_bwd.core_forward, the Triton backend's inference_forward="core"): out and final state
against the float64 reference and the fused forward (chunk_fwd), outputs that own their memory,
the "auto" rule, and clear errors (CPU under TRITON_INTERPRET=1; the model-shape check is a GPU
test)."""

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mamba3_kernels.triton_impl import chunk_bwd as cb  # noqa: E402
from mamba3_kernels.triton_impl import chunk_fwd  # noqa: E402

import mamba3_kernels  # noqa: E402
from mamba3_kernels.state import Mamba3State  # noqa: E402
from mamba3_kernels.testing import cast_inputs, random_inputs, rel_err  # noqa: E402
from mamba3_kernels.validate import describe  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
cpu_interpreted = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (CPU)")


def _inputs(rank, seed, *, z=True, init=True, dtype=torch.float32, device="cpu", **sizes):
    g = torch.Generator().manual_seed(seed)
    shape = dict(batch=2, seqlen=37, nheads=2, ngroups=1, d_state=16, headdim=16, n_angles=4)
    shape.update(sizes)
    return random_inputs(**shape, rank=rank, dtype=dtype, device=device, with_z=z, with_D=True,
                         with_mimo_o=True, with_initial_state=init, generator=g)  # fmt: skip


def _scan(inputs, backend, rotary, final=True):
    res = mamba3_kernels.scan(*inputs[:14], initial_state=inputs.initial_state,
                              return_final_state=final, cu_seqlens=inputs.cu_seqlens,
                              rotary=rotary, backend=backend)  # fmt: skip
    return res if final else (res, None)


def _mode(pin_config, mode):
    """The inference forward's path: chunk_fwd's config field ("core" or "fused"; "auto": the
    heuristic's)."""
    if mode != "auto":
        pin_config("triton", "chunk_fwd", path=mode)


def _same_rotations(name, a, b):
    if name == "angle":  # (the kernels keep it reduced modulo 2 pi: compare the rotations)
        return torch.stack((a.cos(), a.sin())), torch.stack((b.cos(), b.sin()))
    return a, b


@cpu_interpreted
@pytest.mark.parametrize(
    "rank,final,z,init", [(1, True, True, True), (1, False, False, False), (2, True, True, False),
                          (4, True, False, True)],
)  # fmt: skip
def test_core_forward_matches_reference_and_fused(rank, final, z, init, pin_config):
    inputs = _inputs(rank, 40 + rank, z=z, init=init)
    rotary = "halves" if rank > 1 else "interleaved"
    _mode(pin_config, "core")
    out, st = _scan(inputs, "triton", rotary, final)
    _mode(pin_config, "fused")
    f_out, f_st = _scan(inputs, "triton", rotary, final)
    w_out, w_st = _scan(cast_inputs(inputs, torch.float64), "reference", rotary, final)
    assert out.dtype == f_out.dtype == inputs.v.dtype and out.shape == w_out.shape
    assert rel_err(out, w_out) < 1e-4 and rel_err(out, f_out) < 1e-4
    assert (st is None) == (not final)
    if final:
        for name, a, b, w in zip(Mamba3State._fields, st, f_st, w_st, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert rel_err(*_same_rotations(name, a, w)) < 1e-4, name


@cpu_interpreted
def test_core_forward_in_bf16():
    inputs = _inputs(4, 7, dtype=torch.bfloat16)
    problem = _problem(inputs, "halves")
    out, st = cb.core_forward(problem, inputs, cb.default_config(problem))
    w_out, w_st = _scan(cast_inputs(inputs, torch.float64), "reference", "halves")
    assert out.dtype == torch.bfloat16 and rel_err(out, w_out) < 2e-2
    for name, a, w in zip(Mamba3State._fields, st, w_st, strict=True):
        assert rel_err(*_same_rotations(name, a, w)) < 2e-2, name


def _problem(inputs, rotary):
    return describe(inputs, False, rotary, True, None)


@cpu_interpreted
def test_core_forward_outputs_own_their_memory():
    """Fresh contiguous tensors that share no memory with the inputs (the final v is the last
    token's v, a slice of v inside the scan)."""
    inputs = _inputs(1, 3)
    problem = _problem(inputs, "interleaved")
    out, st = cb.core_forward(problem, inputs, cb.default_config(problem))
    taken = {t.untyped_storage().data_ptr() for t in inputs[:14] if t is not None}
    for t in (out, *st):
        assert t.is_contiguous() and not t._is_view() and t.storage_offset() == 0
        assert t.untyped_storage().data_ptr() not in taken
    assert st.angle.dtype == st.ssm.dtype == torch.float32
    assert st.k.dtype == inputs.k.dtype and st.v.dtype == inputs.v.dtype


@pytest.mark.parametrize(
    "rank,batch,seqlen,wins",
    [(1, 1, 16384, True), (1, 1, 2048, False), (1, 8, 2048, False), (1, 64, 8192, False),
     (4, 1, 16384, True), (4, 8, 2048, True), (4, 1, 2048, False)],
)  # fmt: skip
def test_auto_rule(rank, batch, seqlen, wins):
    """chunk_fwd's heuristic path: "core" for MIMO calls of >= 8K tokens; SISO sequences of
    >= 8K tokens too few for the fused forward's whole-sequence walks (64 sequences x 64 heads
    fill the GPU)."""
    rotary = "halves" if rank > 1 else "interleaved"
    inputs = _inputs(rank, 1, nheads=64, d_state=128, headdim=64, n_angles=32, batch=1,
                     seqlen=1, dtype=torch.bfloat16)  # fmt: skip
    problem = dataclasses.replace(_problem(inputs, rotary), batch=batch, seqlen=seqlen,
                                  nseq=batch)  # fmt: skip
    assert (chunk_fwd.default_config(problem).path == "core") == wins


@cpu_interpreted
def test_auto_stays_fused_for_varlen_and_configs_the_core_cannot_run():
    varlen = random_inputs(batch=1, seqlen=37, nheads=2, d_state=16, headdim=16, n_angles=4,
                           rank=4, cu_seqlens=[0, 10, 37])  # fmt: skip
    small = _inputs(4, 5, headdim=8)  # (P = 8: the core's dots need >= 16)
    for inputs in (varlen, small):
        problem = dataclasses.replace(_problem(inputs, "halves"), seqlen=16384)
        assert chunk_fwd.default_config(problem).path == "fused"


@cpu_interpreted
@pytest.mark.parametrize("wins", [True, False])
def test_path_field_picks_the_forward(wins, monkeypatch, pin_config):
    calls = []
    real_core, real_fused = cb.core_forward, chunk_fwd.chunk_fwd
    monkeypatch.setattr(cb, "core_forward", lambda *a: calls.append("core") or real_core(*a))
    monkeypatch.setattr(chunk_fwd, "chunk_fwd", lambda *a: calls.append("fused") or real_fused(*a))
    _mode(pin_config, "core" if wins else "fused")
    _scan(_inputs(2, 2), "triton", "halves")
    assert calls == (["core"] if wins else ["fused"])


@cpu_interpreted
def test_explicit_core_fails_loudly_and_unknown_paths_are_errors(pin_config):
    _mode(pin_config, "core")
    with pytest.raises(ValueError, match="headdim P=8"):
        _scan(_inputs(1, 6, headdim=8), "triton", "interleaved")
    problem = _problem(_inputs(1, 6), "interleaved")
    fast = dataclasses.replace(chunk_fwd.default_config(problem), path="fast")
    assert "path 'fast' not 'fused' or 'core'" in chunk_fwd.constraint(problem, fast, None)


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [1, 4])
def test_core_forward_on_gpu(rank, monkeypatch, pin_config):
    """Model shape (B=2, L=4096, H=32, N=128, P=64, S=32), bf16, with z and an initial state: the
    core path's out and final state against the fused path's and the fp32 reference's."""
    sizes = dict(batch=2, seqlen=4096, nheads=32, d_state=128, headdim=64, n_angles=32)
    inputs = _inputs(rank, 8, dtype=torch.bfloat16, device="cuda", **sizes)
    rotary = "halves" if rank > 1 else "interleaved"
    results = {}
    with torch.no_grad():
        for mode in ("core", "fused"):
            _mode(pin_config, mode)
            results[mode] = _scan(inputs, "triton", rotary)
        w_out, w_st = _scan(cast_inputs(inputs, torch.float32), "reference", rotary)
    f_out, f_st = results["fused"]
    out, st = results["core"]
    assert rel_err(out, w_out) < 2e-2 and rel_err(out, f_out) < 2e-2
    for name, a, b, w in zip(Mamba3State._fields, st, f_st, w_st, strict=True):
        assert rel_err(*_same_rotations(name, a, b)) < 2e-2, name
        assert rel_err(*_same_rotations(name, a, w)) < 2e-2, name


@pytest.mark.parametrize(
    "rank,batch,seqlen,want",
    [(1, 1, 16384, 4096), (4, 1, 16384, 2048), (4, 8, 2048, 2048), (1, 8, 2048, 2048),
     (1, 1, 512, 256), (1, 1, 300, 300)],
)  # fmt: skip
def test_inference_segments(rank, batch, seqlen, want, monkeypatch):
    """About 2 (SISO) / 4 (MIMO) programs per multiprocessor of a 132-multiprocessor GPU, in
    segments of >= 256 tokens; the whole sequence on the CPU."""
    from mamba3_kernels.triton_impl import core_segments as cs

    monkeypatch.setattr(cs, "_multiprocessors", lambda device: 132)
    got = cs.inference_segment_len(seqlen, batch, 64, rank, torch.device("cuda", 0))
    assert got == want
    assert cs.inference_segment_len(seqlen, batch, 64, rank, torch.device("cpu")) == seqlen
