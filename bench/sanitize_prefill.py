"""One prefill forward per config at a small model-like shape, for a memory checker:

    compute-sanitizer --tool memcheck python bench/sanitize_prefill.py [--configs C,BP,W,S,...]

Each config (ChunkFwdConfig fields in order, as bench_triton_prefill.py --configs) runs once on
fresh bf16 inputs (MIMO R=4 when the chunk's rows allow, else SISO) and is compared with the
fp32 reference; the sanitizer reports any out-of-range access. Prints one line per config.
"""

from __future__ import annotations

import argparse

import torch
from mamba3_kernels.triton_impl import chunk_fwd as cf

from mamba3_kernels.reference import reference_scan
from mamba3_kernels.testing import cast_inputs, random_inputs, rel_err
from mamba3_kernels.validate import validate_scan

# MIMO R=4, 16-token blocks (64 rows) on 4 warps: the shape a Triton 3.6 miscompile was seen at
# in the segment-walk kernel; SISO 64-token blocks.
DEFAULT = ["16,64,4,1,0,1,2,64", "64,64,4,1,0,1,2,256"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=DEFAULT)
    ap.add_argument("--rank", type=int, default=4)
    args = ap.parse_args()
    for text in args.configs:
        config = cf.ChunkFwdConfig(*map(int, text.split(",")))
        rank = args.rank if config.chunk_size * args.rank <= 128 else 1
        g = torch.Generator().manual_seed(5)
        inputs = random_inputs(batch=1, seqlen=600, nheads=4, ngroups=1, d_state=128, headdim=64,
                               n_angles=32, rank=rank, dtype=torch.bfloat16, device="cuda",
                               generator=g, with_initial_state=True)  # fmt: skip
        rotary = "halves" if rank > 1 else "interleaved"
        problem, inputs = validate_scan(*inputs[:14], initial_state=inputs.initial_state,
                                        return_final_state=True, rotary=rotary)  # fmt: skip
        reason = cf.constraint(problem, config, None)
        if reason is not None:
            print(f"{text} R={rank}: rejected ({reason})")
            continue
        out, state = cf.chunk_fwd(problem, inputs, config)
        torch.cuda.synchronize()
        ref, rstate = reference_scan(cast_inputs(inputs, torch.float32), rotary, chunk_size=64)
        errs = rel_err(out, ref), rel_err(state.ssm, rstate.ssm)
        print(f"{text} R={rank}: out {errs[0]:.2e} ssm {errs[1]:.2e}")


if __name__ == "__main__":
    main()
