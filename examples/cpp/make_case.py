"""Write a decode case for examples/cpp/decode_step: inputs, and the float64 reference's outputs.

    python examples/cpp/make_case.py --variant 0 --batch 3 --steps 16 --out case.bin
    build/decode_step case.bin

``--variant`` is an index into (or a name of) the exported kernel set
(``python -m mamba3_kernels.cute_impl.export --list``). The file (little-endian):
"M3DC", int32 version 1, the 13 int32 fields of mamba3_step_desc, int32 batch, int32 steps,
then blobs (int64 byte count, bytes; count 0 for an absent tensor): q_bias, k_bias, D, mimo_v,
mimo_z, mimo_o (fp32); the initial state angle, ssm (fp32), k, v (the dtype); per step q, k,
v, z (the dtype), adt, dt, trap, angles (fp32), the expected out (fp32); at the end the
expected state angle, ssm, k, v (fp32).
"""

from __future__ import annotations

import argparse
import os
import struct
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from mamba3_kernels.cute_impl.export import DEFAULT_SET, DTYPE_CODES  # noqa: E402
from mamba3_kernels.cute_impl.step import Variant, heuristic  # noqa: E402

from mamba3_kernels.reference import reference_step  # noqa: E402
from mamba3_kernels.testing import cast_inputs, random_inputs  # noqa: E402

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_variant(key: str) -> Variant:
    if key.isdigit():
        return DEFAULT_SET[int(key)]
    for v in DEFAULT_SET:
        if v.name(heuristic(v.d_state, v.headdim, v.rank)) == key:
            return v
    raise SystemExit(f"no variant {key!r} in the exported set")


def _blob(f, t: torch.Tensor | None, dtype: torch.dtype | None = None) -> None:
    if t is None:
        f.write(struct.pack("<q", 0))
        return
    t = t.detach().to("cpu")
    if dtype is not None:
        t = t.to(dtype)
    data = t.contiguous().view(torch.uint8).numpy().tobytes()
    f.write(struct.pack("<q", len(data)))
    f.write(data)


def case_inputs(variant: Variant, batch: int, seed: int):
    """The first step's inputs (with the initial state) of a random case of ``variant``."""
    g = torch.Generator().manual_seed(seed)
    return random_inputs(
        batch=batch, nheads=variant.nheads, ngroups=variant.ngroups, d_state=variant.d_state,
        headdim=variant.headdim, n_angles=variant.n_angles, rank=variant.rank,
        mimo=variant.has_mimo_v, dtype=TORCH_DTYPES[variant.dtype], with_D=variant.has_D,
        with_z=variant.has_z, with_mimo_o=variant.has_mimo_o, step=True, generator=g,
    )  # fmt: skip


def write_case(path: str, variant: Variant, batch: int, steps: int, seed: int = 0) -> None:
    rotary = "interleaved" if variant.interleaved else "halves"
    first = case_inputs(variant, batch, seed)
    state = first.initial_state
    f32 = torch.float32
    with open(path, "wb") as f:
        f.write(b"M3DC" + struct.pack("<i", 1))
        desc = (
            variant.nheads, variant.ngroups, variant.rank, variant.d_state, variant.headdim,
            variant.n_angles, variant.interleaved, variant.has_D, variant.has_z,
            variant.has_mimo_v, variant.has_mimo_z, variant.has_mimo_o, DTYPE_CODES[variant.dtype],
        )  # fmt: skip
        f.write(struct.pack("<13i", *(int(x) for x in desc)))
        f.write(struct.pack("<ii", batch, steps))
        mz = first.mimo_z if variant.has_mimo_z else None
        for t in (first.q_bias, first.k_bias, first.D, first.mimo_v, mz, first.mimo_o):
            _blob(f, t, f32)
        for t in state:
            _blob(f, t)
        truth = cast_inputs(first._replace(mimo_z=mz), torch.float64).initial_state
        for t in range(steps):
            x = first if t == 0 else case_inputs(variant, batch, seed + 1000 * t)
            x = x._replace(q_bias=first.q_bias, k_bias=first.k_bias, D=first.D,
                           mimo_v=first.mimo_v, mimo_z=mz, mimo_o=first.mimo_o)  # fmt: skip
            for tensor in (x.q, x.k, x.v, x.z):
                _blob(f, tensor)
            for tensor in (x.adt, x.dt, x.trap, x.angles):
                _blob(f, tensor, f32)
            t64 = cast_inputs(x._replace(initial_state=None), torch.float64)
            out, truth = reference_step(t64, truth, rotary)
            # The kernel rounds the stored k and v to the dtype; so does this reference's state.
            truth = truth._replace(
                k=truth.k.to(TORCH_DTYPES[variant.dtype]).double(),
                v=truth.v.to(TORCH_DTYPES[variant.dtype]).double(),
            )
            _blob(f, out, f32)
        for t in truth:
            _blob(f, t, f32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="0", help="index or name in the exported set")
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="case.bin")
    args = parser.parse_args()
    variant = pick_variant(args.variant)
    write_case(args.out, variant, args.batch, args.steps, args.seed)
    print(f"{args.out}: {variant.name(heuristic(variant.d_state, variant.headdim, variant.rank))}"
          f", batch {args.batch}, {args.steps} steps")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
