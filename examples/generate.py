"""Greedy generation with a tiny (untrained) Mamba-3 language model.

Builds embedding -> Mamba3 layer -> head, prefills a random prompt through ``scan`` while filling
the layer's inference cache, then decodes a few tokens one at a time through ``step``. At the end
it re-runs the whole generated sequence in one prefill and prints how far the step-by-step logits
are from it (they compute the same function, so the gap is rounding).

    python examples/generate.py                      # SISO, CPU, backend "auto"
    python examples/generate.py --mimo-rank 2 --device cuda --backend triton
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from mamba3_kernels.nn import Mamba3, Mamba3Cache


class TinyLM(nn.Module):
    """One Mamba-3 layer between an embedding and an output head."""

    def __init__(self, vocab: int, d_model: int, **layer_kwargs):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.mixer = Mamba3(d_model, **layer_kwargs)
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h))

    def forward(self, tokens: torch.Tensor, cache: Mamba3Cache | None = None) -> torch.Tensor:
        """tokens (B, L) -> logits (B, L, vocab); fills ``cache`` when given."""
        h = self.embed(tokens)
        return self.logits(h + self.mixer(h, cache=cache))

    def decode(self, tokens: torch.Tensor, cache: Mamba3Cache) -> torch.Tensor:
        """tokens (B,) -> logits (B, vocab) of the next position, advancing ``cache``."""
        h = self.embed(tokens)[:, None]
        return self.logits(h + self.mixer.step(h, cache))[:, 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--mimo-rank", type=int, default=1)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    vocab = 128
    model = TinyLM(
        vocab,
        d_model=64,
        d_state=32,
        headdim=16,
        mimo_rank=args.mimo_rank,
        backend=args.backend,
    ).to(args.device)
    model.eval()
    mixer = model.mixer
    print(f"layer: {mixer.extra_repr()}")

    prompt = torch.randint(0, vocab, (args.batch, args.prompt_len), device=args.device)
    with torch.no_grad():
        cache = mixer.allocate_inference_cache(args.batch)
        logits = model(prompt, cache=cache)[:, -1]  # prefill: scan, final state into the cache
        step_logits, generated = [], [prompt]
        for _ in range(args.new_tokens):
            nxt = logits.argmax(-1)
            generated.append(nxt[:, None])
            logits = model.decode(nxt, cache)  # decode: step, state updated in place
            step_logits.append(logits)
        tokens = torch.cat(generated, dim=1)

        # The same sequence in one prefill: the logits after each generated token must agree.
        full = model(tokens)[:, args.prompt_len :]
        gap = (torch.stack(step_logits, dim=1) - full).abs().max().item()

    for b in range(args.batch):
        new = tokens[b, args.prompt_len :].tolist()
        print(f"sequence {b}: prompt of {args.prompt_len} tokens, generated {new}")
    print(f"cache now holds {cache.seqlen_offset} tokens per sequence")
    print(f"max |decode logits - one-prefill logits| = {gap:.2e}")
    if not gap < 1e-3:
        raise SystemExit("decode and prefill disagree")


if __name__ == "__main__":
    main()
