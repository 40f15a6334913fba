"""Tuned configs reach the kernels: for each kernel family of the Triton backend and each call
path (an inference forward, a training forward+backward, a decode step), a config written to the
store by the tuner's writer for a bucket is the config the family's entry point receives when
the public API runs a call of that bucket (spied on at the launch). Also: "auto" follows the
tuner's record of the fastest backend per mode and bucket. Triton runs under its interpreter.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mamba3_kernels
from mamba3_kernels import dispatch, tuned_configs
from mamba3_kernels.backend import (
    Backend,
    KernelSpec,
    register_backend,
    registered_backends,
    unregister_backend,
)
from mamba3_kernels.reference import reference_scan
from mamba3_kernels.state import Mamba3State
from mamba3_kernels.testing import random_inputs
from mamba3_kernels.validate import describe

cpu_interpreted = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (CPU)")
pytestmark = cpu_interpreted

ROTARY = "interleaved"


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty user config folder; the store and dispatch's memo forgotten before and after."""
    monkeypatch.setenv("MAMBA3_KERNELS_CONFIG_DIR", str(tmp_path))
    tuned_configs.reload()
    dispatch.clear_caches()
    yield tmp_path
    tuned_configs.reload()
    dispatch.clear_caches()


def _inputs(seqlen=32):
    g = torch.Generator().manual_seed(3)
    return random_inputs(batch=1, seqlen=seqlen, nheads=2, d_state=16, headdim=16, n_angles=4,
                         with_initial_state=True, generator=g)  # fmt: skip


def _families():
    return {k.name: k for k in registered_backends()["triton"].all_kernels()}


def _other_config(spec, problem, **fixed):
    """A config of ``spec`` other than its heuristic's that its constraint accepts for
    ``problem``, with ``fixed`` fields set."""
    default = dataclasses.replace(spec.default(problem), **fixed)
    space = spec.space(problem)
    for name, values in space.items():
        if name in fixed:
            continue
        for v in values:
            cand = dataclasses.replace(default, **{name: v})
            if cand != default and spec.constraint(problem, cand, None) is None:
                return cand
    raise AssertionError(f"no other valid config of {spec.name}")


def _write(store, entries):
    """Entries written as the tuner writes them (autotune.report.write_configs' writer)."""
    rows = [{"backend": "triton", "kernel": spec.name, "mode": mode,
             "kernel_version": spec.version, "bucket": problem.bucket_key(),
             "config": dataclasses.asdict(cfg), "tuned_ms": 1.0, "default_ms": 2.0, "trials": 1,
             "rejected": 0} for spec, mode, problem, cfg in entries]  # fmt: skip
    tuned_configs.write_config_file(store / "cpu.json", "cpu", None, rows)
    tuned_configs.reload()
    dispatch.clear_caches()


def _spy(monkeypatch, module, name, seen, index, rotary_index=None):
    """Record the config argument (and the rotary family's, where the entry point takes one)
    of each call of ``module.name``."""
    real = getattr(module, name)

    def spy(*args, **kwargs):
        seen.setdefault(name, []).append(args[index])
        if rotary_index is not None:
            seen.setdefault(f"{name}.rotary", []).append(args[rotary_index])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


@pytest.mark.parametrize("path", ["fused", "core"])
def test_inference_forward_gets_every_family_it_runs(store, monkeypatch, path):
    from mamba3_kernels.triton_impl import chunk_bwd, chunk_fwd

    inputs = _inputs()
    problem = describe(inputs, False, ROTARY, False, None)
    fams = _families()
    fwd = _other_config(fams["chunk_fwd"], problem, path=path)
    core = _other_config(fams["chunk_bwd"], problem)
    rot = _other_config(fams["rotary"], problem)
    _write(store, [(fams["chunk_fwd"], "inference", problem, fwd),
                   (fams["chunk_bwd"], "inference", problem, core),
                   (fams["rotary"], "inference", problem, rot)])  # fmt: skip
    seen: dict = {}
    _spy(monkeypatch, chunk_fwd, "chunk_fwd", seen, 2)
    _spy(monkeypatch, chunk_bwd, "core_forward", seen, 2, rotary_index=3)
    with torch.no_grad():
        mamba3_kernels.scan(*inputs[:14], initial_state=inputs.initial_state, rotary=ROTARY,
                            backend="triton")  # fmt: skip
    if path == "fused":
        assert seen == {"chunk_fwd": [fwd]}
    else:
        # core_forward fills in its automatic segment length; every tuned field arrives
        (got,) = seen["core_forward"]
        assert "chunk_fwd" not in seen
        assert dataclasses.replace(got, segment=core.segment) == core
        assert seen["core_forward.rotary"] == [rot]


@pytest.mark.parametrize("record", [1, 0])
def test_training_call_gets_the_training_configs(store, monkeypatch, record):
    from mamba3_kernels.triton_impl import chunk_bwd, chunk_fwd

    inputs = _inputs()
    problem = describe(inputs, False, ROTARY, False, None)
    fams = _families()
    core = _other_config(fams["chunk_bwd"], problem, record_forward=record)
    fwd = _other_config(fams["chunk_fwd"], problem)
    # inference entries that must not leak into the training call
    infer = _other_config(fams["chunk_bwd"], problem, record_forward=1 - record,
                          chunk_size=core.chunk_size * 2)  # fmt: skip
    rot = _other_config(fams["rotary"], problem)
    _write(store, [(fams["chunk_bwd"], "training", problem, core),
                   (fams["chunk_fwd"], "training", problem, fwd),
                   (fams["rotary"], "training", problem, rot),
                   (fams["chunk_bwd"], "inference", problem, infer)])  # fmt: skip
    seen: dict = {}
    _spy(monkeypatch, chunk_bwd, "record_forward", seen, 2, rotary_index=3)
    _spy(monkeypatch, chunk_fwd, "chunk_fwd_saving_y", seen, 2)
    _spy(monkeypatch, chunk_bwd, "chunk_bwd", seen, 4, rotary_index=6)
    leaves = [t.detach().clone().requires_grad_() if t is not None and t.is_floating_point()
              else t for t in inputs[:14]]  # fmt: skip
    state = Mamba3State(*(t.detach().clone() for t in inputs.initial_state))
    out = mamba3_kernels.scan(*leaves, initial_state=state, rotary=ROTARY, backend="triton")
    out.float().square().sum().backward()
    if record:  # (its backward runs the recorded graph)
        assert seen == {"record_forward": [core], "record_forward.rotary": [rot]}
    else:
        assert seen == {"chunk_fwd_saving_y": [fwd], "chunk_bwd": [core],
                        "chunk_bwd.rotary": [rot]}  # fmt: skip


def test_decode_step_gets_the_decode_config(store, monkeypatch):
    from mamba3_kernels.triton_impl import step

    inputs = random_inputs(batch=2, seqlen=1, nheads=2, d_state=16, headdim=16, n_angles=4,
                           with_initial_state=True, step=True)  # fmt: skip
    problem = describe(inputs, True, ROTARY, True, None)
    spec = _families()["step"]
    cfg = _other_config(spec, problem)
    _write(store, [(spec, "decode", problem, cfg)])
    seen: dict = {}
    _spy(monkeypatch, step, "step", seen, 3)
    state = Mamba3State(*(t.clone() for t in inputs.initial_state))
    mamba3_kernels.step(*inputs[:9], state, *inputs[9:14], rotary=ROTARY, backend="triton")
    assert seen == {"step": [cfg]}


@dataclasses.dataclass(frozen=True)
class _NoConfig:
    pass


class _Twin(Backend):
    """The reference under another name, auto-eligible on CPU, with one tunable family."""

    def __init__(self, name: str, priority: int) -> None:
        spec = KernelSpec(name="twin", modes=("inference",), config_cls=_NoConfig,
                          applies=lambda p: not p.decode, default=lambda p: _NoConfig(),
                          space=lambda p: {})  # fmt: skip
        super().__init__(name=name, priority=priority, kernels=[spec])

    def scan(self, problem, inputs, configs=None):
        return reference_scan(inputs, problem.rotary)


def test_auto_follows_the_tuner_record_of_the_fastest_backend(store):
    from mamba3_kernels.autotune.buckets import Bucket
    from mamba3_kernels.autotune.measure import time_backends

    high, low = _Twin("twin_high", 1000), _Twin("twin_low", 999)
    register_backend(high)
    register_backend(low)
    try:
        inputs = _inputs(seqlen=16)
        problem = describe(inputs, False, ROTARY, False, None)
        assert dispatch.choose_backend(problem, "auto", "inference") is high  # priority
        bucket = Bucket("scan", 1, 16, 2, 1, 16, 16, 4, 1, torch.float32)
        times = time_backends(bucket, "inference", "cpu")
        assert {"twin_high", "twin_low"} <= set(times) and all(t > 0 for t in times.values())
        record = {"mode": "inference", "bucket": problem.bucket_key(), "backend": "twin_low",
                  "times_ms": times}  # fmt: skip
        tuned_configs.write_config_file(store / "cpu.json", "cpu", None, [], choices=[record])
        tuned_configs.reload()
        dispatch.clear_caches()
        assert dispatch.choose_backend(problem, "auto", "inference") is low
        # other modes and explicit names ignore the record
        assert dispatch.choose_backend(problem, "auto", "training") is high
        assert dispatch.choose_backend(problem, "twin_high", "inference") is high
    finally:
        unregister_backend("twin_high")
        unregister_backend("twin_low")
