# Sourced by the study scripts in benchmarks/ablation/*/: run from the repository root with the
# repository's themask, one thread per runner; $OUT and $B (the ablation.py flags every run
# shares) must be set first. `lane variant:seed ...` trains those runs one after the other,
# each into its own log; start two lanes with & and `wait` for both.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
PY=${PY:-python}
start=$(date +%s)
echo "start $(date)"
lane() {
    for job in "$@"; do
        $PY benchmarks/ablation.py $B --variants "${job%:*}" --seeds "${job#*:}" >"$OUT/lane_${job%:*}_${job#*:}.log" 2>&1
        echo "${job} done $(date) $(( ($(date +%s)-start)/60 )) min"
    done
}
