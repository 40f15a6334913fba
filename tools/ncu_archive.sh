# Sourced by tools/ncu_kernels.sh and tools/ncu_backward.sh: their ncu sections, and
#   ncu_archive WORK NAME OUT.tgz
# exports the report WORK/NAME.ncu-rep as NAME_details.csv (every section's metrics) and
# NAME_sass.csv (the source page: per-instruction samples and counts), copies the cubins of the
# Triton cache WORK/cache (their line tables map the samples to source lines, tools/ncu_lines.py)
# and packs them with the log NAME_ncu.log into OUT.tgz.
# The sections both profiles collect (SourceCounters: the per-instruction samples).
NCU_SECTIONS=(--section SpeedOfLight --section Occupancy --section LaunchStats
              --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis
              --section SourceCounters)

ncu_archive() {
    local work=$1 name=$2 out=$3
    ncu -i "$work/$name.ncu-rep" --page details --csv > "$work/${name}_details.csv" 2>&1
    ncu -i "$work/$name.ncu-rep" --page source --csv --print-source sass \
        > "$work/${name}_sass.csv" 2>&1
    mkdir -p "$work/cubin"
    find "$work/cache" -name '*.cubin' -exec cp {} "$work/cubin/" \;
    tar czf "$out" -C "$work" "${name}_details.csv" "${name}_sass.csv" "${name}_ncu.log" cubin
}
