#!/usr/bin/env bash
# multi.sh REPS CLIENTS RR PRELOAD V1 V2 ... : each rep runs every variant, order rotated
reps=$1 c=$2 rr=$3 pre=$4; shift 4; vs=("$@"); n=${#vs[@]}
for r in $(seq 1 $reps); do
  for k in $(seq 0 $((n-1))); do
    v=${vs[$(( (k + r) % n ))]}
    /tmp/perf2/ab.sh /tmp/perf2/$v $v-r$r $c $rr 10 $pre 2>&1 | tail -1
    sleep 1
  done
done
echo "load $(cat /proc/loadavg)"
