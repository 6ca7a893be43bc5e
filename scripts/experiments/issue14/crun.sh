#!/bin/bash
# usage: scripts/experiments/issue14/crun.sh SEED base|cusum : EXP14c, reporting seeds 600-602
# (needs commit 2026e3e: the --cusum flags were removed after the test)
cd /work/wt-cusum14
flags=--no-cusum; [ "$2" = cusum ] && flags="--cusum --cusum-k 0.25 --cusum-rows 30"
rm -rf /tmp/cs/bundle-c-$1-$2 /tmp/cs/bundle-c-$1-$2.pub
PYTHONPATH=/work/wt-cusum14 .venv/bin/python scripts/evaluate_unseen.py --data /work/shared/datasets/skab \
  --seeds 600,601,602 --seed $1 --threads 1 $flags --json --keep /tmp/cs/bundle-c-$1-$2 \
  > scripts/experiments/issue14/c-$1-$2.json 2> scripts/experiments/issue14/c-$1-$2.err
