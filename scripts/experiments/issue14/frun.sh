#!/bin/sh
# EXP14f: one SKAB cell. Usage: frun.sh SEED base|sub (from the worktree root).
set -eu
seed=$1 arm=$2
flag=--no-subspace
[ "$arm" = sub ] && flag=--subspace
PYTHONPATH=$(pwd) .venv/bin/python scripts/evaluate_unseen.py \
  --data /work/shared/datasets/skab --seeds 900,901,902 --seed "$seed" --threads 1 $flag \
  --json --keep "/tmp/sub14f/bundle-f-$seed-$arm" > "scripts/experiments/issue14/f-$seed-$arm.json"
