#!/usr/bin/env bash
# ab.sh BINDIR TAG CLIENTS READRATIO [DURATION] [PRELOAD]: fresh 3-node cluster from BINDIR, one loadgen run, stop.
set -euo pipefail
bin=$1 tag=$2 clients=$3 rr=$4 dur=${5:-10} pre=${6:-0}
base=${PORT_BASE:-21001}
w=/tmp/perf3/run-$tag; rm -rf $w; mkdir -p $w/data
python3 - $w/cluster.json $w/data $base <<'PY'
import json,sys
import os
p,d,b=sys.argv[1],sys.argv[2],int(sys.argv[3])
extra=json.loads(os.environ.get("EXTRA") or "{}")
json.dump({**extra,"raft_nodes":[{"id":i+1,"ip":"127.0.0.1","port":b+i} for i in range(3)],"data_dir":d},open(p,"w"))
PY
pids=()
for i in 1 2 3; do (cd $w && exec $bin/kvserver --config $w/cluster.json --id $i >$w/node$i.log 2>&1) & pids+=($!); done
trap 'kill ${pids[@]} 2>/dev/null; wait; rm -rf $w/data' EXIT
for i in $(seq 1 60); do
  if $bin/clerk --config $w/cluster.json --timeout 2 status --json 2>/dev/null | grep -q '"role":"leader"'; then break; fi; sleep 0.5; done
sleep 1
if [ "$pre" = 1 ]; then $bin/loadgen --config $w/cluster.json --clients 512 --duration 1 --value-size 256 --keys 10000 --read-ratio 0 --preload --json >/dev/null; fi
$bin/loadgen --config $w/cluster.json --clients $clients --duration $dur --value-size 256 --keys 10000 --read-ratio $rr --json > $w/out.json
python3 -c "
import json,sys
l=[x for x in open('$w/out.json') if x.strip().startswith('{')][-1]; r=json.loads(l)
print('$tag', round(r['ops_per_sec']), 'p50', r['p50_ms'], 'p99', r['p99_ms'], 'cpu', round(r.get('client_cpu_s',0),2))
"
