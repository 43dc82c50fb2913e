#!/bin/bash
# after the 50-query core comparison (study.sh, first command): 10 queries, seed by seed
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
PY=${PY:-python}
B="--out benchmarks/ablation --steps 2000 --stage2-steps 500 --eval-every 250 --threads 1"

for seed in 0 1 2; do
  $PY benchmarks/ablation.py $B --queries 10 --seeds $seed --variants mask2former themask
  echo "q10 seed $seed done $(date)"
done
