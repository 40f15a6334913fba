"""A decode server's loop on one Mamba-3 layer: a pool of state slots, continuous batching.

Requests of different prompt and answer lengths arrive over time. Each is prefilled with
``scan(..., return_final_state=True)`` and its final state copied into a free slot of one
preallocated pool; then every tick runs one batched ``step(..., state=pool,
state_indices=slots)`` over the live requests, padded to a fixed batch with index -1 (padding
rows touch no slot), so the step's shapes never change (what a CUDA graph needs). A finished
request frees its slot for the next one. At the end each request's decoded outputs are compared
with one ``scan`` over its whole sequence: they compute the same function, so the gap is
rounding. The layer's inputs are random (no model around it).

    python examples/serve.py                                  # CPU, backend "auto"
    python examples/serve.py --device cuda --backend triton --dtype bf16
"""

from __future__ import annotations

import argparse

import torch

import mamba3_kernels
from mamba3_kernels import Mamba3State
from mamba3_kernels.testing import random_inputs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _tokens(x, r: int, start: int, stop: int):
    """Request ``r``'s tokens [start, stop) as a batch of one (the layer's parameters shared)."""
    return x.along_tokens(lambda t: t[r : r + 1, start:stop], lambda t: t[r : r + 1, :, start:stop])


def _step_rows(x, rows: list[tuple[int, int]], batch: int):
    """Step inputs of (request, position) ``rows``, padded to ``batch`` rows with row 0's."""
    rows = rows + [rows[0]] * (batch - len(rows))
    req = torch.tensor([r for r, _ in rows], device=x.q.device)
    pos = torch.tensor([p for _, p in rows], device=x.q.device)
    return x.along_tokens(lambda t: t[req, pos], lambda t: t[req, :, pos])


def serve(args: argparse.Namespace) -> float:
    """Run the loop; returns the largest relative gap between decoded and one-scan outputs."""
    g = torch.Generator().manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    n_req, slots, batch = args.requests, args.slots, args.batch
    prompt = torch.randint(4, args.max_prompt + 1, (n_req,), generator=g).tolist()
    answer = torch.randint(1, args.max_answer + 1, (n_req,), generator=g).tolist()
    dims = dict(nheads=4, d_state=32, headdim=16, rank=args.mimo_rank, dtype=dtype)
    # Every request's tokens in one batch of inputs; the per-head parameters are the layer's.
    x = random_inputs(batch=n_req, seqlen=max(p + a for p, a in zip(prompt, answer, strict=True)),
                      generator=g, **dims)  # fmt: skip
    x = type(x)(*(t.to(args.device) if isinstance(t, torch.Tensor) else t for t in x))
    pool = Mamba3State.zeros(slots, 4, 16, 32, 8, rank=args.mimo_rank, dtype=dtype,
                             device=args.device, state_dtype=DTYPES[args.state_dtype])  # fmt: skip
    free = list(range(slots))
    waiting = list(range(n_req))
    live: dict[int, tuple[int, int]] = {}  # request -> (slot, next position)
    decoded: dict[int, list[torch.Tensor]] = {r: [] for r in range(n_req)}
    ticks = 0
    with torch.no_grad():
        while waiting or live:
            # Admit one request per tick while a slot and a batch row are free (arrivals).
            if waiting and free and len(live) < batch:
                r = waiting.pop(0)
                slot = free.pop(0)
                xp = _tokens(x, r, 0, prompt[r])
                _, final = mamba3_kernels.scan(
                    *xp[:14], return_final_state=True, backend=args.backend
                )
                for dst, src in zip(pool, final, strict=True):
                    dst[slot].copy_(src[0])
                live[r] = (slot, prompt[r])
            if not live:
                continue
            order = sorted(live)
            xs = _step_rows(x, [(r, live[r][1]) for r in order], batch)
            idx = torch.full((batch,), -1, dtype=torch.int32)
            idx[: len(order)] = torch.tensor([live[r][0] for r in order], dtype=torch.int32)
            out, _ = mamba3_kernels.step(
                *xs[:9], pool, *xs[9:14], backend=args.backend,
                state_indices=idx.to(args.device),
            )  # fmt: skip
            ticks += 1
            for row, r in enumerate(order):
                slot, pos = live[r]
                decoded[r].append(out[row])
                if pos + 1 == prompt[r] + answer[r]:
                    del live[r]
                    free.append(slot)
                else:
                    live[r] = (slot, pos + 1)
        worst = 0.0
        for r in range(n_req):
            full = mamba3_kernels.scan(
                *_tokens(x, r, 0, prompt[r] + answer[r])[:14], backend=args.backend
            )[0, prompt[r] :].float()
            got = torch.stack(decoded[r]).float()
            worst = max(worst, ((got - full).norm() / full.norm()).item())
    print(
        f"{n_req} requests (prompts {min(prompt)}-{max(prompt)}, answers {min(answer)}-"
        f"{max(answer)} tokens) through {slots} slots in {ticks} batched steps of {batch} rows; "
        f"largest relative gap to one scan per request: {worst:.2e}"
    )
    return worst


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--slots", type=int, default=3, help="state slots in the pool")
    ap.add_argument("--batch", type=int, default=4, help="rows of every step (>= live requests)")
    ap.add_argument("--max-prompt", type=int, default=24)
    ap.add_argument("--max-answer", type=int, default=8)
    ap.add_argument("--mimo-rank", type=int, default=1)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--state-dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


if __name__ == "__main__":
    serve(parse_args())
