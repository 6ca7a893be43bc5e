#!/bin/sh
# EXP14e: one SKAB cell. Usage: srun.sh SEED base|sub (from the worktree root).
set -eu
seed=$1 arm=$2
flag=--no-subspace
[ "$arm" = sub ] && flag=--subspace
PYTHONPATH=$(pwd) .venv/bin/python scripts/evaluate_unseen.py \
  --data /work/shared/datasets/skab --seeds 800,801,802 --seed "$seed" --threads 1 $flag \
  --json --keep "/tmp/sub14/bundle-e-$seed-$arm" > "scripts/experiments/issue14/e-$seed-$arm.json"
