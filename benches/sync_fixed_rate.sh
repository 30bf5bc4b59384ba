#!/usr/bin/env bash
# `pglite-cache sync` binaries compared under the same fixed-rate load.
#
# The harness in ../shared/bench/native-logical/ lets pgbench run flat out,
# so on a shared 2-core machine its throughput (and with it the daemon's
# merge sizes and CPU) moves by 2x between runs. Here the publisher gets a
# fixed rate (`pgbench -R`), so each binary applies the same transactions,
# and the script prints, per binary, in turn:
#   - a reader's latency on an idle cache and during the load (`pgbench
#     -R 100`, one client, the newest heartbeat row, over the Unix socket;
#     with -R, latency counts from the scheduled start);
#   - the commit lag: mean of `pglite_cache_commit_lag_seconds` (remote
#     commit -> local commit) over the load, and transactions per local commit;
#   - the daemon's CPU (all threads, /proc) per 1,000 applied transactions.
# Run each binary twice or more, alternating: the machine drifts.
#
# Usage (as root: the publisher runs as the `postgres` user):
#   benches/sync_fixed_rate.sh [-r RATE] [-s SECONDS] BIN... [-- SYNC_ARGS...]
# e.g. benches/sync_fixed_rate.sh /tmp/old/pglite-cache target/release/pglite-cache target/release/pglite-cache
set -euo pipefail
RATE=2000; SECS=10; EXTRA=()
while getopts "r:s:" o; do case $o in r) RATE=$OPTARG ;; s) SECS=$OPTARG ;; *) exit 2 ;; esac; done
shift $((OPTIND - 1))
BINS=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; EXTRA=("$@"); break; fi
  BINS+=("$1"); shift
done
[ ${#BINS[@]} -gt 0 ] || { echo "usage: $0 [-r RATE] [-s SECONDS] BIN... [-- SYNC_ARGS...]" >&2; exit 2; }
PGB=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$PGB/initdb" ] || { echo "PostgreSQL server binaries not found under /usr/lib/postgresql" >&2; exit 1; }
command -v pgbench >/dev/null && command -v curl >/dev/null || { echo "needs pgbench and curl" >&2; exit 1; }
W=$(mktemp -d /tmp/sync-fixed-rate.XXXXXX); chmod 777 "$W" # the publisher (user postgres) writes here
PUB="$W/pub"; SOCK="$W/sock"; PORT=55470; CPORT=55471; MPORT=9187
P="host=$W port=$PORT user=postgres dbname=postgres"
T="host=$SOCK port=$CPORT user=postgres dbname=postgres"
DPID=""
stop_all() {
  [ -n "$DPID" ] && kill -TERM "$DPID" 2>/dev/null && wait "$DPID" 2>/dev/null || true
  DPID=""
  su postgres -c "$PGB/pg_ctl -D $PUB stop -m fast" >/dev/null 2>&1 || true
}
trap 'stop_all; rm -rf "$W"' EXIT
cat > "$W/load.sql" <<'SQL'
\set id random(1, 10000)
BEGIN;
INSERT INTO items (v, pad) VALUES (:id, 'y');
UPDATE items SET v = v + 1 WHERE id = :id;
END;
SQL
echo 'SELECT id FROM heartbeat ORDER BY id DESC LIMIT 1;' > "$W/read.sql"
metrics() {
  curl -s "127.0.0.1:$MPORT/metrics" |
    awk '/^pglite_cache_commit_lag_seconds_sum/ {s=$2} /^pglite_cache_commit_lag_seconds_count/ {c=$2}
         /^pglite_cache_local_commits_total/ {l=$2} END {print s+0, c+0, l+0}'
}
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
latency() { grep -oP "latency average = \K[\d.]+" || echo "?"; }

for BIN in "${BINS[@]}"; do
  rm -rf "$PUB" "$W/cache" "$SOCK"; mkdir -p "$SOCK"
  su postgres -c "$PGB/initdb -D $PUB -A trust" >/dev/null
  su postgres -c "$PGB/pg_ctl -D $PUB -l $W/pub.log -o '-p $PORT -k $W -c wal_level=logical' start" >/dev/null
  psql "$P" -q -c "CREATE TABLE items (id bigserial PRIMARY KEY, v int, pad text);
    CREATE TABLE heartbeat (id bigserial PRIMARY KEY, pub_ts timestamptz DEFAULT now());
    INSERT INTO items (v, pad) SELECT g, repeat('x', 80) FROM generate_series(1, 10000) g;
    INSERT INTO heartbeat DEFAULT VALUES;
    CREATE PUBLICATION pub FOR TABLE items, heartbeat;"
  "$BIN" sync --source "$P" --data "$W/cache" --publication pub --slot s1 --socket-dir "$SOCK" --port $CPORT \
    --metrics "127.0.0.1:$MPORT" "${EXTRA[@]}" > "$W/sync.log" 2>&1 &
  DPID=$!
  for _ in $(seq 150); do
    [ "$(psql "$T" -Atc 'SELECT count(*) FROM items' 2>/dev/null)" = 10000 ] && break
    sleep 0.2
  done
  idle=$(pgbench -n -f "$W/read.sql" -c 1 -T 5 "$T" 2>/dev/null | latency)
  read -r s0 c0 l0 < <(metrics); t0=$(cpu "$DPID")
  pgbench -n -f "$W/load.sql" -c 4 -j 2 -R "$RATE" -T "$SECS" "$P" > "$W/load.out" 2>&1 &
  LOAD=$!
  sleep 1
  loaded=$(pgbench -n -f "$W/read.sql" -c 1 -R 100 -T $((SECS - 2)) "$T" 2>/dev/null | latency)
  wait $LOAD
  # The last transactions applied, then the counters read.
  for _ in $(seq 100); do
    [ "$(psql "$T" -Atc 'SELECT max(id) FROM items')" = "$(psql "$P" -Atc 'SELECT max(id) FROM items')" ] && break
    sleep 0.05
  done
  read -r s1 c1 l1 < <(metrics); t1=$(cpu "$DPID")
  n=$(grep -oP "number of transactions actually processed: \K\d+" "$W/load.out")
  python3 - "$BIN" "$idle" "$loaded" "$s0" "$c0" "$l0" "$s1" "$c1" "$l1" "$t0" "$t1" "$n" <<'PY'
import os, sys
b, idle, loaded = sys.argv[1:4]
s0, c0, l0, s1, c1, l1 = map(float, sys.argv[4:10])
t0, t1, n = map(int, sys.argv[10:13])
ticks = os.sysconf("SC_CLK_TCK")
print(f"{b}: reader idle {idle} ms, loaded {loaded} ms; commit lag mean {(s1 - s0) / (c1 - c0) * 1000:.2f} ms, "
      f"{(c1 - c0) / max(l1 - l0, 1):.1f} txns per local commit; CPU {(t1 - t0) / ticks * 1e6 / n:.0f} ms per 1,000 txns ({n} txns)")
PY
  stop_all
done
