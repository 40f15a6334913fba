"""The reference scan: literal recurrence, chunked form, state passing, varlen, decode, grads."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from mamba3_kernels.inputs import ScanInputs
from mamba3_kernels.problem import Problem
from mamba3_kernels.reference import ReferenceBackend, reference_scan, reference_step
from mamba3_kernels.state import Mamba3State
from mamba3_kernels.testing import cast_inputs, random_inputs, rel_err

F64 = torch.float64
EXACT = 1e-10  # the two forms must agree to rounding in float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def state_err(a: Mamba3State, b: Mamba3State) -> float:
    return max(rel_err(x, y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------
# An independent, deliberately naive transcription of docs/spec.md (scalar loops over b, h, t, r),
# sharing no code with the reference, so that a mistake in the shared preparation (rotary pairs,
# biases, group expansion, rank weights) cannot hide behind the two forms agreeing.


def _naive_rot(x: torch.Tensor, theta: torch.Tensor, layout: str) -> torch.Tensor:
    n = x.shape[0]
    out = x.clone()
    for j in range(theta.shape[0]):
        i0, i1 = (2 * j, 2 * j + 1) if layout == "interleaved" else (j, n // 2 + j)
        c, s = torch.cos(theta[j]), torch.sin(theta[j])
        out[i0] = x[i0] * c - x[i1] * s
        out[i1] = x[i0] * s + x[i1] * c
    return out


def naive_scan(inp: ScanInputs, layout: str) -> torch.Tensor:
    mimo = inp.q.dim() == 5
    q = inp.q if mimo else inp.q.unsqueeze(2)
    k = inp.k if mimo else inp.k.unsqueeze(2)
    bsz, seqlen, rank, ngroups, _ = q.shape
    nheads, headdim = inp.v.shape[2:]
    qb = inp.q_bias if mimo else inp.q_bias.unsqueeze(1)  # (H, R, N)
    kb = inp.k_bias if mimo else inp.k_bias.unsqueeze(1)
    ones = torch.ones(nheads, rank, headdim, dtype=F64)
    mv = inp.mimo_v if mimo else ones
    mz = inp.mimo_z if mimo else ones
    st = inp.initial_state
    outs = torch.zeros(bsz, seqlen, rank, nheads, headdim, dtype=F64)
    for b in range(bsz):
        for h in range(nheads):
            g = h // (nheads // ngroups)
            theta = st.angle[b, h].clone() if st is not None else torch.zeros(inp.angles.shape[-1])
            hs = st.ssm[b, h].clone() if st is not None else torch.zeros(headdim, q.shape[-1])
            prev = torch.zeros_like(hs)
            if st is not None:
                for r in range(rank):
                    prev += torch.outer(st.v[b, h] * mv[h, r], st.k[b, r, h])
            for t in range(seqlen):
                lam = torch.sigmoid(inp.trap[b, h, t])
                dt = inp.dt[b, h, t]
                alpha = torch.exp(inp.adt[b, h, t])
                beta = (1 - lam) * dt * alpha
                gamma = lam * dt
                theta = theta + math.pi * torch.tanh(inp.angles[b, t, h]) * dt
                qr = [_naive_rot(q[b, t, r, g] + qb[h, r], theta, layout) for r in range(rank)]
                kr = [_naive_rot(k[b, t, r, g] + kb[h, r], theta, layout) for r in range(rank)]
                vr = [inp.v[b, t, h] * mv[h, r] for r in range(rank)]
                cur = sum(torch.outer(vr[r], kr[r]) for r in range(rank))
                hs = alpha * hs + beta * prev + gamma * cur
                prev = cur
                for r in range(rank):
                    y = hs @ qr[r]
                    if inp.D is not None:
                        y = y + inp.D[h] * vr[r]
                    if inp.z is not None:
                        zr = inp.z[b, t, h] * mz[h, r]
                        y = y * zr * torch.sigmoid(zr)
                    outs[b, t, r, h] = y
    if mimo and inp.mimo_o is not None:
        return (outs * inp.mimo_o.transpose(0, 1)).sum(2)
    return outs if mimo else outs[:, :, 0]


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(ngroups=2, n_angles=4),
        dict(rank=2, with_mimo_o=False),
        dict(rank=2, ngroups=2, with_z=False),
        dict(rank=1, mimo=True, with_D=False, n_angles=4),
    ],
)
@pytest.mark.parametrize("layout", ["interleaved", "halves"])
def test_matches_literal_recurrence(kw, layout):
    inp = random_inputs(
        batch=2,
        seqlen=5,
        nheads=4,
        d_state=8,
        headdim=4,
        dtype=F64,
        with_initial_state=True,
        generator=gen(1),
        **kw,
    )
    ref = naive_scan(inp, layout)
    out_rec, _ = reference_scan(inp, layout)
    out_chk, _ = reference_scan(inp, layout, chunk_size=2)
    assert out_rec.shape == ref.shape
    assert rel_err(out_rec, ref) < EXACT
    assert rel_err(out_chk, ref) < EXACT


# ---------------------------------------------------------------------------------------------
# recurrent == chunked over a grid of features

MODES = {
    "siso": dict(rank=1, mimo=False),
    "mimo_r1": dict(rank=1, mimo=True),
    "mimo_r2": dict(rank=2),
    "mimo_r4": dict(rank=4),
}


# (D, z, mimo_o, initial state)
OPTIONS = {
    "all": (True, True, True, True),
    "none": (False, False, False, False),
    "D_state": (True, False, False, True),
    "z_mimo_o": (False, True, True, False),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layout", ["interleaved", "halves"])
@pytest.mark.parametrize("s_frac", [4, 2])
@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_chunked_matches_recurrent(mode, layout, s_frac, ngroups, options):
    n = 16
    with_D, with_z, with_mimo_o, with_state = OPTIONS[options]
    seed = zlib.crc32(repr((mode, layout, s_frac, ngroups, options)).encode())
    inp = random_inputs(
        batch=2,
        seqlen=19,
        nheads=4,
        ngroups=ngroups,
        d_state=n,
        headdim=8,
        n_angles=n // s_frac,
        dtype=F64,
        with_D=with_D,
        with_z=with_z,
        with_mimo_o=with_mimo_o,
        with_initial_state=with_state,
        generator=gen(seed),
        **MODES[mode],
    )
    out, state = reference_scan(inp, layout)
    mimo_no_o = inp.q.dim() == 5 and inp.mimo_o is None
    assert out.shape == ((2, 19, inp.q.shape[2], 4, 8) if mimo_no_o else (2, 19, 4, 8))
    assert torch.isfinite(out).all()
    for chunk in (1, 3, 8, 16, 64):
        out_c, state_c = reference_scan(inp, layout, chunk_size=chunk)
        assert rel_err(out_c, out) < EXACT, chunk
        assert state_err(state_c, state) < EXACT, chunk


def test_final_state_is_true_state():
    """The final state is (theta_L, Hs_L, kr_L, v_L) in the compute dtype for angle and ssm."""
    inp = random_inputs(seqlen=13, dtype=F64, with_initial_state=True, generator=gen(2))
    _, st = reference_scan(inp, "interleaved", chunk_size=4)
    _, st_r = reference_scan(inp, "interleaved")
    assert state_err(st, st_r) < EXACT
    assert torch.equal(st.v, inp.v[:, -1])
    assert st.angle.dtype == F64 and st.ssm.dtype == F64
    # theta_L is theta_0 plus the sum of the increments, kept modulo 2 pi
    inc = math.pi * torch.tanh(inp.angles) * inp.dt.transpose(1, 2).unsqueeze(-1)
    want = inp.initial_state.angle + inc.sum(1)
    assert ((st.angle >= 0) & (st.angle < 2 * math.pi)).all()
    assert rel_err(torch.stack((st.angle.cos(), st.angle.sin())),
                   torch.stack((want.cos(), want.sin()))) < EXACT  # fmt: skip


# ---------------------------------------------------------------------------------------------
# state passing


@pytest.mark.parametrize("kw", [dict(), dict(rank=2, with_mimo_o=False), dict(rank=4)])
@pytest.mark.parametrize("chunk", [None, 5])
def test_split_and_carry_state(kw, chunk):
    seqlen = 41
    inp = random_inputs(seqlen=seqlen, dtype=F64, with_initial_state=True, generator=gen(3), **kw)
    out, state = reference_scan(inp, None, chunk_size=chunk)
    g = gen(4)
    for _ in range(3):
        cuts = sorted(torch.randint(1, seqlen, (3,), generator=g).tolist())
        bounds = [0, *cuts, seqlen]
        st, outs = inp.initial_state, []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            o, st = reference_scan(inp.tokens(a, b, st), None, chunk_size=chunk)
            outs.append(o)
        assert rel_err(torch.cat(outs, 1), out) < EXACT
        assert state_err(st, state) < EXACT


@pytest.mark.parametrize("kw", [dict(), dict(rank=2), dict(rank=2, with_mimo_o=False)])
def test_scan_then_steps(kw):
    seqlen, nsteps = 20, 5
    inp = random_inputs(
        seqlen=seqlen + nsteps, dtype=F64, with_initial_state=True, generator=gen(5), **kw
    )
    out, state = reference_scan(inp, None, chunk_size=8)
    o, st = reference_scan(inp.tokens(0, seqlen, inp.initial_state), None, chunk_size=6)
    outs = [o]
    for t in range(seqlen, seqlen + nsteps):
        before = st.clone()
        o_t, st = reference_step(inp.token(t), st)
        for x, y in zip(before, st, strict=True):
            assert x is not y
        outs.append(o_t.unsqueeze(1))
    assert rel_err(torch.cat(outs, 1), out) < EXACT
    assert state_err(st, state) < EXACT


def test_step_does_not_modify_state():
    inp = random_inputs(step=True, generator=gen(6))
    state = inp.initial_state
    saved = state.clone()
    out, new = reference_step(inp, state)
    assert out.shape == (2, 4, 8)
    assert all(torch.equal(a, b) for a, b in zip(state, saved, strict=True))
    assert not torch.equal(new.ssm, state.ssm)


def test_step_shapes_mimo_without_mimo_o():
    inp = random_inputs(step=True, rank=4, with_mimo_o=False, generator=gen(7))
    out, new = reference_step(inp, inp.initial_state)
    assert out.shape == (2, 4, 4, 8)
    assert new.k.shape == (2, 4, 4, 16) and new.ssm.shape == (2, 4, 8, 16)


# ---------------------------------------------------------------------------------------------
# variable length


@pytest.mark.parametrize("kw", [dict(), dict(rank=2, with_mimo_o=False)])
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("chunk", [None, 4])
def test_varlen_matches_per_sequence(kw, with_state, chunk):
    cu = [0, 7, 7, 20, 21, 33]
    inp = random_inputs(
        cu_seqlens=cu, dtype=F64, with_initial_state=with_state, generator=gen(8), **kw
    )
    out, state = reference_scan(inp, None, chunk_size=chunk)
    assert out.shape[:2] == (1, 33)
    assert state.ssm.shape[0] == len(cu) - 1
    for i in range(len(cu) - 1):
        a, b = cu[i], cu[i + 1]
        st = None
        if with_state:
            st = Mamba3State(*(x[i : i + 1] for x in inp.initial_state))
        sub = inp.tokens(a, b, st)
        o, s = reference_scan(sub, None)
        assert rel_err(out[:, a:b], o) < EXACT
        assert state_err(Mamba3State(*(x[i : i + 1] for x in state)), s) < EXACT
    # the empty sequence (index 1) keeps its initial state, or zeros
    if with_state:
        assert all(
            torch.equal(x[1], y[1].to(x.dtype))
            for x, y in zip(state, inp.initial_state, strict=True)
        )
    else:
        assert all((x[1] == 0).all() for x in state)


def test_varlen_no_crossing():
    """Changing sequence 0 must leave the outputs of sequence 1 untouched."""
    cu = [0, 9, 20]
    inp = random_inputs(cu_seqlens=cu, dtype=F64, generator=gen(9))
    out, _ = reference_scan(inp, None, chunk_size=4)
    v2 = inp.v.clone()
    v2[:, :9] += 1.0
    trap2 = inp.trap.clone()
    trap2[..., :9] += 1.0
    out2, _ = reference_scan(inp._replace(v=v2, trap=trap2), None, chunk_size=4)
    assert torch.equal(out[:, 9:], out2[:, 9:])
    assert not torch.equal(out[:, :9], out2[:, :9])


@pytest.mark.parametrize("chunk", [None, 8])
@pytest.mark.parametrize("with_state", [True, False])
def test_empty_sequence(chunk, with_state):
    inp = random_inputs(
        seqlen=0, rank=2, dtype=F64, with_initial_state=with_state, generator=gen(10)
    )
    out, state = reference_scan(inp, None, chunk_size=chunk)
    assert out.shape == (2, 0, 4, 8)
    if with_state:
        assert all(torch.equal(x, y) for x, y in zip(state, inp.initial_state, strict=True))
    else:
        assert [tuple(x.shape) for x in state] == [
            (2, 4, 4),
            (2, 4, 8, 16),
            (2, 2, 4, 16),
            (2, 4, 8),
        ]
        assert all((x == 0).all() for x in state)
    # varlen with only empty sequences
    inp = random_inputs(
        cu_seqlens=[0, 0, 0], dtype=F64, with_initial_state=with_state, generator=gen(11)
    )
    out, state = reference_scan(inp, None, chunk_size=chunk)
    assert out.shape == (1, 0, 4, 8) and state.ssm.shape == (2, 4, 8, 16)


# ---------------------------------------------------------------------------------------------
# numerics


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)]
)
@pytest.mark.parametrize("kw", [dict(), dict(rank=4)])
@pytest.mark.parametrize("chunk", [None, 16])
def test_low_precision_within_tolerance(dtype, tol, kw, chunk):
    inp = random_inputs(seqlen=64, dtype=dtype, with_initial_state=True, generator=gen(12), **kw)
    out, state = reference_scan(inp, None, chunk_size=chunk)
    ref, ref_state = reference_scan(cast_inputs(inp, F64), None)
    assert out.dtype == dtype
    assert state.ssm.dtype == torch.float32 and state.angle.dtype == torch.float32
    assert state.k.dtype == dtype and state.v.dtype == dtype
    assert rel_err(out, ref) < tol
    assert rel_err(state.ssm, ref_state.ssm) < tol


@pytest.mark.parametrize("chunk", [None, 8])
def test_angle_state_modulo_two_pi(chunk):
    inp = random_inputs(seqlen=16, dtype=F64, with_initial_state=True, generator=gen(13))
    st = inp.initial_state
    big = st._replace(
        angle=st.angle + 2 * math.pi * torch.randint(-50, 50, st.angle.shape, dtype=F64)
    )
    out, fs = reference_scan(inp, None, chunk_size=chunk)
    out_big, fs_big = reference_scan(inp._replace(initial_state=big), None, chunk_size=chunk)
    reduced = big._replace(angle=torch.remainder(big.angle, 2 * math.pi))
    out_red, _ = reference_scan(inp._replace(initial_state=reduced), None, chunk_size=chunk)
    assert rel_err(out_big, out) < 1e-12
    assert rel_err(out_red, out) < 1e-12
    assert rel_err(torch.remainder(fs_big.angle - fs.angle + 1, 2 * math.pi), torch.ones(1)) < 1e-12


def test_long_strong_decay_no_nan():
    inp = random_inputs(batch=1, seqlen=2048, nheads=2, d_state=16, headdim=8, generator=gen(14))
    adt = -5.0 + 0.5 * torch.rand(inp.adt.shape, generator=gen(15))
    inp = inp._replace(adt=adt)
    out, state = reference_scan(inp, None, chunk_size=64)
    assert torch.isfinite(out).all() and torch.isfinite(state.ssm).all()
    ref, _ = reference_scan(cast_inputs(inp, F64), None, chunk_size=64)
    assert rel_err(out, ref) < 1e-5
    # gradients stay finite through the masked decay matrix
    short = inp.tokens(0, 256, None)
    q = short.q.clone().requires_grad_()
    a = short.adt.clone().requires_grad_()
    out, _ = reference_scan(short._replace(q=q, adt=a), None, chunk_size=64)
    out.square().sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(a.grad).all()


# ---------------------------------------------------------------------------------------------
# gradients

GRAD_FIELDS = ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "D", "z")
MIMO_FIELDS = ("mimo_v", "mimo_z", "mimo_o")


@pytest.mark.parametrize("kw", [dict(), dict(rank=2), dict(rank=2, with_mimo_o=False, ngroups=2)])
@pytest.mark.parametrize("chunk", [None, 2])
def test_gradcheck(kw, chunk):
    inp = random_inputs(
        batch=1,
        seqlen=5,
        nheads=2,
        d_state=4,
        headdim=2,
        dtype=F64,
        with_initial_state=True,
        generator=gen(16),
        **kw,
    )
    names = [f for f in GRAD_FIELDS + MIMO_FIELDS if getattr(inp, f) is not None]
    leaves = [getattr(inp, f).clone().requires_grad_() for f in names]
    leaves += [t.clone().requires_grad_() for t in inp.initial_state]

    def fn(*xs):
        fields = dict(zip(names, xs[: len(names)], strict=True))
        call = inp._replace(**fields, initial_state=Mamba3State(*xs[len(names) :]))
        out, st = reference_scan(call, None, chunk_size=chunk)
        return (out, *st)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


def test_gradcheck_step():
    inp = random_inputs(
        batch=1, nheads=2, d_state=4, headdim=2, rank=2, dtype=F64, step=True, generator=gen(17)
    )
    names = [f for f in GRAD_FIELDS + MIMO_FIELDS if getattr(inp, f) is not None]
    leaves = [getattr(inp, f).clone().requires_grad_() for f in names]
    leaves += [t.clone().requires_grad_() for t in inp.initial_state]

    def fn(*xs):
        fields = dict(zip(names, xs[: len(names)], strict=True))
        out, st = reference_step(inp._replace(**fields), Mamba3State(*xs[len(names) :]))
        return (out, *st)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# the backend object


def _problem(inp: ScanInputs, decode: bool, return_final_state: bool, chunk: int | None):
    mimo = inp.q.dim() == (4 if decode else 5)
    b, h, p = inp.v.shape[0], inp.v.shape[-2], inp.v.shape[-1]
    return Problem(
        batch=b,
        seqlen=1 if decode else inp.v.shape[1],
        nheads=h,
        ngroups=inp.q.shape[-2],
        rank=inp.q.shape[-3] if mimo else 1,
        d_state=inp.q.shape[-1],
        headdim=p,
        n_angles=inp.angles.shape[-1],
        nseq=b,
        dtype=inp.v.dtype,
        device_type="cpu",
        mimo=mimo,
        rotary="halves" if mimo else "interleaved",
        has_D=inp.D is not None,
        has_z=inp.z is not None,
        has_mimo_o=inp.mimo_o is not None,
        has_initial_state=inp.initial_state is not None,
        return_final_state=return_final_state,
        varlen=False,
        decode=decode,
        chunk_size=chunk,
    )


def test_backend_scan_and_step():
    be = ReferenceBackend()
    assert (be.name, be.priority, be.has_backward) == ("reference", 0, False)
    inp = random_inputs(seqlen=23, rank=2, dtype=F64, with_initial_state=True, generator=gen(18))
    ref, ref_state = reference_scan(inp, "halves")
    out, st = be.scan(_problem(inp, False, False, None), inp)
    assert st is None and rel_err(out, ref) < EXACT
    out, st = be.scan(_problem(inp, False, True, 5), inp)
    assert rel_err(out, ref) < EXACT and state_err(st, ref_state) < EXACT

    sinp = random_inputs(rank=2, step=True, generator=gen(19))
    state = sinp.initial_state.clone()
    ref_out, ref_new = reference_step(sinp, sinp.initial_state, "halves")
    out = be.step(_problem(sinp, True, True, None), sinp, state)
    assert rel_err(out, ref_out) < 1e-6
    assert all(torch.equal(a, b) for a, b in zip(state, ref_new, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kw", [dict(), dict(rank=4, with_mimo_o=False)])
def test_runs_on_cuda(kw):
    inp = random_inputs(seqlen=50, dtype=F64, with_initial_state=True, generator=gen(20), **kw)
    out, state = reference_scan(inp, None, chunk_size=16)
    out_g, state_g = reference_scan(cast_inputs(inp, F64, device="cuda"), None, chunk_size=16)
    assert out_g.is_cuda
    assert rel_err(out_g, out) < EXACT and state_err(state_g, state) < EXACT


def test_absent_rank_weights_are_ones():
    """A MIMO call without mimo_v / mimo_z behaves as with all-ones rank weights."""
    inp = random_inputs(seqlen=11, rank=2, dtype=F64, with_initial_state=True, generator=gen(21))
    ones = torch.ones_like(inp.mimo_v)
    out, state = reference_scan(inp._replace(mimo_v=ones, mimo_z=ones), None)
    out_none, state_none = reference_scan(inp._replace(mimo_v=None, mimo_z=None), None, 4)
    assert rel_err(out_none, out) < EXACT and state_err(state_none, state) < EXACT


def test_unknown_rotary_rejected():
    inp = random_inputs(seqlen=3, generator=gen(22))
    with pytest.raises(ValueError, match="rotary"):
        reference_scan(inp, "spiral")


def test_long_decode_keeps_fp32_angles_exact():
    """20k fp32 steps turning ~pi rad each (~6e4 rad in all): the stored angle stays in
    [0, 2 pi), so its drift from float64 is the sum of per-step roundings in [0, 2 pi) (~3e-4
    rad), not an unreduced angle's (one rounding near 6e4 rad is up to 2e-3 rad, every step)."""
    inp = random_inputs(batch=1, nheads=1, d_state=4, headdim=2, n_angles=2, step=True,
                        with_initial_state=True, dtype=F64, generator=gen(41))  # fmt: skip
    inp = inp._replace(dt=torch.ones_like(inp.dt), angles=torch.full_like(inp.angles, 10.0))
    inp32 = cast_inputs(inp, torch.float32)
    s64, s32 = inp.initial_state, Mamba3State(*(t.float() for t in inp.initial_state))
    turned = 0.0
    for _ in range(20_000):
        o64, s64 = reference_step(inp, s64)
        o32, s32 = reference_step(inp32, s32)
        turned += math.pi * math.tanh(10.0)
    assert turned > 6e4
    assert 0 <= s32.angle.min() and s32.angle.max() < 2 * math.pi
    assert rel_err(o32.double(), o64) < 1e-5
    drift = torch.remainder(s32.angle.double() - s64.angle + math.pi, 2 * math.pi) - math.pi
    assert drift.abs().max() < 1e-3  # (compared modulo 2 pi: either may have just wrapped)
