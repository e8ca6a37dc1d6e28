#!/usr/bin/env bash
# Loopback deployment of fed-asr on Flower's Deployment Engine, on 127.0.0.1:
# credentials -> SuperLink (TLS + SuperNode authentication) -> node registration ->
# N SuperNodes, each with its site identity key and the pinned site list -> a short
# FedASR run (authenticated secure spectrum aggregation, signed global state)
# -> everything stopped, also on failure or Ctrl-C.
#
# Usage: scripts/deploy_local.sh [OUT_DIR]          (default: ./deploy-local)
# Environment:
#   FED_ASR_NODES=2          number of SuperNodes (each holds one Dirichlet share)
#   FED_ASR_OVERRIDES="..."  extra Hydra overrides for the run (e.g. a smaller slice)
#   FED_ASR_TIMEOUT=1800     seconds allowed for the run
#   FED_ASR_FLWR_HOME=DIR    Flower home (config.toml, installed app copies); default:
#                            a fresh folder under ${TMPDIR:-/tmp}, removed on exit
#   FED_ASR_SITE_WORKERS=0   the first K nodes get a site worker (fed-asr-site-worker,
#                            the base model stays loaded between messages); the
#                            others load it in every ClientApp process
#   FED_ASR_SITE_EXECUTORS=0 the next K nodes (after those with a worker) run in
#                            process isolation mode with fed-asr-site-executor (every
#                            task in one long-lived process: no process per message)
# Prints the path of the run's metrics.json as its last line; exit code 0 on success.
set -euo pipefail

OUT=$(python3 -c 'import os, sys; print(os.path.abspath(sys.argv[1]))' "${1:-deploy-local}")
NODES=${FED_ASR_NODES:-2}
WORKERS=${FED_ASR_SITE_WORKERS:-0}
EXECUTORS=${FED_ASR_SITE_EXECUTORS:-0}
EXTRA=${FED_ASR_OVERRIDES:-}
TIMEOUT=${FED_ASR_TIMEOUT:-1800}
REPO=$(cd "$(dirname "$0")/.." && pwd)
CONNECTION=deploy-local
CERTS="$OUT/certs"

# The Flower home holds installed copies of the app (server/, clients/): outside the
# checkout, so they can never shadow its packages (README, "Deployment").
OWN_HOME=
if [ -n "${FED_ASR_FLWR_HOME:-}" ]; then
    FLWR_HOME=$FED_ASR_FLWR_HOME
else
    FLWR_HOME=$(mktemp -d "${TMPDIR:-/tmp}/fed-asr-deploy-XXXXXX")
    OWN_HOME=$FLWR_HOME
fi
export FLWR_HOME
# Use this environment for the apps instead of installing their dependencies per run.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# Every ClientApp message logs its timing in the SuperNode logs (clients/entry.py)
export FED_ASR_LOG_TIMING=${FED_ASR_LOG_TIMING:-1}

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && kill -TERM -- "-$pid" 2>/dev/null || true
    done
    sleep 1
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && kill -KILL -- "-$pid" 2>/dev/null || true
    done
}
# Site worker sockets: a short path (Unix sockets allow ~100 bytes), removed on exit
SOCKETS=$(mktemp -d "${TMPDIR:-/tmp}/fed-asr-w-XXXXXX")
remove_home() {
    rm -rf -- "$SOCKETS"
    if [ -n "$OWN_HOME" ]; then rm -rf -- "$OWN_HOME"; fi
}
trap 'cleanup; remove_home' EXIT
trap 'exit 130' INT TERM

step() { echo "[deploy_local] $*"; }
fail() { echo "[deploy_local] ERROR: $*" >&2; exit 1; }
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# Start a command in its own session (process group) so cleanup stops its children too.
start() {
    local log=$1
    shift
    setsid "$@" >"$log" 2>&1 &
    PIDS+=("$!")
    disown "$!"  # no job notices when cleanup kills it
}

mkdir -p "$OUT" "$FLWR_HOME"
cd "$REPO"

step "1/6 credentials in $CERTS (CA, SuperLink TLS for localhost/127.0.0.1, $NODES node and site identity keys, signing key)"
fed-asr-credentials --out "$CERTS" --nodes "$NODES" --san localhost --san 127.0.0.1 --force >"$OUT/credentials.log"

PORT=$(free_port)
step "2/6 SuperLink on 127.0.0.1:$PORT with TLS and SuperNode authentication"
start "$OUT/superlink.log" flower-superlink \
    --ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem" \
    --ssl-keyfile "$CERTS/server.key" --enable-supernode-auth \
    --host 127.0.0.1 --port "$PORT" --database "$OUT/superlink.db"
cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "$CONNECTION"

[superlink.$CONNECTION]
address = "127.0.0.1:$PORT"
root-certificates = "$CERTS/ca.crt"
EOF
for _ in $(seq 120); do
    python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$PORT" 2>/dev/null && break
    sleep 0.5
done || true
python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$PORT" 2>/dev/null \
    || fail "SuperLink did not start; see $OUT/superlink.log"

step "3/6 registering $NODES SuperNode public keys"
for i in $(seq 0 $((NODES - 1))); do
    flwr supernode register "$CERTS/node-$i.pub" "$CONNECTION" >>"$OUT/register.log" 2>&1 \
        || fail "registering node-$i failed; see $OUT/register.log"
done

step "4/6 starting $NODES SuperNodes (TLS, authenticated, server signatures verified, site identities; $WORKERS with a site worker, $EXECUTORS with a site executor)"
for i in $(seq 0 $((NODES - 1))); do
    WORKER_CONFIG=
    if [ "$i" -lt "$WORKERS" ]; then
        start "$OUT/site-worker-$i.log" fed-asr-site-worker --socket "$SOCKETS/node-$i.sock"
        for _ in $(seq 240); do [ -S "$SOCKETS/node-$i.sock" ] && break; sleep 0.5; done
        [ -S "$SOCKETS/node-$i.sock" ] || fail "site worker $i did not start; see $OUT/site-worker-$i.log"
        WORKER_CONFIG=" site-worker='$SOCKETS/node-$i.sock'"
    fi
    ISOLATION=()
    EXECUTOR=
    if [ "$i" -ge "$WORKERS" ] && [ "$i" -lt $((WORKERS + EXECUTORS)) ]; then
        ISOLATION=(--isolation process)
        EXECUTOR=1
    fi
    RUNTIME_PORT=$(free_port)
    start "$OUT/supernode-$i.log" flower-supernode \
        --root-certificates "$CERTS/ca.crt" --auth-supernode-private-key "$CERTS/node-$i" \
        --superlink "127.0.0.1:$PORT" --port "$RUNTIME_PORT" "${ISOLATION[@]}" \
        --node-config "partition-id=$i num-partitions=$NODES verify-key='$CERTS/signing.pub' identity-key='$CERTS/site-$i.key' site-keys='$CERTS/site-keys.json'$WORKER_CONFIG"
    if [ -n "$EXECUTOR" ]; then
        start "$OUT/site-executor-$i.log" fed-asr-site-executor \
            --runtime-api-address "127.0.0.1:$RUNTIME_PORT" --insecure
    fi
done
online=0
for _ in $(seq 120); do
    online=$(flwr supernode list "$CONNECTION" 2>/dev/null | grep -c " online " || true)
    [ "$online" -ge "$NODES" ] && break
    sleep 0.5
done
[ "$online" -ge "$NODES" ] || fail "only $online of $NODES SuperNodes online; see $OUT/supernode-*.log"

step "5/6 FedASR run through the deployment (output: $OUT/run)"
OVERRIDES="federation.num_clients=$NODES output_dir=$OUT/run privacy.secure_spectrum=true"
OVERRIDES="$OVERRIDES security.sign=true security.signing_key=$CERTS/signing.key"
OVERRIDES="$OVERRIDES security.site_keys=$CERTS/site-keys.json $EXTRA"
rm -f "$OUT/run/metrics.json"
timeout "$TIMEOUT" flwr run "$REPO" "$CONNECTION" --stream \
    --run-config "overrides='$OVERRIDES'" 2>&1 | tee "$OUT/run.log" || true
[ -f "$OUT/run/metrics.json" ] || fail "the run wrote no metrics.json; see $OUT/run.log and $OUT/superlink.log"

step "6/6 stopping the SuperLink and SuperNodes"
cleanup
PIDS=()
echo "$OUT/run/metrics.json"
