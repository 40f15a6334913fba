"""Segment states for the core kernels: their walks along the sequence split into segments.

The core backward (core_scan) walks each (sequence, head) through all its chunks twice: forward
carrying the state S, in reverse carrying its gradient dS. With few sequences and heads those
walks are too few programs to fill the GPU (at B=1, H=64 and two column blocks: 256 programs
for 132 multiprocessors holding two each, one wave whose forward-sweep half finishes early), and
each is a chain as long as the sequence. Here the sequence is cut into segments of SEG tokens:

1. ``_contrib_kernel``: per segment, the state its chunks add when started from zero, and the
   state gradient its chunks add when started from zero at its end (the same chunk steps as the
   core backward's sweeps, so the same rounded operands), plus its total log-decay;
2. ``_pass_kernel``: one elementwise walk over the segments turns those into the state entering
   each segment (from s0) and the state gradient at each segment's end (from dS_final);
3. the core backward then runs one program per segment and sweep (``SEGMENTED``); the core
   forward (the backward's recompute of y, when z or mimo_o read it) likewise, from the states
   alone (one program per (sequence, head): 64 at B=1, H=64, on half the multiprocessors).

Segments need a (B, L) batch (no cu_seqlens): with varlen the backward keeps whole sequences.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .core_tiles import _dstate_step, _load_chunk, _seq_bounds, _state_step
from .launch import run_kernel

__all__ = [
    "bwd_segment_len", "fwd_segment_len", "inference_segment_len", "segment_len", "segment_states",
]  # fmt: skip

# The core backward's threads hold 255 registers (docs/performance.md), so a multiprocessor's 64K
# registers hold 8 warps of it: two programs of 4 warps or one of 8. _WAVES such waves of
# programs keep every multiprocessor busy to the end (the sweeps' lengths differ, so a single
# wave leaves the multiprocessors of the shorter forward sweeps idle for the rest). Two waves
# beat four and eight with the 4-warp, unsplit default (docs/performance.md): more segments
# cost more contribution and pass work than they recover. (The segment length itself is the
# config's ChunkBwdConfig.segment; these only shape its automatic choice.)
_WARPS_PER_SM = 8
_WAVES = 2
# Software pipelining of the contribution kernel's chunk loop (its loads are most of its time)
_CONTRIB_STAGES = 1
# Shortest automatic segment: each segment's states cost two extra P x N passes.
_MIN_SEGMENT = 256


_SMS: dict[int | None, int] = {}  # multiprocessors per CUDA device index (asked once)


def _multiprocessors(device: torch.device) -> int:
    n = _SMS.get(device.index)
    if n is None:
        n = _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return n


def fwd_segment_len(
    seqlen: int, nseq: int, H: int, chunk: int, num_warps: int, segment: int, device
) -> int:
    """segment_len of the core forward (one program per sequence and head)."""
    return segment_len(seqlen, nseq * H, chunk, num_warps, segment, device)


def inference_segment_len(seqlen: int, nseq: int, H: int, rank: int, device) -> int:
    """Tokens per segment of an inference forward through the core (no backward shares its
    segments): the longest of L, L/2, L/4, ... (down to _MIN_SEGMENT) whose walks make about two
    programs per multiprocessor for SISO, four for MIMO (a MIMO walk holds R rows per token and
    waits on more of them), 1/16 short of that allowed: fewer segments carry less state
    traffic, and fewer programs than that leave multiprocessors idle (docs/performance.md).
    A result >= seqlen means no segments."""
    if device.type != "cuda":
        return seqlen
    want = (2 if rank == 1 else 4) * _multiprocessors(device) * 15 // 16
    nseg = 1
    while nseq * H * nseg < want and seqlen // (2 * nseg) >= _MIN_SEGMENT:
        nseg *= 2
    return -(-seqlen // nseg)


def bwd_segment_len(
    seqlen: int, nseq: int, H: int, split_n: int, chunk: int, num_warps: int, segment: int,
    device,
) -> int:  # fmt: skip
    """segment_len of the core backward (a program per sequence, head, sweep, column block)."""
    return segment_len(seqlen, nseq * H * 2 * split_n, chunk, num_warps, segment, device)


def segment_len(
    seqlen: int, programs: int, chunk: int, num_warps: int, segment: int, device: torch.device
) -> int:
    """Tokens per segment of a core kernel's walks for a (B, L) call that launches ``programs``
    programs of ``num_warps`` warps without segments: ``segment`` rounded up to a multiple of
    ``chunk`` when given (> 0); 0 picks one that gives about _WAVES waves of programs on this
    device's multiprocessors (the whole sequence when the programs fill them already, and on the
    CPU). A result >= seqlen means no segments."""
    if segment > 0:
        return -(-segment // chunk) * chunk
    if device.type != "cuda":
        return seqlen
    want = _WAVES * max(1, _WARPS_PER_SM // num_warps) * _multiprocessors(device)
    nseg = 1
    while programs * nseg < want and seqlen // (2 * nseg) >= _MIN_SEGMENT:
        nseg *= 2
    seg = -(-seqlen // nseg)
    return -(-seg // chunk) * chunk


@triton.jit
def _contrib_kernel(
    qr_ptr, kr_ptr, vr_ptr, adt_ptr, w_ptr, g_ptr, dy_ptr, fwd_ptr, rev_ptr, dec_ptr,
    L, H, NSEG, SEG,
    N: tl.constexpr, P: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
    DOTK: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, NS: tl.constexpr,
    FAST: tl.constexpr, FIRST: tl.constexpr,
):  # fmt: skip
    """Grid (nseq * H * NSEG, 2 - FIRST, NS): axis 1 + FIRST picks the state (0) or the state
    gradient (1), axis 2 a block of N / NS state columns. Writes the segment's contribution
    started from zero into fwd / rev (nseq, H, NSEG, P, N) fp32 and (first column block) its
    summed log-decay into dec (nseq, H, NSEG): from the forward sweep but for the last
    segment, which has no forward contribution (nothing follows it), from its reverse sweep
    (with FIRST = 1, no forward sweep, every segment's from its reverse sweep)."""
    pid = tl.program_id(0)
    sweep = tl.program_id(1) + FIRST
    NB: tl.constexpr = N // NS
    n0 = tl.program_id(2) * NB
    seg = pid % NSEG
    sh = pid // NSEG
    seq = sh // H
    h = sh % H
    bos, seqlen, coef_base = _seq_bounds(adt_ptr, seq, h, L, H, False)
    lo = seg * SEG
    hi = tl.minimum(seqlen, lo + SEG)
    # No segment follows the last one and none precedes the first: their state (gradient)
    # contributions are never read, so those programs walk no chunks.
    unused = tl.where(sweep == 0, seg == NSEG - 1, seg == 0)
    hi = tl.where(unused, lo, hi)
    pp = tl.arange(0, P)
    nn = n0 + tl.arange(0, NB)
    off = (sh.to(tl.int64) * NSEG + seg) * P * N + pp[:, None] * N + nn[None, :]
    x = tl.zeros((P, NB), dtype=tl.float32)
    if sweep == 0:
        decay = 0.0
        for c0 in range(lo, hi, C):
            c, c_last, w, _g, _q, k, v, _m, _r, _t = _load_chunk(
                qr_ptr, kr_ptr, vr_ptr, adt_ptr, w_ptr, g_ptr, bos, seqlen, coef_base, c0, h, H,
                N, P, R, C, DOTK, UPCAST, n0, NB,
            )  # fmt: skip
            x = _state_step(x, k, v, c, c_last, w, DOTK, DOT_PREC, UPCAST, FAST)
            decay += c_last
        tl.store(fwd_ptr + off, x)
        if n0 == 0:  # (the last segment's decay comes from its reverse sweep)
            if seg < NSEG - 1:
                tl.store(dec_ptr + sh.to(tl.int64) * NSEG + seg, decay)
    else:
        decay = 0.0
        nch = (hi - lo + C - 1) // C
        for jj in range(0, nch):
            c0 = lo + (nch - 1 - jj) * C
            c, c_last, _w, _g, q, _k, _v, valid, row, _t = _load_chunk(
                qr_ptr, kr_ptr, vr_ptr, adt_ptr, w_ptr, g_ptr, bos, seqlen, coef_base, c0, h, H,
                N, P, R, C, DOTK, UPCAST, n0, NB,
            )  # fmt: skip
            dy = tl.load(dy_ptr + row[:, None] * P + pp[None, :], mask=valid[:, None], other=0.0)
            x = _dstate_step(x, q, dy.to(tl.float32), c, c_last, DOTK, DOT_PREC, UPCAST, FAST)
            decay += c_last
        tl.store(rev_ptr + off, x)
        if n0 == 0:
            # (without the forward sweep, FIRST = 1, every segment's decay but the unused
            # first one's, which the reverse pass does not read)
            if seg == NSEG - 1 or FIRST == 1:
                tl.store(dec_ptr + sh.to(tl.int64) * NSEG + seg, decay)


@triton.jit
def _pass_kernel(
    fwd_ptr, rev_ptr, dec_ptr, s0_ptr, dsf_ptr, NSEG,
    PN: tl.constexpr, BLOCK: tl.constexpr, HAS_S0: tl.constexpr, HAS_DSF: tl.constexpr,
    FIRST: tl.constexpr,
):  # fmt: skip
    """Grid (nseq * H, 2 - FIRST, PN / BLOCK) (axis 1 + FIRST: the sweep): in place, fwd's
    contributions become the state entering each segment (from s0) and rev's the state
    gradient at each segment's end (from dS_final): S_in[s + 1] = exp(dec[s]) S_in[s] + fwd[s],
    dS_out[s - 1] = exp(dec[s]) dS_out[s] + rev[s]."""
    sh = tl.program_id(0).to(tl.int64)
    sweep = tl.program_id(1) + FIRST
    idx = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    base = sh * NSEG * PN + idx
    # (the last segment's fwd and the first segment's rev contributions are not computed)
    if sweep == 0:
        if HAS_S0:
            x = tl.load(s0_ptr + sh * PN + idx).to(tl.float32)
        else:
            x = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, NSEG - 1):
            contrib = tl.load(fwd_ptr + base + s * PN)
            tl.store(fwd_ptr + base + s * PN, x)
            x = x * tl.exp(tl.load(dec_ptr + sh * NSEG + s)) + contrib
        tl.store(fwd_ptr + base + (NSEG - 1) * PN, x)
    else:
        if HAS_DSF:
            x = tl.load(dsf_ptr + sh * PN + idx).to(tl.float32)
        else:
            x = tl.zeros((BLOCK,), dtype=tl.float32)
        for jj in range(0, NSEG - 1):
            s = NSEG - 1 - jj
            contrib = tl.load(rev_ptr + base + s * PN)
            tl.store(rev_ptr + base + s * PN, x)
            x = x * tl.exp(tl.load(dec_ptr + sh * NSEG + s)) + contrib
        tl.store(rev_ptr + base, x)


def segment_states(
    qr, kr, vr, adt, w, gam, s0, dsf, dy, consts: dict, nseq: int, seg: int, num_warps: int,
    split_n: int, s_in: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:  # fmt: skip
    """(S_in, dS_out, nseg): the state entering each segment of ``seg`` tokens and the state
    gradient at each segment's end, both (nseq, H, nseg, P, N) fp32, for a (B, L) call of the
    core backward (operands as core_scan.core_bwd takes them; consts: its kernels' constants).
    dy None (the core forward): S_in only, dS_out None. s_in: the S_in of an earlier call on
    the same operands, chunk and segments (the core forward's, core_scan.core_fwd's
    state_chunk): only dS_out is computed, and s_in returned."""
    B, L, R, H, N = qr.shape
    P = vr.shape[-1]
    nseg = -(-L // seg)
    first = 1 if s_in is not None else 0  # the first sweep to run (0: the states, 1: dS)
    sweeps = 1 if dy is None else 2
    dev = qr.device
    f32 = torch.float32
    fwd = s_in if s_in is not None else torch.empty((nseq, H, nseg, P, N), dtype=f32, device=dev)
    rev = torch.empty_like(fwd) if sweeps == 2 else None
    dec = torch.empty((nseq, H, nseg), dtype=f32, device=dev)
    dummy = dec
    c = {k: consts[k] for k in ("N", "P", "R", "C", "DOTK", "DOT_PREC", "UPCAST", "FAST")}
    # (with s_in only the reverse sweeps run: each segment's decay then comes from its own)
    run_kernel(
        _contrib_kernel, (nseq * H * nseg, sweeps - first, split_n), qr, kr, vr, adt, w, gam,
        dy if dy is not None else dummy, fwd, rev if rev is not None else dummy, dec,
        L, H, nseg, seg, **c, NS=split_n, FIRST=first, num_warps=num_warps,
        num_stages=_CONTRIB_STAGES,
    )  # fmt: skip
    block = min(P * N, 1024)
    run_kernel(
        _pass_kernel, (nseq * H, sweeps - first, P * N // block), fwd,
        rev if rev is not None else dummy, dec, s0 if s0 is not None else dummy,
        dsf if dsf is not None else dummy, nseg, PN=P * N, BLOCK=block, HAS_S0=s0 is not None,
        HAS_DSF=dsf is not None, FIRST=first, num_warps=4,
    )  # fmt: skip
    return fwd, rev, nseg
