"""triton_impl.fast_math against float64: exp and sigmoid over the whole fp32 range the kernels
feed them (decays down to underflow, gates and angle rates of either sign). On a GPU the fast
hardware forms run; under the interpreter the plain tl functions (it has no libdevice)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from mamba3_kernels.triton_impl.fast_math import _exp, _sigmoid  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"


@triton.jit
def _eval_kernel(x_ptr, e_ptr, s_ptr, n, BLOCK: tl.constexpr, FAST: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n, other=0.0)
    tl.store(e_ptr + i, _exp(x, FAST), mask=i < n)
    tl.store(s_ptr + i, _sigmoid(x, FAST), mask=i < n)


def _evaluate(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    e, s = torch.empty_like(x), torch.empty_like(x)
    block = 1024
    _eval_kernel[(triton.cdiv(x.numel(), block),)](x, e, s, x.numel(), BLOCK=block,
                                                    FAST=not INTERPRET)  # fmt: skip
    return e, s


@pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_exp_and_sigmoid_match_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.linspace(-110.0, 90.0, 20001),  # through exp's underflow and sigmoid's saturation
        torch.randn(20000, generator=g) * 4.0,  # where gates and rates live
        torch.tensor([0.0, -0.0, 1e-30, -1e-30, -87.0, -88.0, 88.0]),
    ]).float()  # fmt: skip
    e, s = _evaluate(x.to(DEVICE))
    e, s = e.cpu().double(), s.cpu().double()
    xd = x.double()
    e_ref, s_ref = torch.exp(xd), torch.sigmoid(xd)
    assert torch.isfinite(s).all() and (s >= 0).all() and (s <= 1).all()
    # exp: relative error of fp32 rounding (x log2(e) is rounded: ~|x| 2^-24) where the result
    # is a normal fp32 number; below it, flushed to zero or denormal (absolute < 2^-126).
    normal = e_ref > 2.0**-126
    big = xd < 88.7  # exp overflows fp32 above ~88.72
    rel_e = ((e - e_ref).abs() / e_ref)[normal & big]
    assert rel_e.max() < 1e-5, rel_e.max()
    assert ((e - e_ref).abs()[~normal] < 2.0**-126).all()
    # sigmoid: relative error where it is normal (for x << 0 it is exp(x), with exp's error,
    # measured 3.8e-6 on an H200), else absolute below the normal range.
    normal_s = s_ref > 2.0**-126
    rel_s = ((s - s_ref).abs() / s_ref)[normal_s]
    assert rel_s.max() < 1e-5, rel_s.max()
    assert ((s - s_ref).abs()[xd > -10] < 1e-6).all()  # where gates and weights live
    assert ((s - s_ref).abs()[~normal_s] < 2.0**-126).all()
