#!/usr/bin/env bash
# prof.sh BINDIR TAG MODE CLIENTS: fresh 3-node cluster, put load (read-ratio 0) for 12 s, and
# 3 s in, MODE=perf: perf record -g of the leader for 5 s; MODE=strace: strace -c -f of the leader for 5 s.
set -euo pipefail
bin=$1 tag=$2 mode=$3 clients=${4:-256}
base=${PORT_BASE:-21001}
w=/tmp/perf3/run-$tag; rm -rf $w; mkdir -p $w/data
python3 - $w/cluster.json $w/data $base <<'PY'
import json,sys
import os
p,d,b=sys.argv[1],sys.argv[2],int(sys.argv[3])
extra=json.loads(os.environ.get("EXTRA","{}"))
json.dump({**extra,"raft_nodes":[{"id":i+1,"ip":"127.0.0.1","port":b+i,"http_port":b+10+i} for i in range(3)],"data_dir":d},open(p,"w"))
PY
pids=()
for i in 1 2 3; do (cd $w && exec $bin/kvserver --config $w/cluster.json --id $i >$w/node$i.log 2>&1) & pids+=($!); done
trap 'ls -la $w/data/*/ 2>/dev/null | grep wal > $w/wal-ls.txt; kill ${pids[@]} 2>/dev/null; wait; rm -rf $w/data' EXIT
for i in $(seq 1 60); do
  if $bin/clerk --config $w/cluster.json --timeout 2 status --json 2>/dev/null | grep -q '"role":"leader"'; then break; fi; sleep 0.5; done
sleep 1
leader=$(grep -l 'leader in term' $w/node*.log | head -1 | sed 's/.*node\([0-9]\).log/\1/')
lpid=${pids[$((leader-1))]}
fpid=${pids[$((leader % 3))]}
echo "leader node $leader pid $lpid follower pid $fpid"
$bin/loadgen --config $w/cluster.json --clients $clients --duration 12 --value-size 256 --keys 10000 --read-ratio 0 --json > $w/out.json &
lg=$!
sleep 3
case $mode in
  perf) perf record -F 999 -g -o $w/perf.data -p $lpid -- sleep 5 2>$w/perf.err
        perf record -F 999 -g -o $w/perf-f.data -p $fpid -- sleep 2 2>>$w/perf.err || true ;;
  strace) timeout -s INT 5 strace -c -f -p $lpid -o $w/strace.txt || true ;;
  cpu) python3 /tmp/perf3/cpu.py 6 ${pids[@]} $lg > $w/cpu.txt; echo "leader=$lpid" >> $w/cpu.txt ;;
  stracet) timeout -s INT 1 strace -f -tt -p $lpid -o $w/stracet.txt || true ;;
esac
wait $lg
for i in 1 2 3; do curl -s http://127.0.0.1:$((base+9+i))/metrics > $w/metrics$i.txt || true; done
python3 -c "
import json,sys
l=[x for x in open('$w/out.json') if x.strip().startswith('{')][-1]; r=json.loads(l)
print('$tag', round(r['ops_per_sec']), 'p50', r['p50_ms'], 'p99', r['p99_ms'])
"
