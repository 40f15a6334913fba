"""Triton decode step vs the reference (CPU under TRITON_INTERPRET=1; GPU tests marked gpu)."""

import math
import os
import textwrap

import pytest
import torch

# Without a GPU the kernel runs under Triton's interpreter; must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mamba3_kernels.triton_impl import launch as tlaunch  # noqa: E402
from mamba3_kernels.triton_impl import step as tstep  # noqa: E402

from mamba3_kernels.inputs import ScanInputs  # noqa: E402
from mamba3_kernels.problem import Problem  # noqa: E402
from mamba3_kernels.reference import reference_scan, reference_step  # noqa: E402
from mamba3_kernels.state import Mamba3State  # noqa: E402
from mamba3_kernels.testing import cast_inputs, random_inputs, rel_err, run_compiled  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The small-shape CPU tests need the interpreter (on a GPU machine run the gpu tests instead).
cpu_interpreted = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (CPU)")

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def make_problem(inputs: ScanInputs, rotary: str) -> Problem:
    """The Problem of a step call, built by hand from step-shaped inputs."""
    q, v = inputs.q, inputs.v
    mimo = q.dim() == 4
    bsz, nheads, headdim = v.shape
    return Problem(
        batch=bsz,
        seqlen=1,
        nheads=nheads,
        ngroups=q.shape[-2],
        rank=q.shape[1] if mimo else 1,
        d_state=q.shape[-1],
        headdim=headdim,
        n_angles=inputs.angles.shape[-1],
        nseq=bsz,
        dtype=v.dtype,
        device_type=v.device.type,
        mimo=mimo,
        rotary=rotary,
        has_D=inputs.D is not None,
        has_z=inputs.z is not None,
        has_mimo_o=inputs.mimo_o is not None,
        has_initial_state=True,
        return_final_state=True,
        varlen=False,
        decode=True,
    )


def run_step(inputs: ScanInputs, state: Mamba3State, rotary: str, config=None, out=None):
    """Run the Triton step on ``state`` (in place); returns out."""
    problem = make_problem(inputs, rotary)
    config = config if config is not None else tstep.SPEC.default(problem)
    assert tstep.SPEC.constraint(problem, config, None) is None
    return tstep.step(problem, inputs, state, config, out=out)


def truth_step(inputs: ScanInputs, state: Mamba3State, rotary: str):
    """reference_step in float64: (out, new_state)."""
    t = cast_inputs(inputs._replace(initial_state=state), torch.float64)
    return reference_step(t, t.initial_state, rotary)


def check_state(state: Mamba3State, ref: Mamba3State, tol: float, ssm_tol: float = 1e-4) -> None:
    # angle and ssm are fp32 whatever the input dtype; k and v round to the dtype (and after
    # several steps the rounded k feeds back into ssm, hence ssm_tol).
    # (both keep the angle modulo 2 pi: compare the rotations, which a wrap does not change)
    assert ((state.angle >= 0) & (state.angle < 2 * math.pi + 1e-6)).all()
    rot = torch.stack((state.angle.double().cos(), state.angle.double().sin()))
    assert rel_err(rot, torch.stack((ref.angle.cos(), ref.angle.sin()))) < 1e-5
    assert rel_err(state.ssm, ref.ssm) < ssm_tol
    assert rel_err(state.k, ref.k) < tol
    assert rel_err(state.v, ref.v) < tol


# (rank, mimo, rotary, dtype, ngroups, D, z, mimo_o, S = N / s_div, block_p)
CASES = [
    (1, False, "interleaved", torch.float32, 1, True, True, False, 4, None),
    (1, False, "interleaved", torch.bfloat16, 2, True, True, False, 4, 8),
    (1, False, "halves", torch.float32, 4, False, False, False, 2, None),
    (1, False, "interleaved", torch.float16, 1, False, True, False, 2, 8),
    (1, False, "halves", torch.bfloat16, 2, True, False, False, 4, None),
    (1, True, "halves", torch.float32, 1, True, True, True, 4, None),
    (2, True, "halves", torch.float32, 2, True, True, True, 4, 8),
    (2, True, "interleaved", torch.bfloat16, 1, False, True, False, 2, None),
    (4, True, "halves", torch.float32, 4, True, False, False, 4, None),
    (4, True, "halves", torch.bfloat16, 2, True, True, True, 2, 8),
    (4, True, "interleaved", torch.float32, 1, False, False, True, 4, None),
    (8, True, "halves", torch.float32, 2, True, True, True, 4, None),
]


def _split_cases():
    """(case, split_p): SISO and MIMO, both layouts, with 2 and 4 programs per head."""
    return [(CASES[i], split) for i in (1, 2, 6, 9) for split in (2, 4)]


@cpu_interpreted
@pytest.mark.parametrize(
    "case,split_p",
    [(c, 1) for c in CASES] + _split_cases(),
    ids=lambda c: "-".join(str(x) for x in c) if isinstance(c, tuple) else f"split{c}",
)
def test_step_matches_reference(case, split_p):
    """One step vs the float64 reference; split_p > 1: several programs share each head (the
    last to finish writes the head's new k and angle)."""
    rank, mimo, rotary, dtype, ngroups, with_d, with_z, with_mo, s_div, block_p = case
    g = torch.Generator().manual_seed(100 + CASES.index(case))
    n, p = 32, 16
    inputs = random_inputs(
        batch=2, nheads=4, ngroups=ngroups, d_state=n, headdim=p, n_angles=n // s_div,
        rank=rank, mimo=mimo, dtype=dtype, with_D=with_d, with_z=with_z,
        with_mimo_o=with_mo, step=True, generator=g,
    )  # fmt: skip
    state = inputs.initial_state.clone()
    ref_out, ref_state = truth_step(inputs, inputs.initial_state, rotary)
    # Explicit configs alternate the state prefetch (on in the default config).
    prefetch = CASES.index(case) % 2
    config = None
    if block_p is not None:
        config = tstep.StepConfig(block_p=block_p, num_warps=1, prefetch=prefetch)
    if split_p > 1:
        config = tstep.StepConfig(block_p=p // split_p, num_warps=1, split_p=split_p,
                                  prefetch=prefetch)  # fmt: skip
    out = run_step(inputs, state, rotary, config)
    assert out.shape == ref_out.shape and out.dtype == dtype
    assert rel_err(out, ref_out) < TOL[dtype]
    check_state(state, ref_state, TOL[dtype])


def steps_vs_prefill(
    device, seqlen, rank, mimo, rotary, dtype, chunk_size=None, config=None, **sizes
):
    """Run ``seqlen`` in-place Triton steps from a random state and check them against one
    float64 reference scan over the same tokens (outputs of every step and the final state)."""
    g = torch.Generator().manual_seed(7 + rank + seqlen)
    inputs = random_inputs(
        seqlen=seqlen, rank=rank, mimo=mimo, dtype=dtype, with_initial_state=True, generator=g,
        **sizes,
    )  # fmt: skip
    truth = cast_inputs(inputs, torch.float64, device=device)
    ref_out, ref_state = reference_scan(truth, rotary, chunk_size=chunk_size)

    def move(t):
        return t.to(device) if isinstance(t, torch.Tensor) else t

    inputs = ScanInputs(
        *(move(t) for t in inputs[:14]), Mamba3State(*(move(t) for t in inputs.initial_state))
    )
    state = inputs.initial_state.clone()
    outs = []
    for t in range(seqlen):
        tok = inputs._replace(
            q=inputs.q[:, t], k=inputs.k[:, t], v=inputs.v[:, t], z=inputs.z[:, t],
            adt=inputs.adt[..., t], dt=inputs.dt[..., t], trap=inputs.trap[..., t],
            angles=inputs.angles[:, t], initial_state=None,
        )  # fmt: skip
        outs.append(run_step(tok, state, rotary, config))
    out = torch.stack(outs, dim=1)
    assert rel_err(out, ref_out) < TOL[dtype]
    check_state(state, ref_state, TOL[dtype], ssm_tol=max(1e-4, TOL[dtype]))


@cpu_interpreted
@pytest.mark.parametrize(
    "rank,mimo,rotary,dtype,split_p",
    [(1, False, "interleaved", torch.float32, 1), (2, True, "halves", torch.bfloat16, 1),
     (1, False, "halves", torch.float32, 2)],
)  # fmt: skip
def test_steps_match_scan(rank, mimo, rotary, dtype, split_p):
    """Consecutive in-place steps equal one reference scan over the same tokens (split steps:
    the per-head tickets carry over from step to step)."""
    config = tstep.StepConfig(block_p=8, num_warps=1, split_p=split_p)
    steps_vs_prefill(
        "cpu", 5, rank, mimo, rotary, dtype, config=config,
        batch=2, nheads=4, ngroups=2, d_state=32, headdim=16,
    )  # fmt: skip


@cpu_interpreted
def test_inplace_strided_and_out():
    """Strided views in, state views of a larger cache updated in place, out written in place."""
    g = torch.Generator().manual_seed(3)
    bsz, h, n, p, s = 2, 4, 32, 16, 8
    inputs = random_inputs(
        batch=bsz, nheads=h, ngroups=2, d_state=n, headdim=p, dtype=torch.float32, step=True,
        generator=g,
    )  # fmt: skip
    ref_out, ref_state = truth_step(inputs, inputs.initial_state, "interleaved")

    # Inputs as non-contiguous views (a fused projection's slices), state rows of a cache.
    qkv = torch.randn(bsz, 3, 2 * n * 2, generator=g)
    qkv[:, 0, ::2][:, : 2 * n] = inputs.q.reshape(bsz, -1)
    q = qkv[:, 0, ::2][:, : 2 * n].view(bsz, 2, n)
    vz = torch.randn(bsz, h, 2, p, generator=g)
    vz[:, :, 0] = inputs.v
    v = vz[:, :, 0]
    assert not q.is_contiguous() and not v.is_contiguous()
    cache = Mamba3State(
        angle=torch.randn(bsz + 2, h, s, generator=g),
        ssm=torch.randn(bsz + 2, h, p, n, generator=g),
        k=torch.randn(bsz + 2, 1, h, n, generator=g),
        v=torch.randn(bsz + 2, h, p, generator=g),
    )
    rows = slice(1, 1 + bsz)
    for dst, src in zip(cache, inputs.initial_state, strict=True):
        dst[rows] = src
    untouched = Mamba3State(*(t[[0, -1]].clone() for t in cache))
    state = Mamba3State(*(t[rows] for t in cache))
    ptrs = [t.data_ptr() for t in state]

    out = torch.full((bsz, h, p), float("nan"))
    res = run_step(inputs._replace(q=q, v=v), state, "interleaved", out=out)
    assert res is out
    assert rel_err(out, ref_out) < 1e-4
    assert [t.data_ptr() for t in state] == ptrs
    check_state(Mamba3State(*(t[rows] for t in cache)), ref_state, 1e-4)
    for a, b in zip(untouched, cache, strict=True):
        assert torch.equal(a, b[[0, -1]])


@cpu_interpreted
def test_plan_reuse_across_layouts():
    """One Problem and config, three calls whose tensors differ in data and layout (packed,
    batch-padded slices with packed inner axes, a strided out): each matches the reference."""
    g = torch.Generator().manual_seed(11)
    bsz, h, n, p = 2, 4, 32, 16
    base = random_inputs(
        batch=bsz, nheads=h, ngroups=2, d_state=n, headdim=p, rank=2, mimo=True,
        dtype=torch.float32, step=True, generator=g,
    )  # fmt: skip
    problem = make_problem(base, "halves")
    config = tstep.SPEC.default(problem)
    assert tstep.SPEC.default(problem) is config  # memoized: the plans key on it

    def padded(t):  # the same values as a slice of a wider per-batch buffer
        wide = torch.randn(t.shape[0], 2 * t[0].numel(), generator=g)
        wide[:, 1 : 1 + t[0].numel()] = t.reshape(t.shape[0], -1)
        return wide[:, 1 : 1 + t[0].numel()].view(t.shape)

    for layout in ("packed", "padded", "strided_out"):
        inputs = random_inputs(
            batch=bsz, nheads=h, ngroups=2, d_state=n, headdim=p, rank=2, mimo=True,
            dtype=torch.float32, step=True, generator=g,
        )._replace(q_bias=base.q_bias, k_bias=base.k_bias, D=base.D, mimo_v=base.mimo_v,
                   mimo_z=base.mimo_z, mimo_o=base.mimo_o)  # fmt: skip
        ref_out, ref_state = truth_step(inputs, inputs.initial_state, "halves")
        run_in, out = inputs, None
        if layout != "packed":
            run_in = inputs._replace(
                **{
                    f: padded(getattr(inputs, f))
                    for f in ("q", "k", "v", "z", "adt", "dt", "trap", "angles")
                }
            )
            assert not run_in.q.is_contiguous() and run_in.q.stride(0) == 2 * run_in.q[0].numel()
        if layout == "strided_out":
            out = torch.full((bsz, h, 2 * p), float("nan"))[:, :, ::2]
        state = inputs.initial_state.clone()
        res = tstep.step(problem, run_in, state, config, out=out)
        if out is not None:
            assert res is out
        assert rel_err(res, ref_out) < 1e-4
        check_state(state, ref_state, 1e-4)


class _Recorder:
    """Stands in for Triton: the binder's launch (returns a fake compiled kernel) and the
    compiled kernel's ``run``, recording what each was handed."""

    def __init__(self):
        self.generic, self.direct = [], []
        self.function, self.packed_metadata = "function", "packed"

    def launch_generic(self, kernel, grid, args, consts, options):
        assert kernel is tstep._step_kernel
        ptrs = [t.data_ptr() for t in args[:21]]
        self.generic.append((grid, ptrs, tuple(args[21:]), tuple(consts.values())))
        return self

    def run(self, *args):
        self.direct.append(args)

    def launch_metadata(self, grid, stream, *args):  # called where a launch hook is installed
        return ("meta", grid, stream)


@pytest.mark.parametrize("mimo", [False, True], ids=["siso-D-z", "mimo2-no-mo-split2"])
def test_direct_launch_hands_the_kernel_the_general_paths_arguments(monkeypatch, mimo):
    """The GPU hot path (raw addresses straight to the compiled kernel) cannot run here, so the
    launches are recorded instead: once the plan has a compiled kernel, a call passes the same
    grid, pointers (absent tensors: v's), strides and constants as Triton's launcher got, on the
    current stream; a misaligned pointer goes back to the launcher."""
    rec = _Recorder()
    monkeypatch.setattr(tstep, "_PLANS", {})
    monkeypatch.setattr(tlaunch, "_ENABLED", [True])
    monkeypatch.setattr(tlaunch, "_launch_generic", rec.launch_generic)
    monkeypatch.setattr(tlaunch, "_current_stream", lambda index: 7)
    g = torch.Generator().manual_seed(5)
    inputs = random_inputs(
        batch=3, nheads=4, d_state=32, headdim=16, rank=2 if mimo else 1, mimo=mimo,
        with_mimo_o=not mimo, dtype=torch.bfloat16, step=True, generator=g,
    )  # fmt: skip
    problem = make_problem(inputs, "halves" if mimo else "interleaved")
    config = tstep.StepConfig(block_p=8, num_warps=1, split_p=2 if mimo else 1)
    state = inputs.initial_state.clone()
    out = torch.empty(tstep.output_shape(problem), dtype=inputs.v.dtype)
    tstep.step(problem, inputs, state, config, out=out)  # builds the plan (interpreter branch)
    (plan,) = tstep._PLANS.values()
    plan.on_gpu = True  # from here on, the branches a CUDA call takes
    tstep.step(problem, inputs, state, config, out=out)  # Triton's launcher, then kept
    assert len(rec.generic) == 2 and plan.launch.compiled is not None and not rec.direct
    grid, ptrs, strides, consts = rec.generic[-1]
    assert tstep.step(problem, inputs, state, config, out=out) is out
    (args,) = rec.direct
    assert args[:4] == (*grid, 7) and args[4:6] == ("function", "packed")
    assert list(args[9:]) == [*ptrs, *strides, *consts]
    if mimo:  # the absent mimo_o is v's address; the split's ticket counter is its own
        assert args[9 + 13] == inputs.v.data_ptr() != args[9 + 19]
    buf = torch.empty(inputs.q.numel() + 1, dtype=inputs.q.dtype)
    shifted = buf[1:].view(inputs.q.shape)  # same strides, a 2-byte offset
    shifted.copy_(inputs.q)
    tstep.step(problem, inputs._replace(q=shifted), state, config, out=out)
    assert len(rec.generic) == 3 and len(rec.direct) == 1
    # Without out (another plan): out is allocated on the hot path, in v's dtype.
    for _ in range(2):
        tstep.step(problem, inputs, state, config)
        for p in tstep._PLANS.values():
            p.on_gpu = True
    fresh = tstep.step(problem, inputs, state, config)
    assert fresh.shape == out.shape and fresh.dtype == out.dtype and len(rec.direct) == 2
    assert rec.direct[-1][9 + 18] == fresh.data_ptr()
    assert rec.direct[-1][9 : 9 + 18] == args[9 : 9 + 18]


def test_default_configs_are_valid():
    inputs = random_inputs(batch=1, nheads=2, d_state=16, headdim=8, step=True)
    base = make_problem(inputs, "interleaved")
    for n in (64, 128, 256):
        for p in (32, 64, 128):
            for rank in (1, 2, 4, 8):
                for batch in (1, 16, 128):
                    problem = Problem(
                        **{**base.__dict__, "d_state": n, "headdim": p, "rank": rank,
                           "mimo": rank > 1, "batch": batch, "nheads": 64}
                    )  # fmt: skip
                    cfg = tstep.SPEC.default(problem)
                    assert tstep.SPEC.constraint(problem, cfg, {}) is None, (problem, cfg)
                    space = tstep.SPEC.space(problem)
                    assert cfg.block_p in space["block_p"]
                    assert cfg.num_warps in space["num_warps"]
                    assert cfg.num_stages in space["num_stages"]


# Compiles the kernel for Hopper the way a launch would specialise it (16-divisible pointers and
# strides marked), in a fresh interpreter without TRITON_INTERPRET.
_SM90_COMPILE = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mamba3_kernels.triton_impl import step as tstep

    B, H, G, N, P, S = 16, 64, 1, 128, 64, 32
    # (the second also a state pool: the slot load and the padding rows' early return)
    for R, mimo, split, pooled in ((1, False, 1, False), (4, True, 4, True)):
        kern = tstep._step_kernel
        consts = dict(H=H, G=G, R=R, N=N, P=P, S=S, BLOCK_P=min(32, P // split), SPLIT=split,
                      INTERLEAVED=not mimo,
                      HAS_D=True, HAS_Z=True, HAS_MV=mimo, HAS_MZ=mimo, HAS_MO=mimo,
                      KEEP_RANKS=False, PREFETCH=split > 1, POOLED=pooled)
        io = "*bf16"
        ptrs = dict(q_ptr=io, k_ptr=io, v_ptr=io, z_ptr=io, sk_ptr=io, sv_ptr=io, out_ptr=io,
                    cnt_ptr="*i32", idx_ptr="*i32")
        # Runtime integers: the batch strides of q, k, v, z, adt, dt, trap, angles.
        strides = [R * G * N] * 2 + [H * P] * 2 + [H] * 3 + [H * S]
        names = [n for n in kern.arg_names if n.startswith("s_")]
        assert len(names) == len(strides)
        sv = dict(zip(names, strides))
        sig, attrs = {}, {}
        for i, name in enumerate(kern.arg_names):
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = ptrs.get(name, "*fp32")
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[name] = "i32"
                if sv[name] % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(kern, sig, constexprs=consts, attrs=attrs)
        ck = triton.compile(src, target=GPUTarget("cuda", 90, 64),
                            options=dict(num_warps=4, num_stages=2))
        ptx, cubin = ck.asm["ptx"], ck.asm["cubin"]
        assert ".target sm_90" in ptx, ptx[:400]
        assert len(cubin) > 1000
        # The fp32 state tile moves in 16-byte accesses; the barrier guarding the state is there.
        lines = ptx.splitlines()
        for op in ("ld.global", "st.global"):
            assert any(op in line and ".v4." in line for line in lines), (op, split)
        assert "bar.sync" in ptx
        # split heads take their ticket with an acquire-release atomic
        assert ("acq_rel.add" in ptx) == (split > 1), split
        print("ok", R, len(ptx), len(cubin))
    """
)


def test_compiles_for_sm90_without_gpu():
    out = run_compiled(_SM90_COMPILE)
    assert out.count("ok") == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "rank,mimo,rotary,dtype",
    [
        (1, False, "interleaved", torch.float32),
        (1, False, "interleaved", torch.bfloat16),
        (4, True, "halves", torch.float32),
        (4, True, "halves", torch.bfloat16),
    ],
)
@pytest.mark.parametrize("split_p", [None, 4])
def test_gpu_steps_match_prefill(rank, mimo, rotary, dtype, split_p):
    """64 consecutive steps on the GPU equal one reference prefill over the same tokens (the
    default config, and 4 programs per head)."""
    config = None if split_p is None else tstep.StepConfig(16, 2, 1, split_p=split_p)
    steps_vs_prefill(
        "cuda", 64, rank, mimo, rotary, dtype, chunk_size=16, config=config,
        batch=2, nheads=32, ngroups=2, d_state=128, headdim=64, n_angles=32,
    )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("split_p", [None, 4])
def test_gpu_graph_capture_matches_reference(split_p):
    """A step captured in a CUDA graph (out preallocated) replays to the reference result, also
    with several programs per head (their ticket counter is made during the capture)."""
    g = torch.Generator().manual_seed(5)
    inputs = random_inputs(
        batch=3, nheads=8, ngroups=2, d_state=128, headdim=64, n_angles=32,
        dtype=torch.bfloat16, device="cuda", step=True, generator=g,
    )  # fmt: skip
    problem = make_problem(inputs, "interleaved")
    cfg = tstep.SPEC.default(problem)
    if split_p is not None:
        cfg = tstep.StepConfig(16, 2, 1, split_p=split_p)
    out = torch.empty(tstep.output_shape(problem), device="cuda", dtype=torch.bfloat16)
    state = inputs.initial_state.clone()
    tstep.step(problem, inputs, state.clone(), cfg, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tstep.step(problem, inputs, state, cfg, out=out)
    out.fill_(float("nan"))
    for _ in range(3):  # replays carry the tickets over; each starts from the initial state
        for dst, src in zip(state, inputs.initial_state, strict=True):
            dst.copy_(src)
        graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_state = truth_step(inputs, inputs.initial_state, "interleaved")
    assert rel_err(out, ref_out) < TOL[torch.bfloat16]
    check_state(state, ref_state, TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graph_capture_of_the_public_step():
    """mamba3_kernels.step captured in a CUDA graph after warm-up calls (the validation memo hit
    and its launch plan: no host sync, nothing but out allocated) replays to the reference."""
    import mamba3_kernels

    g = torch.Generator().manual_seed(6)
    inputs = random_inputs(
        batch=4, nheads=8, ngroups=1, d_state=128, headdim=64, n_angles=32,
        dtype=torch.bfloat16, device="cuda", step=True, generator=g,
    )  # fmt: skip
    state = inputs.initial_state.clone()

    def call():
        return mamba3_kernels.step(*inputs[:9], state, D=inputs.D, z=inputs.z, backend="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # a memo miss, then hits (the plan compiled outside the capture)
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = call()
    for dst, src in zip(state, inputs.initial_state, strict=True):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_state = truth_step(inputs, inputs.initial_state, "interleaved")
    assert rel_err(out, ref_out) < TOL[torch.bfloat16]
    check_state(state, ref_state, TOL[torch.bfloat16])


@cpu_interpreted
@pytest.mark.parametrize("rank,mimo", [(1, False), (4, True)])
def test_public_step_uses_triton(rank, mimo):
    """mamba3_kernels.step(..., backend="triton") reaches this kernel and updates in place."""
    import mamba3_kernels

    g = torch.Generator().manual_seed(21 + rank)
    inputs = random_inputs(
        batch=2, nheads=4, ngroups=2, d_state=32, headdim=16, rank=rank, mimo=mimo,
        dtype=torch.float32, step=True, generator=g,
    )  # fmt: skip
    rotary = "halves" if mimo else "interleaved"
    ref_out, ref_state = truth_step(inputs, inputs.initial_state, rotary)
    state = inputs.initial_state.clone()
    ptrs = [t.data_ptr() for t in state]
    out, new_state = mamba3_kernels.step(
        *inputs[:9], state, D=inputs.D, z=inputs.z, mimo_v=inputs.mimo_v,
        mimo_z=inputs.mimo_z, mimo_o=inputs.mimo_o, rotary=rotary, backend="triton",
    )  # fmt: skip
    assert [t.data_ptr() for t in new_state] == ptrs
    assert rel_err(out, ref_out) < 1e-4
    check_state(new_state, ref_state, 1e-4)


@cpu_interpreted
def test_public_step_plans_follow_each_validated_layout():
    """Through mamba3_kernels.step, a memo hit keys the launch plan on the validated Problem: calls
    whose per-step tensors differ only in layout (packed, then batch-padded slices) get their own
    Problem and plan, and each matches the reference, on the first call and on memo hits."""
    import mamba3_kernels
    from mamba3_kernels import validate

    g = torch.Generator().manual_seed(31)
    inputs = random_inputs(
        batch=2, nheads=4, ngroups=2, d_state=32, headdim=16, dtype=torch.float32, step=True,
        generator=g,
    )  # fmt: skip
    fields = ("q", "k", "v", "z", "adt", "dt", "trap", "angles")

    def padded(t):  # the same values as a slice of a wider per-batch buffer
        wide = torch.zeros(t.shape[0], 2 * t[0].numel())
        wide[:, 3 : 3 + t[0].numel()] = t.reshape(t.shape[0], -1)
        return wide[:, 3 : 3 + t[0].numel()].view(t.shape)

    layouts = {
        "packed": inputs,
        "padded": inputs._replace(**{f: padded(getattr(inputs, f)) for f in fields}),
    }
    ref_out, ref_state = truth_step(inputs, inputs.initial_state, "interleaved")
    problems = {}
    for _ in range(3):  # a miss, then hits (the plan keyed on the memo's Problem)
        for name, x in layouts.items():
            state = inputs.initial_state.clone()
            out, new_state = mamba3_kernels.step(
                *x[:9], state, D=x.D, z=x.z, backend="triton"
            )  # fmt: skip
            assert rel_err(out, ref_out) < 1e-4, name
            check_state(new_state, ref_state, 1e-4)
            problem, checked = validate.validate_step(*x[:9], state, x.D, x.z)
            assert isinstance(checked, validate.ValidatedInputs)
            assert checked.validated_problem is problem
            problems.setdefault(name, problem)
            assert problems[name] is problem  # one Problem per signature
    assert problems["packed"] is not problems["padded"]
    assert problems["packed"] == problems["padded"]  # equal sizes and flags, other layouts
