#!/usr/bin/env bash
# abloop.sh PAIRS CLIENTS RR PRELOAD A_DIR B_DIR  (alternated A,B / B,A)
pairs=$1 c=$2 rr=$3 pre=$4 A=$5 B=$6
for i in $(seq 1 $pairs); do
  if [ $((i%2)) = 1 ]; then order="A B"; else order="B A"; fi
  for s in $order; do
    d=$A; [ $s = B ] && d=$B
    /tmp/perf3/ab.sh $d $s$i $c $rr 10 $pre 2>&1 | tail -1
    sleep 1
  done
done
echo "load $(cat /proc/loadavg)"
