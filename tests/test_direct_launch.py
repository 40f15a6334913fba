"""triton_impl.direct_launch: past the first launch of a key, the compiled kernel's launcher gets
exactly what Triton's own launch path gives it (tensors as their addresses), and any change of
what Triton specialises on (an integer becoming 1 or losing its divisibility by 16, an unaligned
pointer, another dtype or compile-time argument) goes back through Triton's launcher.

Without a GPU: Triton's JIT compiles for sm_90 through the stand-in driver (tools/jit_standin.py)
in a subprocess, and the compiled kernels' launcher is replaced by a recorder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

_BENCH = str(Path(__file__).resolve().parents[1] / "tools")
_SCRIPT = f"BENCH = {_BENCH!r}\n" + textwrap.dedent(
    """
    import sys
    import torch
    import triton
    import triton.language as tl
    from triton.compiler.compiler import CompiledKernel

    sys.path.insert(0, BENCH)
    import jit_standin

    jit_standin.install()
    calls = []  # (path, grid, launcher arguments)

    def recorder(gx, gy, gz, stream, function, packed, meta, enter, leave, *args):
        calls.append(((gx, gy, gz), args))

    CompiledKernel._init_handles = lambda self: None
    CompiledKernel.run = property(lambda self: recorder)
    CompiledKernel.function = None
    compiles = []
    real_compile = triton.compiler.compile

    def recording_compile(src, *args, **kwargs):
        compiles.append(src.fn.__name__)
        return real_compile(src, *args, **kwargs)

    triton.compiler.compile = recording_compile

    from mamba3_kernels.triton_impl import direct_launch as dl

    dl._direct = lambda args: dl._ENABLED[0] and isinstance(args[0], torch.Tensor)
    dl._current_stream = lambda device: 0

    @triton.jit
    def scale(x_ptr, y_ptr, n, factor, BLOCK: tl.constexpr, SHIFT: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < n, other=0.0)
        tl.store(y_ptr + i, x * factor + SHIFT, mask=i < n)

    x = torch.randn(256)
    y = torch.empty(256)

    def run(args, grid=(4,), **kw):
        before = len(compiles)
        n_calls = len(calls)
        dl.launch(scale, grid, args, dict(BLOCK=64, SHIFT=0, num_warps=4) | kw)
        assert len(calls) == n_calls + 1
        return calls[-1], len(compiles) - before

    as_addr = lambda args: tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args)

    (grid, first), n = run((x, y, 256, 2.0))
    assert n == 1 and isinstance(first[0], torch.Tensor)  # Triton's launcher: compiled, tensors
    (grid2, again), n = run((x, y, 256, 2.0))
    assert n == 0 and grid2 == grid == (4, 1, 1)
    assert again == as_addr(first), (again, as_addr(first))  # direct: same arguments, addresses
    assert dl._CACHE
    print("same-args ok")

    # Each change Triton specialises on misses the key: Triton's launcher (tensors) runs again.
    for args, kw in (
        ((x, y, 1, 2.0), {}),  # n == 1 becomes a constant
        ((x, y, 255, 2.0), {}),  # n no longer divisible by 16
        ((x[1:], y[1:], 255, 2.0), {}),  # 4-byte aligned pointers
        ((x.double(), y.double(), 256, 2.0), {}),  # dtypes
        ((x, y, 256, 2.0), {"SHIFT": 1}),  # a compile-time argument
        ((x, y, 256, 2.0), {"num_warps": 2}),  # a launch option
    ):
        (_, got), _n = run(args, **kw)
        assert isinstance(got[0], torch.Tensor), (args[2], kw)
        (_, got2), n2 = run(args, **kw)
        assert n2 == 0 and got2 == as_addr(got), (args[2], kw)
    print("keys ok")

    # A value Triton does not specialise on (the float, an aligned pointer elsewhere, n of the
    # same class) reuses the entry.
    z = torch.empty(256)
    (_, got), n = run((x, z, 512, 3.0))
    assert n == 0 and got == as_addr((x, z, 512, 3.0)) + (64, 0)
    print("reuse ok")
    """
)


def test_direct_launch_matches_tritons_launcher(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    script = tmp_path / "direct_launch_check.py"  # (@triton.jit reads its source from a file)
    script.write_text(_SCRIPT)
    res = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for step in ("same-args ok", "keys ok", "reuse ok"):
        assert step in res.stdout, res.stdout


def test_backward_launches_all_go_direct(tmp_path):
    """tools/host_time_bwd_jit.py (the backward through Triton's JIT with a no-op launcher):
    every kernel the backward launches is keyed for the direct path after its first launch, so
    no call site leaves Triton's binder in the loop; the script writes its JSON."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bwd.json"
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, str(root / "tools" / "host_time_bwd_jit.py"), "--repeats", "1",
           "--calls", "2", "--ab", "--json", str(out)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=root, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["launches_per_call"] >= 5
    assert got["direct_launch_keys"] == got["launches_per_call"]
    assert set(got["us_per_call"]) == {"chunk_bwd (direct on)", "chunk_bwd (direct off)"}
