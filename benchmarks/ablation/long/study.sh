#!/bin/bash
# The longer key comparison: Mask2Former vs THE-Mask (T=1), 50 queries, 3 seeds, 7,000 steps.
# Two runners in parallel (one thread each) into one folder: the data are generated first and
# every run has its own run folder; the report step at the end tables all six runs.
OUT=benchmarks/ablation/long
B="--out $OUT --data $OUT/data --queries 50 --steps 7000 --eval-every 250 --threads 1"
source "$(dirname "$0")/../lanes.sh"
$PY benchmarks/synthetic_videos.py $OUT/data --train-videos 150 --val-videos 8
lane mask2former:0 themask:1 mask2former:2 &
lane themask:0 mask2former:1 themask:2 &
wait
$PY benchmarks/ablation.py $B --only-finished --seeds 0 1 2 --variants mask2former themask
echo "all done $(date) $(( ($(date +%s)-start)/60 )) min"
