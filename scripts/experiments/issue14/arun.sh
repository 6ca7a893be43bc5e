#!/bin/sh
# EXP14h: one SKAB cell. Usage: arun.sh SEED base|away (from the worktree root).
# Needs commit 3fe08a5 (the --level-away code was removed after the test).
set -eu
seed=$1 arm=$2
flag=--no-level-away
[ "$arm" = away ] && flag=--level-away
PYTHONPATH=$(pwd) .venv/bin/python scripts/evaluate_unseen.py \
  --data /work/shared/datasets/skab --seeds 1100,1101,1102 --seed "$seed" --threads 1 $flag \
  --json --keep "/tmp/d14h/bundle-a-$seed-$arm" > "scripts/experiments/issue14/away-$seed-$arm.json"
