#!/usr/bin/env bash
# Issue 13's benchmarks; see bench/README.md.
#   bench/membership.sh transfer [--clients N] [--duration S] [--transfers T] [--out DIR]
#   bench/membership.sh add [--keys K] [--clients N] [--baseline S] [--load S] [--out DIR]
# transfer: a fresh 3-node cluster (bin/start_nodes.sh on a temporary config:
#   free loopback ports, data under ${TMPDIR:-/tmp}, fsync on); N clients put
#   for S seconds with no transfer (the baseline), then again while the
#   leadership is handed to another voter T times (`clerk transfer-leader`,
#   one every S/(T+1) seconds), then again while the leader is SIGKILLed once
#   (an election, for comparison). Each run reports loadgen's
#   max_write_gap_ms: the longest time with no write acknowledged.
# add: `bench/scale.sh catchup --add-member`: K keys preloaded, the put load's
#   p99 alone and while a new node joins (`kvserver --join`, `clerk member
#   add`) and catches up.
# Prints one JSON object per run (also in OUT/transfer.json) after a few
# human-readable lines. The cluster is stopped on exit, failure and Ctrl-C.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# build_release, write_config, stop_nodes_keep_logs.
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

START_TIMEOUT_S=300
STOP_TIMEOUT_S=60
RUN_SLACK_S=60
CLIENTS=64
DURATION_S=20
TRANSFERS=4
OUT=""

usage() {
    echo "usage: bench/membership.sh transfer [--clients N (default $CLIENTS)] [--duration S (default $DURATION_S)]" \
        "[--transfers T (default $TRANSFERS)] [--out DIR]"
    echo "       bench/membership.sh add [bench/scale.sh catchup options]"
}
die_usage() { echo "membership.sh: $1" >&2; usage >&2; exit 2; }
say() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
fail() { echo "membership.sh: FAIL: $*" >&2; exit 1; }

[[ $# -ge 1 ]] || die_usage "a subcommand is required"
case "$1" in
    add) shift; exec "$ROOT/bench/scale.sh" catchup --add-member "$@" ;;
    transfer) shift ;;
    -h|--help) usage; exit 0 ;;
    *) die_usage "unknown subcommand '$1'" ;;
esac
while [[ $# -gt 0 ]]; do
    case "$1" in
        --clients|--duration|--transfers|--out)
            [[ $# -ge 2 && -n "$2" ]] || die_usage "$1 needs a value"
            case "$1" in
                --clients) CLIENTS="$2" ;;
                --duration) DURATION_S="$2" ;;
                --transfers) TRANSFERS="$2" ;;
                --out) OUT="$2" ;;
            esac
            shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die_usage "unexpected argument '$1'" ;;
    esac
done
for pair in "clients:$CLIENTS" "duration:$DURATION_S" "transfers:$TRANSFERS"; do
    [[ "${pair#*:}" =~ ^[1-9][0-9]*$ ]] || die_usage "${pair%%:*} '${pair#*:}' is not a positive whole number"
done
command -v python3 >/dev/null || { echo "membership.sh: python3 is required" >&2; exit 2; }

OUT="${OUT:-${TMPDIR:-/tmp}/kv-membership/transfer-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT/logs"
[[ ! -e "$OUT/transfer.json" ]] || die_usage "$OUT already holds a transfer.json"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/kv-membership-work.XXXXXX")"

CUR_CONFIG=""
LOAD_PID=""
on_exit() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n "$LOAD_PID" ]]; then
        kill "$LOAD_PID" 2>/dev/null || true
        wait "$LOAD_PID" 2>/dev/null || true
    fi
    [[ -z "$CUR_CONFIG" ]] || stop_nodes_keep_logs
    rm -rf "$WORK"
    exit "$status"
}
trap on_exit EXIT
trap 'say "interrupted"; exit 130' INT TERM

build_release
LOADGEN="$TARGET_DIR/release/loadgen"
CLERK="$TARGET_DIR/release/clerk"
{
    echo "date: $(date -u '+%F %T UTC')"
    echo "machine: $(nproc) CPUs, $(uname -sr)"
    echo "commit: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "parameters: transfer, clients $CLIENTS, duration ${DURATION_S}s, transfers $TRANSFERS"
    echo "loadavg_before: $(cat /proc/loadavg)"
} >"$OUT/machine.txt"

CUR_CONFIG="$WORK/membership-$$.json"
write_config "$CUR_CONFIG" "$WORK/data" || fail "no free ports"
(cd "$ROOT" && timeout -k 10 "$START_TIMEOUT_S" bin/start_nodes.sh --config "$CUR_CONFIG") \
    >"$OUT/logs/start.log" 2>&1 \
    || fail "bin/start_nodes.sh failed: $(tail -n 1 "$OUT/logs/start.log")"
LOG_DIR="$ROOT/logs/$(basename "$CUR_CONFIG" .json)"

# The leader's id and another voter's, from `clerk member list --json`.
leader_and_other() {
    "$CLERK" --config "$CUR_CONFIG" --timeout 5 member list --json | python3 -c '
import json, sys
view = json.load(sys.stdin)
others = sorted(m["id"] for m in view["members"] if m["role"] == "voter" and m["id"] != view["leader"])
print(view["leader"], others[0] if others else 0)'
}
now_s() { python3 -c 'import time; print(f"{time.time():.3f}")'; }

# Runs the load in the background for DURATION_S; TAG names its output.
start_load() { # TAG
    timeout -k 10 "$((DURATION_S + RUN_SLACK_S))" "$LOADGEN" --config "$CUR_CONFIG" \
        --clients "$CLIENTS" --duration "$DURATION_S" --read-ratio 0 --json \
        --plot "$OUT/$1.svg" >"$OUT/logs/$1.out" 2>"$OUT/logs/$1.err" &
    LOAD_PID=$!
    LOAD_START="$(now_s)"
    echo "$LOAD_START" >"$OUT/logs/$1.start"
}
wait_load() { # TAG
    local status=0
    wait "$LOAD_PID" || status=$?
    LOAD_PID=""
    [[ "$status" == 0 ]] || fail "loadgen ($1) exited with status $status: $(tail -n 1 "$OUT/logs/$1.err")"
}

EVENTS="$OUT/logs/events.txt"
: >"$EVENTS"
step_s="$(python3 -c "print($DURATION_S / ($TRANSFERS + 1))")"

say "baseline: $CLIENTS clients putting for ${DURATION_S}s, no transfer"
start_load baseline
wait_load baseline

say "transfer: the same load, $TRANSFERS transfers, one every ${step_s}s"
start_load transfer
for _ in $(seq 1 "$TRANSFERS"); do
    sleep "$step_s"
    read -r leader target <<<"$(leader_and_other)"
    [[ "$target" != 0 ]] || fail "no voter to transfer to"
    begin="$(now_s)"
    timeout -k 5 20 "$CLERK" --config "$CUR_CONFIG" --timeout 10 transfer-leader "$target" \
        >>"$OUT/logs/transfers.log" 2>&1 || fail "clerk transfer-leader $target failed: $(tail -n 1 "$OUT/logs/transfers.log")"
    end="$(now_s)"
    echo "transfer $leader->$target $(python3 -c "print(f'{$begin - $LOAD_START:.3f} {$end - $LOAD_START:.3f}')")" >>"$EVENTS"
    say "  leadership $leader -> $target"
done
wait_load transfer

say "election: the same load, the leader SIGKILLed once halfway (for comparison)"
start_load election
sleep "$(python3 -c "print($DURATION_S / 2)")"
read -r leader _ <<<"$(leader_and_other)"
kill -KILL "$(cat "$LOG_DIR/node$leader.pid")"
echo "kill $leader $(python3 -c "print(f'{$(now_s) - $LOAD_START:.3f}')")" >>"$EVENTS"
say "  SIGKILL leader $leader"
wait_load election

python3 - "$OUT" "$EVENTS" <<'PY'
import json, sys
out, events = sys.argv[1:]
def last_json(path):
    lines = [l for l in open(path).read().splitlines() if l.startswith("{")]
    if not lines:
        sys.exit(f"membership.sh: FAIL: no JSON from loadgen in {path}")
    return json.loads(lines[-1])
keys = ("ops_per_sec", "p50_ms", "p99_ms", "max_ms", "max_write_gap_ms", "max_write_gap_end_s", "errors")
result = {tag: {k: last_json(f"{out}/logs/{tag}.out")[k] for k in keys}
          for tag in ("baseline", "transfer", "election")}
result["events"] = open(events).read().splitlines()
# The longest write gap around each transfer: one that ended between the
# transfer's start and 0.5 s after the clerk saw it done; when none of the
# run's 16 longest did, the transfer's gap was below the shortest of them.
transfer_run = last_json(f"{out}/logs/transfer.out")
gaps = transfer_run["write_gaps"]
# Events are stamped in seconds since the load was started; loadgen's window
# begins a little later (it connects first): move the gaps onto that clock.
load_start = float(open(f"{out}/logs/transfer.start").read())
shift = transfer_run["window_start_unix_s"] - load_start
for g in gaps:
    g["end_s"] += shift
floor_ms = min(g["ms"] for g in gaps) if gaps else 0.0
per_transfer = []
for line in result["events"]:
    words = line.split()
    if words[0] != "transfer":
        continue
    begin, end = float(words[2]), float(words[3])
    near = [g["ms"] for g in gaps if begin <= g["end_s"] <= end + 0.5]
    per_transfer.append({"transfer": words[1], "longest_gap_ms": max(near) if near else None,
                         "below_ms": None if near else floor_ms})
result["per_transfer"] = per_transfer
open(f"{out}/transfer.json", "w").write(json.dumps(result) + "\n")
for tag in ("baseline", "transfer", "election"):
    r = result[tag]
    print(f"{tag:9} ops/s {r['ops_per_sec']:.0f}  p99 {r['p99_ms']:.1f} ms  max {r['max_ms']:.1f} ms  "
          f"longest time with no write acknowledged {r['max_write_gap_ms']:.1f} ms "
          f"(ended {r['max_write_gap_end_s']:.2f} s in)  errors {r['errors']}", file=sys.stderr)
for t in per_transfer:
    gap = t["longest_gap_ms"]
    print(f"  transfer {t['transfer']}: longest write gap ending during it "
          + (f"below {t['below_ms']:.1f} ms (the 16th longest of the run)" if gap is None else f"{gap:.1f} ms"),
          file=sys.stderr)
print(json.dumps(result))
PY
echo "loadavg_after: $(cat /proc/loadavg)" >>"$OUT/machine.txt"
say "results: $OUT/transfer.json; logs: $OUT/logs"
