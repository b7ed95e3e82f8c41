#!/usr/bin/env bash
# Takes a screenshot of the live dashboard in headless Chromium, the way an
# operator would see it in an incident: a 3-node cluster under a mixed load,
# whose leader is killed (kill -9) part way through.
#
#   bin/dashboard_screenshot.sh [OUT.png]      (default docs/dashboard.png)
#
# Installs Chromium (Debian's package) when it is missing. Everything runs
# on 127.0.0.1 in a temporary directory, removed at the end.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$(realpath -m "${1:-$ROOT/docs/dashboard.png}")"
LOAD_S=75          # the load runs this long
KILL_AT_S=35       # the leader is killed this far into it
SHOT_AT_S=65       # and the screenshot taken this far into it

if ! command -v chromium >/dev/null; then
    echo "dashboard_screenshot: installing chromium" >&2
    (apt-get install -y chromium >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y chromium >/dev/null; })
fi
(cd "$ROOT" && cargo build --release --quiet --bins)
BIN="$ROOT/target/release"
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

python3 - "$WORK" <<'PY'
import json, socket, sys
work = sys.argv[1]
socks = [socket.socket() for _ in range(6)]
for s in socks:
    s.bind(("127.0.0.1", 0))
ports = [s.getsockname()[1] for s in socks]
for s in socks:
    s.close()
nodes = [{"id": i + 1, "ip": "127.0.0.1", "port": ports[i], "http_port": ports[i + 3]} for i in range(3)]
json.dump({"raft_nodes": nodes, "data_dir": work + "/data", "cluster_id": "demo"}, open(work + "/cluster.json", "w"))
PY
CONFIG="$WORK/cluster.json"
http_of() { python3 -c "import json,sys; n=json.load(open('$CONFIG'))['raft_nodes'][$1-1]; print(f\"{n['ip']}:{n['http_port']}\")"; }
for id in 1 2 3; do
    "$BIN/kvserver" --config "$CONFIG" --id "$id" 2>"$WORK/node$id.log" &
    PIDS+=($!)
done
for _ in $(seq 100); do
    "$BIN/clerk" --config "$CONFIG" --timeout 1 put ready 1 >/dev/null 2>&1 && break
    sleep 0.2
done
"$BIN/loadgen" --config "$CONFIG" --clients 16 --duration "$LOAD_S" --read-ratio 0.5 --timeout 5 \
    >"$WORK/loadgen.out" 2>&1 &
sleep "$KILL_AT_S"
LEADER="$(curl -s "http://$(http_of 1)/health" | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader"])')"
echo "dashboard_screenshot: killing the leader, node $LEADER" >&2
kill -9 "${PIDS[$((LEADER - 1))]}"
SURVIVOR=$(( LEADER % 3 + 1 ))
sleep $(( SHOT_AT_S - KILL_AT_S ))
# The new leader's dashboard: it serves the clients, so it has every chart.
VIEW="$(curl -s "http://$(http_of "$SURVIVOR")/health" | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader"] or '"$SURVIVOR"')')"
mkdir -p "$(dirname "$OUT")"
timeout 60 chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$WORK/chromium" --window-size=1400,1000 --virtual-time-budget=3000 \
    --screenshot="$OUT" "http://$(http_of "$VIEW")/" >/dev/null 2>&1
echo "dashboard_screenshot: $OUT (node $VIEW's dashboard)" >&2
