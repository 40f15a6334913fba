"""Requests to bring global-memory lines into L2 ahead of the loads that read them (GPU only).

The chunk loops of the forward kernels are one dependent chain per program with ~2 programs per
multiprocessor: a load that misses L2 stalls its warp for the whole DRAM latency, since no other
warp has work to cover it (docs/performance.md: the v, angle and coefficient loads were the
kernels' long-scoreboard stalls). Holding the next chunk's tiles in registers would cost the
registers these kernels already spill; a prefetch holds nothing: it asks L2 for the lines of a
later chunk and returns at once, so that chunk's loads hit L2. The interpreter has no inline
assembly: its kernels are compiled with the prefetch switched off (it changes no value).
Measured on an H200 it did not pay where tried (docs/performance.md, "L2 prefetch"): it stays a
tunable of the forward (ChunkFwdConfig.prefetch), off by default.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _prefetch_lines(ptr, off, mask, width, WP: tl.constexpr):
    """Ask L2 for the 128-byte lines of rows of ``width`` contiguous elements at ptr + off.

    off, mask: (rows,) element offsets of the rows and which to fetch; WP: a power of two >=
    width. One request per line that starts inside a row (no address past a row's last element
    is touched; a row that does not start on a line may miss its last line, which only costs
    that line's latency later)."""
    E: tl.constexpr = 1024 // ptr.dtype.element_ty.primitive_bitwidth  # elements per line
    NL: tl.constexpr = (WP + E - 1) // E
    j = tl.arange(0, NL) * E
    m = mask[:, None] & (j < width)[None, :]
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
        "=r,l,r",
        [ptr + off[:, None] + j[None, :], m.to(tl.int32)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )
