"""The autotuner's whole loop on the CPU: study in SQLite, rejection of wrong configs, interruption
and resumption, the config file, and the store's lookup (exact, nearest, stale).

A small backend registered here ("fake_tune") runs the reference with its config's chunk size;
two of its flavors are deliberately broken (a wrong answer, an exception) and must be rejected
with their reason. The real Triton kernels are tuned through the command line under the Triton
interpreter at tiny shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna", reason="the autotuner needs optuna (the [tune] extra)")
import torch
from mamba3_kernels.autotune import Bucket, Space, find_targets, open_storage, tune_target
from mamba3_kernels.autotune.report import table, write_configs

import mamba3_kernels
from mamba3_kernels import tuned_configs
from mamba3_kernels.backend import Backend, KernelSpec, register_backend, registered_backends
from mamba3_kernels.reference import reference_scan

FAKE = "fake_tune"
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class FakeConfig:
    chunk_size: int = 16
    flavor: str = "right"  # "wrong" perturbs the output, "crash" raises
    unroll: int = 1


def _fake_space(problem):
    return {"chunk_size": [8, 16, 32], "flavor": ["right", "wrong", "crash"], "unroll": [1, 2]}


def _fake_constraint(problem, cfg, props):
    if cfg.chunk_size > problem.seqlen:
        return f"chunk_size {cfg.chunk_size} > L={problem.seqlen}"
    return None


class FakeBackend(Backend):
    """The reference in chunked form, with broken flavors; ``delay`` seconds per call lets two
    workers overlap in the distributed test."""

    delay = float(os.environ.get("FAKE_TUNE_DELAY", "0"))

    def __init__(self) -> None:
        spec = KernelSpec(
            name="fake_chunk",
            modes=("inference",),
            config_cls=FakeConfig,
            applies=lambda p: not p.decode,
            default=lambda p: FakeConfig(),
            space=_fake_space,
            constraint=_fake_constraint,
        )
        super().__init__(name=FAKE, priority=-100, kernels=[spec])

    def auto_eligible(self, problem) -> bool:
        return False

    def scan(self, problem, inputs, configs=None):
        cfg = (configs or {}).get("fake_chunk") or FakeConfig()
        if self.delay:
            time.sleep(self.delay)
        if cfg.flavor == "crash":
            raise RuntimeError("boom: this flavor always fails")
        out, _ = reference_scan(inputs, problem.rotary, cfg.chunk_size)
        if cfg.flavor == "wrong":
            out = out * 1.01
        return out, None


def register_fake() -> None:
    """Register the fake backend (the CLI's ``--import test_autotune:register_fake``).

    With ``FAKE_TUNE_BARRIER=DIR:N`` (the distributed test) each worker process also waits here
    until N workers have arrived, so that all of them start tuning together however long each
    took to import (a loaded CI machine staggers them by seconds)."""
    if FAKE not in registered_backends():
        register_backend(FakeBackend())
    barrier = os.environ.get("FAKE_TUNE_BARRIER")
    if barrier:
        folder, n = barrier.rsplit(":", 1)
        Path(folder, str(os.getpid())).touch()
        deadline = time.monotonic() + 120
        while len(os.listdir(folder)) < int(n) and time.monotonic() < deadline:
            time.sleep(0.05)


@pytest.fixture(autouse=True)
def fake_backend():
    """The fake backend exists only during these tests: other tests see the real registry."""
    from mamba3_kernels import dispatch
    from mamba3_kernels.backend import _REGISTRY

    register_fake()
    yield _REGISTRY[FAKE]
    _REGISTRY.pop(FAKE, None)
    dispatch.clear_caches()


TINY = Bucket("scan", 1, 16, 2, 1, 16, 8, 4, 1, torch.float32)


def _target(bucket=TINY):
    targets, _ = find_targets([bucket], "cpu", backends=[FAKE])
    assert len(targets) == 1
    return targets[0]


def _evaluated(study):
    """Trials that ran their config (not duplicates), by params."""
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.params
        and "duplicate_of" not in t.user_attrs
        and t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ]


def _key(t):
    return tuple(sorted(t.params.items()))


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    d = tmp_path / "configs"
    monkeypatch.setenv("MAMBA3_KERNELS_CONFIG_DIR", str(d))
    tuned_configs.reload()
    yield d
    tuned_configs.reload()


def test_grid_study_rejects_wrong_configs_and_writes_a_file_the_store_reads(tmp_path, config_dir):
    target = _target()
    storage = open_storage(None, tmp_path / "s.db")
    res = tune_target(target, storage, "cpu", device="cpu", n_trials=18, progress=False)
    trials = _evaluated(res.study)
    # Grid search (18 points <= 18 trials): every point exactly once.
    assert len(trials) == 18 and len({_key(t) for t in trials}) == 18
    for t in trials:
        p = t.params
        reason = t.user_attrs.get("rejected")
        if p["chunk_size"] > TINY.seqlen:
            assert reason and "constraint" in reason and "L=16" in reason
        elif p["flavor"] == "wrong":
            assert reason and reason.startswith("wrong: out rel err")
        elif p["flavor"] == "crash":
            assert reason and "RuntimeError" in reason and "boom" in reason
        else:
            assert reason is None
            assert t.user_attrs["rel_err"] < 1e-5
            # Timed fully, or (CPU timings are noisy) pruned as too slow, with the reason.
            if t.state == optuna.trial.TrialState.COMPLETE:
                assert t.value > 0 and t.user_attrs["evaluated"]
            else:
                assert "x best" in t.user_attrs["pruned"]
    entry = res.entry
    assert entry["config"]["flavor"] == "right" and entry["config"]["chunk_size"] <= 16
    assert entry["trials"] == 18 and entry["rejected"] == 14
    assert entry["default_ms"] is not None and entry["tuned_ms"] <= entry["default_ms"]
    assert "fake_tune/fake_chunk/inference" in table([res])
    assert "rejected trials, why" in table([res]) and "boom" in table([res])
    assert sum(entry["rejected_why"].values()) == 14

    # The file lands in the user config dir and the store serves it.
    (path,) = write_configs([res], "cpu", None, [config_dir])
    data = json.loads(path.read_text())
    assert data["gpu"] == "cpu" and data["versions"]["torch"] == torch.__version__
    assert data["entries"][0]["bucket"] == TINY.problem("cpu").bucket_key()
    spec = target.kernel
    cfg = tuned_configs.lookup(FAKE, spec, TINY.problem("cpu"), "inference", "cpu")
    assert cfg == FakeConfig(**entry["config"])
    # Nearest bucket: same kernel and head dims, other batch and length.
    other = Bucket("scan", 4, 64, 2, 1, 16, 8, 4, 1, torch.float32).problem("cpu")
    assert tuned_configs.lookup(FAKE, spec, other, "inference", "cpu") == cfg
    # Nothing for another dtype, another head size or another GPU: the heuristic applies.
    bf16 = Bucket("scan", 1, 16, 2, 1, 16, 8, 4, 1, torch.bfloat16).problem("cpu")
    assert tuned_configs.lookup(FAKE, spec, bf16, "inference", "cpu") is None
    wide = Bucket("scan", 1, 16, 4, 1, 16, 8, 4, 1, torch.float32).problem("cpu")
    assert tuned_configs.lookup(FAKE, spec, wide, "inference", "cpu") is None
    assert tuned_configs.lookup(FAKE, spec, TINY.problem("cpu"), "inference", "NVIDIA H100") is None
    # The nearest config is not used where the kernel's constraint rules it out (chunk > L).
    short = Bucket("scan", 1, 4, 2, 1, 16, 8, 4, 1, torch.float32).problem("cpu")
    assert tuned_configs.lookup(FAKE, spec, short, "inference", "cpu") is None


def test_journal_storage_and_a_finished_study_costs_nothing(tmp_path):
    target = _target()
    url = f"journal:{tmp_path / 'studies.journal'}"
    res = tune_target(target, open_storage(url, ""), "cpu", "cpu", 18, progress=False)
    assert len(_evaluated(res.study)) == 18
    n = len(res.study.get_trials(deepcopy=False))
    again = tune_target(target, open_storage(url, ""), "cpu", "cpu", 18, progress=False)
    assert len(again.study.get_trials(deepcopy=False)) == n
    assert again.entry["config"] == res.entry["config"]


def test_a_queued_point_half_suggested_by_another_worker_is_still_a_duplicate():
    """Two copies of one grid point (two workers queued the grid at once): while the first is
    still suggesting its params one by one, the second must find it and defer, not evaluate."""
    from mamba3_kernels.autotune.study import _earlier_duplicate

    study = optuna.create_study()
    point = {"chunk_size": 8, "flavor": "right", "unroll": 2}
    study.enqueue_trial(point)
    study.enqueue_trial(point)
    first = study.ask()
    first.suggest_categorical("chunk_size", [8, 16])  # the other two params not yet set
    second = study.ask()
    assert second.number > first.number
    dup = _earlier_duplicate(study, second.number, point)
    assert dup is not None and dup.number == first.number
    assert _earlier_duplicate(study, first.number, point) is None


class _Stop(KeyboardInterrupt):
    pass


def test_interrupted_study_resumes_without_losing_trials(tmp_path):
    target = _target()
    url = f"sqlite:///{tmp_path / 'resume.db'}"
    seen = []

    def stop_after_5(study, trial):
        seen.append(trial.number)
        if len(seen) == 5:
            raise _Stop

    with pytest.raises(_Stop):
        tune_target(
            target,
            open_storage(url, ""),
            "cpu",
            "cpu",
            18,
            progress=False,
            callbacks=[stop_after_5],
        )
    # A fresh process would open the file again: do the same.
    study = optuna.load_study(study_name=target.study_name("cpu"), storage=open_storage(url, ""))
    before = {t.number: (t.state, t.value, t.params) for t in _evaluated(study)}
    assert len(before) == 5

    # Simulate a worker killed mid-trial on this host: its trial must be failed and its point
    # queued again.
    dead = study.ask()
    dead.set_user_attr("worker", f"{os.uname().nodename}:{_dead_pid()}")
    res = tune_target(target, open_storage(url, ""), "cpu", "cpu", 18, progress=False)
    after = {t.number: (t.state, t.value, t.params) for t in _evaluated(res.study)}
    for n, v in before.items():
        assert after[n] == v  # finished trials kept as they were
    assert len(after) == 18 and len({_key(t) for t in _evaluated(res.study)}) == 18
    states = {t.number: t.state for t in res.study.get_trials(deepcopy=False)}
    assert states[dead.number] == optuna.trial.TrialState.FAIL


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_tpe_study_for_a_large_space_spends_its_budget_on_distinct_configs(tmp_path):
    target = _target(Bucket("scan", 1, 32, 2, 1, 16, 8, 4, 1, torch.float32))
    res = tune_target(
        target, open_storage(None, tmp_path / "tpe.db"), "cpu", "cpu", 8, progress=False
    )
    trials = _evaluated(res.study)
    assert len(trials) == 8 and len({_key(t) for t in trials}) == 8
    # The default config is always tried first.
    first = min(res.study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert first.user_attrs.get("default") and first.params["flavor"] == "right"
    assert res.entry["config"]["flavor"] == "right"


def _fake_entry(spec, problem, **extra):
    return {
        "backend": FAKE, "kernel": spec.name, "mode": "inference", "bucket": problem.bucket_key(),
        "config": {"chunk_size": 8, "flavor": "right", "unroll": 2}, "tuned_ms": 1.0,
        "default_ms": 2.0, "trials": 1, "rejected": 0, **extra,
    }  # fmt: skip


def test_files_of_another_toolchain_are_used(config_dir):
    """The toolchain versions are recorded, not checked: an entry tuned under other torch and
    Triton versions serves this process."""
    problem = TINY.problem("cpu")
    spec = registered_backends()[FAKE].kernels[0]
    old = {"torch": "1.13.0", "triton": "2.0.0", "mamba3_kernels": "0.0.1"}
    path = tuned_configs.write_config_file(config_dir / "cpu.json", "cpu", None,
                                           [_fake_entry(spec, problem)], versions=old)  # fmt: skip
    assert json.loads(path.read_text())["versions"] == old
    tuned_configs.reload()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = tuned_configs.lookup(FAKE, spec, problem, "inference", "cpu")
        assert got == FakeConfig(8, "right", 2)
    # Kept per mode: nothing for another call path of the same family.
    assert tuned_configs.lookup(FAKE, spec, problem, "training", "cpu") is None


def test_entry_of_another_kernel_version_is_reported_and_skipped(config_dir):
    problem = TINY.problem("cpu")
    spec = registered_backends()[FAKE].kernels[0]
    newer = dataclasses.replace(spec, version=3)
    tuned_configs.write_config_file(config_dir / "cpu.json", "cpu", None,
                                    [_fake_entry(spec, problem, kernel_version=2)])  # fmt: skip
    tuned_configs.reload()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tuned_configs.lookup(FAKE, newer, problem, "inference", "cpu") is None
        assert tuned_configs.lookup(FAKE, newer, problem, "inference", "cpu") is None
    said = [str(w.message) for w in caught if "version 2" in str(w.message)]
    assert len(said) == 1 and "version 3" in said[0]
    (report,) = [r for r in tuned_configs.file_reports("cpu", {(FAKE, spec.name): newer})
                 if r["path"].endswith("cpu.json") and not r["shipped"]]  # fmt: skip
    assert not report["used"] and "another kernel version" in report["reason"]
    assert len(report["skipped"]) == 1 and "kernel version 2" in report["skipped"][0]
    # The same entry at the kernel's version is used.
    tuned_configs.reload()
    same = dataclasses.replace(spec, version=2)
    got = tuned_configs.lookup(FAKE, same, problem, "inference", "cpu")
    assert got == FakeConfig(8, "right", 2)


def test_shipped_files_load_under_any_toolchain(monkeypatch):
    """The shipped files are read whatever torch and Triton run here; each entry matches a
    family of the Triton backend at its version, and ``info`` lists every file."""
    from mamba3_kernels.info import info

    other = {"torch": "9.9", "triton": "9.9"}
    monkeypatch.setattr(tuned_configs, "current_versions", lambda: other)
    tuned_configs.reload()
    triton_backend = registered_backends()["triton"]
    families = {("triton", k.name): k for k in triton_backend.all_kernels()}
    shipped = [r for r in tuned_configs.file_reports("NVIDIA H200", families) if r["shipped"]]
    assert {Path(r["path"]).name for r in shipped} >= {"nvidia-h200.json",
                                                       "nvidia-h100-80gb-hbm3.json"}  # fmt: skip
    for r in shipped:
        assert r["entries"] > 0 and r["skipped"] == [], r
    (h200,) = [r for r in shipped if r["gpu"] == "NVIDIA H200"]
    assert h200["used"] and h200["reason"] is None
    assert all(not r["used"] and "this device is NVIDIA H200" in r["reason"]
               for r in shipped if r is not h200)  # fmt: skip
    listed = info()["tuned_files"]
    assert {r["path"] for r in shipped} <= {r["path"] for r in listed}
    bucket = Bucket("step", 16, 1, 64, 1, 128, 64, 32, 1, torch.bfloat16).problem("cuda")
    step = families[("triton", "step")]
    assert tuned_configs.lookup("triton", step, bucket, "decode", "NVIDIA H200") is not None
    tuned_configs.reload()


def test_model_config_gives_the_layer_buckets():
    from mamba3_kernels.autotune.buckets import default_buckets, layer_from_model

    layer = layer_from_model('{"d_model": 2048, "expand": 2, "headdim": 64, "mimo_rank": 4}')
    assert layer == {
        "nheads": 64,
        "ngroups": 1,
        "d_state": 128,
        "headdim": 64,
        "n_angles": 32,
        "rank": 4,
    }
    buckets = default_buckets(torch.bfloat16, layer)
    keys = {b.problem("cuda").bucket_key() for b in buckets}
    assert "scan-B1-L16384-H64-G1-R4-N128-P64-S32-bfloat16" in keys
    assert "step-B128-L1-H64-G1-R4-N128-P64-S32-bfloat16" in keys
    assert len(buckets) == 6


def _cli(args, env_extra, timeout=600):
    env = {**os.environ, **env_extra, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "mamba3_kernels.autotune", "--device", "cpu", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_cli_tunes_the_triton_kernels_under_the_interpreter(tmp_path):
    env = {"MAMBA3_KERNELS_CONFIG_DIR": str(tmp_path)}
    shapes = ["--shape", "1,32,2,1,16,16,4,1", "--step", "2,2,1,16,8,4,1", "--dtype", "fp32"]
    dry = _cli(["--backend", "triton", *shapes, "--dry-run"], env)
    assert dry.returncode == 0, dry.stderr
    assert "triton/chunk_fwd/inference/scan-B1-L32" in dry.stdout
    assert "triton/chunk_bwd/training/scan-B1-L32" in dry.stdout
    assert "triton/step/decode/step-B2" in dry.stdout

    run = _cli(["--backend", "triton", *shapes, "--n-trials", "3", "--no-progress"], env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "speed-up" in run.stdout
    data = json.loads((tmp_path / "cpu.json").read_text())
    wanted = (("chunk_fwd", "inference"), ("step", "decode"))
    entries = {e["kernel"]: e for e in data["entries"] if (e["kernel"], e["mode"]) in wanted}
    assert set(entries) == {"chunk_fwd", "step"}
    modes = {(e["kernel"], e["mode"]) for e in data["entries"]}
    assert modes >= {("chunk_fwd", "inference"), ("chunk_bwd", "training"), ("step", "decode")}
    assert all(e["kernel_version"] >= 1 for e in data["entries"])
    assert list((tmp_path / "plots" / "cpu").glob("*-history.png"))

    # The store hands the tuned configs to the real kernel specs.
    os.environ["MAMBA3_KERNELS_CONFIG_DIR"] = str(tmp_path)
    try:
        tuned_configs.reload()
        triton_backend = registered_backends()["triton"]
        specs = {s.name: s for s in triton_backend.all_kernels()}
        for b in (
            Bucket("scan", 1, 32, 2, 1, 16, 16, 4, 1, torch.float32),
            Bucket("step", 2, 1, 2, 1, 16, 8, 4, 1, torch.float32),
        ):
            name, mode = ("chunk_fwd", "inference") if b.kind == "scan" else ("step", "decode")
            cfg = tuned_configs.lookup("triton", specs[name], b.problem("cpu"), mode, "cpu")
            assert cfg is not None and cfg == specs[name].make_config(entries[name]["config"])
    finally:
        del os.environ["MAMBA3_KERNELS_CONFIG_DIR"]
        tuned_configs.reload()


@pytest.mark.gpu
def test_dispatcher_uses_a_tuned_config_on_the_gpu(config_dir):
    from mamba3_kernels import dispatch
    from mamba3_kernels.backend import device_properties

    backend = registered_backends()["triton"]
    bucket = Bucket("step", 16, 1, 64, 1, 128, 64, 32, 1, torch.bfloat16)
    problem, _ = bucket.inputs("cuda")
    (spec,) = backend.kernels_for(problem, "decode")
    # A config other than the heuristic's that the kernel accepts on this GPU.
    props = device_properties()
    default = spec.default(problem)
    space = Space.build(spec.space(problem), {})
    cfg = default
    for labels in space.grid():
        cand = spec.make_config({**default.__dict__, **space.decode(labels)})
        if cand != default and spec.constraint(problem, cand, props) is None:
            cfg = cand
            break
    entry = {
        "backend": "triton",
        "kernel": spec.name,
        "mode": "decode",
        "bucket": problem.bucket_key(),
        "config": cfg.__dict__,
        "tuned_ms": 0.01,
        "default_ms": 0.02,
        "trials": 1,
        "rejected": 0,
    }
    tuned_configs.write_config_file(
        config_dir / "gpu.json", props["name"], props["capability"], [entry]
    )
    tuned_configs.reload()
    dispatch.clear_caches()
    assert dispatch.kernel_configs(backend, problem, "decode") == {spec.name: cfg}
    dispatch.clear_caches()


def test_package_imports_register_backends():
    assert "triton" in registered_backends() and mamba3_kernels is not None


def test_sweep_compares_tpe_with_the_exhaustive_grid(tmp_path):
    from mamba3_kernels.autotune import sweep

    out = tmp_path / "sweep.json"
    args = ["--device", "cpu", "--backend", FAKE, "--shape", "1,16,2,1,16,8,4,1", "--dtype"]
    args += ["fp32", "--storage", str(tmp_path / "sweep.db"), "--seeds", "3", "--out", str(out)]
    assert sweep.main([*args, "--no-progress"]) == 0
    (summary,) = json.loads(out.read_text())
    # 18 configs; the valid ones: flavor "right", chunk 8 or 16, unroll 1 or 2.
    assert summary["grid_size"] == 18 and summary["valid_configs"] == 4
    assert summary["tpe_budget"] == 5
    assert summary["grid_best_ms"] > 0 and summary["tpe_best_ms"] > 0  # measured, not compared
    assert 0.0 <= summary["replay_success_rate"] <= 1.0


class _StickyBackend(Backend):
    """chunk_size 16 'crashes the GPU context' (the error message of an illegal address)."""

    def __init__(self) -> None:
        spec = KernelSpec(
            name="sticky",
            modes=("inference",),
            config_cls=FakeConfig,
            applies=lambda p: True,
            default=lambda p: FakeConfig(chunk_size=8),
            space=lambda p: {"chunk_size": [8, 16]},
        )
        super().__init__(name="fake_sticky", priority=-100, kernels=[spec])

    def scan(self, problem, inputs, configs=None):
        cfg = configs["sticky"]
        if cfg.chunk_size == 16:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return reference_scan(inputs, problem.rotary, cfg.chunk_size)[0], None


def test_a_config_that_breaks_the_gpu_context_stops_the_run_and_is_skipped_on_resume(tmp_path):
    from mamba3_kernels.autotune.study import CudaContextLost

    from mamba3_kernels.backend import _REGISTRY

    register_backend(_StickyBackend())
    try:
        (target,), _ = find_targets([TINY], "cpu", backends=["fake_sticky"])
        url = f"sqlite:///{tmp_path / 'sticky.db'}"
        with pytest.raises(CudaContextLost, match="re-run"):
            tune_target(target, open_storage(url, ""), "cpu", "cpu", 4, progress=False, seed=1)
        res = tune_target(target, open_storage(url, ""), "cpu", "cpu", 4, progress=False)
    finally:
        _REGISTRY.pop("fake_sticky", None)
    trials = _evaluated(res.study)
    assert sorted(t.params["chunk_size"] for t in trials) == [8, 16]  # each once
    (bad,) = [t for t in trials if t.params["chunk_size"] == 16]
    assert "illegal memory access" in bad.user_attrs["rejected"]
    assert res.entry["config"]["chunk_size"] == 8
