"""A serving loop over a tiny (untrained) Mamba-3 language model: one state pool, continuous
batching.

Requests with different prompt lengths arrive at different ticks. Each tick admits arrivals into
free slots of every layer's pooled cache (``allocate_inference_cache(slots)``, slots zeroed with
``reset_slots``), prefills each admitted request by one chunk of its prompt (``forward(...,
state_indices=[slot])``: the chunk continues the slot and leaves its state there), and runs one
decode step for all decoding requests at once, padded to the maximum batch with slot -1 (padding
rows touch no slot, so the step's shapes never change). A finished request frees its slot. At
the end every request is generated again alone (one prefill, then steps) and its tokens are
compared with the served ones; tokens per second are printed.

    python examples/serve.py                                  # CPU, backend "auto"
    python examples/serve.py --device cuda --backend triton --dtype bf16 --requests 32
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from mamba3_kernels.nn import Mamba3

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TinyLM(nn.Module):
    """Embedding, ``n_layers`` residual Mamba-3 layers, a norm and an output head."""

    def __init__(self, vocab: int, d_model: int, n_layers: int, **layer_kwargs):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.layers = nn.ModuleList(Mamba3(d_model, **layer_kwargs) for _ in range(n_layers))
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def prefill(self, tokens: torch.Tensor, caches, slots: torch.Tensor) -> torch.Tensor:
        """tokens (n, L) continuing slots ``slots`` (n,) -> logits of the last position (n, V)."""
        h = self.embed(tokens)
        for layer, cache in zip(self.layers, caches, strict=True):
            h = h + layer(h, cache=cache, state_indices=slots)
        return self.head(self.norm(h[:, -1]))

    def decode(self, tokens: torch.Tensor, caches, slots: torch.Tensor) -> torch.Tensor:
        """tokens (B,) on slots (B,) (-1: padding) -> next-token logits (B, V)."""
        h = self.embed(tokens)[:, None]
        for layer, cache in zip(self.layers, caches, strict=True):
            h = h + layer.step(h, cache, state_indices=slots)
        return self.head(self.norm(h[:, 0]))


@dataclass
class Request:
    prompt: list[int]
    max_new: int
    arrival: int
    slot: int = -1
    done_prompt: int = 0  # prompt tokens prefilled so far
    out: list[int] = field(default_factory=list)


def make_requests(args: argparse.Namespace, g: torch.Generator) -> list[Request]:
    reqs = []
    for i in range(args.requests):
        n = int(torch.randint(2, args.max_prompt + 1, (), generator=g))
        prompt = torch.randint(0, args.vocab, (n,), generator=g).tolist()
        new = int(torch.randint(1, args.max_new + 1, (), generator=g))
        reqs.append(Request(prompt, new, arrival=i * args.arrival_gap))
    return reqs


def serve(model: TinyLM, reqs: list[Request], args: argparse.Namespace) -> int:
    """Run the loop until every request is done; returns the number of ticks."""
    dev = args.device
    caches = [layer.allocate_inference_cache(args.slots, state_dtype=DTYPES[args.state_dtype])
              for layer in model.layers]  # fmt: skip
    free = list(range(args.slots))
    waiting = sorted(reqs, key=lambda r: r.arrival)
    prefilling: list[Request] = []
    decoding: list[Request] = []
    tick = 0
    while waiting or prefilling or decoding:
        while waiting and waiting[0].arrival <= tick and free and (
            len(prefilling) + len(decoding) < args.batch
        ):  # fmt: skip
            r = waiting.pop(0)
            r.slot = free.pop(0)
            for cache in caches:
                cache.reset_slots(torch.tensor([r.slot], device=dev))
            prefilling.append(r)
        for r in list(prefilling):  # one prompt chunk each
            chunk = r.prompt[r.done_prompt : r.done_prompt + args.chunk]
            logits = model.prefill(torch.tensor([chunk], device=dev), caches,
                                   torch.tensor([r.slot], device=dev))  # fmt: skip
            r.done_prompt += len(chunk)
            if r.done_prompt == len(r.prompt):
                r.out.append(int(logits[0].argmax()))
                prefilling.remove(r)
                decoding.append(r)
        active = [r for r in decoding if len(r.out) < r.max_new]
        if active:
            pad = args.batch - len(active)
            tokens = torch.tensor([r.out[-1] for r in active] + [0] * pad, device=dev)
            slots = torch.tensor([r.slot for r in active] + [-1] * pad, dtype=torch.int32,
                                 device=dev)  # fmt: skip
            nxt = model.decode(tokens, caches, slots).argmax(-1).tolist()
            for r, t in zip(active, nxt, strict=False):
                r.out.append(t)
        for r in [r for r in decoding if len(r.out) >= r.max_new]:
            decoding.remove(r)
            free.append(r.slot)
        tick += 1
    return tick


def generate_alone(model: TinyLM, req: Request, args: argparse.Namespace) -> list[int]:
    """The same request with a cache of its own: one prefill of the prompt, then steps."""
    caches = [layer.allocate_inference_cache(1, state_dtype=DTYPES[args.state_dtype])
              for layer in model.layers]  # fmt: skip
    slot = torch.zeros(1, dtype=torch.int32, device=args.device)
    out = [int(model.prefill(torch.tensor([req.prompt], device=args.device), caches,
                             slot)[0].argmax())]  # fmt: skip
    while len(out) < req.max_new:
        out.append(int(model.decode(torch.tensor(out[-1:], device=args.device), caches,
                                    slot)[0].argmax()))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    """Serve, check against requests run alone; returns the number of mismatching requests."""
    args = parse_args(argv)
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = TinyLM(args.vocab, 64, args.layers, d_state=32, headdim=16,
                   mimo_rank=args.mimo_rank, backend=args.backend)  # fmt: skip
    model = model.to(args.device, DTYPES[args.dtype]).eval()
    reqs = make_requests(args, g)
    with torch.no_grad():
        start = time.perf_counter()
        ticks = serve(model, reqs, args)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        tokens = sum(len(r.prompt) + len(r.out) for r in reqs)
        mismatches = sum(generate_alone(model, r, args) != r.out for r in reqs)
    print(f"{len(reqs)} requests, {args.slots} slots, decode batch {args.batch}, {ticks} ticks: "
          f"{tokens} tokens (prompt and generated) in {seconds:.2f} s, "
          f"{tokens / seconds:.0f} tokens/s")  # fmt: skip
    print(f"requests whose tokens differ from the same request run alone: {mismatches}")
    return mismatches


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--slots", type=int, default=4, help="state slots in each layer's pool")
    ap.add_argument("--batch", type=int, default=4, help="decode rows per step (padded)")
    ap.add_argument("--chunk", type=int, default=8, help="prompt tokens per prefill chunk")
    ap.add_argument("--max-prompt", type=int, default=24)
    ap.add_argument("--max-new", type=int, default=8)
    ap.add_argument("--arrival-gap", type=int, default=2, help="ticks between arrivals")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--mimo-rank", type=int, default=1)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--state-dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(1 if main() else 0)
