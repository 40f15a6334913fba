"""Benchmark of the Triton decode step (SISO and MIMO) on a CUDA GPU.

For each case and batch: a correctness check against the float64 reference, then
  kernel_ms    do_bench median of one launch (L2 flushed before each call: a cold state),
  loop_ms      per-call wall time of back-to-back eager launches (host overhead included),
  api_loop_ms  the same through ``mamba3_kernels.step(..., backend="triton")``,
  graph_ms     do_bench median of a CUDA-graph replay of one step (L2 flushed),
  graph_rot_ms per-step time of a graph of steps over distinct states (cold: the realistic one),
  graph_hot_ms per-step time of a graph of consecutive steps on the same state (L2-warm),
  host_us      host time per launcher call (the GPU kept busy, so calls only enqueue),
  api_host_us  the same through ``mamba3_kernels.step``,
  variants     kernel, graph and rotated-graph times with the state prefetch flipped,
and the floor: the fp32 state read and written once at the measured copy rate. ``--sweep``
times every valid config of the kernel's search space by graph replay.

    python tools/bench_triton_step.py --batches 1 16 128 --json results.json [--sweep]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time

import torch
import triton
import triton.testing
from mamba3_kernels.triton_impl import launch as tlaunch
from mamba3_kernels.triton_impl import step as tstep

from mamba3_kernels.problem import Problem
from mamba3_kernels.reference import reference_step
from mamba3_kernels.testing import cast_inputs, random_inputs, rel_err

CASES = {
    "siso_bf16": dict(rank=1, mimo=False, rotary="interleaved"),
    "mimo4_bf16": dict(rank=4, mimo=True, rotary="halves"),
}
SHAPE = dict(nheads=64, ngroups=1, d_state=128, headdim=64, n_angles=32)


def make_problem(inputs, rotary: str) -> Problem:
    q, v = inputs.q, inputs.v
    mimo = q.dim() == 4
    bsz, nheads, headdim = v.shape
    return Problem(
        batch=bsz, seqlen=1, nheads=nheads, ngroups=q.shape[-2],
        rank=q.shape[1] if mimo else 1, d_state=q.shape[-1], headdim=headdim,
        n_angles=inputs.angles.shape[-1], nseq=bsz, dtype=v.dtype, device_type=v.device.type,
        mimo=mimo, rotary=rotary, has_D=inputs.D is not None, has_z=inputs.z is not None,
        has_mimo_o=inputs.mimo_o is not None, has_initial_state=True, return_final_state=True,
        varlen=False, decode=True,
    )  # fmt: skip


def copy_gbps() -> float:
    """Device-to-device copy rate, bytes read plus written, GB/s."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 4 / ms / 1e6


def loop_ms(fn, calls: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    best = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best.append((time.perf_counter() - t0) / calls * 1e3)
    return sorted(best)[1]


def host_us(fn, calls: int = 200) -> float:
    """Host time per call in microseconds: the GPU is kept busy by a sleep kernel first, so the
    calls only enqueue and the wall time is the launcher's own (Python + driver) cost."""
    fn()
    torch.cuda.synchronize()
    best = []
    for _ in range(3):
        torch.cuda._sleep(100_000_000)  # ~60 ms of GPU time, longer than the calls take
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return min(best)


def capture(fn, n: int = 1) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    torch.cuda.synchronize()
    return graph


def graph_ms(step_fn, hot_steps: int = 20, rep: int = 100) -> tuple[float, float]:
    g1 = capture(step_fn)
    cold = triton.testing.do_bench(g1.replay, warmup=10, rep=rep, return_mode="median")
    gn = capture(step_fn, hot_steps)
    hot = loop_ms(gn.replay, calls=20) / hot_steps
    return cold, hot


def graph_rotated_ms(problem, inputs, cfg) -> tuple[float, int]:
    """Per-step time of a graph of steps over n distinct states, n * state >= 3 L2 sizes: each
    step finds its state in DRAM, as in a model whose layers each carry their own state."""
    ssm_bytes = inputs.initial_state.ssm.numel() * 4
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    n = max(2, min(64, -(-3 * l2 // ssm_bytes)))
    states = [inputs.initial_state.clone() for _ in range(n)]
    outs = [torch.empty(tstep.output_shape(problem), device="cuda", dtype=inputs.v.dtype)]
    outs = outs * n

    def steps():
        for st, o in zip(states, outs, strict=True):
            tstep.step(problem, inputs, st, cfg, out=o)

    g = capture(steps)
    return triton.testing.do_bench(g.replay, return_mode="median") / n, n


def one(case: str, batch: int, sweep: bool, gbps: float) -> dict:
    spec = CASES[case]
    gen = torch.Generator().manual_seed(batch)
    inputs = random_inputs(
        batch=batch, dtype=torch.bfloat16, device="cuda", step=True, generator=gen,
        rank=spec["rank"], mimo=spec["mimo"], **SHAPE,
    )  # fmt: skip
    rotary = spec["rotary"]
    problem = make_problem(inputs, rotary)
    cfg = tstep.SPEC.default(problem)
    state = inputs.initial_state.clone()

    truth = cast_inputs(inputs, torch.float64)
    ref_out, ref_state = reference_step(truth, truth.initial_state, rotary)
    out = torch.full(tstep.output_shape(problem), float("nan"), device="cuda", dtype=torch.bfloat16)
    tstep.step(problem, inputs, inputs.initial_state.clone(), cfg, out=out)  # compiles
    out.fill_(float("nan"))
    tstep.step(problem, inputs, state, cfg, out=out)  # the cached launch path is the one checked
    torch.cuda.synchronize()
    err = {
        "out": rel_err(out, ref_out),
        "ssm": rel_err(state.ssm, ref_state.ssm),
        "angle": rel_err(state.angle, ref_state.angle),
        "k": rel_err(state.k, ref_state.k),
        "v": rel_err(state.v, ref_state.v),
    }
    ok = err["out"] < 2e-2 and err["ssm"] < 1e-4 and err["angle"] < 1e-5 and err["k"] < 2e-2

    def run(c=cfg):
        return tstep.step(problem, inputs, state, c, out=out)

    ssm_bytes = 2 * state.ssm.numel() * 4
    res = {
        "case": case, "batch": batch, **SHAPE, "rank": spec["rank"], "dtype": "bfloat16",
        "config": cfg.__dict__, "rel_err": err, "correct": ok,
        "floor_ms": ssm_bytes / gbps / 1e6, "state_bytes_rw": ssm_bytes,
    }  # fmt: skip
    res["kernel_ms"] = triton.testing.do_bench(run, return_mode="median")
    res["loop_ms"] = loop_ms(run)
    res["graph_ms"], res["graph_hot_ms"] = graph_ms(run)
    res["graph_rot_ms"], res["rotated_states"] = graph_rotated_ms(problem, inputs, cfg)
    res["achieved_gbps"] = ssm_bytes / res["graph_rot_ms"] / 1e6
    res["host_us"] = host_us(run)
    # The config's state prefetch flipped, timed with the rest as default.
    flipped = dataclasses.replace(cfg, prefetch=1 - cfg.prefetch)
    res["prefetch"] = cfg.prefetch
    alt = {"switch": "prefetch", "value": flipped.prefetch}
    alt["graph_rot_ms"] = graph_rotated_ms(problem, inputs, flipped)[0]
    alt["graph_ms"] = graph_ms(lambda: run(flipped))[0]
    alt["kernel_ms"] = triton.testing.do_bench(lambda: run(flipped), return_mode="median")
    res["variants"] = [alt]
    try:
        import mamba3_kernels

        args = (inputs.q, inputs.k, inputs.v, inputs.adt, inputs.dt, inputs.trap)
        args += (inputs.q_bias, inputs.k_bias, inputs.angles, state)
        kw = dict(D=inputs.D, z=inputs.z, mimo_v=inputs.mimo_v, mimo_z=inputs.mimo_z)
        kw.update(mimo_o=inputs.mimo_o, rotary=rotary, backend="triton")
        res["api_loop_ms"] = loop_ms(lambda: mamba3_kernels.step(*args, **kw))
        res["api_host_us"] = host_us(lambda: mamba3_kernels.step(*args, **kw))
        res["api_kernel_ms"] = triton.testing.do_bench(
            lambda: mamba3_kernels.step(*args, **kw), return_mode="median"
        )
    except Exception as e:  # the public API is optional for this benchmark
        res["api_error"] = f"{type(e).__name__}: {e}"[:300]
    if sweep:
        rows = []
        space = tstep.SPEC.space(problem)
        for bp, nw, ns, sp, pf in itertools.product(
            space["block_p"], space["num_warps"], (1, 2), space["split_p"], space["prefetch"]
        ):
            # deeper pipelining: no loads to overlap beyond 2 tiles (and split heads have few)
            c = tstep.StepConfig(block_p=bp, num_warps=nw, num_stages=ns, split_p=sp, prefetch=pf)
            if (ns > 1 and sp > 1) or tstep.SPEC.constraint(problem, c, {}) is not None:
                continue
            cold, hot = graph_ms(lambda c=c: run(c), hot_steps=10, rep=40)
            rows.append({**c.__dict__, "graph_ms": cold, "graph_hot_ms": hot})
        rows.sort(key=lambda r: r["graph_ms"])
        res["sweep"] = rows
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 128])
    ap.add_argument("--cases", nargs="+", default=list(CASES))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gbps = copy_gbps()
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_gbps": gbps,
        "direct_launch": None,
        "runs": [],
    }
    for case in args.cases:
        for b in args.batches:
            r = one(case, b, args.sweep, gbps)
            results["runs"].append(r)
            results["direct_launch"] = tlaunch._ENABLED[0]
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
    print(f"{results['device']}  copy {gbps:.0f} GB/s  direct launch {results['direct_launch']}")
    print("times in us; floor = fp32 state read + written once at the copy rate")
    hdr = "case        B  correct floor kernel graph g_rot g_hot  loop  api_loop  host api_host"
    hdr += "  kernel/g_rot per variant (prefetch flipped)  best_sweep"
    print(hdr)
    for r in results["runs"]:
        best = r["sweep"][0] if r.get("sweep") else None
        bs = "-"
        if best:
            bs = f"{best['graph_ms'] * 1e3:.1f} {best['block_p']}/{best['num_warps']}/"
            bs += f"{best['num_stages']}/{best['split_p']}"
        api = f"{r['api_loop_ms'] * 1e3:.1f}" if "api_loop_ms" in r else "n/a"
        print(
            f"{r['case']:<11}{r['batch']:>4}  {str(r['correct']):<6}{r['floor_ms'] * 1e3:6.1f}"
            f"{r['kernel_ms'] * 1e3:7.1f}{r['graph_ms'] * 1e3:6.1f}{r['graph_rot_ms'] * 1e3:6.1f}"
            f"{r['graph_hot_ms'] * 1e3:6.1f}"
            f"{r['loop_ms'] * 1e3:6.1f}  {api:>8}  {r['host_us']:5.1f}"
            f" {r.get('api_host_us', 0):6.1f}"
            + "  "
            + " ".join(
                f"{v['kernel_ms'] * 1e3:.1f}/{v['graph_rot_ms'] * 1e3:.1f}" for v in r["variants"]
            )
            + f"  {bs}"
        )


if __name__ == "__main__":
    main()
