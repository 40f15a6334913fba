"""triton_impl.parallel_compile: a first call's kernels compile side by side, through Triton's
JIT (``warmup``) with the specializations of the real launches.

Without a GPU, Triton's JIT runs with a stand-in driver that reports an sm_90 target
(tools/jit_standin.py: the JIT only asks it for the target, device and stream when it
compiles; nothing is launched), in a
subprocess with the interpreter off and a fresh kernel cache: the forward's launch plan and one
dry run of the backward compile their kernels, on more than one thread, and a second pass
compiles nothing new.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from mamba3_kernels.triton_impl import parallel_compile as pc

from mamba3_kernels.testing import run_compiled

_BENCH = str(Path(__file__).resolve().parents[1] / "tools")
_SCRIPT = f"BENCH = {_BENCH!r}\n" + textwrap.dedent(
    """
    import dataclasses
    import sys
    import threading
    import torch
    import triton
    import triton.compiler

    sys.path.insert(0, BENCH)
    import jit_standin

    jit_standin.install()
    compiled = []  # (kernel name, thread) of every compile the JIT makes
    real_compile = triton.compiler.compile

    def recording_compile(src, *args, **kwargs):
        compiled.append((src.fn.__name__, threading.get_ident()))
        return real_compile(src, *args, **kwargs)

    triton.compiler.compile = recording_compile

    from mamba3_kernels import validate
    from mamba3_kernels.testing import random_inputs
    from mamba3_kernels.triton_impl import chunk_bwd as cb, chunk_fwd as cf, parallel_compile as pc

    assert pc.available()
    g = torch.Generator().manual_seed(0)
    x = random_inputs(batch=1, seqlen=256 + 32, nheads=2, d_state=64, headdim=32,
                      dtype=torch.bfloat16, generator=g)
    problem, inputs = validate.validate_scan(*x[:9], x.D, x.z, x.mimo_v, x.mimo_z, x.mimo_o,
                                             None, False)

    # Forward: the launch plan's kernels, from the call's argument table.
    config = cf.default_config(problem)
    plan = cf._plan(problem, inputs, config, False)
    out = inputs.v.new_empty(plan.out_shape)
    ws = inputs.v.new_empty((plan.ws_bytes,), dtype=torch.uint8) if plan.ws_bytes else None
    table = cf._tensor_table(plan, tuple(inputs[:14]), None, None, out, None, ws, None)
    pc.compile_launches(plan.launches, table)
    names = sorted({n for n, _ in compiled})
    want = sorted(ln.kernel.fn.__name__ for ln in plan.launches)
    assert names == want, (names, want)
    print("fwd", len(compiled), len({t for _, t in compiled}))
    assert all(ln.tried for ln in plan.launches)
    pc.compile_launches(plan.launches, table)  # tried once: nothing more
    n_fwd = len(compiled)
    assert n_fwd == len(want)

    # Backward: one dry run compiles every kernel the backward launches (its core backward over
    # segments of 128 tokens: the segment kernels too).
    grad_out = torch.randn_like(out)
    bcfg = dataclasses.replace(cb.default_config(problem), segment=128)
    with pc.compile_only():
        cb._chunk_bwd(problem, inputs, grad_out, None, bcfg)
    bwd = compiled[n_fwd:]
    print("bwd", sorted({n for n, _ in bwd}), len({t for _, t in bwd}))
    with pc.compile_only():  # the same specializations: every kernel found in the JIT's cache
        cb._chunk_bwd(problem, inputs, grad_out, None, bcfg)
    assert len(compiled) == n_fwd + len(bwd), compiled[n_fwd + len(bwd):]
    print("again", 0)
    """
)


def test_first_call_kernels_compile_side_by_side(tmp_path):
    env = {"TRITON_CACHE_DIR": str(tmp_path / "cache"), pc.ENV_SERIAL: "0"}
    out = run_compiled(_SCRIPT, timeout=600, env=env)
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    fwd_compiles, fwd_threads = map(int, lines["fwd"].split())
    assert fwd_compiles == 3 and fwd_threads >= 2, lines["fwd"]
    bwd_names, bwd_threads = lines["bwd"].rsplit(" ", 1)
    for name in ("_rot_fwd_kernel", "_rot_bwd_kernel", "_angle_fwd_kernel", "_angle_bwd_kernel",
                 "_core_bwd_kernel", "_contrib_kernel", "_pass_kernel"):  # fmt: skip
        assert name in bwd_names, bwd_names
    assert int(bwd_threads) >= 2
    assert lines["again"] == "0"


def test_compile_only_refuses_the_interpreter():
    if pc.available():
        pytest.skip("runs where the interpreter is on (CPU CI)")
    with pytest.raises(RuntimeError, match="compile_only needs"):
        with pc.compile_only():
            pass


def test_run_kernel_launches_outside_compile_only():
    # Under the interpreter run_kernel is kernel[grid](...): the backward's kernels still run
    # (the interpreter suites check their values); here one tiny launch writes its output.
    import triton
    import triton.language as tl

    @triton.jit
    def _fill(out_ptr, value, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out_ptr + i, tl.zeros((N,), dtype=tl.float32) + value)

    if pc.available():
        pytest.skip("launches on a GPU only; the interpreter suites cover CPU")
    out = torch.zeros(16)
    pc.run_kernel(_fill, (1,), out, 2.5, N=16)
    assert torch.equal(out, torch.full((16,), 2.5))


def test_serial_compile_switch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(pc.ENV_SERIAL, "1")
    assert not pc.available()
    monkeypatch.setenv(pc.ENV_SERIAL, "0")
    assert pc.available() == hasattr(__import__("triton"), "AsyncCompileMode")


def test_first_call_compile_script_runs(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "fc.json"
    cmd = [sys.executable, str(root / "tools" / "first_call_compile.py"), "--shape",
           "1,64,2,64,32", "--json", str(out)]  # fmt: skip
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=root, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    rows = json.loads(out.read_text())["seconds"]
    assert set(rows) == {f"{k} ({m})" for k in ("fwd_s", "bwd_s") for m in ("serial", "parallel")}
    assert all(v[0] > 0 for v in rows.values())
