"""Accuracy of 16-bit ssm states against an fp32 state, over many decode steps and prefill chunks.

Two runs per state dtype, each compared with the same run on an fp32 state (same inputs, same
backend), relative errors by norm:
  decode   ``--steps`` pooled decode steps from a prefilled slot: the largest per-step output
           error, the last step's, and the final ssm state's;
  prefill  a sequence prefilled into its slot in ``--chunks`` chunks of ``--chunk`` tokens
           (scan with state_indices, the state stored in the pool's dtype between chunks): the
           largest per-chunk output error, the last chunk's, and the final ssm state's.

    python tools/state_dtype_accuracy.py --json acc.json                  # reference, CPU
    python tools/state_dtype_accuracy.py --backend triton --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json

import torch

import mamba3_kernels
from mamba3_kernels import Mamba3State
from mamba3_kernels.testing import random_inputs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _tokens(x, start: int, stop: int):
    return x.along_tokens(lambda t: t[:, start:stop], lambda t: t[:, :, start:stop])


def _pool(x, state_dtype) -> tuple[Mamba3State, torch.Tensor]:
    """A zero pool of one slot per batch row of ``x``, and the slots' indices."""
    B = x.q.shape[0]
    H, P = x.v.shape[2:]
    N, S, R = x.q.shape[-1], x.angles.shape[-1], x.q.shape[2] if x.q.dim() == 5 else 1
    pool = Mamba3State.zeros(B, H, P, N, S, rank=R, dtype=x.v.dtype, device=x.v.device,
                             state_dtype=state_dtype)  # fmt: skip
    return pool, torch.arange(B, dtype=torch.int32, device=x.v.device)


def decode_run(x, prefill: int, steps: int, state_dtype, backend: str):
    """Outputs of ``steps`` pooled steps after a prefill of ``prefill`` tokens, and the state."""
    pool, idx = _pool(x, state_dtype)
    mamba3_kernels.scan(*_tokens(x, 0, prefill)[:14], initial_state=pool, state_indices=idx,
                        backend=backend)  # fmt: skip
    outs = []
    for t in range(prefill, prefill + steps):
        xt = x.along_tokens(lambda u, t=t: u[:, t], lambda u, t=t: u[:, :, t])
        out, _ = mamba3_kernels.step(*xt[:9], pool, *xt[9:14], backend=backend,
                                     state_indices=idx)  # fmt: skip
        outs.append(out.float())
    return outs, pool.ssm.float()


def prefill_run(x, chunk: int, chunks: int, state_dtype, backend: str):
    """Per-chunk outputs of a prefill in ``chunks`` chunks through each sequence's slot."""
    pool, idx = _pool(x, state_dtype)
    outs = []
    for c in range(chunks):
        xc = _tokens(x, c * chunk, (c + 1) * chunk)
        out = mamba3_kernels.scan(*xc[:14], initial_state=pool, state_indices=idx,
                                  backend=backend)  # fmt: skip
        outs.append(out.float())
    return outs, pool.ssm.float()


def compare(runs: dict) -> dict:
    base_outs, base_state = runs["fp32"]
    table = {}
    for name, (outs, state) in runs.items():
        if name == "fp32":
            continue
        errs = [rel(o, b) for o, b in zip(outs, base_outs, strict=True)]
        table[name] = {"max_out": max(errs), "last_out": errs[-1], "state": rel(state, base_state)}
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="reference")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="inputs' dtype")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--nheads", type=int, default=4)
    ap.add_argument("--headdim", type=int, default=32)
    ap.add_argument("--d-state", type=int, default=64)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1024)
    ap.add_argument("--prefill", type=int, default=64, help="tokens before the decode steps")
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()

    g = torch.Generator().manual_seed(args.seed)
    length = max(args.prefill + args.steps, args.chunks * args.chunk)
    x = random_inputs(batch=args.batch, seqlen=length, nheads=args.nheads, headdim=args.headdim,
                      d_state=args.d_state, rank=args.rank, dtype=DTYPES[args.dtype],
                      generator=g)  # fmt: skip
    x = type(x)(*(t.to(args.device) if isinstance(t, torch.Tensor) else t for t in x))
    with torch.no_grad():
        decode = compare({n: decode_run(x, args.prefill, args.steps, d, args.backend)
                          for n, d in DTYPES.items()})  # fmt: skip
        prefill = compare({n: prefill_run(x, args.chunk, args.chunks, d, args.backend)
                           for n, d in DTYPES.items()})  # fmt: skip
    print(f"backend {args.backend} on {args.device}, inputs {args.dtype}, B={args.batch} "
          f"H={args.nheads} P={args.headdim} N={args.d_state} R={args.rank}; "
          "relative errors against an fp32 state")  # fmt: skip
    print(f"{'run':<34}{'state':<7}{'max out':>10}{'last out':>10}{'final ssm':>11}")
    runs = {f"decode, {args.steps} steps": decode,
            f"prefill, {args.chunks} x {args.chunk}-token chunks": prefill}  # fmt: skip
    for label, table in runs.items():
        for name, row in table.items():
            print(f"{label:<34}{name:<7}{row['max_out']:>10.2e}{row['last_out']:>10.2e}"
                  f"{row['state']:>11.2e}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "decode": decode, "prefill": prefill}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
