"""``python -m mamba3_kernels.demo``: a small Mamba-3 layer through every backend that runs here.

Builds SISO and MIMO layers, runs a prefill with an inference cache and then decode steps through
each available backend, and cross-checks the outputs against the reference backend (same weights,
float64 on CPU) in a table. On a CPU-only machine the Triton kernels run under Triton's interpreter
at a tiny size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import mamba3_kernels
from mamba3_kernels.nn import Mamba3
from mamba3_kernels.testing import rel_err


def _run_layer(layer: Mamba3, prompt: torch.Tensor, tokens: torch.Tensor, backend: str):
    """Prefill ``prompt`` (B, L, d) then decode ``tokens`` (B, k, d) one by one; returns the
    prefill output, the stacked decode outputs and the wall time of each phase in ms."""
    layer.backend = backend
    cache = layer.allocate_inference_cache(prompt.shape[0])
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        pre = layer(prompt, cache=cache)
        sync()
        t1 = time.perf_counter()
        steps = [layer.step(tokens[:, i], cache) for i in range(tokens.shape[1])]
        sync()
    t2 = time.perf_counter()
    dec = torch.stack([s.reshape(s.shape[0], -1) for s in steps], dim=1)
    return pre, dec, (t1 - t0) * 1e3, (t2 - t1) * 1e3 / max(tokens.shape[1], 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=None, help="prompt length")
    parser.add_argument("--steps", type=int, default=4, help="decode steps after the prompt")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels first load
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    # Sizes the Triton kernels accept: model-like on a GPU, tiny under the interpreter.
    if cuda:
        sizes = dict(d_model=512, d_state=128, headdim=64)
        seqlen = args.seqlen or 1024
    else:
        sizes = dict(d_model=16, d_state=16, headdim=16)
        seqlen = args.seqlen or 24
    backends = [n for n, row in mamba3_kernels.info()["backends"].items() if row["available"]]
    print(f"device={device} dtype={str(dtype).replace('torch.', '')} seqlen={seqlen} "
          f"steps={args.steps} backends={backends}")  # fmt: skip
    header = f"{'layer':<10} {'backend':<10} {'prefill err':>12} {'decode err':>12} "
    header += f"{'prefill ms':>11} {'step ms':>9} result"
    print(header)
    failures = 0
    for label, rank in (("SISO", 1), ("MIMO R=4", 4)):
        torch.manual_seed(0)
        layer = Mamba3(**sizes, expand=2, mimo_rank=rank, device=device, dtype=dtype)
        prompt = torch.randn(2, seqlen, sizes["d_model"], device=device, dtype=dtype)
        tokens = torch.randn(2, args.steps, sizes["d_model"], device=device, dtype=dtype)
        # The truth: the reference backend on a float64 copy of the same layer.
        truth = Mamba3(**sizes, expand=2, mimo_rank=rank, dtype=torch.float64)
        truth.load_state_dict({k: v.double().cpu() for k, v in layer.state_dict().items()})
        ref_pre, ref_dec, _, _ = _run_layer(truth, prompt.double().cpu(), tokens.double().cpu(),
                                            "reference")  # fmt: skip
        tol = 2e-2 if dtype != torch.float32 else 1e-4
        for name in backends:
            try:
                pre, dec, pre_ms, step_ms = _run_layer(layer, prompt, tokens, name)
            except ValueError as err:  # the backend does not support this layer here
                print(f"{label:<10} {name:<10} {'n/a':>12} {'n/a':>12} {'':>11} {'':>9} {err}")
                continue
            e_pre, e_dec = rel_err(pre, ref_pre), rel_err(dec, ref_dec)
            ok = e_pre < tol and e_dec < tol
            failures += not ok
            print(f"{label:<10} {name:<10} {e_pre:>12.2e} {e_dec:>12.2e} {pre_ms:>11.2f} "
                  f"{step_ms:>9.3f} {'pass' if ok else 'FAIL'}")  # fmt: skip
    print("all backends agree with the reference" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
