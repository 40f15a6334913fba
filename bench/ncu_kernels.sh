#!/usr/bin/env bash
# Nsight Compute profile of the kernels of one prefill forward call (the 4th: three warm-ups
# first), with per-instruction warp stall samples, for bench/ncu_lines.py.
#   bash bench/ncu_kernels.sh CASE OUT.tgz [CONFIG]
# CASE: a bench_triton_prefill.py case (siso_1x16384, mimo4_8x2048, ...); CONFIG as
# profile_prefill.py --config. OUT.tgz holds CASE_details.csv (every section's metrics),
# CASE_sass.csv (the source page: per-instruction samples and counts), the log, and the cubins
# the call ran (a fresh Triton cache), whose line tables map the samples to source lines.
set -uo pipefail
case_name=$1 out=$2 config=${3:-}
work=$(mktemp -d)
export PYTHONPATH="$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}" TRITON_CACHE_DIR="$work/cache"
args=(--case "$case_name" --reps 1 --plain)
[ -n "$config" ] && args+=(--config "$config")
kernels='regex:_chunk_fwd_kernel|_segment_state_kernel|_state_pass_kernel|_block_out_kernel'
ncu --clock-control none --kernel-name "$kernels" --launch-skip 9 --launch-count 3 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section MemoryWorkloadAnalysis --section SourceCounters \
    -f -o "$work/$case_name" python bench/profile_prefill.py "${args[@]}" \
    > "$work/${case_name}_ncu.log" 2>&1
tail -4 "$work/${case_name}_ncu.log"
ncu -i "$work/$case_name.ncu-rep" --page details --csv > "$work/${case_name}_details.csv" 2>&1
ncu -i "$work/$case_name.ncu-rep" --page source --csv --print-source sass \
    > "$work/${case_name}_sass.csv" 2>&1
mkdir -p "$work/cubin"
find "$work/cache" -name '*.cubin' -exec cp {} "$work/cubin/" \;
tar czf "$out" -C "$work" "${case_name}_details.csv" "${case_name}_sass.csv" \
    "${case_name}_ncu.log" cubin
rm -rf "$work"
ls -la "$out"
