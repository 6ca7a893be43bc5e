#!/bin/sh
# EXP14e: the factor plant. Usage: fprun.sh base|sub (from the worktree root; key in /tmp/sub14).
set -eu
arm=$1
flag=--no-subspace
[ "$arm" = sub ] && flag=--subspace
export PYTHONPATH=$(pwd)
for s in 1 2; do
  [ -d "/tmp/sub14/fp$s" ] || .venv/bin/python scripts/experiments/issue14/factor_plant.py --seed $s --out "/tmp/sub14/fp$s"
done
.venv/bin/autoglm model train --data /tmp/sub14/fp1 --out "/tmp/sub14/fpb-$arm" \
  --signing-key /tmp/sub14/key.pem --epochs 4 --seed 0 --threads 1 --no-progress $flag
.venv/bin/autoglm model evaluate "/tmp/sub14/fpb-$arm" --public-key /tmp/sub14/key.pub \
  --data /tmp/sub14/fp2 --calibration-rows 400 --json > "scripts/experiments/issue14/fp-$arm.json"
