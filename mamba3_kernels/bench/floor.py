"""Bytes and FLOPs of each benchmarked call, and the floor they imply on a measured machine.

Every benchmark row divides its median time into these counts (GB/s, TFLOP/s) and compares it
with a floor: ``max(bytes / copy_rate, flops / matmul_rate)``, where both rates are measured on
the machine at start (a large device-to-device copy and a large bf16 matmul). The counts are the
*minimum* a kernel must do, so the floor is a lower bound on the time, not a model of any kernel.

Bytes (HBM traffic: each input read once, each output written once). With e the element size of
q/k/v/z (2 for bf16) and every parameter in fp32 (4 bytes):

* prefill forward: q and k ``2 B L R G N e``, v ``B L H P e``, z ``B L H P e`` (if given),
  adt/dt/trap ``3 B H L 4``, angles ``B L H S 4``, q/k bias ``2 H R N 4``, D ``H 4``,
  mimo_v/z/o ``3 H R P 4`` (MIMO), out ``B L H P e`` (``B L R H P e`` without mimo_o), plus the
  initial/final state when present (angle ``B H S 4``, ssm ``B H P N 4``, k ``B R H N e``,
  v ``B H P e``).
* forward+backward: the forward, then the backward reads every input again and the output
  gradient, and writes one gradient per input: ``3 * inputs + 2 * outputs``.
* decode step: the inputs of one token (the forward count at L = 1), the output, and the whole
  state read and written once (``2 * state``): the fp32 ``P x N`` state dominates.

FLOPs (only matmul-shaped work, since the floor divides by the matmul rate; rotary, exp and
gating are elementwise and far below it). The chunked form with ``T = C R`` rows per chunk
(``T = 64``, ``C = 64 / R`` by default, the chunk the public kernels use), per head and chunk:

* scores ``Qr Kr^T`` over all rank pairs: ``2 T^2 N``;
* intra-chunk output ``(scores * decay) Vr``: ``2 T^2 P``;
* inter-chunk output ``Qr Hs^T``: ``2 T N P``;
* state update ``Hs += Vr^T Kr``: ``2 T N P``;

so ``B H ceil(L / C) (2 T^2 (N + P) + 4 T N P)``. The backward is counted as twice the forward
(each matmul has two gradient matmuls), so forward+backward is ``3x`` the forward.
A decode step per head: decay ``P N``, the two rank-R outer-product updates ``4 R P N``, the
output ``2 R P N``: ``B H P N (1 + 6 R)``.

Peers: causal attention (``q, k: (B, H, L, Dqk)``, ``v, o: (B, H, L, Dv)``) counts
``2 B H L^2 (Dqk + Dv) / 2`` FLOPs (two matmuls, half masked) and its q/k/v/o bytes; Mamba-2's
chunked scan counts the SISO chunked FLOPs with chunk 256 and bytes of x, B, C, dt, out.
"""

from __future__ import annotations

import math

from .shapes import Shape

FP32 = 4
ROWS_PER_CHUNK = 64  # T = C * R: the MIMO chunk shrinks as R grows so T stays the same


def _prefill_io(s: Shape, with_initial_state: bool = False, with_final_state: bool = False):
    """(input bytes, output bytes) of one prefill forward at shape ``s``."""
    B, L, H, G, R, N, P, S, e = (
        s.batch,
        s.seqlen,
        s.nheads,
        s.ngroups,
        s.rank,
        s.d_state,
        s.headdim,
        s.n_angles,
        s.elt,
    )
    inp = 2 * B * L * R * G * N * e  # q, k
    inp += B * L * H * P * e  # v
    if s.has_z:
        inp += B * L * H * P * e
    inp += 3 * B * H * L * FP32  # adt, dt, trap
    inp += B * L * H * S * FP32  # angles
    inp += 2 * H * R * N * FP32  # q_bias, k_bias
    if s.has_D:
        inp += H * FP32
    if s.mimo:
        inp += (3 if s.has_mimo_o else 2) * H * R * P * FP32
    out = B * L * H * P * e * (1 if (not s.mimo or s.has_mimo_o) else R)
    state = state_bytes(s)
    if with_initial_state:
        inp += state
    if with_final_state:
        out += state
    return inp, out


def state_bytes(s: Shape) -> int:
    """Bytes of one Mamba3State of batch B: angle and ssm fp32, k and v in the input dtype."""
    B, H, R, N, P, S, e = s.batch, s.nheads, s.rank, s.d_state, s.headdim, s.n_angles, s.elt
    return B * H * S * FP32 + B * H * P * N * FP32 + B * R * H * N * e + B * H * P * e


def scan_bytes(s: Shape, backward: bool = False, **state_flags) -> int:
    """Minimum HBM bytes of a prefill forward (or forward+backward) at shape ``s``."""
    inp, out = _prefill_io(s, **state_flags)
    if not backward:
        return inp + out
    return 3 * inp + 2 * out


def scan_flops(s: Shape, backward: bool = False, rows_per_chunk: int = ROWS_PER_CHUNK) -> int:
    """Matmul FLOPs of the chunked forward (x3 with the backward) at shape ``s``."""
    T = rows_per_chunk
    C = max(T // s.rank, 1)
    N, P = s.d_state, s.headdim
    per_chunk = 2 * T * T * (N + P) + 4 * T * N * P
    fwd = s.batch * s.nheads * math.ceil(s.seqlen / C) * per_chunk
    return 3 * fwd if backward else fwd


def step_bytes(s: Shape) -> int:
    """Minimum HBM bytes of one decode step (state read and written once)."""
    one_token = Shape(**{**s.__dict__, "seqlen": 1})
    inp, out = _prefill_io(one_token)
    return inp + out + 2 * state_bytes(s)


def step_flops(s: Shape) -> int:
    """FLOPs of one decode step: decay, two rank-R updates and the output, per head."""
    return s.batch * s.nheads * s.headdim * s.d_state * (1 + 6 * s.rank)


def attention_bytes(
    batch: int, nheads: int, seqlen: int, d_qk: int, d_v: int, elt: int = 2, backward=False
) -> int:
    """Forward: q, k, v read and o written once. Backward: q, k, v, o and dO read, dq, dk and
    dv written."""
    qk = 2 * batch * nheads * seqlen * d_qk * elt  # q and k
    one_v = batch * nheads * seqlen * d_v * elt  # one (B, H, L, Dv) tensor
    fwd = qk + 2 * one_v  # q, k, v, o
    if not backward:
        return fwd
    return fwd + (qk + 3 * one_v) + (qk + one_v)


def attention_flops(
    batch: int, nheads: int, seqlen: int, d_qk: int, d_v: int, backward: bool = False
) -> int:
    """Causal attention: QK^T (2 L^2 Dqk) and PV (2 L^2 Dv), half masked; backward x2."""
    fwd = batch * nheads * seqlen * seqlen * (d_qk + d_v)
    return 3 * fwd if backward else fwd


def mamba2_bytes(s: Shape, backward: bool = False) -> int:
    """Mamba-2 chunked scan: x and out (B L H P e), B and C (B L G N e), dt (B L H 4), A, D."""
    B, L, H, G, N, P, e = s.batch, s.seqlen, s.nheads, s.ngroups, s.d_state, s.headdim, s.elt
    inp = B * L * H * P * e + 2 * B * L * G * N * e + B * L * H * FP32 + 2 * H * FP32
    out = B * L * H * P * e
    return 3 * inp + 2 * out if backward else inp + out


def mamba2_flops(s: Shape, backward: bool = False, chunk: int = 256) -> int:
    """Mamba-2 chunked scan FLOPs: the SISO chunked count at its default chunk of 256."""
    siso = Shape(**{**s.__dict__, "rank": 1})
    return scan_flops(siso, backward=backward, rows_per_chunk=chunk)


def floor_ms(nbytes: int, flops: int, copy_gbps: float, matmul_tflops: float) -> float:
    """The lower bound on time in ms: the larger of moving the bytes and doing the FLOPs."""
    t_mem = nbytes / (copy_gbps * 1e9)
    t_math = flops / (matmul_tflops * 1e12)
    return 1e3 * max(t_mem, t_math)


def op_bytes(op: str, s: Shape) -> int:
    """Bytes of a benchmark op ("fwd", "fwdbwd" or "decode") of the Mamba-3 scan at ``s``."""
    if op == "decode":
        return step_bytes(s)
    return scan_bytes(s, backward=op == "fwdbwd")


def op_flops(op: str, s: Shape) -> int:
    """FLOPs of a benchmark op of the Mamba-3 scan at ``s``."""
    if op == "decode":
        return step_flops(s)
    return scan_flops(s, backward=op == "fwdbwd")
