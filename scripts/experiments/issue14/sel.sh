#!/bin/bash
# usage: scripts/experiments/issue14/sel.sh SEED : a default bundle (valve1 hidden) for the MAR diagnosis, valve1 figures only
cd /work/wt-det14
rm -rf scripts/experiments/issue14/sel-$1 scripts/experiments/issue14/sel-$1.pub
PYTHONPATH=/work/wt-det14 .venv/bin/python scripts/evaluate_unseen.py --data /work/shared/datasets/skab \
  --seeds "" --seed $1 --threads 1 --json --keep scripts/experiments/issue14/sel-$1 > scripts/experiments/issue14/sel-$1.json 2> scripts/experiments/issue14/sel-$1.err
