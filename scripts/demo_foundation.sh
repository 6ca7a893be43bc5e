#!/usr/bin/env bash
# The foundation demo (until the full demo lands with the alerts issue): a control plane,
# one registered and enrolled device, its agent online, then revoked, using only the real
# `autoglm` and `autoglm-edge` commands on embedded defaults (SQLite, local files).
set -euo pipefail
work=$(mktemp -d -t autoglm-demo-XXXXXX)
export HOME="$work/home"  # keep the demo's CLI context out of the user's own
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. Initialise a control plane in $work/cloud"
autoglm cloud init --state-dir "$work/cloud" --host localhost \
  --api-listen 127.0.0.1:0 --device-listen 127.0.0.1:0 | tee "$work/init.txt"
token=$(grep -o 'agt_op_[A-Za-z0-9_-]*' "$work/init.txt")

step "2. Serve it (TLS API port, mutual-TLS device port)"
autoglm cloud serve --state-dir "$work/cloud" --ports-file "$work/ports.json" 2>"$work/serve.log" &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/ports.json" ] && break; sleep 0.1; done
api_port=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['api_port'])" "$work/ports.json")
autoglm login --server "localhost:$api_port" --ca-cert "$work/cloud/ca.crt" --token "$token"

step "3. Register a device; its bootstrap file carries the one-time token"
autoglm device register pump-station-7 --label site=plant-a --label line=2 \
  --profile jetson-orin-nx --bootstrap-out "$work/pump-station-7.yaml"

step "4. On the device: enroll (key made on the device) and run the agent"
autoglm-edge enroll --bootstrap "$work/pump-station-7.yaml" --state-dir "$work/agent"
autoglm-edge run --state-dir "$work/agent" 2>"$work/agent.log" &
pids+=($!)
for _ in $(seq 50); do
  autoglm device list --json | grep -q '"online": true' && break; sleep 0.1
done
autoglm device list

step "5. Revoke it: the session ends, the certificate is refused"
autoglm device revoke pump-station-7 --reason "demo"
sleep 1
autoglm device list
grep -m1 "refused" "$work/agent.log" || true

printf '\nDone. Logs and state are in %s\n' "$work"
