"""Distributed tuning: two worker processes tune one study through a real PostgreSQL server.

The fixture starts a throwaway server (initdb + pg_ctl in a temporary folder, loopback only, a
free port) from the PostgreSQL binaries (Debian: ``apt-get install postgresql``, see
``.ci/postgres.sh``), or uses ``$MAMBA3_TEST_POSTGRES_URL`` when set. As root, the server runs as
the ``postgres`` user (initdb refuses root). Without the binaries or the psycopg2 driver the test
is skipped with the reason.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna", reason="the autotuner needs optuna (the [tune] extra)")

ROOT = Path(__file__).resolve().parents[1]
ENV_URL = "MAMBA3_TEST_POSTGRES_URL"


def _pg_bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent

    def version(path: str) -> tuple:
        v = Path(path).parents[1].name
        return tuple(int(x) for x in v.split(".") if x.isdigit())

    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    return Path(dirs[-1]).parent if dirs else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    if os.environ.get(ENV_URL):
        yield os.environ[ENV_URL]
        return
    pytest.importorskip("psycopg2", reason="psycopg2 missing (pip install psycopg2-binary)")
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (Debian: apt-get install postgresql)")
    prefix: list[str] = []
    if os.geteuid() == 0:
        # initdb and postgres refuse to run as root: run them as the postgres user.
        try:
            import pwd

            pg_user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user to run the server as")
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root and no runuser to drop to the postgres user")
        prefix = [runuser, "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="mamba3-pg-"))
    if prefix:
        os.chown(root, pg_user.pw_uid, pg_user.pw_gid)
    data, log = root / "data", root / "server.log"
    port = _free_port()

    def run(*cmd: str) -> None:
        res = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {res.stdout}\n{res.stderr}")

    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync")
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w", "start")
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_tune_one_study_through_postgres(postgres_url, tmp_path):
    tag = f"t{uuid.uuid4().hex[:8]}"  # a fresh study even on a shared server
    args = [
        sys.executable,
        "-m",
        "mamba3_kernels.autotune",
        "--device",
        "cpu",
        "--import",
        "test_autotune:register_fake",  # the small "fake_tune" backend of test_autotune
        "--backend",
        "fake_tune",
        "--shape",
        "1,16,2,1,16,8,4,1",
        "--dtype",
        "fp32",
        "--n-trials",
        "18",
        "--storage",
        postgres_url,
        "--study-tag",
        tag,
        "--no-progress",
        "--no-plots",
    ]
    barrier = tmp_path / "arrived"
    barrier.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
        "FAKE_TUNE_DELAY": "0.1",  # long enough trials that both workers get some
        "FAKE_TUNE_BARRIER": f"{barrier}:2",  # and both start together
        "TRITON_INTERPRET": "1",
    }
    workers = []
    for i in range(2):
        wenv = {**env, "MAMBA3_KERNELS_CONFIG_DIR": str(tmp_path / f"w{i}")}
        workers.append(
            subprocess.Popen(
                args, env=wenv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outs = [w.communicate(timeout=300) for w in workers]
    for w, (out, err) in zip(workers, outs, strict=True):
        assert w.returncode == 0, err[-3000:]
        assert "fake_tune/fake_chunk" in out

    storage = optuna.storages.RDBStorage(postgres_url)
    (summary,) = [s for s in optuna.get_all_study_summaries(storage) if tag in s.study_name]
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    trials = study.get_trials(deepcopy=False)
    evaluated = [
        t for t in trials if t.state in done and t.params and "duplicate_of" not in t.user_attrs
    ]
    keys = [tuple(sorted(t.params.items())) for t in evaluated]
    # The whole grid, each point evaluated exactly once, by both workers together.
    table = "\n".join(
        f"#{t.number} {t.state.name} {t.system_attrs.get('fixed_params')}: {t.user_attrs}"
        for t in trials
    )
    assert len(keys) == 18 and len(set(keys)) == 18, table
    pids = {w.pid for w in workers}
    by_worker = {int(t.user_attrs["worker"].rpartition(":")[2]) for t in evaluated}
    assert by_worker == pids, f"trials by {by_worker}, workers {pids}"
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    # Rejected configs carry their reason; the winner is a correct one.
    assert all(t.user_attrs.get("rejected") for t in evaluated if t.params["flavor"] != "right")
    assert study.best_trial.params["flavor"] == "right"
