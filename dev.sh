#!/usr/bin/env bash
# One entry point that sets itself up on a fresh machine (Python 3.11+ with venv and pip).
#   ./dev.sh demo   build a small Mamba-3 layer, run prefill + decode through every backend that
#                   runs here, cross-check against the reference, print a table, then a quick bench
#   ./dev.sh test   ruff, then the test suite (GPU tests run only where CUDA is present)
# The virtual environment (.venv, or $VENV) sees the system's packages, so a machine that already
# has a CUDA build of torch keeps it; elsewhere the CPU build of torch is installed.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

setup() {
    if [ ! -x "$PY" ]; then
        python3 -m venv --system-site-packages "$VENV"
    fi
    if ! "$PY" -c "import torch" 2>/dev/null; then
        "$PY" -m pip install -q "torch==2.13.0"
    fi
    if ! "$PY" -c "import mamba3_kernels, triton, optuna, pytest, hypothesis, tilelang, cutlass" \
            2>/dev/null; then
        # tilelang and the CuTe DSL: their kernels lower, compile and export for sm_90a here too
        # (no GPU needed)
        "$PY" -m pip install -q -e ".[triton,tune,dev,tilelang,cute]"
    fi
    # CMake builds the native decode library from the exported CuTe kernels
    if ! command -v cmake >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null
    then
        apt-get update -qq && apt-get install -y -qq cmake >/dev/null
    fi
}

case "${1:-}" in
    demo)
        setup
        "$PY" -m mamba3_kernels info
        "$PY" -m mamba3_kernels.demo
        if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
            "$PY" -m mamba3_kernels.bench --json bench/results/latest.json
        else
            "$PY" -m mamba3_kernels.bench --quick
        fi
        ;;
    test)
        setup
        "$PY" -m ruff check .
        # pytest exits 5 when it collects nothing: set -e turns that into a failure, as it should.
        "$PY" -m pytest -q -n "${PYTEST_WORKERS:-2}" "${@:2}"
        ;;
    *)
        echo "usage: ./dev.sh demo | ./dev.sh test [pytest args]" >&2
        exit 2
        ;;
esac
