#!/usr/bin/env bash
# EXP14d on a lent GPU machine (one H200, 16 cores): the CUDA training path with mixed
# precision, and the spread of the current defaults over training seeds never used before.
# Run from the repository root with the development data copied to .gpu/skab and the
# missing wheels in .whl (both ignored by git); results go to $OUT/exp14d.tgz.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
RES=/tmp/exp14d
mkdir -p "$RES"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

eval_unseen() {  # $1 device, $2 training seed, $3 threads
  timeout 480 python3 scripts/evaluate_unseen.py --data .gpu/skab --seeds 700,701,702 \
    --seed "$2" --threads "$3" --device "$1" --json \
    > "$RES/$1-$2.json" 2> "$RES/$1-$2.log"
  echo "$1 seed $2 exit $?"
}

# CPU, one thread each: training seeds 7-14 side by side.
for seed in 7 8 9 10 11 12 13 14; do eval_unseen cpu "$seed" 1 & done

# CUDA: the product command first (timed), then the protocol on seeds 7 and 8.
python3 -c "
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives import serialization as s
k = ed25519.Ed25519PrivateKey.generate()
open('/tmp/sign.pem', 'wb').write(k.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
"
time python3 -c "from cloud.cli.main import main; main()" model train --data .gpu/skab --out /tmp/b-cuda \
  --signing-key /tmp/sign.pem --name pump --model-version 1 --device cuda --threads 1 --no-progress \
  > "$RES/train-cuda.log" 2>&1
echo "cli train cuda exit $?"
python3 -c "import json; m = json.load(open('/tmp/b-cuda/manifest.json')); \
t = m['training']; print({k: t.get(k) for k in ('device', 'seconds', 'wall_seconds', 'cpu_seconds', 'losses')})" \
  > "$RES/train-cuda-facts.txt" 2>&1
cat "$RES/train-cuda-facts.txt"
eval_unseen cuda 7 1
eval_unseen cuda 8 1
wait
tar czf "$OUT/exp14d.tgz" -C "$RES" .
ls -la "$RES"
