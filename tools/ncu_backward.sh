#!/usr/bin/env bash
# Nsight Compute profile of one backward kernel in the 4th of four fwd+bwd calls (the first
# three compile and warm up), with per-instruction warp stall samples, for tools/ncu_lines.py.
#   bash tools/ncu_backward.sh B L RANK OUT.tgz [KERNEL]
# KERNEL: the kernel's name (default _core_bwd_kernel; a kernel launched once per call).
# OUT.tgz holds KERNEL_details.csv, KERNEL_sass.csv, the log and the cubins that ran.
set -uo pipefail
source "$(dirname "$0")/ncu_archive.sh"
batch=$1 seqlen=$2 rank=$3 out=$4 kernel=${5:-_core_bwd_kernel}
work=$(mktemp -d)
export PYTHONPATH="$PWD:$PWD/tools${PYTHONPATH:+:$PYTHONPATH}" TRITON_CACHE_DIR="$work/cache"
ncu --clock-control none --kernel-name "$kernel" --launch-skip 3 --launch-count 1 \
    "${NCU_SECTIONS[@]}" \
    -f -o "$work/$kernel" python tools/profile_backward.py --batch "$batch" --seqlen "$seqlen" \
    --rank "$rank" > "$work/${kernel}_ncu.log" 2>&1
tail -4 "$work/${kernel}_ncu.log"
ncu_archive "$work" "$kernel" "$out"
rm -rf "$work"
ls -la "$out"
