#!/usr/bin/env bash
# The standard benchmark of kvstore-raft (issue 4 §3) and its scale
# scenarios (issue 11); see bench/README.md.
#   bench/run.sh [--duration S] [--warmup S] [--scenarios LIST] [--out DIR]
# Every scenario runs on a fresh 3-node cluster (bin/start_nodes.sh on a
# temporary config: free loopback ports, an empty data dir under
# ${TMPDIR:-/tmp}, fsync on), driven by target/release/loadgen. Scenarios
# that read, and every scenario with a key-count suffix (put_c64_k1m), first
# write every key once (loadgen --preload-only, timed and logged apart).
# Each node's RSS is sampled every RSS_SAMPLE_S during the preload and the
# run. Prints a markdown table and writes the raw loadgen JSON (plus RSS) to
# the output dir. The cluster is stopped on exit, on failure and on Ctrl-C.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# write_config, node_pids, rss_kib and the RSS sampler.
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
DEFAULT_SCENARIOS="put_c1,put_c16,put_c64,put_c256,get_lin_c64,mixed_r50_c64,overload"
# --scenarios scale: issue 11's targets, the 10 000-key figures beside 1 M and 10 M keys.
SCALE_SCENARIOS="put_c64,mixed_r50_c64,put_c64_k1m,mixed_r50_c64_k1m,put_c64_k10m,mixed_r50_c64_k10m"
DURATION=10
WARMUP=0
SCENARIOS="$DEFAULT_SCENARIOS"
OUT=""
# The workload (as compare.sh: 256-byte values, 10 000 uniform keys).
VALUE_SIZE="${VALUE_SIZE:-256}"
KEYS="${KEYS:-10000}"
# Overload: open loop at OVERLOAD_FACTOR x the put_c64 peak, sent by this
# many clerks (more than the cluster can serve at once, so requests queue).
OVERLOAD_FACTOR="${OVERLOAD_FACTOR:-4}"
OVERLOAD_CLIENTS="${OVERLOAD_CLIENTS:-4096}"
# The preload: writes in flight, and its time limit (loadgen fails past it).
PRELOAD_CLIENTS="${PRELOAD_CLIENTS:-512}"
PRELOAD_TIMEOUT_S="${PRELOAD_TIMEOUT_S:-3600}"
# Seconds between two samples of each node's RSS.
RSS_SAMPLE_S="${RSS_SAMPLE_S:-0.5}"
# Time limits: a start (it may build), a stop, and a run beyond its length.
START_TIMEOUT_S=300
STOP_TIMEOUT_S=60
RUN_SLACK_S=120

usage() {
    echo "usage: bench/run.sh [--duration S (default $DURATION)] [--warmup S (default 0)]" \
        "[--scenarios LIST (default $DEFAULT_SCENARIOS; 'scale' = $SCALE_SCENARIOS)] [--out DIR]"
}
die_usage() { echo "run.sh: $1 ($(usage))" >&2; exit 2; }
say() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
fail() { echo "run.sh: FAIL: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --duration|--warmup|--scenarios|--out)
            [[ $# -ge 2 && -n "$2" ]] || die_usage "$1 needs a value"
            case "$1" in
                --duration) DURATION="$2" ;;
                --warmup) WARMUP="$2" ;;
                --scenarios) SCENARIOS="$2" ;;
                --out) OUT="$2" ;;
            esac
            shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die_usage "unexpected argument '$1'" ;;
    esac
done
[[ "$DURATION" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die_usage "--duration '$DURATION' is not a number of seconds"
[[ "$WARMUP" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die_usage "--warmup '$WARMUP' is not a number of seconds"
SCENARIOS="${SCENARIOS//scale/$SCALE_SCENARIOS}"
IFS=, read -r -a SCEN_LIST <<<"$SCENARIOS"
for scen in "${SCEN_LIST[@]}"; do
    [[ "$scen" =~ ^((put_c[0-9]+|get_lin_c[0-9]+|mixed_r[0-9]+_c[0-9]+)(_k[0-9]+[km]?)?|overload)$ ]] \
        || die_usage "unknown scenario '$scen' (put_c<N>, get_lin_c<N>, mixed_r<P>_c<N>, each with an optional key count _k<K>[k|m], overload)"
done
[[ "$PRELOAD_CLIENTS" =~ ^[1-9][0-9]*$ ]] || die_usage "PRELOAD_CLIENTS '$PRELOAD_CLIENTS' is not a positive number"
[[ "$PRELOAD_TIMEOUT_S" =~ ^[1-9][0-9]*$ ]] || die_usage "PRELOAD_TIMEOUT_S '$PRELOAD_TIMEOUT_S' is not a whole number of seconds"
[[ "$RSS_SAMPLE_S" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die_usage "RSS_SAMPLE_S '$RSS_SAMPLE_S' is not a number of seconds"
# The overload rate comes from put_c64's peak: run put_c64 first if it is
# not listed before overload.
if [[ ",$SCENARIOS," == *,overload,* ]]; then
    before_overload="${SCENARIOS%%overload*}"
    [[ ",$before_overload" == *,put_c64,* ]] || SCEN_LIST=(put_c64 "${SCEN_LIST[@]}")
fi
command -v python3 >/dev/null || { echo "run.sh: python3 is required" >&2; exit 2; }

OUT="${OUT:-${TMPDIR:-/tmp}/kv-bench/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT/logs"
[[ ! -e "$OUT/runs.jsonl" ]] || die_usage "$OUT already holds a runs.jsonl"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/kv-bench-work.XXXXXX")"

CUR_CONFIG=""
stop_cluster() {
    [[ -n "$CUR_CONFIG" ]] || return 0
    stop_nodes_keep_logs
    rm -rf "$(dirname "$CUR_CONFIG")"
    CUR_CONFIG=""
}
on_exit() {
    local status=$?
    trap - EXIT INT TERM
    rss_stop
    stop_cluster
    rm -rf "$WORK"
    exit "$status"
}
trap on_exit EXIT
trap 'say "interrupted"; exit 130' INT TERM

build_release
LOADGEN="$TARGET_DIR/release/loadgen"
[[ -x "$LOADGEN" ]] || fail "$LOADGEN is missing after the build"

FS_TYPE="$(df -T "$WORK" | awk 'NR == 2 { print $2 }')"
[[ "$FS_TYPE" != tmpfs ]] || say "warning: $WORK is on tmpfs, so fsync costs nothing: set TMPDIR to a disk"
{
    echo "date: $(date -u '+%F %T UTC')"
    echo "machine: $(nproc) CPUs, $(uname -sr), $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo "cpu: $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)"
    echo "data dir: $WORK ($FS_TYPE)"
    echo "commit: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "parameters: duration ${DURATION}s, warmup ${WARMUP}s, value ${VALUE_SIZE} B, keys $KEYS"
    echo "loadavg_before: $(cat /proc/loadavg)"
} >"$OUT/machine.txt"

start_cluster() { # TAG
    local dir="$WORK/$1"
    mkdir -p "$dir"
    CUR_CONFIG="$dir/bench-$1-$$.json"
    write_config "$CUR_CONFIG" "$dir/data" || fail "no free ports for $1"
    (cd "$ROOT" && timeout -k 10 "$START_TIMEOUT_S" bin/start_nodes.sh --config "$CUR_CONFIG") \
        >"$OUT/logs/$1.start.log" 2>&1 \
        || fail "bin/start_nodes.sh failed for $1: $(tail -n 1 "$OUT/logs/$1.start.log") (log: $OUT/logs/$1.start.log)"
    sleep 1
}

# The last "loadgen:" line of a stderr file (its one-line reason), else
# its last line.
loadgen_error() {
    grep '^loadgen:' "$1" | tail -n 1 | grep . || tail -n 1 "$1"
}

# check_loadgen_status STATUS WHAT LIMIT LOG: stops the script with one line
# when a loadgen run did not exit 0 (interrupted, over its time limit, or
# failed, naming loadgen's own error and its log).
check_loadgen_status() {
    local status="$1" what="$2" limit="$3" log="$4"
    case "$status" in
        0) ;;
        130) say "interrupted"; exit 130 ;;
        124|137) fail "$what ran past $limit (log: $log)" ;;
        *) fail "$what exited with status $status: $(loadgen_error "$log") (log: $log)" ;;
    esac
}

# preload TAG KEYS: writes every key once (loadgen --preload-only), with each
# node's RSS sampled meanwhile; leaves loadgen's JSON in logs/TAG.preload.out.
preload() {
    local tag="$1" keys="$2" status=0
    say "  preloading $keys keys ($PRELOAD_CLIENTS writes in flight; progress: $OUT/logs/$tag.preload.err)"
    # shellcheck disable=SC2046
    rss_start "$OUT/logs/$tag.preload.rss" $(node_pids)
    timeout --foreground -k 10 "$((PRELOAD_TIMEOUT_S + RUN_SLACK_S))" "$LOADGEN" --config "$CUR_CONFIG" \
        --clients 64 --value-size "$VALUE_SIZE" --keys "$keys" --preload-only \
        --preload-clients "$PRELOAD_CLIENTS" --preload-timeout "$PRELOAD_TIMEOUT_S" --json \
        >"$OUT/logs/$tag.preload.out" 2>"$OUT/logs/$tag.preload.err" || status=$?
    rss_stop
    check_loadgen_status "$status" "loadgen --preload-only ($tag)" "its time limit" "$OUT/logs/$tag.preload.err"
    say "  $(grep '^\[preload' "$OUT/logs/$tag.preload.err" | tail -n 1 | sed 's/  */ /g')"
}

# run_loadgen TAG KEYS ARGS...: the measured run (after the preload, if
# there was one); its JSON plus the scenario, the preload's figures and the
# nodes' RSS (before, after, and the largest sampled during the run and
# during the preload) goes to runs.jsonl, and the line itself to stdout.
run_loadgen() {
    local tag="$1" keys="$2" rss_before rss_after line
    shift 2
    rss_before="$(rss_kib)"
    local limit
    limit="$(python3 -c "import math; print(math.ceil($DURATION + $WARMUP + $RUN_SLACK_S))")"
    local warm=()
    [[ "$WARMUP" == 0 ]] || warm=(--warmup "$WARMUP")
    # --foreground: loadgen stays in our process group, so Ctrl-C reaches it.
    local status=0
    # shellcheck disable=SC2046
    rss_start "$OUT/logs/$tag.rss" $(node_pids)
    timeout --foreground -k 10 "$limit" "$LOADGEN" --config "$CUR_CONFIG" --duration "$DURATION" \
        --value-size "$VALUE_SIZE" --keys "$keys" "${warm[@]}" --json --plot "$OUT/$tag.svg" "$@" \
        >"$OUT/logs/$tag.out" 2>"$OUT/logs/$tag.err" || status=$?
    rss_stop
    check_loadgen_status "$status" "loadgen ($tag)" "${limit}s" "$OUT/logs/$tag.err"
    rss_after="$(rss_kib)"
    line="$(python3 - "$OUT/logs" "$tag" "$rss_before" "$rss_after" "$(rss_max "$OUT/logs/$tag.rss")" <<'PY'
import json, os, sys
logs, tag, before, after, run_max = sys.argv[1:]
def last_json(path):
    lines = [l for l in open(path).read().splitlines() if l.startswith("{")]
    if not lines:
        sys.exit(f"loadgen printed no JSON object ({path})")
    return json.loads(lines[-1])
result = last_json(f"{logs}/{tag}.out")
result.update(scenario=tag, rss_kib_before=json.loads(before), rss_kib_after=json.loads(after),
              rss_kib_max=json.loads(run_max))
if os.path.exists(f"{logs}/{tag}.preload.out"):
    pre = last_json(f"{logs}/{tag}.preload.out")
    result.update(preload_keys=pre["preload_keys"], preload_s=pre["preload_s"],
                  preload_errors=pre["preload_errors"], preload_clients=pre.get("preload_clients"))
    rows = [[int(v) for v in l.split()[1:]] for l in open(f"{logs}/{tag}.preload.rss") if l.strip()]
    result["preload_rss_kib_max"] = [max(c) for c in zip(*rows)] if rows else []
# The timeline's slowest second against its median: a stall shows here
# even when the run's average hides it.
ops = sorted(s["ops"] for s in result["timeline"])
if ops:
    n = len(ops)
    median = ops[n // 2] if n % 2 else (ops[n // 2 - 1] + ops[n // 2]) / 2
    result["timeline_min_ops"] = ops[0]
    result["timeline_median_ops"] = median
    result["seconds_below_half_median"] = [
        {"second": s["second"], "ops": s["ops"]} for s in result["timeline"] if s["ops"] < median / 2]
print(json.dumps(result))
PY
)" || fail "loadgen ($tag): no result (see $OUT/logs/$tag.out)"
    echo "$line" >>"$OUT/runs.jsonl"
    echo "$line"
}

# One field of a JSON line.
field() { python3 -c 'import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

# The key count of a suffix: 100k -> 100000, 1m -> 1000000, 5000 -> 5000.
suffix_keys() {
    local n="${1%[km]}"
    case "$1" in
        *k) echo $((n * 1000)) ;;
        *m) echo $((n * 1000000)) ;;
        *) echo "$n" ;;
    esac
}

PEAK_C64=""
run_scenario() { # SCENARIO
    local scen="$1" base="$1" keys="$KEYS" clients ratio=0 preload=0 line
    [[ "$scen" != overload ]] || { run_overload; return; }
    # A key-count suffix (put_c64_k1m) sets the keys and preloads them all.
    if [[ "$scen" =~ ^(.*)_k([0-9]+[km]?)$ ]]; then
        base="${BASH_REMATCH[1]}"
        keys="$(suffix_keys "${BASH_REMATCH[2]}")"
        preload=1
    fi
    case "$base" in
        put_c*) clients="${base#put_c}" ;;
        get_lin_c*) clients="${base#get_lin_c}"; ratio=1; preload=1 ;;
        mixed_r*)
            clients="${base##*_c}"
            ratio="$(python3 -c "print(int('${base#mixed_r}'.split('_')[0]) / 100)")"
            preload=1 ;;
    esac
    say "$scen: $clients clients, read ratio $ratio, $keys keys, ${DURATION}s"
    start_cluster "$scen"
    ((preload == 0)) || preload "$scen" "$keys"
    line="$(run_loadgen "$scen" "$keys" --clients "$clients" --read-ratio "$ratio")"
    stop_cluster
    [[ "$scen" != put_c64 ]] || PEAK_C64="$(field "$line" ops_per_sec)"
    say "  $(field "$line" ops_per_sec | cut -d. -f1) ops/s, p99 $(field "$line" p99_ms) ms, puts' max $(field "$line" write_latency | python3 -c 'import ast, sys; print(ast.literal_eval(sys.stdin.read())["max_ms"])') ms"
}

run_overload() {
    [[ -n "$PEAK_C64" ]] || fail "overload needs the put_c64 peak, and put_c64 did not run"
    local rate
    rate="$(python3 -c "print(round($PEAK_C64 * $OVERLOAD_FACTOR, 1))")"
    say "overload: open loop at $rate ops/s (${OVERLOAD_FACTOR}x put_c64) with $OVERLOAD_CLIENTS clerks, ${DURATION}s"
    start_cluster overload
    run_loadgen overload "$KEYS" --clients "$OVERLOAD_CLIENTS" --read-ratio 0 --rate "$rate" >/dev/null
    stop_cluster
}

for scen in "${SCEN_LIST[@]}"; do
    run_scenario "$scen"
    sleep 1
done
echo "loadavg_after: $(cat /proc/loadavg)" >>"$OUT/machine.txt"

python3 - "$OUT" "$PEAK_C64" <<'PY' | tee "$OUT/table.md"
import json, sys
out, peak = sys.argv[1], sys.argv[2]
runs = [json.loads(l) for l in open(f"{out}/runs.jsonl")]
machine = open(f"{out}/machine.txt").read().splitlines()
mib = lambda kib: max(kib) / 1024 if kib else 0.0
print(" ".join(l for l in machine if l.startswith(("date:", "machine:"))))
print()
print("| scenario | keys | ops/s | p50 ms | p99 ms | p99.9 ms | max ms | puts' max ms "
      "| slowest second / median ops | seconds < median/2 | errors | busy "
      "| RSS MiB per node (max sampled in the run) | preload |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
flagged = []
for r in runs:
    errors = sum(r["errors"].values()) if isinstance(r["errors"], dict) else r["errors"]
    slow = r.get("seconds_below_half_median", [])
    if slow:
        flagged.append(f"{r['scenario']}: seconds below half the median ({r['timeline_median_ops']:.0f} ops): "
                       + ", ".join(f"s{s['second']} {s['ops']}" for s in slow))
    rss = ", ".join(f"{k / 1024:.0f}" for k in r.get("rss_kib_max") or r["rss_kib_after"])
    preload = "–"
    if r.get("preload_s"):
        preload = (f"{r['preload_keys']} keys in {r['preload_s']:.1f} s "
                   f"({r['preload_keys'] / r['preload_s']:.0f}/s)")
    write_max = r["write_latency"]["max_ms"] if r.get("writes") else float("nan")
    print(f"| {r['scenario']} | {r['keys']} | {r['ops_per_sec']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
          f"| {r['p999_ms']:.2f} | {r['max_ms']:.1f} | {write_max:.1f} "
          f"| {r.get('timeline_min_ops', 0)} / {r.get('timeline_median_ops', 0):.0f} | {len(slow)} "
          f"| {errors} | {r['busy']} | {rss} | {preload} |")
if flagged:
    print()
    for line in flagged:
        print(f"- FLAG {line}")
for r in runs:
    if r["scenario"] != "overload":
        continue
    peak = float(peak)
    fmt = lambda kib: ", ".join(f"{k / 1024:.1f}" for k in kib)
    print()
    print(f"overload: open loop at {r['rate']:.0f} ops/s ({r['rate'] / peak:.1f}x the put_c64 peak of "
          f"{peak:.0f} ops/s), {r['clients']} clerks: goodput {r['ops_per_sec']:.0f} ops/s = "
          f"{100 * r['ops_per_sec'] / peak:.0f}% of the peak; busy {r['busy']}; "
          f"{r['unsent']} of {r['scheduled']} scheduled requests never sent; "
          f"node RSS MiB before [{fmt(r['rss_kib_before'])}] after [{fmt(r['rss_kib_after'])}]")
PY
say "raw runs: $OUT/runs.jsonl; table: $OUT/table.md; plots: $OUT/*.svg"
