"""The benchmark harness on CPU: runs end to end, writes JSON and plots; floor counts by hand."""

from __future__ import annotations

import json

import pytest
import torch

from mamba3_kernels.bench import floor, runner, timing
from mamba3_kernels.bench.cli import main
from mamba3_kernels.bench.report import DECODE_PLOT, PREFILL_PLOT
from mamba3_kernels.bench.shapes import Shape

ROW_KEYS = {
    "op", "impl", "kind", "variant", "B", "L", "H", "G", "R", "N", "P", "S", "dtype",
    "ms", "bytes", "flops", "gbps", "tflops", "floor_ms", "floor_frac", "status",
}  # fmt: skip


def test_quick_cpu_run_writes_json_and_plots(tmp_path):
    out = tmp_path / "bench.json"
    plots = tmp_path / "plots"
    md = tmp_path / "summary.md"
    rc = main(["--quick", "--device", "cpu", "--peers", "sdpa", "--json", str(out),
               "--plots", str(plots), "--markdown", str(md)])  # fmt: skip
    assert rc == 0
    doc = json.loads(out.read_text())
    assert {"date", "device", "gpu", "versions", "rates", "args", "rows"} <= set(doc)
    assert doc["device"] == "cpu" and doc["versions"]["torch"] == torch.__version__
    assert doc["rates"]["copy_gbps"] > 0 and doc["rates"]["matmul_tflops"] > 0
    rows = doc["rows"]
    assert {r["op"] for r in rows} == {"fwd", "fwdbwd", "decode"}
    ours = [r for r in rows if r["impl"] == "reference"]
    assert {r["variant"] for r in ours} >= {"siso", "mimo R=4"}
    for r in ours:
        assert r["status"] == "ok", r
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["ms"] > 0 and r["bytes"] > 0 and r["flops"] > 0 and r["floor_ms"] > 0
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["ms"] * 1e-3) / 1e9)
        assert r["floor_frac"] == pytest.approx(r["floor_ms"] / r["ms"])
    decode = [r for r in ours if r["op"] == "decode"]
    assert all(r["ms_loop"] > 0 and r["ms_graph"] is None and r["graph_reason"] for r in decode)
    # The attention peer ran at the prefill shapes, and speedups against it were recorded.
    sdpa = [r for r in rows if r["impl"] == "sdpa"]
    assert sdpa and all(r["status"] == "ok" and r["op"] != "decode" for r in sdpa)
    fwd = [r for r in ours if r["op"] == "fwd" and r["variant"] == "siso"]
    assert all("sdpa" in r["speedup"] for r in fwd)
    r = fwd[0]
    peer = next(p for p in sdpa if (p["op"], p["B"], p["L"]) == (r["op"], r["B"], r["L"]))
    assert r["speedup"]["sdpa"] == pytest.approx(peer["ms"] / r["ms"])
    # Sweeps feed the plots: several lengths at B=1 and several decode batches.
    assert len({r["L"] for r in ours if r.get("group") == "prefill_sweep"}) >= 3
    assert len({r["B"] for r in ours if r.get("group") == "decode_sweep"}) >= 3
    table = md.read_text()
    assert table.count("| reference |") == len(ours) and "vs peers" in table
    for name in (PREFILL_PLOT, DECODE_PLOT):
        png = plots / name
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unsupported_backend_rows_are_na(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "b.json"
    args = ["--quick", "--device", "cpu", "--backends", "triton", "--peers", "none"]
    rc = main(args + ["--batch", "1", "--seqlen", "16", "--ops", "fwd,decode", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2
    assert all(r["status"] == "n/a" and r["reason"] and r.get("ms") is None for r in rows)


def test_floor_counts_by_hand():
    # B=2, L=128, H=4, G=2, R=2, N=16, P=8, S=4, bf16 (2 bytes), D, z and mimo_o present.
    s = Shape(batch=2, seqlen=128, nheads=4, ngroups=2, rank=2, d_state=16, headdim=8, n_angles=4,
              dtype=torch.bfloat16, has_D=True, has_z=True, has_mimo_o=True)  # fmt: skip
    q_k = 2 * (2 * 128 * 2 * 2 * 16) * 2  # 65536
    v = 2 * 128 * 4 * 8 * 2  # 16384
    z = v
    adt_dt_trap = 3 * (2 * 4 * 128) * 4  # 12288
    angles = 2 * 128 * 4 * 4 * 4  # 16384
    biases = 2 * (4 * 2 * 16) * 4  # 1024
    D = 4 * 4
    mimo = 3 * (4 * 2 * 8) * 4  # 768
    out = v
    inputs = q_k + v + z + adt_dt_trap + angles + biases + D + mimo
    assert inputs == 128784
    assert floor.scan_bytes(s) == inputs + out == 145168
    assert floor.scan_bytes(s, backward=True) == 3 * inputs + 2 * out
    # Chunk C = 64 / R = 32 -> 4 chunks; per head and chunk 2*64^2*(16+8) + 4*64*16*8.
    per_chunk = 2 * 64 * 64 * 24 + 4 * 64 * 16 * 8
    assert per_chunk == 229376
    assert floor.scan_flops(s) == 2 * 4 * 4 * per_chunk == 7340032
    assert floor.scan_flops(s, backward=True) == 3 * 7340032

    # Decode: one token's inputs and output, plus the state read and written.
    state = 2 * 4 * 4 * 4 + 2 * 4 * 8 * 16 * 4 + 2 * 2 * 4 * 16 * 2 + 2 * 4 * 8 * 2  # 4864
    assert state == 4864 and floor.state_bytes(s) == state
    one = Shape(**{**s.__dict__, "seqlen": 1})
    assert floor.step_bytes(s) == floor.scan_bytes(one) + 2 * state
    assert floor.step_flops(s) == 2 * 4 * 8 * 16 * (1 + 6 * 2)

    # The anchor: SISO (1, 16384), H=64, N=128, P=64, S=32, bf16, D, no z: 423.7 MB,
    # about 0.14 ms at a 3.0 TB/s copy rate (the memory bound wins over 60 GFLOP of matmuls).
    t = Shape(batch=1, seqlen=16384)
    assert floor.scan_bytes(t) == 423690496
    assert floor.scan_flops(t) == 64 * 256 * (2 * 64 * 64 * 192 + 4 * 64 * 128 * 64)
    assert floor.floor_ms(floor.scan_bytes(t), floor.scan_flops(t), 3000, 700) == pytest.approx(
        0.1412, abs=1e-4
    )

    # Causal attention, q/k head dim 128 and v 64: B H L^2 (Dqk + Dv) FLOPs forward.
    assert floor.attention_flops(1, 64, 2048, 128, 64) == 64 * 2048 * 2048 * 192
    assert floor.attention_bytes(1, 64, 2048, 128, 64) == 2 * (64 * 2048 * 128 * 2) + 2 * (
        64 * 2048 * 64 * 2
    )


def test_timing_helpers_on_cpu():
    cpu = torch.device("cpu")
    assert timing.rotation_count(10, cpu) == 1  # no L2 to defeat on CPU
    calls = []
    rotor = runner.Rotor([lambda: calls.append(0), lambda: calls.append(1)])
    for _ in range(5):
        rotor()
    assert calls == [0, 1, 0, 1, 0]
    x = torch.randn(64, 64)
    assert timing.median_ms(lambda: x @ x, cpu) > 0
    assert timing.loop_ms(lambda: x @ x, cpu, calls=3, repeats=2) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_rows_have_graph_times(tmp_path):
    out = tmp_path / "b.json"
    rc = main(["--batch", "1,16", "--ops", "decode", "--peers", "none", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rc == 0
    for r in rows:
        if r["status"] == "ok":
            assert r["ms_graph"] is not None or r.get("graph_reason")
