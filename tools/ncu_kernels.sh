#!/usr/bin/env bash
# Nsight Compute profile of the kernels of one prefill forward call (the 4th: three warm-ups
# first), with per-instruction warp stall samples, for tools/ncu_lines.py.
#   bash tools/ncu_kernels.sh CASE OUT.tgz [CONFIG]
# CASE: a bench_triton_prefill.py case (siso_1x16384, mimo4_8x2048, ...); CONFIG as
# profile_prefill.py --config. OUT.tgz holds CASE_details.csv (every section's metrics),
# CASE_sass.csv (the source page: per-instruction samples and counts), the log, and the cubins
# the call ran (a fresh Triton cache), whose line tables map the samples to source lines.
set -uo pipefail
source "$(dirname "$0")/ncu_archive.sh"
case_name=$1 out=$2 config=${3:-}
work=$(mktemp -d)
export PYTHONPATH="$PWD:$PWD/tools${PYTHONPATH:+:$PYTHONPATH}" TRITON_CACHE_DIR="$work/cache"
args=(--case "$case_name" --reps 1 --plain)
[ -n "$config" ] && args+=(--config "$config")
kernels='regex:_chunk_fwd_kernel|_segment_state_kernel|_state_pass_kernel|_block_out_kernel'
ncu --clock-control none --kernel-name "$kernels" --launch-skip 9 --launch-count 3 \
    "${NCU_SECTIONS[@]}" \
    -f -o "$work/$case_name" python tools/profile_prefill.py "${args[@]}" \
    > "$work/${case_name}_ncu.log" 2>&1
tail -4 "$work/${case_name}_ncu.log"
ncu_archive "$work" "$case_name" "$out"
rm -rf "$work"
ls -la "$out"
