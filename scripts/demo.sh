#!/usr/bin/env bash
# The demo: a Postgres of its own (as the postgres OS user when run as root), a subscribed
# table, the forwarder printing events as JSON lines, and a writer making changes.
# DEMO_ROWS (default 10) rows are written a second apart; then everything stops cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_BIN="${PG_BIN:-/usr/lib/postgresql/${PG_MAJOR:-15}/bin}"
DEMO_DIR="${DEMO_DIR:-/tmp/pgpipe-demo}"
DEMO_ROWS="${DEMO_ROWS:-10}"
PGPIPE="${PGPIPE:-target/debug/pgpipe}"

run_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

rm -rf "$DEMO_DIR" && mkdir -p "$DEMO_DIR"
[ "$(id -u)" -eq 0 ] && chown postgres "$DEMO_DIR"
PORT="$(free_port)"
URL="postgres://postgres@127.0.0.1:${PORT}/postgres"

echo "demo: starting Postgres on port $PORT (data in $DEMO_DIR)" >&2
run_pg "$PG_BIN/initdb" -D "$DEMO_DIR/data" -A trust -U postgres >/dev/null
run_pg "$PG_BIN/pg_ctl" -D "$DEMO_DIR/data" -l "$DEMO_DIR/postgres.log" -w start \
  -o "-p $PORT -k $DEMO_DIR -c listen_addresses=127.0.0.1 -c wal_level=logical -c shared_preload_libraries=pgpipe" >/dev/null

FORWARDER_PID=""
cleanup() {
  [ -n "$FORWARDER_PID" ] && kill -TERM "$FORWARDER_PID" 2>/dev/null && wait "$FORWARDER_PID" 2>/dev/null || true
  run_pg "$PG_BIN/pg_ctl" -D "$DEMO_DIR/data" -m fast stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

psql() { command psql -X -q -v ON_ERROR_STOP=1 "$URL" "$@"; }
psql <<'SQL'
CREATE EXTENSION pgpipe;
CREATE TABLE orders (id serial PRIMARY KEY, status text NOT NULL, total numeric(10,2), meta jsonb);
SELECT pgpipe.subscribe('orders');
SQL

echo "demo: $PGPIPE listen --db $URL --channel orders  (events below, one JSON line each)" >&2
"$PGPIPE" listen --db "$URL" --channel orders &
FORWARDER_PID=$!

for i in $(seq 1 "$DEMO_ROWS"); do
  sleep 1
  case $((i % 3)) in
    1) psql -c "INSERT INTO orders (status, total, meta) VALUES ('new', $i.50, '{\"n\": $i}')" ;;
    2) psql -c "UPDATE orders SET status = 'paid' WHERE id = (SELECT max(id) FROM orders)" ;;
    0) psql -c "DELETE FROM orders WHERE id = (SELECT min(id) FROM orders)" ;;
  esac
done
sleep 1
echo "demo: done; stopping the forwarder and Postgres" >&2
