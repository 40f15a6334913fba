"""triton_impl.mimo_gate (the MIMO epilogue: z gate and mimo_o rank sum) vs PyTorch autograd
of the same formula in float64 (CPU under TRITON_INTERPRET=1)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mamba3_kernels.triton_impl import mimo_gate as mg  # noqa: E402

from mamba3_kernels.testing import rel_err, run_compiled  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
cpu_interpreted = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (CPU)")


def _truth(y, z, mz, mo, dout):
    """Value and gradients of sum_r mo_r * y_r * silu(z * mz_r) (mo None: y silu(z), R = 1) by
    float64 autograd."""
    leaves = [t.double().requires_grad_() if t is not None else None for t in (y, z, mz, mo)]
    y64, z64, mz64, mo64 = leaves
    gate = 1.0
    if z64 is not None:
        zr = z64.unsqueeze(2) * (mz64.transpose(0, 1) if mz64 is not None else 1.0)
        gate = torch.nn.functional.silu(zr)
    out = (y64 * gate * (mo64.transpose(0, 1) if mo64 is not None else 1.0)).sum(2)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, dout.double()))
    return out, [next(grads) if t is not None else None for t in leaves]


@cpu_interpreted
@pytest.mark.parametrize(
    "rank,gate", [(r, gt) for r in (2, 4) for gt in ("none", "z", "z_mz")] + [(1, "siso")]
)
def test_gate_matches_autograd(rank, gate):
    """The MIMO epilogue with each gate, and SISO's z gate (R = 1, no mimo_o)."""
    g = torch.Generator().manual_seed(rank + len(gate))
    B, L, H, P = 2, 150, 3, 16  # 300 tokens: two programs per head, the second partial
    y = torch.randn(B, L, rank, H, P, generator=g)
    z = torch.randn(B, L, H, P, generator=g).to(torch.bfloat16) if gate != "none" else None
    mz = torch.randn(H, rank, P, generator=g) + 1.0 if gate == "z_mz" else None
    mo = torch.randn(H, rank, P, generator=g) if gate != "siso" else None
    dout = torch.randn(B, L, H, P, generator=g).to(torch.bfloat16)
    want_out, want = _truth(y, z, mz, mo, dout)

    leaves = [t.clone().requires_grad_() if t is not None else None for t in (y, z, mz, mo)]
    out = mg.mimo_gate(*leaves, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (B, L, H, P)
    assert rel_err(out, want_out) < 1e-2  # (rounded to bf16)
    with torch.no_grad():  # the forward pass (gate_fwd) in fp32: one rounding at the end
        assert rel_err(mg.mimo_gate(*leaves, torch.float32), want_out) < 1e-5
    out.backward(dout)
    for name, leaf, ref in zip(("y", "z", "mimo_z", "mimo_o"), leaves, want, strict=True):
        if leaf is None:
            continue
        assert leaf.grad is not None, name
        assert leaf.grad.dtype == leaf.dtype, name
        tol = 1e-2 if leaf.dtype == torch.bfloat16 else 1e-5
        assert rel_err(leaf.grad, ref) < tol, (name, rel_err(leaf.grad, ref))


@cpu_interpreted
def test_gate_with_16bit_y():
    """A bf16 y (the core's operand_dtype with 16-bit inputs) gives a bf16 dy, the gradients of the
    rounded y to bf16 accuracy."""
    g = torch.Generator().manual_seed(11)
    B, L, R, H, P = 1, 70, 4, 2, 16
    y = torch.randn(B, L, R, H, P, generator=g).to(torch.bfloat16)
    z = torch.randn(B, L, H, P, generator=g).to(torch.bfloat16)
    mo = torch.randn(H, R, P, generator=g)
    dout = torch.randn(B, L, H, P, generator=g).to(torch.bfloat16)
    _, want = _truth(y, z, None, mo, dout)
    leaves = [t.clone().requires_grad_() for t in (y, z, mo)]
    mg.mimo_gate(leaves[0], leaves[1], None, leaves[2], torch.bfloat16).backward(dout)
    assert leaves[0].grad.dtype == torch.bfloat16
    for name, leaf, ref in zip(("y", "z", "mimo_o"), leaves, (want[0], want[1], want[3]),
                               strict=True):  # fmt: skip
        assert rel_err(leaf.grad, ref) < 1e-2, (name, rel_err(leaf.grad, ref))


@cpu_interpreted
def test_gate_without_value_keeps_gradients():
    """need_value=False (the backward's recompute): zeros for the value, exact gradients."""
    g = torch.Generator().manual_seed(3)
    y = torch.randn(1, 5, 2, 2, 16, generator=g, requires_grad=True)
    mo = torch.randn(2, 2, 16, generator=g)
    out = mg.mimo_gate(y, None, None, mo, torch.float32, need_value=False)
    assert out.shape == (1, 5, 2, 16) and not out.any()
    dout = torch.randn(out.shape, generator=g)
    out.backward(dout)
    assert rel_err(y.grad, (dout.unsqueeze(2) * mo.transpose(0, 1)).expand_as(y)) < 1e-6


@cpu_interpreted
def test_gate_op_schema_and_fake():
    g = torch.Generator().manual_seed(4)
    y = torch.randn(1, 3, 2, 2, 16, generator=g)
    z = torch.randn(1, 3, 2, 16, generator=g)
    mz, mo = torch.randn(2, 2, 2, 16, generator=g)
    dout = torch.randn(1, 3, 2, 16, generator=g)
    utils = ("test_schema", "test_faketensor")
    for args in (
        (dout, y, z, mz, mo),
        (dout, y, None, None, mo),
        (dout, y.to(torch.bfloat16), z, None, mo),
    ):
        torch.library.opcheck(torch.ops.mamba3_triton.mimo_gate_bwd.default, args, test_utils=utils)
        torch.library.opcheck(torch.ops.mamba3_triton.mimo_gate_fwd.default,
                              (*args[1:], "bfloat16"), test_utils=utils)  # fmt: skip
    torch.library.opcheck(torch.ops.mamba3_triton.mimo_vmix_bwd.default, (y, z, mo),
                          test_utils=utils)  # fmt: skip
    for v in (z, z.to(torch.bfloat16)):  # (vr fp32, and in v's 16-bit dtype)
        torch.library.opcheck(torch.ops.mamba3_triton.mimo_vmix_fwd.default, (v, mo),
                              test_utils=utils)  # fmt: skip


_SM90 = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from mamba3_kernels.triton_impl import mimo_gate as mg

    fn = mg._gate_bwd_kernel
    for R, z, mz, mo in ((4, True, True, True), (2, True, False, True), (8, False, False, True),
                         (1, True, False, False)):
        c = dict(R=R, P=64, BT=max(1, mg._ROWS // R), STEPS=4, HAS_Z=z, HAS_MZ=mz, HAS_MO=mo)
        sig = {a: "constexpr" if a in c else ("i32" if a in ("T", "H") else "*fp32")
               for a in fn.arg_names}
        sig.update(dout_ptr="*bf16", z_ptr="*bf16")
        k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=c),
                           target=GPUTarget("cuda", 90, 64), options={"num_warps": 4})
        ptx = k.asm["ptx"]
        assert ".target sm_90" in ptx
        if mo:  # the per-head weight sums
            assert "red.global" in ptx or "atom.global" in ptx
        print("ok", R)
    fn = mg._gate_fwd_kernel
    for R, z, mz, mo in ((4, True, True, True), (1, True, False, False)):
        c = dict(R=R, P=64, BT=max(1, mg._ROWS // R), STEPS=4, HAS_Z=z, HAS_MZ=mz, HAS_MO=mo)
        sig = {a: "constexpr" if a in c else ("i32" if a in ("T", "H") else "*fp32")
               for a in fn.arg_names}
        sig.update(y_ptr="*bf16", z_ptr="*bf16", out_ptr="*bf16")
        k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=c),
                           target=GPUTarget("cuda", 90, 64), options={"num_warps": 4})
        assert "st.global" in k.asm["ptx"]
        print("ok fwd", R)
    fn = mg._vmix_bwd_kernel
    c = dict(R=4, P=64, BT=4, STEPS=16)
    sig = {a: "constexpr" if a in c else ("i32" if a in ("T", "H") else "*fp32")
           for a in fn.arg_names}
    sig.update(v_ptr="*bf16", dv_ptr="*bf16", dvr_ptr="*bf16")  # (vr in bf16: _MimoVMix)
    k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=c),
                       target=GPUTarget("cuda", 90, 64), options={"num_warps": 4})
    assert ".target sm_90" in k.asm["ptx"]
    print("ok vmix")
    fn = mg._vmix_fwd_kernel
    sig = {a: "constexpr" if a in c else ("i32" if a in ("T", "H") else "*fp32")
           for a in fn.arg_names}
    sig.update(v_ptr="*bf16", vr_ptr="*bf16")
    k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=c),
                       target=GPUTarget("cuda", 90, 64), options={"num_warps": 4})
    assert "st.global" in k.asm["ptx"]
    print("ok vmix fwd")
    """
)


def test_gate_kernel_compiles_for_sm90_without_gpu():
    out = run_compiled(_SM90)
    assert out.count("ok") == 8


@cpu_interpreted
@pytest.mark.parametrize("rank,dtype", [(2, torch.float32), (4, torch.bfloat16)])
def test_v_mix_matches_autograd(rank, dtype):
    """vr = v * mimo_v (the prologue): gradients against float64 autograd, 300 tokens (two
    programs per head, the second partial); vr (and the gradient the core gives it) in v's
    dtype when that is 16-bit."""
    g = torch.Generator().manual_seed(rank)
    B, L, H, P = 2, 150, 3, 16
    v = torch.randn(B, L, H, P, generator=g).to(dtype)
    mv = torch.randn(H, rank, P, generator=g)
    dvr = torch.randn(B, L, rank, H, P, generator=g).to(dtype)  # (as vr's gradient comes)
    v64, mv64 = v.double().requires_grad_(), mv.double().requires_grad_()
    want = torch.autograd.grad(v64.unsqueeze(2) * mv64.transpose(0, 1), (v64, mv64), dvr.double())
    leaves = v.clone().requires_grad_(), mv.clone().requires_grad_()
    vr = mg.mimo_v_mix(*leaves)
    assert vr.dtype == dtype and vr.shape == (B, L, rank, H, P)
    assert vr.is_contiguous()  # (else the core copies it whole before reading it)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert rel_err(vr, v64.unsqueeze(2) * mv64.transpose(0, 1)) < tol
    # the fp32 product rounded once (the interpreter's cast to bf16 truncates where the GPU's
    # rounds to nearest: one ulp apart at most; test_v_mix_rounds_once_on_gpu checks the bits)
    exact = (v.float().unsqueeze(2) * mv.transpose(0, 1)).to(dtype)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-23
    assert ((vr.float() - exact.float()).abs() <= exact.float().abs() * ulp).all()
    vr.backward(dvr)
    for leaf, ref in zip(leaves, want, strict=True):
        assert leaf.grad.dtype == leaf.dtype
        tol = 1e-2 if leaf.dtype == torch.bfloat16 else 1e-5
        assert rel_err(leaf.grad, ref) < tol, rel_err(leaf.grad, ref)


@pytest.mark.gpu
def test_v_mix_rounds_once_on_gpu():
    """On the GPU, vr is bit for bit the fp32 product rounded once to bf16 (as PyTorch's fp32
    product then a cast), at a model-sized head count."""
    g = torch.Generator().manual_seed(12)
    v = torch.randn(2, 1000, 32, 64, generator=g).to(torch.bfloat16).cuda()
    mv = torch.randn(32, 4, 64, generator=g).cuda()
    vr = mg.mimo_v_mix(v, mv)
    assert torch.equal(vr, (v.float().unsqueeze(2) * mv.transpose(0, 1)).to(torch.bfloat16))


def test_glue_traffic_script_runs(tmp_path):
    """tools/glue_traffic.py (the op and traffic count behind the gate passes' numbers) runs
    and writes its JSON."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "glue.json"
    cmd = [sys.executable, str(root / "tools" / "glue_traffic.py"), "--rank", "4", "--z",
           "--json", str(out)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got["aten_ops"] > 0 and got["traffic_units"] > 0 and got["top"]
