#!/bin/sh
# EXP14g: one SKAB cell. Usage: grun.sh SEED base|pooled (from the worktree root).
# Needs commit aea0450 (the --pooled-tolerance code was removed after the test).
set -eu
seed=$1 arm=$2
flag=--no-pooled-tolerance
[ "$arm" = pooled ] && flag=--pooled-tolerance
PYTHONPATH=$(pwd) .venv/bin/python scripts/evaluate_unseen.py \
  --data /work/shared/datasets/skab --seeds 1000,1001,1002 --seed "$seed" --threads 1 $flag \
  --json --keep "/tmp/d14g/bundle-g-$seed-$arm" > "scripts/experiments/issue14/g-$seed-$arm.json"
