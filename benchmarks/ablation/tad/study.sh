#!/bin/bash
# The TAD stage at the longer budget: from each 7,000-step THE-Mask T=1 run of
# benchmarks/ablation/long (50 queries, seeds 0-2), 1,500 more steps of
#   T=1 continued | TAD with T=1 | TAD with T=2 | TAD with T=3.
# The stage-1 runs are trained first if runs/themask_q50 is missing (copy them from
# benchmarks/ablation/long/runs to skip that). Two runners in parallel, one thread each.
OUT=benchmarks/ablation/tad
B="--out $OUT --data $OUT/data --queries 50 --steps 7000 --stage2-steps 1500 --eval-every 250 --threads 1"
source "$(dirname "$0")/../lanes.sh"
[ -f $OUT/data/train.txt ] || $PY benchmarks/synthetic_videos.py $OUT/data --train-videos 150 --val-videos 8
$PY benchmarks/ablation.py $B --variants themask --seeds 0 1 2 >"$OUT/stage1.log" 2>&1
lane tad_t3:0 tad_t3:1 t1_continued:0 t1_continued:1 t1_continued:2 tad_t1:0 &
lane tad_t3:2 tad_t2:0 tad_t2:1 tad_t2:2 tad_t1:1 tad_t1:2 &
wait
$PY benchmarks/ablation.py $B --only-finished --seeds 0 1 2 --variants themask t1_continued tad_t1 tad_t2 tad_t3
echo "all done $(date) $(( ($(date +%s)-start)/60 )) min"
