#!/usr/bin/env bash
# One GPU session from the repository root (no install needed): GPU tests, the cross-check
# matrix, the harness benchmark and/or the autotuner, each under its own time limit.
#   bash bench/gpu_session.sh validate   # pytest -m gpu, check, bench  -> $OUT
#   bash bench/gpu_session.sh tune       # autotune the benchmark buckets + one exhaustive sweep
#   bash bench/gpu_session.sh tests step bwd prefill   # GPU tests; decode sweep; backward pass
#                                        # variants with kernel profiles; forward incl. API time
#   bash bench/gpu_session.sh ncu        # Nsight Compute per-line profiles of the forwards
#   bash bench/gpu_session.sh firstcall  # first-call compile time, parallel vs serial
# Environment: *_S per-part time limits; STEP_SWEEP= (empty) skips the decode sweep;
# STEP_BATCHES, BWD_SWEEP=--sweep (core-backward configs), BWD_VARIANTS (core_rotary.KNOBS),
# BWD_Z=1 (inputs with the z gate), BWD_SEGMENTS="1073741824 0" (core-backward segment A/B),
# BWD_WAVES="2 4" (automatic segments' waves), BWD_CONFIGS="default num_stages=1" (ChunkBwdConfig
# changes, e.g. pipeline stages), BWD_CASES="siso mimo4".
# Optuna (for tune) may come from an unpacked site folder named by SITE_TARBALL.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results/session}
mkdir -p "$OUT"
if [ -n "${SITE_TARBALL:-}" ] && [ -f "$SITE_TARBALL" ]; then
    mkdir -p /tmp/site && tar xJf "$SITE_TARBALL" -C /tmp/site && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python -m mamba3_kernels info

for mode in "${@:-validate}"; do
case "$mode" in
    validate)
        timeout "${TESTS_S:-200}" python -m pytest -m gpu -q -p no:cacheprovider tests \
            2>&1 | tee "$OUT/gpu_tests.log" | tail -25
        timeout "${CHECK_S:-120}" python -m mamba3_kernels.check --json "$OUT/harness_check_h100.json" \
            2>&1 | tee "$OUT/check.log" | tail -60
        timeout "${BENCH_S:-200}" python -m mamba3_kernels.bench --backends triton \
            --json "$OUT/harness_h100.json" --plots "$OUT" --markdown "$OUT/harness_summary.md" \
            2>&1 | tail -70
        ;;
    tune)
        # The issue-4 buckets of the forward and decode kernels (the backward's compile + run
        # time per trial does not fit one call).
        timeout "${TUNE_S:-330}" python -m mamba3_kernels.autotune --n-trials "${TRIALS:-10}" \
            --kernel chunk_fwd --kernel step \
            --shape 1,2048,64,1,128,64,32,1 --shape 1,16384,64,1,128,64,32,1 \
            --shape 8,2048,64,1,128,64,32,1 --shape 8,2048,64,1,128,64,32,4 \
            --step 1,64,1,128,64,32,1 --step 16,64,1,128,64,32,1 --step 128,64,1,128,64,32,1 \
            --no-progress --out-dir "$OUT" --plots "$OUT/plots" --storage "$OUT/studies.db" \
            2>&1 | tee "$OUT/autotune.log" | tail -40
        timeout "${SWEEP_S:-150}" python -m mamba3_kernels.autotune.sweep --kernel step --no-progress \
            --step 16,64,1,128,64,32,1 --out "$OUT/sweep_step.json" 2>&1 | tee "$OUT/sweep.log" | tail -25
        ;;
    tests)
        # several workers: a cold run spends most of its time compiling kernels on the CPU
        workers=()
        python -c "import xdist" 2>/dev/null && workers=(-n "${GPU_WORKERS:-6}")
        timeout "${TESTS_S:-300}" python -m pytest -m gpu -q -p no:cacheprovider "${workers[@]}" \
            tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
        ;;
    step)
        # shellcheck disable=SC2086
        timeout "${STEP_S:-300}" python bench/bench_triton_step.py --cases siso_bf16 ${STEP_SWEEP---sweep} \
            --batches ${STEP_BATCHES:-1 16 128} \
            --json "$OUT/triton_step.json" 2>&1 | tail -12
        ;;
    bwd)
        # the core backward's configs first (BWD_SWEEP=--sweep), then the rotary/angle settings
        # shellcheck disable=SC2086
        timeout "${BWD_S:-300}" python bench/bench_triton_backward.py --cases ${BWD_CASES:-siso} \
            --shapes 8x2048 1x16384 --profile ${BWD_SWEEP:-} --json "$OUT/triton_backward.json" \
            ${BWD_Z:+--z} ${BWD_SEGMENTS:+--segments $BWD_SEGMENTS} \
            ${BWD_WAVES:+--waves $BWD_WAVES} \
            ${BWD_CONFIGS:+--configs $BWD_CONFIGS} \
            --variants ${BWD_VARIANTS:-rot_tokens=32 rot_tokens=4 rot_tokens=8 rot_tokens=16} 2>&1 \
            | grep -v "^  *0\.[01][0-9][0-9] ms"
        ;;
    prefill)
        timeout "${PREFILL_S:-240}" python bench/bench_triton_prefill.py --no-check \
            --json "$OUT/triton_prefill.json" 2>&1 | tail -20
        ;;
    firstcall)
        # a first SISO fwd+bwd call's compiles, side by side and serial, fresh caches
        timeout "${FIRSTCALL_S:-300}" python bench/first_call_compile.py --repeats 2 \
            --json "$OUT/first_call_compile.json" 2>&1 | tail -6
        ;;
    ncu)
        # per-line warp stall samples of the default SISO and MIMO forwards (bench/ncu_lines.py)
        for c in siso_1x16384 mimo4_8x2048; do
            timeout "${NCU_S:-120}" bash bench/ncu_kernels.sh "$c" "$OUT/ncu_$c.tgz"
        done
        ;;
    *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
done
