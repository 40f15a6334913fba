"""Time a first call's kernel compiles, side by side (the default) and one after the other
(``MAMBA3_KERNELS_SERIAL_COMPILE=1``), each in a fresh process with an empty Triton cache.

On a CUDA machine the child process times its first SISO fwd+bwd call through
``mamba3_kernels.scan(..., backend="triton")`` (compiles plus one run), then the same call again
(the run alone). Without a GPU it compiles for sm_90 through Triton's JIT with a stand-in driver
(tools/jit_standin.py): the forward's launch plan (``compile_launches``) and one dry run of the
backward (``compile_only``), serially or side by side; nothing is run.

    python tools/first_call_compile.py [--shape B,L,H,N,P] [--repeats 1] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(shape: tuple[int, ...], serial: bool) -> dict:
    """Runs in the fresh process: {'first_s', 'again_s'} (GPU) or {'fwd_s', 'bwd_s'} (no GPU)."""
    import torch

    B, L, H, N, P = shape
    gpu = torch.cuda.is_available()
    if not gpu:
        sys.path.insert(0, str(HERE))
        import jit_standin

        jit_standin.install()
    from mamba3_kernels.triton_impl import chunk_bwd as cb
    from mamba3_kernels.triton_impl import chunk_fwd as cf
    from mamba3_kernels.triton_impl import launch as tlaunch

    import mamba3_kernels
    from mamba3_kernels import validate
    from mamba3_kernels.testing import random_inputs

    x = random_inputs(batch=B, seqlen=L, nheads=H, d_state=N, headdim=P, n_angles=N // 4,
                      dtype=torch.bfloat16, device="cuda" if gpu else "cpu")  # fmt: skip
    if gpu:
        leaves = [t.requires_grad_() if t is not None else None for t in x[:14]]

        def call() -> float:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            mamba3_kernels.scan(*leaves, backend="triton").float().sum().backward()
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        return {"first_s": call(), "again_s": call()}
    problem, inputs = validate.validate_scan(*x[:9], x.D, x.z, x.mimo_v, x.mimo_z, x.mimo_o,
                                             None, False)  # fmt: skip
    config = cf.default_config(problem)
    plan = cf._plan(problem, inputs, config, False)
    out = inputs.v.new_empty(plan.out_shape)
    ws = inputs.v.new_empty((plan.ws_bytes,), dtype=torch.uint8) if plan.ws_bytes else None
    table = cf._tensor_table(plan, tuple(inputs[:14]), None, None, out, None, ws, None)
    # Both modes through launch.py's side-by-side compiles (one worker: one kernel after the other).
    os.environ[tlaunch.ENV_SERIAL] = "0"
    workers = 1 if serial else None
    t0 = time.perf_counter()
    tlaunch.compile_launches(plan.launches, table, workers)
    fwd_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with tlaunch.compile_only(workers or 8):
        cb._chunk_bwd(problem, inputs, torch.randn_like(out), None, cb.default_config(problem))
    return {"fwd_s": fwd_s, "bwd_s": time.perf_counter() - t0}


def measure(shape: tuple[int, ...], serial: bool) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TRITON_CACHE_DIR": cache, "TRITON_INTERPRET": "0",
               "MAMBA3_KERNELS_SERIAL_COMPILE": "1" if serial else "0"}  # fmt: skip
        cmd = [sys.executable, __file__, "--child", ",".join(map(str, shape))]
        if serial:
            cmd.append("--serial")
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-3000:])
        return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1,2048,64,128,64", help="B,L,H,N,P (SISO, bf16)")
    ap.add_argument("--repeats", type=int, default=1, help="fresh processes per mode")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--serial", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(tuple(int(v) for v in a.child.split(",")), a.serial)))
        return
    shape = tuple(int(v) for v in a.shape.split(","))
    rows = {}
    for _ in range(a.repeats):
        for serial in (True, False):
            for k, v in measure(shape, serial).items():
                rows.setdefault(f"{k} ({'serial' if serial else 'parallel'})", []).append(v)
    print(f"{'what':24} {'seconds (each fresh process)':>30}")
    for k, v in rows.items():
        print(f"{k:24} {' '.join(f'{s:7.2f}' for s in v):>30}")
    if a.json:
        import torch
        import triton

        out = {"date": datetime.date.today().isoformat(), "shape_BLHNP": shape,
               "cpus": os.cpu_count(), "torch": torch.__version__, "triton": triton.__version__,
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               "seconds": rows}  # fmt: skip
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
