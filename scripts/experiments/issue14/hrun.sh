#!/bin/bash
# usage: scripts/experiments/issue14/hrun.sh SEED base|h : EXP14b, reporting seeds 100-102
# (needs commit f335136: the --hold flag was removed after the test)
cd /work/wt-det14
hold=0; [ "$2" = h ] && hold=0.8
rm -rf scripts/experiments/issue14/bundle-h-$1-$2 scripts/experiments/issue14/bundle-h-$1-$2.pub
PYTHONPATH=/work/wt-det14 .venv/bin/python scripts/evaluate_unseen.py --data /work/shared/datasets/skab \
  --seeds 100,101,102 --seed $1 --threads 1 --hold $hold --json --keep scripts/experiments/issue14/bundle-h-$1-$2 \
  > scripts/experiments/issue14/h-$1-$2.json 2> scripts/experiments/issue14/h-$1-$2.err
