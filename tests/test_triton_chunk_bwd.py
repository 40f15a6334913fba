"""Triton prefill backward vs the float64 reference's autograd (CPU under TRITON_INTERPRET=1;
model-shape tests marked gpu)."""

import os
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mamba3_kernels.triton_impl import chunk_bwd as cb  # noqa: E402

import mamba3_kernels  # noqa: E402
from mamba3_kernels.reference import reference_scan  # noqa: E402
from mamba3_kernels.state import Mamba3State  # noqa: E402
from mamba3_kernels.testing import (  # noqa: E402
    cast_inputs,
    poison_empty,
    random_inputs,
    rel_err,
    run_compiled,
)
from mamba3_kernels.validate import describe  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
cpu_interpreted = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (CPU)")


def _reference_grads(inputs, rotary, grad_out, grad_state):
    """Gradients of every floating input (keys as chunk_bwd returns them) by float64 autograd."""
    truth = cast_inputs(inputs, torch.float64)
    present = [(n, t) for n, t in cb._flat(truth) if t is not None and t.is_floating_point()]
    for _, t in present:
        t.requires_grad_()
    out, state = reference_scan(truth, rotary)
    loss = (out * grad_out.double()).sum()
    if grad_state is not None:
        loss = loss + sum((a * b.double()).sum() for a, b in zip(state, grad_state, strict=True))
    grads = torch.autograd.grad(loss, [t for _, t in present], allow_unused=True)
    return {n: g for (n, _), g in zip(present, grads, strict=True)}


def _check(inputs, rotary, final, chunk, tol=1e-4, seed=0, split_n=1, segment=0, fwd_chunk=0):
    g = torch.Generator().manual_seed(seed)
    problem = describe(inputs, False, rotary, final, None)
    config = cb.ChunkBwdConfig(chunk_size=chunk, num_warps=4, split_n=split_n, segment=segment,
                               fwd_chunk_size=fwd_chunk)  # fmt: skip
    assert cb.constraint(problem, config, None) is None
    ref_out, ref_state = reference_scan(cast_inputs(inputs, torch.float64), rotary)
    grad_out = torch.randn(ref_out.shape, generator=g).to(inputs.v.dtype)
    grad_state = None
    if final:
        grad_state = Mamba3State(
            *(torch.randn(t.shape, generator=g).to(d) for t, d in zip(
                ref_state, (torch.float32, torch.float32, inputs.k.dtype, inputs.v.dtype),
                strict=True))
        )  # fmt: skip
    got = cb.chunk_bwd(problem, inputs, grad_out, grad_state, config)
    want = _reference_grads(inputs, rotary, grad_out, grad_state)
    assert want, "nothing to check"
    for name, ref in want.items():
        if ref is None:  # not reached by the loss (e.g. an unused input)
            continue
        assert got[name] is not None, name
        assert got[name].shape == ref.shape, name
        assert rel_err(got[name], ref) < tol, (name, rel_err(got[name], ref))


# (rank, mimo, rotary, G, D/z, mimo_o, initial state, final state, varlen)
GRID = [
    (1, False, "interleaved", 1, True, False, False, False, None),
    (1, False, "interleaved", 2, True, False, True, True, None),
    (1, False, "halves", 1, False, False, True, False, None),
    (1, True, "halves", 1, True, True, True, True, None),
    (2, True, "halves", 1, True, True, True, True, None),
    (2, True, "interleaved", 2, False, False, False, True, None),
    (2, True, "halves", 1, True, False, True, False, None),
    (1, False, "interleaved", 1, True, False, True, True, [0, 5, 5, 30, 47]),
    (2, True, "halves", 2, False, True, True, True, [0, 17, 18, 40]),
    (1, False, "interleaved", 1, True, False, False, True, [0, 23, 41]),
]


def _grid_inputs(rank, mimo, G, dz, mo, init, cu, g, d_state):
    """Random inputs of a GRID case: 37 tokens, 4 heads, P=16 (one varlen batch with cu)."""
    return random_inputs(
        batch=2 if cu is None else 1, seqlen=37, nheads=4, ngroups=G, d_state=d_state,
        headdim=16, rank=rank, mimo=mimo, with_D=dz, with_z=dz, with_mimo_o=mo,
        with_initial_state=init, cu_seqlens=cu, generator=g,
    )  # fmt: skip


@cpu_interpreted
@pytest.mark.parametrize("rank,mimo,rotary,G,dz,mo,init,final,cu", GRID)
def test_grads_match_reference(rank, mimo, rotary, G, dz, mo, init, final, cu):
    g = torch.Generator().manual_seed(11 * rank + G + 3 * init + 5 * final)
    inputs = _grid_inputs(rank, mimo, G, dz, mo, init, cu, g, d_state=16)
    # 37 tokens over chunks of 16 rows: a partial last chunk (and, with varlen, chunks that
    # start mid-way through the token axis).
    _check(inputs, rotary, final, chunk=16 // rank)


@cpu_interpreted
@pytest.mark.parametrize("case", [GRID[i] for i in (1, 4, 8)], ids=str)
def test_grads_with_state_columns_split(case):
    """The core backward with its state columns over 2 programs per sweep (partial sums over N
    added atomically): SISO with GQA and both states, MIMO R=2, MIMO varlen with empty ones."""
    rank, mimo, rotary, G, dz, mo, init, final, cu = case
    g = torch.Generator().manual_seed(17 * rank + G)
    inputs = _grid_inputs(rank, mimo, G, dz, mo, init, cu, g, d_state=32)
    _check(inputs, rotary, final, chunk=16 // rank, split_n=2)


@cpu_interpreted
@pytest.mark.parametrize("case", [GRID[i] for i in (0, 4, 8)], ids=str)
def test_grads_with_longer_forward_chunks(case, monkeypatch):
    """The forward recompute (which the z gate and mimo_o read) on chunks twice the backward's
    (ChunkBwdConfig.fwd_chunk_size): SISO with z, MIMO R=2 with mimo_o, MIMO varlen."""
    from mamba3_kernels.triton_impl import core_scan as cs

    chunks = []
    real = cs.core_fwd

    def recording(*args, **kwargs):
        chunks.append(args[8][0])  # meta's chunk
        return real(*args, **kwargs)

    monkeypatch.setattr(cs, "core_fwd", recording)
    rank, mimo, rotary, G, dz, mo, init, final, cu = case
    g = torch.Generator().manual_seed(19 * rank + G)
    inputs = _grid_inputs(rank, mimo, G, dz, mo, init, cu, g, d_state=16)
    _check(inputs, rotary, final, chunk=16 // rank, fwd_chunk=32 // rank)
    assert chunks == [32 // rank]


def test_automatic_segment_lengths(monkeypatch):
    """segment_len's automatic rule on a 132-multiprocessor GPU (no GPU needed): segments
    double until the programs make _WAVES waves (programs of 4 warps: two per multiprocessor),
    never below _MIN_SEGMENT tokens; none when the programs fill the GPU already, on the CPU,
    or when a length is given (rounded up to whole chunks)."""
    from mamba3_kernels.triton_impl import core_segments as cs

    monkeypatch.setattr(cs, "_multiprocessors", lambda device: 132)
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    want = cs._WAVES * 2 * 132
    # SISO (1, 16384), H=64: two sweeps per head, 128 programs without segments
    seg = cs.bwd_segment_len(16384, 1, 64, 1, 32, 4, 0, gpu)
    nseg = 16384 // seg
    assert 16384 % seg == 0 and 128 * nseg >= want > 128 * nseg // 2
    assert cs.bwd_segment_len(16384, 64, 64, 1, 32, 4, 0, gpu) == 16384  # 8192 programs
    assert cs.fwd_segment_len(512, 1, 4, 32, 4, 0, gpu) == cs._MIN_SEGMENT  # floor
    assert cs.bwd_segment_len(16384, 1, 64, 1, 32, 4, 0, cpu) == 16384
    assert cs.bwd_segment_len(16384, 1, 64, 1, 32, 4, 1000, gpu) == 1024


@cpu_interpreted
@pytest.mark.parametrize(
    "case,split_n,segment",
    [(GRID[1], 2, 16), (GRID[0], 1, 32), (GRID[4], 1, 8), (GRID[6], 2, 16), (GRID[7], 1, 16)],
    ids=str,
)
def test_grads_with_segments(case, split_n, segment, monkeypatch):
    """The core backward's sweeps cut into segments (core_segments: contributions, a pass over
    the segments, one program per segment): 37 tokens in 2-5 segments, the last one partial,
    with and without initial and final states, SISO and MIMO, one or two column blocks; every
    torch.empty poisoned (the segment buffers are left partly unwritten by no kernel). Varlen
    calls keep whole sequences whatever the config asks (the last case)."""
    poison_empty(monkeypatch)
    rank, mimo, rotary, G, dz, mo, init, final, cu = case
    g = torch.Generator().manual_seed(23 * rank + segment)
    inputs = _grid_inputs(rank, mimo, G, dz, mo, init, cu, g, d_state=32)
    _check(inputs, rotary, final, chunk=16 // rank, split_n=split_n, segment=segment)


@cpu_interpreted
@pytest.mark.parametrize("rank,mimo", [(1, False), (2, True)])
def test_D_without_z(rank, mimo):
    """D without z (and no mimo_o): the backward skips the core's forward recompute."""
    g = torch.Generator().manual_seed(40 + rank)
    inputs = random_inputs(
        batch=2, seqlen=29, nheads=4, ngroups=2, d_state=16, headdim=16, rank=rank, mimo=mimo,
        with_D=True, with_z=False, with_mimo_o=False, with_initial_state=True, generator=g,
    )  # fmt: skip
    _check(inputs, "interleaved" if rank == 1 else "halves", True, chunk=16 // rank)


@cpu_interpreted
@pytest.mark.parametrize("rank,s0", [(1, True), (2, False)])
def test_core_forward_over_segments(rank, s0, monkeypatch):
    """The core forward (the backward's recompute of y) over segments of 16 tokens gives the
    whole-sequence walk's y and final state: 41 tokens in 3 segments, the last partial, with
    and without an initial state; every torch.empty poisoned."""
    from mamba3_kernels.triton_impl import core_scan as cs

    g = torch.Generator().manual_seed(5 + rank)
    B, L, H, N, P = 2, 41, 3, 32, 16
    qr, kr = torch.randn(2, B, L, rank, H, N, generator=g)
    vr = torch.randn(B, L, rank, H, P, generator=g)
    adt = -torch.rand(B, H, L, generator=g)
    w, gam = torch.rand(2, B, H, L, generator=g)
    init = torch.randn(B, H, P, N, generator=g) if s0 else None
    D = torch.randn(H, generator=g)
    chunk = 16 // rank
    whole = cs.core_fwd(qr, kr, vr, adt, w, gam, init, None, (chunk, torch.float32, 4, 1, B), D)
    poison_empty(monkeypatch)
    meta = (chunk, torch.float32, 4, 1, B, 16)
    parts = cs.core_fwd(qr, kr, vr, adt, w, gam, init, None, meta, D)
    for a, b in zip(parts, whole, strict=True):
        assert rel_err(a, b) < 1e-5, rel_err(a, b)


@cpu_interpreted
@pytest.mark.parametrize("with_D,vr_dtype,split_n",
                         [(False, torch.float32, 1), (True, torch.float32, 1),
                          (True, torch.bfloat16, 1), (False, torch.bfloat16, 2)])  # fmt: skip
def test_core_ops_schema_and_fakes(with_D, vr_dtype, split_n):
    """The core's custom ops (their fakes serve torch.compile) with and without the D skip: the
    fake outputs' shapes and dtypes are the kernels' (dD is an empty tensor without D; y in
    vr's dtype, and dv too without the column split, else fp32)."""
    from mamba3_kernels.triton_impl import core_scan  # noqa: F401  (registers the ops)

    g = torch.Generator().manual_seed(7)
    B, L, R, H, N, P = 1, 8, 1, 2, 32, 16
    qr, kr = torch.randn(2, B, L, R, H, N, generator=g)
    vr = torch.randn(B, L, R, H, P, generator=g).to(vr_dtype)
    adt = -torch.rand(B, H, L, generator=g)
    w, gam = torch.rand(2, B, H, L, generator=g)
    D = torch.randn(H, generator=g) if with_D else None
    utils = ("test_schema", "test_faketensor")
    fwd = (qr, kr, vr, adt, w, gam, None, None, 8, "float32", 4, 1, 1, D)
    torch.library.opcheck(torch.ops.mamba3_triton.core_fwd.default, fwd, test_utils=utils)
    y, _, kept = torch.ops.mamba3_triton.core_fwd(*fwd)
    assert kept.shape == (0,)  # (no segment states kept unless asked for)
    assert y.dtype == vr_dtype  # (16-bit vr: a 16-bit y; fp32 otherwise)
    bwd = (vr, None, qr, kr, vr, adt, w, gam, None, None, 8, "float32", 4, 1, 1, split_n, D)
    torch.library.opcheck(torch.ops.mamba3_triton.core_bwd.default, bwd, test_utils=utils)
    grads = torch.ops.mamba3_triton.core_bwd(*bwd)
    assert grads[2].dtype == (vr_dtype if split_n == 1 else torch.float32)
    dD = grads[7]
    assert dD.shape == ((H,) if with_D else (0,))
    assert len(grads) == 9 and grads[8].shape == (0,)  # no d theta unless asked for
    if split_n == 1:  # d theta in the kernel (per token), and dq, dk in the operands' dtype
        rot = dict(n_angles=N // 4, halves=with_D)
        bf = tuple(x.bfloat16() if i in (2, 3) else x for i, x in enumerate(bwd))
        torch.library.opcheck(torch.ops.mamba3_triton.core_bwd.default, bf, rot,
                              test_utils=utils)  # fmt: skip
        got = torch.ops.mamba3_triton.core_bwd(*bf, **rot)
        assert got[0].dtype == got[1].dtype == torch.bfloat16
        assert got[8].shape == (B, L, H, N // 4)
    if with_D:  # dD = sum over every row of dy . vr (here dy = vr)
        vv = vr.float()
        torch.testing.assert_close(dD, (vv * vv).sum((0, 1, 2, 4)), rtol=1e-5, atol=1e-5)


@cpu_interpreted
def test_rank4_n32_long_chunks():
    g = torch.Generator().manual_seed(5)
    inputs = random_inputs(
        batch=1, seqlen=21, nheads=2, d_state=32, headdim=16, rank=4, with_initial_state=True,
        generator=g,
    )  # fmt: skip
    _check(inputs, "halves", True, chunk=8)


@cpu_interpreted
def test_rank8():
    g = torch.Generator().manual_seed(6)
    inputs = random_inputs(
        batch=1, seqlen=9, nheads=2, d_state=16, headdim=16, rank=8, with_initial_state=True,
        generator=g,
    )  # fmt: skip
    _check(inputs, "halves", True, chunk=2)


@cpu_interpreted
def test_bf16_inputs():
    """bf16 inputs: dot operands rounded to bf16 as on the GPU; gradients to bf16 accuracy."""
    g = torch.Generator().manual_seed(8)
    inputs = random_inputs(
        batch=1, seqlen=40, nheads=2, d_state=32, headdim=16, rank=1, dtype=torch.bfloat16,
        with_initial_state=True, generator=g,
    )  # fmt: skip
    _check(inputs, "interleaved", True, chunk=16, tol=2e-2)


@cpu_interpreted
@pytest.mark.parametrize("rank,L", [(1, 512), (2, 256)])
def test_bf16_decay_and_angle_gradients_over_many_chunks(rank, L):
    """bf16 over 16-32 chunks without a final-state gradient, where d adt and d dt (through the
    angles) are reverse sums over the sequence of per-token terms that mostly cancel: they stay
    at bf16 accuracy only if both sweeps form each cross-chunk pair term from the same rounded
    operands (before: d angles 6e-2, d adt 2.6e-2; now every gradient < 1.6e-2)."""
    g = torch.Generator().manual_seed(30 + rank)
    inputs = random_inputs(
        batch=1, seqlen=L, nheads=2, d_state=64, headdim=64, rank=rank, dtype=torch.bfloat16,
        generator=g,
    )  # fmt: skip
    _check(inputs, "interleaved" if rank == 1 else "halves", False, chunk=32 // rank, tol=2e-2)


@cpu_interpreted
@pytest.mark.parametrize(
    "rank,G,H,N,S,layout",
    [(1, 1, 3, 16, 4, "interleaved"), (2, 2, 4, 32, 16, "halves"), (2, 1, 2, 16, 4, "halves"),
     (1, 2, 4, 16, 8, "interleaved"), (2, 1, 4, 16, 4, "halves"), (4, 1, 2, 32, 8, "halves")],
)  # fmt: skip
@pytest.mark.parametrize("bwd_heads", [0, 1, 2])
def test_rotary_kernels_match_torch(rank, G, H, N, S, layout, bwd_heads):
    """The fused bias + rotary + GQA kernels and their hand-written backward vs PyTorch autograd
    of the same prep in float64 (37 tokens per sequence: a partial last token block); backward
    programs over whole groups or 1-2 heads (dq/dk added atomically); ranks 1, 2 and 4."""
    from mamba3_kernels.triton_impl import core_prep as cp
    from mamba3_kernels.triton_impl import core_rotary as cr
    from mamba3_kernels.triton_impl import rot_core

    cfg = cr.RotaryConfig(bwd_heads=bwd_heads)
    g = torch.Generator().manual_seed(rank * 100 + G * 10 + S)
    B, L = 2, 37
    q = torch.randn(B, L, rank, G, N, generator=g)
    k = torch.randn(B, L, rank, G, N, generator=g)
    qb, kb = torch.randn(rank, H, N, generator=g), torch.randn(rank, H, N, generator=g)
    theta = torch.rand(B, L, H, S, generator=g) * 6.28
    halves = layout == "halves"
    qr, kr = cr.rotary_fwd(q, k, qb, kb, theta, halves, torch.float32)

    leaves = [t.double().requires_grad_() for t in (q, k, qb, kb, theta)]
    q64, k64, qb64, kb64, th64 = leaves
    cos, sin = torch.cos(th64).unsqueeze(2), torch.sin(th64).unsqueeze(2)
    want_q = cp.rotate(cp._per_head(q64, H) + qb64, cos, sin, layout)
    want_k = cp.rotate(cp._per_head(k64, H) + kb64, cos, sin, layout)
    assert rel_err(qr, want_q) < 1e-6 and rel_err(kr, want_k) < 1e-6

    dqr, dkr = torch.randn(qr.shape, generator=g), torch.randn(kr.shape, generator=g)
    want = torch.autograd.grad(
        (want_q * dqr.double()).sum() + (want_k * dkr.double()).sum(), leaves
    )
    got = cr.rotary_bwd(dqr, dkr, q, k, qb, kb, theta, halves, cfg=cfg)
    for name, a, b in zip(("dq", "dk", "dqb", "dkb", "dtheta"), got, want, strict=True):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < 1e-5, (name, rel_err(a, b))

    # The core's column order (pair members first and second: pair_major) gives the same
    # values in permuted columns, and the backward reads its gradients in that order.
    pm = rot_core._pair_major
    qp, kp = cr.rotary_fwd(q, k, qb, kb, theta, halves, torch.float32, pair_major=True)
    assert torch.equal(qp, pm(qr, halves)) and torch.equal(kp, pm(kr, halves))
    assert torch.equal(pm(qp, halves, back=True), qr)
    back = cr.rotary_bwd(pm(dqr, halves), pm(dkr, halves), q, k, qb, kb, theta, halves,
                         pair_major=True, cfg=cfg)  # fmt: skip
    for name, a, b in zip(("dq", "dk", "dqb", "dkb", "dtheta"), back, got, strict=True):
        assert rel_err(a, b) < 1e-6, name


@cpu_interpreted
@pytest.mark.parametrize("programs", [0, 64])
@pytest.mark.parametrize("pairs", [32, 2])
@pytest.mark.parametrize("cu,init", [(None, True), (None, False), ([0, 70, 70, 71, 200], True)])
def test_angle_scan_matches_torch(cu, init, pairs, programs, monkeypatch):
    """The Triton angle scan (several 64-token steps, varlen starts mid-step, empty sequences;
    all 5 pairs in one program, or 2 per program with d dt summed across programs; one walk per
    sequence, or (programs > 0, not varlen) three segments walked from carries, the last one
    partial) and its backward vs float64 autograd of cumsum(pi tanh(angles) dt) + angle0
    modulo 2 pi."""
    import math

    from mamba3_kernels.triton_impl import angle_scan as ang_scan
    from mamba3_kernels.triton_impl import core_rotary as cr

    cfg = cr.RotaryConfig(angle_pairs=pairs, angle_step=64, angle_programs=programs)

    g = torch.Generator().manual_seed(3 + init)
    B, L, H, S = (2, 150, 3, 5) if cu is None else (1, 200, 3, 5)
    nseq = B if cu is None else len(cu) - 1
    ang = torch.randn(B, L, H, S, generator=g)
    dt = torch.rand(B, H, L, generator=g) * 0.5 + 0.01
    a0 = torch.rand(nseq, H, S, generator=g) * 20 if init else None
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    nseg, seg = ang_scan._angle_segments(nseq, H, S, L, cu is not None, ang.device, cfg)
    assert (nseg, seg) == ((3, 64) if programs and cu is None else (1, L))
    theta = ang_scan.angle_fwd(ang, dt, a0, cu_t, nseq, cfg)

    leaves = [t.double().requires_grad_() for t in (ang, dt) + ((a0,) if init else ())]
    inc = math.pi * torch.tanh(leaves[0]) * leaves[1].transpose(1, 2)[..., None]
    if cu is None:
        want = inc.cumsum(1) + (leaves[2][:, None] if init else 0)
    else:
        parts = []
        for i in range(nseq):
            seg = inc[:, cu[i] : cu[i + 1]].cumsum(1)
            parts.append(seg + (leaves[2][i][None, None] if init else 0))
        want = torch.cat(parts, dim=1)
    red = want - 2 * math.pi * torch.floor(want.detach() / (2 * math.pi))
    assert (red - theta.double()).abs().max() < 1e-4

    gth = torch.randn(theta.shape, generator=g)
    ref = torch.autograd.grad((want * gth.double()).sum(), leaves)
    with monkeypatch.context() as mp:  # uninitialised outputs start as NaN: all must be written
        empty, empty_like = torch.empty, torch.empty_like
        mp.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
        mp.setattr(torch, "empty_like", lambda *a, **k: empty_like(*a, **k).fill_(float("nan")))
        got = ang_scan.angle_bwd(gth, ang, dt, cu_t, nseq, cfg)
    for name, a, b in zip(("angles", "dt", "angle0"), got, ref, strict=False):
        assert rel_err(a, b) < 1e-5, (name, rel_err(a, b))


def _grads_through_api(inputs, backend, final):
    leaves = [t for t in (*inputs[:14], *(inputs.initial_state or ())) if t is not None]
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    it = iter(leaves)
    fields = [None if t is None else next(it) for t in inputs[:14]]
    state = None
    if inputs.initial_state is not None:
        state = Mamba3State(*(next(it) for _ in range(4)))
    res = mamba3_kernels.scan(
        *fields, initial_state=state, return_final_state=final,
        cu_seqlens=inputs.cu_seqlens, backend=backend,
    )  # fmt: skip
    out, st = res if final else (res, None)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device)
    weight = weight.reshape(out.shape)
    loss = (out * weight).sum()
    if st is not None:
        loss = loss + st.ssm.sum() + st.k.square().sum() + st.angle.sum() + st.v.sum()
    return torch.autograd.grad(loss, leaves)


@cpu_interpreted
@pytest.mark.parametrize("rank,final,cu", [(1, True, None), (2, False, [0, 9, 30])])
def test_end_to_end_through_scan(rank, final, cu):
    """mamba3_kernels.scan(..., backend="triton") and .backward() give the reference gradients."""
    g = torch.Generator().manual_seed(21 + rank)
    inputs = random_inputs(
        batch=2 if cu is None else 1, seqlen=30, nheads=2, d_state=16, headdim=16, rank=rank,
        with_initial_state=True, cu_seqlens=cu, generator=g,
    )  # fmt: skip
    got = _grads_through_api(inputs, "triton", final)
    want = _grads_through_api(cast_inputs(inputs, torch.float64), "reference", final)
    assert len(got) == len(want) == (18 if rank > 1 else 15)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < 1e-4


@cpu_interpreted
@pytest.mark.parametrize(
    "rank,final,cu", [(1, True, None), (2, False, [0, 9, 30]), (4, True, None)]
)
def test_no_kernel_reads_uninitialised_memory(rank, final, cu, monkeypatch):
    """The forward and backward with every torch.empty / empty_like / new_empty poisoned
    (testing.poison_empty): an output, scratch or gradient buffer some kernel leaves partly
    unwritten, or reads before writing, would carry the poison into the gradients."""
    g = torch.Generator().manual_seed(40 + rank)
    inputs = random_inputs(
        batch=2 if cu is None else 1, seqlen=30, nheads=2, d_state=16, headdim=16, rank=rank,
        with_initial_state=True, cu_seqlens=cu, generator=g,
    )  # fmt: skip
    want = _grads_through_api(cast_inputs(inputs, torch.float64), "reference", final)

    poison_empty(monkeypatch)
    got = _grads_through_api(inputs, "triton", final)
    monkeypatch.undo()
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < 1e-4


@cpu_interpreted
def test_compiled_backward_matches_eager(monkeypatch, pin_config):
    """Under torch.compile the backward runs inside the mamba3::scan_bwd op (functorch vjp);
    eagerly, with the fused training forward, it runs from the scan's autograd backward (plain
    autograd). Same gradients (and the default recorded training forward's, to rounding)."""
    from mamba3_kernels import dispatch

    pin_config("triton", "chunk_bwd", record_forward=0)
    paths = []
    probe = cb._autograd_records
    monkeypatch.setattr(cb, "_autograd_records", lambda: paths.append(probe()) or paths[-1])
    g = torch.Generator().manual_seed(5)
    inputs = random_inputs(
        batch=1, seqlen=20, nheads=2, d_state=16, headdim=16, with_initial_state=True,
        generator=g,
    )  # fmt: skip
    eager = _grads_through_api(inputs, "triton", True)
    compiled = torch.compile(_grads_through_api, backend="aot_eager")
    got = compiled(inputs, "triton", True)
    assert paths == [True, False]  # plain autograd eagerly, functorch inside the compiled op
    assert len(got) == len(eager) == 15
    for a, b in zip(got, eager, strict=True):
        assert rel_err(a, b) < 1e-6
    dispatch.unpin("triton", "chunk_bwd")
    for a, b in zip(_grads_through_api(inputs, "triton", True), got, strict=True):
        assert rel_err(a, b) < 1e-4


def test_default_configs_are_valid():
    from mamba3_kernels.problem import Problem

    for n in (64, 128, 256):
        for p in (32, 64, 128):
            for rank in (1, 2, 4, 8):
                problem = Problem(
                    batch=1, seqlen=4096, nheads=8, ngroups=1, rank=rank, d_state=n, headdim=p,
                    n_angles=n // 4, nseq=1, dtype=torch.bfloat16, device_type="cuda",
                    mimo=rank > 1, rotary="halves", has_D=True, has_z=True, has_mimo_o=rank > 1,
                    has_initial_state=False, return_final_state=False, varlen=False,
                )  # fmt: skip
                cfg = cb.default_config(problem)
                assert cb.constraint(problem, cfg, None) is None, (n, p, rank)


_CORE_SM90 = textwrap.dedent(
    """
    import torch
    from mamba3_kernels.triton_impl import core_scan as cs

    # R=4: the backward with its state columns over 2 programs (atomic partial sums); with the
    # D skip, whose dD sums over sequences atomically; segmented: the backward's sweeps over
    # segments and its two segment-state kernels
    cases = ((1, 1, False, False), (4, 2, False, False), (1, 2, True, False), (1, 2, True, True))
    for rank, split_n, has_d, segmented in cases:
        kernels = cs.compile_kernels(rank, 128, 64, 64 // rank, split_n=split_n, has_d=has_d,
                                     segmented=segmented)  # fmt: skip
        assert len(kernels) == (6 if segmented else 2)  # (segment kernels: both sweeps, reverse)
        for name, k in kernels.items():
            ptx = k.asm["ptx"]
            assert ".target sm_90" in ptx, ptx[:400]
            if not name.startswith("segment_pass"):  # (elementwise)
                assert "wgmma" in ptx or "mma.sync" in ptx
            assert len(k.asm["cubin"]) > 1000
            if name == "core_bwd":
                assert ("red.global" in ptx or "atom.global" in ptx) == (split_n > 1 or has_d)
            print("ok", name, rank, has_d)
    # SISO's backward with d theta in the kernel (interleaved pairs): 16-bit dq, dk stores
    plain = cs.compile_kernels(1, 128, 64, 32, num_warps=4, has_d=True)["core_bwd"]
    dth = cs.compile_kernels(1, 128, 64, 32, num_warps=4, has_d=True,
                             dtheta=(32, False))["core_bwd"]  # fmt: skip
    b16 = [k.asm["ptx"].count("st.global.b16") for k in (plain, dth)]
    assert b16[1] > b16[0], b16  # (dv is 16-bit in both)
    # d theta is added per token by both sweeps (the D skip's adds are in both builds)
    adds = [k.asm["ptx"].count("red.global") + k.asm["ptx"].count("atom.global")
            for k in (plain, dth)]
    assert adds[1] > adds[0], adds
    print("ok dtheta")
    """
)


def test_core_kernels_compile_for_sm90_without_gpu():
    out = run_compiled(_CORE_SM90)
    assert out.count("ok") == 13


_DEFAULTS_SM90 = textwrap.dedent(
    """
    import torch
    from mamba3_kernels.problem import Problem
    from mamba3_kernels.triton_impl import chunk_bwd as cb
    from mamba3_kernels.triton_impl import core_scan as cs

    # the shipped backward defaults at ranks and head sizes the GPU tests do not run
    for rank, n, p in ((2, 128, 64), (8, 128, 64), (1, 256, 128)):
        problem = Problem(
            batch=1, seqlen=4096, rank=rank, nseq=1, dtype=torch.bfloat16, device_type="cuda",
            nheads=8, ngroups=1, d_state=n, headdim=p, n_angles=n // 4, mimo=rank > 1,
            rotary="halves", has_D=True, has_z=True, has_mimo_o=rank > 1,
            has_initial_state=False, return_final_state=False, varlen=False,
        )
        cfg = cb.default_config(problem)
        kernels = cs.compile_kernels(rank, n, p, cfg.chunk_size, num_warps=cfg.num_warps,
                                     num_stages=cfg.num_stages, split_n=cfg.split_n,
                                     has_d=True, segmented=True, fwd_chunk=cfg.fwd_chunk_size,
                                     dtheta=(n // 4, True) if cfg.split_n == 1 else None)
        for name, k in kernels.items():
            assert ".target sm_90" in k.asm["ptx"] and len(k.asm["cubin"]) > 1000
            # (an sm_90 block's shared-memory limit: the pipeline stages' buffers must fit)
            assert k.metadata.shared <= 232448, (name, rank, n, p, k.metadata.shared)
            print("ok", name, rank, n, p)
    """
)


def test_default_backward_configs_compile_for_sm90_without_gpu():
    out = run_compiled(_DEFAULTS_SM90, timeout=600)
    assert out.count("ok") == 18  # 3 cases x 6 kernels (segment kernels: both sweeps, reverse)


_ROTARY_SM90 = textwrap.dedent(
    """
    from mamba3_kernels.triton_impl import angle_scan, core_rotary as cr

    # accurate trig, whole-head angle programs, rotary backward programs storing dq/dk;
    # hardware trig, 8-pair angle programs, backward programs adding partial dq/dk atomically
    # (both layouts each way)
    for rank, halves, fast in ((1, False, False), (4, True, True), (1, False, True),
                               (4, True, False)):  # fmt: skip
        pairs, heads = (8, 4) if fast else (32, 16)
        kernels = {**cr.compile_kernels(rank, 128, 32, halves, fast=fast, bwd_heads=heads,
                                        atomic=fast, tokens=4, given=fast),
                   **angle_scan.compile_kernels(32, pairs=pairs, segmented=fast)}  # fmt: skip
        for name, k in kernels.items():
            assert ".target sm_90" in k.asm["ptx"]
            # the backward under its register cap (the knob's default), the others without
            capped = f".maxnreg {cr.RotaryConfig().rot_bwd_maxnreg}" in k.asm["ptx"]
            assert capped == (name == "rotary_bwd"), name
            print("ok", name, rank)
    """
)


def test_rotary_kernels_compile_for_sm90_without_gpu():
    out = run_compiled(_ROTARY_SM90)
    # 4 kernels each, and the angle scans' sums kernel where their walks are segmented
    assert out.count("ok") == 18


# ---------------------------------------------------------------------------- GPU


# The decay (adt) gradient of bf16 inputs is a reverse sum over the sequence of per-token terms
# that mostly cancel, so it is the most sensitive to rounding. Measured on an H100 at this shape
# against the fp32 reference: 3.5e-3 (SISO) and 3.7e-3 (MIMO R=4), every other gradient < 4.4e-3
# (before the two sweeps shared their rounded cross-chunk operands: 3.4e-2 and 4.0e-2).
ADT_INDEX = 3
BF16_ADT_TOL = 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize(
    "rank,dtype,tol",
    [
        (1, torch.float32, 1e-3),
        (4, torch.float32, 1e-3),
        (1, torch.bfloat16, 3e-2),
        (4, torch.bfloat16, 3e-2),
    ],
)
def test_gpu_model_shape(rank, dtype, tol):
    """Model shape (B=2, L=4096, H=32, G=1, N=128, P=64, S=32): every gradient vs an fp32
    reference computed on the GPU from the same inputs."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(rank)
    inputs = random_inputs(
        batch=2, seqlen=4096, nheads=32, ngroups=1, d_state=128, headdim=64, n_angles=32,
        rank=rank, dtype=dtype, device="cuda", with_initial_state=True, generator=g,
    )  # fmt: skip
    got = _grads_through_api(inputs, "triton", True)
    want = _grads_through_api(cast_inputs(inputs, torch.float32), "reference", True)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.isfinite(a).all(), i
        bound = BF16_ADT_TOL if (i == ADT_INDEX and dtype == torch.bfloat16) else tol
        assert rel_err(a, b) < bound, (i, rel_err(a, b))


def test_rotary_backward_tokens_follow_the_programs(monkeypatch):
    """16 tokens per rotary-backward program where that still gives >= 3 programs per
    multiprocessor, else 8 (few programs each walking every head of a group in turn); the
    interpreter keeps the knob."""
    from mamba3_kernels.triton_impl import core_rotary as cr
    from mamba3_kernels.triton_impl import core_segments as cs

    monkeypatch.setitem(cs._SMS, 0, 132)
    gpu = torch.device("cuda", 0)
    bt = cr.RotaryConfig().rot_tokens
    assert bt == 16
    assert cr._bwd_tokens(16384, 1, gpu, bt) == 16  # SISO (1, 16384): 1024 programs
    assert cr._bwd_tokens(2048, 4, gpu, bt) == 16  # MIMO R=4 (1, 2048): 512
    assert cr._bwd_tokens(2048, 1, gpu, bt) == 8  # SISO (1, 2048): 128 at 16 tokens
    assert cr._bwd_tokens(100, 1, gpu, bt) == 8  # never below 8
    assert cr._bwd_tokens(2048, 1, torch.device("cpu"), bt) == 16
