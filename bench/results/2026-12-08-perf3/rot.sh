#!/usr/bin/env bash
# rot.sh REPS CLIENTS RR PRELOAD SPEC...   SPEC = NAME:BINDIR:EXTRAJSON ; order rotates per rep
reps=$1 c=$2 rr=$3 pre=$4; shift 4; specs=("$@"); n=${#specs[@]}
for r in $(seq 1 $reps); do
  for j in $(seq 0 $((n-1))); do
    s=${specs[$(( (j + r - 1) % n ))]}
    IFS=: read -r name dir extra <<<"$s"
    EXTRA=${extra:-{\}} PORT_BASE=21001 /tmp/perf3/ab.sh $dir $name-$r $c $rr 10 $pre 2>&1 | tail -1
    sleep 1
  done
done
echo "load $(cat /proc/loadavg)"
