#!/bin/bash
# A LEFT JOIN whose state is both sides' rows (ROWS rows of t in CHUNK-row INSERTs, ROWS/3
# of u in one), with a one-row view over it; prints RSS as it goes, rows/s and peak RSS.
# Usage: benches/scripts/spill_join.sh ROWS CHUNK [BUDGET_MIB]   (no budget: in memory)
# Needs a release build (`cargo build --release --bins`, CARGO_TARGET_DIR set as in
# scripts/env.sh) and psql; port 5499 must be free.
set -u
ROWS=$1; CHUNK=$2; BUDGET=${3:-}
cd "$(mktemp -d)"
DATA=$(mktemp -d)
$CARGO_TARGET_DIR/release/kappa serve --listen 127.0.0.1:5499 --data-dir $DATA --fsync off ${BUDGET:+--state-memory-mb $BUDGET} > server.log 2>&1 &
PID=$!
sleep 1
rm -f peak.txt
( peak=0; while kill -0 $PID 2>/dev/null; do r=$(awk '/VmRSS/{print $2}' /proc/$PID/status 2>/dev/null); [ -n "$r" ] && [ $r -gt $peak ] && peak=$r && echo $peak > peak.txt; sleep 0.2; done ) &
P="psql -h 127.0.0.1 -p 5499 -U kappa -q -At"
$P -c "CREATE TABLE t (k BIGINT, v BIGINT)" -c "CREATE TABLE u (k BIGINT, w BIGINT)" \
   -c "CREATE MATERIALIZED VIEW lj AS SELECT count(*) AS n, count(u.k) AS matched, sum(u.w) AS w FROM t LEFT JOIN u ON t.k = u.k"
$P -c "INSERT INTO u SELECT value, 2 * value FROM generate_series(3, $ROWS, 3)"
start=$(date +%s.%N)
from=1
while [ $from -le $ROWS ]; do
  to=$((from+CHUNK-1))
  $P -c "INSERT INTO t SELECT value, value % 7 FROM generate_series($from, $to)"
  from=$((to+1))
  if [ $((from % (ROWS/5) )) -eq 1 ]; then echo "$((from-1)) rows: RSS $(( $(awk '/VmRSS/{print $2}' /proc/$PID/status) / 1024 )) MiB"; fi
done
end=$(date +%s.%N)
$P -c "FLUSH" -c "SELECT * FROM lj"
echo "rows/s $(echo "$ROWS / ($end - $start)" | bc)  peak $(( $(cat peak.txt) / 1024 )) MiB"
kill $PID; wait $PID 2>/dev/null
rm -rf "$DATA"
