#!/usr/bin/env bash
# Nsight Compute profile of the kernels of one prefill forward call (the 4th: three warm-ups
# first), with per-source-line warp stall samples, exported as CSV for bench/ncu_lines.py.
#   bash bench/ncu_kernels.sh CASE OUTDIR [CONFIG]
# CASE: a bench_triton_prefill.py case (siso_1x16384, mimo4_8x2048, ...); CONFIG as
# profile_prefill.py --config. Writes OUTDIR/CASE.ncu-rep, CASE_details.csv, CASE_source_*.csv.
set -uo pipefail
case_name=$1 out=$2 config=${3:-}
mkdir -p "$out"
export PYTHONPATH="$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
args=(--case "$case_name" --reps 1 --plain)
[ -n "$config" ] && args+=(--config "$config")
kernels='regex:_chunk_fwd_kernel|_segment_state_kernel|_state_pass_kernel|_block_out_kernel'
ncu --clock-control none --kernel-name "$kernels" --launch-skip 9 --launch-count 3 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section MemoryWorkloadAnalysis --section SourceCounters \
    --import-source yes -f -o "$out/$case_name" python bench/profile_prefill.py "${args[@]}" \
    > "$out/${case_name}_ncu.log" 2>&1
tail -5 "$out/${case_name}_ncu.log"
ncu -i "$out/$case_name.ncu-rep" --page details --csv > "$out/${case_name}_details.csv" 2>&1
for src in cuda sass; do
    ncu -i "$out/$case_name.ncu-rep" --page source --csv --print-source "$src" \
        > "$out/${case_name}_source_$src.csv" 2>&1 || echo "source page ($src) failed"
done
ls -la "$out" | grep "$case_name"
