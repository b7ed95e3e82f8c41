#!/usr/bin/env bash
# The issue-11 measurement on a fresh 3-node cluster (not part of CI): preload K keys of
# 256 bytes, 64 clients writing for 15 s, RSS of the three kvservers, then the time a
# SIGKILLed follower takes to serve again (caught up with the leader) after its restart.
#
#   [SKIP_RESTART=1] bench/engine-choice/cluster.sh K [OUT_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
K="${1:?usage: cluster.sh KEYS [OUT_DIR]}"
OUT="${2:-/tmp/engine-cluster-$K}"
mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/engine-cluster.XXXXXX)"
NAME="engine-cluster-$K"
CONFIG="$WORK/$NAME.json"
sed -e "s#\"data_dir\": \"data\"#\"data_dir\": \"$WORK/data\"#" \
    -e 's/"port": 5001/"port": 5301/; s/"port": 5002/"port": 5302/; s/"port": 5003/"port": 5303/' \
    "$ROOT/conf/cluster.json" >"$CONFIG"
cleanup() { "$ROOT/bin/stop_nodes.sh" --config "$CONFIG" >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT
cd "$ROOT"
bin/start_nodes.sh --config "$CONFIG" >/dev/null
LG=(target/release/loadgen --config "$CONFIG")
t0=$(date +%s.%N)
"${LG[@]}" --clients 64 --duration 1 --keys "$K" --value-size 256 --preload --json >"$OUT/preload.json"
t1=$(date +%s.%N)
echo "preload of $K keys: $(python3 -c "print(round($t1-$t0,1))") s"
"${LG[@]}" --clients 64 --duration 15 --keys "$K" --value-size 256 --json >"$OUT/put_c64.json"
python3 - "$OUT/put_c64.json" <<'PY'
import json,sys
r=json.load(open(sys.argv[1]))
keys=[k for k in r if any(s in k for s in ("ops","p50","p99","max","errors","busy"))]
print({k:r[k] for k in keys})
PY
for id in 1 2 3; do
    pid=$(cat "logs/$NAME/node$id.pid")
    echo "node $id RSS $(awk '/VmRSS/{print int($2/1024)}' /proc/$pid/status) MiB, data $(du -sm "$WORK/data/node$id" | cut -f1) MiB"
done
[[ "${SKIP_RESTART:-0}" == 1 ]] && exit 0
# Restart time: kill a follower with SIGKILL, restart it, wait until its applied index
# reaches the leader's commit.
status() { target/release/clerk --config "$CONFIG" status 2>/dev/null; }
status | tee "$OUT/status-before.txt"
follower=$(status | awk '$3=="follower"{print $1; exit}')
kill -9 "$(cat "logs/$NAME/node$follower.pid")"
sleep 1
# 5 s of writes while it is down, so it has a log to replay.
"${LG[@]}" --clients 64 --duration 5 --keys "$K" --value-size 256 >/dev/null
rm -f "logs/$NAME/node$follower.pid"
t0=$(date +%s.%N)
bin/start_nodes.sh --config "$CONFIG" >/dev/null
# Columns of `clerk status`: ID ADDRESS ROLE TERM LEADER COMMIT APPLIED ...
deadline=$(( $(date +%s) + 300 ))
while (( $(date +%s) < deadline )); do
    s=$(status || true)
    fa=$(echo "$s" | awk -v id="$follower" '$1==id && $3!="unreachable"{print $7}')
    lc=$(echo "$s" | awk '$3=="leader"{print $6}')
    if [[ -n "$fa" && -n "$lc" ]] && (( fa >= lc )); then break; fi
    sleep 0.1
done
t1=$(date +%s.%N)
echo "node $follower killed and restarted: caught up with the leader $(python3 -c "print(round($t1-$t0,1))") s after its restart"
status
