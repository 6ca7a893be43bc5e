#!/bin/sh
# EXP14f: the factor plant (train seed 11, test seed 12). Usage: fp2run.sh base|sub (from the
# worktree root; plants and key in /tmp/sub14f).
set -eu
arm=$1
flag=--no-subspace
[ "$arm" = sub ] && flag=--subspace
export PYTHONPATH=$(pwd)
for s in 11 12; do
  [ -d "/tmp/sub14f/fp$s" ] || .venv/bin/python scripts/experiments/issue14/factor_plant.py --seed $s --out "/tmp/sub14f/fp$s"
done
.venv/bin/autoglm model train --data /tmp/sub14f/fp11 --out "/tmp/sub14f/fpb-$arm" \
  --signing-key /tmp/sub14f/key.pem --epochs 4 --seed 0 --threads 1 --no-progress $flag
.venv/bin/autoglm model evaluate "/tmp/sub14f/fpb-$arm" --signing-key /tmp/sub14f/key.pem \
  --data /tmp/sub14f/fp12 --calibration-rows 400 --json > "scripts/experiments/issue14/fp2-$arm.json"
