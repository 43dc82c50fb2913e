#!/bin/bash
# after study2.sh: the TAD stage (T=2 from the T=1 run vs T=1 continued), the warm-up, T=1/3
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
PY=${PY:-python}
B="--out benchmarks/ablation --steps 2000 --stage2-steps 500 --eval-every 250 --threads 1 --queries 50"
for seed in 0 1 2; do
  $PY benchmarks/ablation.py $B --seeds $seed --variants t1_continued tad_t2
  echo "tad seed $seed done $(date)"
done
for seed in 0 1 2; do
  $PY benchmarks/ablation.py $B --seeds $seed --variants themask_warmup
  echo "warmup seed $seed done $(date)"
done
for seed in 0 1 2; do
  $PY benchmarks/ablation.py $B --seeds $seed --variants tad_t1 tad_t3
  echo "tad t1/t3 seed $seed done $(date)"
done
