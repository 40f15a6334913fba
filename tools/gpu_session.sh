#!/usr/bin/env bash
# One GPU session from the repository root (no install needed), each part under its own time
# limit. The canonical parts write the GPU's result set, bench/results/<gpu>/ (h100, h200, ...,
# from nvidia-smi's name; OUT overrides it):
#   bash tools/gpu_session.sh validate   # GPU tests, cross-check, harness benchmark (default)
#   bash tools/gpu_session.sh kernels    # decode step, forward+backward (with and without z),
#                                        # fused prefill forward: triton_*.json
#   bash tools/gpu_session.sh tune       # autotuner over the benchmark buckets: autotune.txt
#   bash tools/gpu_session.sh tests      # GPU tests only: gpu_tests.txt
# Parts for experiments write into WORK (a fresh temporary folder unless set), never into OUT:
#   bash tools/gpu_session.sh ab         # forward+backward A/B of settings (BWD_* below)
#   bash tools/gpu_session.sh ncu        # Nsight Compute per-line profiles of the forwards
#   bash tools/gpu_session.sh firstcall  # first-call compile time, parallel vs serial
# Files of the result set: gpu_tests.txt; harness.json, harness_summary.md, the two
# harness_*_latency.png plots, harness_check.json, harness_check.txt; triton_step.json,
# triton_backward.json, triton_backward_z.json, triton_prefill.json; autotune.txt (the tuned
# config file itself lands in WORK: copy it to mamba3_kernels/configs/ to ship it).
# Environment: *_S per-part time limits; GPU_WORKERS (pytest-xdist workers, default 6);
# STEP_SWEEP=--sweep (every decode config); TRIALS (tuner trials per bucket, default 10);
# for ab: BWD_CASES ("siso mimo4"), BWD_SHAPES, BWD_Z=1, BWD_VARIANTS (core_rotary.RotaryConfig
# settings), BWD_CONFIGS ("default num_stages=1": ChunkBwdConfig changes), BWD_SEGMENTS,
# BWD_SWEEP=--sweep (core-backward configs).
# Optuna (for tune) may come from an unpacked site folder: SITE_TARBALL names its archive.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 \
      | grep -oiE '[a-z][0-9]{2,4}' | head -n 1 | tr '[:upper:]' '[:lower:]')
OUT=${OUT:-bench/results/${gpu:-gpu}}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT" "$WORK"
echo "result set: $OUT; scratch: $WORK"
if [ -n "${SITE_TARBALL:-}" ] && [ -f "$SITE_TARBALL" ]; then
    site=$(mktemp -d) && tar xJf "$SITE_TARBALL" -C "$site" && export PYTHONPATH="$PYTHONPATH:$site"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python -m mamba3_kernels info

gpu_tests() {
    # several workers: a cold run spends most of its time compiling kernels on the CPU
    local workers=()
    python -c "import xdist" 2>/dev/null && workers=(-n "${GPU_WORKERS:-6}")
    timeout "${TESTS_S:-300}" python -m pytest -m gpu -q -p no:cacheprovider "${workers[@]}" \
        tests 2>&1 | tee "$OUT/gpu_tests.txt" | tail -25
}

for mode in "${@:-validate}"; do
case "$mode" in
    validate)
        gpu_tests
        timeout "${CHECK_S:-120}" python -m mamba3_kernels.check --json "$OUT/harness_check.json" \
            2>&1 | tee "$OUT/harness_check.txt" | tail -60
        timeout "${BENCH_S:-200}" python -m mamba3_kernels.bench --backends triton \
            --json "$OUT/harness.json" --plots "$OUT" --markdown "$OUT/harness_summary.md" \
            2>&1 | tail -70
        ;;
    tests)
        gpu_tests
        ;;
    kernels)
        # shellcheck disable=SC2086
        timeout "${STEP_S:-300}" python tools/bench_triton_step.py ${STEP_SWEEP:-} \
            --cases siso_bf16 mimo4_bf16 --batches 1 16 128 --json "$OUT/triton_step.json" 2>&1 \
            | tail -12
        timeout "${BWD_S:-300}" python tools/bench_triton_backward.py --cases siso mimo4 \
            --shapes 1x2048 1x16384 8x2048 --profile --json "$OUT/triton_backward.json" 2>&1 \
            | tail -40
        timeout "${BWD_S:-300}" python tools/bench_triton_backward.py --cases siso mimo4 \
            --shapes 1x2048 1x16384 8x2048 --z --json "$OUT/triton_backward_z.json" 2>&1 \
            | tail -20
        timeout "${PREFILL_S:-240}" python tools/bench_triton_prefill.py \
            --json "$OUT/triton_prefill.json" 2>&1 | tail -20
        ;;
    tune)
        # The benchmark's buckets of the forward and decode kernels (the backward's compile +
        # run time per trial does not fit one call).
        timeout "${TUNE_S:-330}" python -m mamba3_kernels.autotune --n-trials "${TRIALS:-10}" \
            --kernel chunk_fwd --kernel step \
            --shape 1,2048,64,1,128,64,32,1 --shape 1,16384,64,1,128,64,32,1 \
            --shape 8,2048,64,1,128,64,32,1 --shape 8,2048,64,1,128,64,32,4 \
            --step 1,64,1,128,64,32,1 --step 16,64,1,128,64,32,1 --step 128,64,1,128,64,32,1 \
            --no-progress --out-dir "$WORK/tuned" --plots "$WORK/plots" \
            --storage "$WORK/studies.db" 2>&1 | tee "$OUT/autotune.txt" | tail -40
        ;;
    ab)
        # shellcheck disable=SC2086
        timeout "${BWD_S:-300}" python tools/bench_triton_backward.py \
            --cases ${BWD_CASES:-siso} --shapes ${BWD_SHAPES:-8x2048 1x16384} --profile \
            ${BWD_SWEEP:-} ${BWD_Z:+--z} ${BWD_SEGMENTS:+--segments $BWD_SEGMENTS} \
            ${BWD_CONFIGS:+--configs $BWD_CONFIGS} \
            ${BWD_VARIANTS:+--variants $BWD_VARIANTS} --json "$WORK/triton_backward_ab.json" \
            2>&1 | grep -v "^  *0\.[01][0-9][0-9] ms"
        ;;
    firstcall)
        # a first SISO fwd+bwd call's compiles, side by side and serial, fresh caches
        timeout "${FIRSTCALL_S:-300}" python tools/first_call_compile.py --repeats 2 \
            --json "$WORK/first_call_compile.json" 2>&1 | tail -6
        ;;
    ncu)
        # per-line warp stall samples of the default SISO and MIMO forwards (tools/ncu_lines.py)
        for c in siso_1x16384 mimo4_8x2048; do
            timeout "${NCU_S:-120}" bash tools/ncu_kernels.sh "$c" "$WORK/ncu_$c.tgz"
            python tools/ncu_lines.py "$WORK/ncu_$c.tgz" --top 25
        done
        ;;
    *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
done
echo "result set: $OUT; scratch: $WORK"
