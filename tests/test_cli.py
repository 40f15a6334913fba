"""The command-line tools: every one answers --help, and a missing optional package is one line
naming the extra to install (exit 2), never a traceback. Import-only: no kernel runs here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mamba3_kernels.autotune import __main__ as autotune_main

from mamba3_kernels import __main__ as top
from mamba3_kernels import check, demo
from mamba3_kernels.bench import cli as bench_cli

ROOT = Path(__file__).resolve().parents[1]

MAINS = {
    "mamba3_kernels": top.main,
    "mamba3_kernels.check": check.main,
    "mamba3_kernels.bench": bench_cli.main,
    "mamba3_kernels.demo": demo.main,
    "mamba3_kernels.autotune": autotune_main.main,
}


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("command", list(MAINS))
def test_help_exits_zero(command, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        MAINS[command]([flag])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        top.main(["--help"])
    out = capsys.readouterr().out
    assert "python -m mamba3_kernels info" in out
    for name in ("check", "bench", "demo", "autotune"):
        assert f"python -m mamba3_kernels.{name}" in out


def test_top_level_points_to_the_other_modules(capsys):
    assert top.main(["check"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "check is its own module: python -m mamba3_kernels.check"
    with pytest.raises(SystemExit) as exc:
        top.main(["nonsense"])
    assert exc.value.code == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def test_autotune_without_optuna_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # "import optuna" raises ImportError
    assert autotune_main.main(["--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    line = _one_line(captured.err)
    assert line == 'mamba3_kernels.autotune needs optuna: pip install "mamba3-kernels[tune]"'


def test_bench_plots_without_matplotlib_stop_before_timing(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert bench_cli.main(["--quick", "--plots", str(tmp_path / "plots")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing was set up or timed
    line = _one_line(captured.err)
    assert "matplotlib" in line and 'pip install "mamba3-kernels[bench]"' in line
    assert not (tmp_path / "plots").exists()


# A fresh interpreter where these packages cannot be imported, running ``python -m <module>``.
_WITHOUT = """
import runpy, sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None
module = sys.argv[2]
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def _run_without(packages: str, module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT, packages, module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_autotune_module_without_optuna():
    """``python -m mamba3_kernels.autotune`` imports its package first: that must not need
    optuna either, for --help or for the one-line message."""
    res = _run_without("optuna", "mamba3_kernels.autotune", "--dry-run")
    assert res.returncode == 2, res.stderr
    assert _one_line(res.stderr).startswith("mamba3_kernels.autotune needs optuna")
    res = _run_without("optuna", "mamba3_kernels.autotune", "--help")
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout


def test_help_without_any_optional_package():
    res = _run_without("triton,optuna,matplotlib", "mamba3_kernels", "--help")
    assert res.returncode == 0, res.stderr
    assert "python -m mamba3_kernels.autotune" in res.stdout
