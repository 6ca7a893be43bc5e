#!/bin/sh
# EXP14j: one SKAB cell. Usage: jrun.sh SEED base|s1 (from the checkout's root).
set -eu
seed=$1 arm=$2
smoothing=5
[ "$arm" = s1 ] && smoothing=1
PYTHONPATH=$(pwd) .venv/bin/python scripts/evaluate_unseen.py \
  --data /work/shared/datasets/skab --seeds 1200,1201,1202 --seed "$seed" --threads 1 \
  --smoothing "$smoothing" --json --keep "/tmp/d14j/bundle-j-$seed-$arm" \
  > "scripts/experiments/issue14/j-$seed-$arm.json"
