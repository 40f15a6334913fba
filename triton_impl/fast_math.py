"""exp and sigmoid for the Triton kernels, as the hardware approximations on the GPU.

``tl.exp`` already evaluates ``ex2.approx`` of ``x * log2(e)``, plus instructions that keep
results in the denormal range; ``tl.sigmoid`` is ``1 / (1 + exp(-x))`` with an IEEE-rounded
reciprocal (a Newton step and range checks on top of the hardware reciprocal). In the chunked
forward the sigmoid alone was 14-22 % of all instructions executed (docs/performance.md, "Fast exp
and sigmoid"). With FAST, exp flushes denormal results to zero (a decay below 1e-38 is zero to
every consumer here) and sigmoid divides with the approximate division (2 ulp): both keep the
error of fp32 exp (tests/test_triton_fast_math.py). Without FAST (the interpreter has no
libdevice) the plain functions run.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _exp(x, FAST: tl.constexpr):
    """exp(x), fp32."""
    if FAST:
        return libdevice.fast_expf(x)
    else:
        return tl.exp(x)


@triton.jit
def _sigmoid(x, FAST: tl.constexpr):
    """1 / (1 + exp(-x)), fp32; 0 where exp(-x) overflows, as the exact value rounds to."""
    if FAST:
        return libdevice.fast_dividef(1.0, 1.0 + libdevice.fast_expf(-x))
    else:
        return tl.sigmoid(x)
