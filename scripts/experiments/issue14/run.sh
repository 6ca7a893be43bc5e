#!/bin/bash
# usage: scripts/experiments/issue14/run.sh SEED base|c1
# (needs commit ab09781: the --fast-return flag was removed after the test)
cd /work/wt-det14
flag=--no-fast-return; [ "$2" = c1 ] && flag=--fast-return
rm -rf scripts/experiments/issue14/bundle-$1-$2 scripts/experiments/issue14/bundle-$1-$2.pub
PYTHONPATH=/work/wt-det14 .venv/bin/python scripts/evaluate_unseen.py --data /work/shared/datasets/skab \
  --seeds 500,501,502 --seed $1 --threads 1 $flag --json --keep scripts/experiments/issue14/bundle-$1-$2 > scripts/experiments/issue14/$1-$2.json 2> scripts/experiments/issue14/$1-$2.err
