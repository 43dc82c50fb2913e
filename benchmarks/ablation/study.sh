#!/bin/bash
# the study, in sequence; each step reuses finished runs
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
PY=${PY:-python}
B="--out benchmarks/ablation --seeds 0 1 2 --steps 2000 --stage2-steps 500 --eval-every 250 --threads 1"
start=$(date +%s)
echo "start $(date)"
$PY benchmarks/ablation.py $B --queries 50 --variants mask2former two_rounds_hard themask
echo "core q50 done $(date) $(( ($(date +%s)-start)/60 )) min"
$PY benchmarks/ablation.py $B --queries 10 --variants mask2former two_rounds_hard themask
echo "core q10 done $(date) $(( ($(date +%s)-start)/60 )) min"
$PY benchmarks/ablation.py $B --queries 50 --variants themask themask_warmup t1_continued tad_t2
echo "warmup/tad2 done $(date) $(( ($(date +%s)-start)/60 )) min"
$PY benchmarks/ablation.py $B --queries 50 --variants t1_continued tad_t1 tad_t2 tad_t3
echo "all done $(date) $(( ($(date +%s)-start)/60 )) min"
