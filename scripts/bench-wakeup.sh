#!/usr/bin/env bash
# Writer cost of pgpipe's capture path, measured in one run on a Postgres of its own:
# single-row INSERT, pgbench -M prepared, CLIENTS clients, SECONDS seconds per setup.
#   plain          no capture
#   trigger        capture trigger without the wake-up mark (the capture path before it)
#   trigger+wake   capture trigger with pgpipe.mark_wakeup() (transaction callback + latch;
#                  the background worker sends the coalesced NOTIFY to a LISTENing session)
#   trigger+notify capture trigger plus pg_notify in every transaction (what is avoided)
#   wal            the table subscribed with mode => 'wal' (the worker decodes the WAL)
# Needs the extension installed (make install) and runs Postgres as the postgres OS user.
# ROUNDS (default 2) alternations of trigger / trigger+wake; on a shared machine use short
# runs and many rounds (SECONDS_PER_RUN=5 ROUNDS=8) and read the medians.
set -euo pipefail

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
CLIENTS=${CLIENTS:-8}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-20}
PORT=${PORT:-55433}
DIR=$(mktemp -d /tmp/pgpipe-bench-XXXXXX)
chmod 755 "$DIR"
chown postgres "$DIR"
as_pg() { runuser -u postgres -- "$@"; }
cleanup() {
    [[ -n "${LISTENER:-}" ]] && kill "$LISTENER" 2>/dev/null || true
    as_pg "$PG_BIN/pg_ctl" -D "$DIR/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$DIR"
}
trap cleanup EXIT

as_pg "$PG_BIN/initdb" -D "$DIR/data" -U postgres --auth=trust --no-sync >/dev/null
cat >>"$DIR/data/postgresql.conf" <<EOF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$DIR'
wal_level = logical
shared_preload_libraries = 'pgpipe'
max_connections = 100
EOF
as_pg "$PG_BIN/pg_ctl" -D "$DIR/data" -l "$DIR/log" -w start >/dev/null
PSQL=("$PG_BIN/psql" -X -q -h "$DIR" -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -d postgres)

"${PSQL[@]}" <<'SQL'
CREATE EXTENSION pgpipe;
CREATE TABLE bench (id bigserial PRIMARY KEY, account int NOT NULL, amount numeric NOT NULL, note text);
-- The capture trigger as it was before the wake-up mark.
CREATE FUNCTION public.capture_row_nowake() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_row jsonb;
    old_row jsonb;
BEGIN
    IF TG_OP = 'DELETE' THEN
        new_row := to_jsonb(OLD);
    ELSIF TG_OP = 'UPDATE' THEN
        new_row := to_jsonb(NEW);
        old_row := to_jsonb(OLD);
    ELSE
        new_row := to_jsonb(NEW);
    END IF;
    INSERT INTO pgpipe.events (id, channel, operation, payload, source)
    VALUES (pgpipe.uuid_generate_v7(), TG_ARGV[0], TG_OP,
            jsonb_build_object('op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
                               'row', new_row, 'old', old_row),
            'trigger');
    RETURN NULL;
END $$;
CREATE FUNCTION public.notify_each() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pgpipe_wakeup', '');
    RETURN NULL;
END $$;
SQL
echo "INSERT INTO bench (account, amount, note) VALUES (:client_id, 10.50, 'x');" >"$DIR/insert.sql"

# A forwarder stand-in: a session LISTENing on pgpipe_wakeup for the whole run.
(echo "LISTEN pgpipe_wakeup;"; sleep 100000) | "${PSQL[@]}" >/dev/null 2>&1 &
LISTENER=$!

run() {
    local name=$1
    "${PSQL[@]}" -c "TRUNCATE bench; TRUNCATE pgpipe.events; CHECKPOINT" >/dev/null
    local tps
    tps=$(as_pg "$PG_BIN/pgbench" -h "$DIR" -p "$PORT" -U postgres -n -M prepared \
        -c "$CLIENTS" -j "$CLIENTS" -T "$SECONDS_PER_RUN" -f "$DIR/insert.sql" postgres 2>/dev/null |
        awk '/^tps = / {print int($3)}')
    printf '%-16s %8s tps\n' "$name" "$tps"
    RESULTS[$name]="${RESULTS[$name]:-} $tps"
}
declare -A RESULTS
median() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2))}'; }

echo "pgbench -M prepared, single-row INSERT, $CLIENTS clients, ${SECONDS_PER_RUN}s each"
run plain
# Before and after alternate, so load from elsewhere on the machine hits both alike.
before() {
    "${PSQL[@]}" -c "SELECT pgpipe.unsubscribe('bench')" >/dev/null
    "${PSQL[@]}" -c "CREATE TRIGGER cap AFTER INSERT OR UPDATE OR DELETE ON bench FOR EACH ROW EXECUTE FUNCTION public.capture_row_nowake('bench')"
    run "trigger"
    "${PSQL[@]}" -c "DROP TRIGGER cap ON bench"
}
after() {
    "${PSQL[@]}" -c "SELECT pgpipe.subscribe('bench')" >/dev/null
    run "trigger+wake"
    "${PSQL[@]}" -c "SELECT pgpipe.unsubscribe('bench')" >/dev/null
}
WORKER_PID=$("${PSQL[@]}" -At -c "SELECT worker_pid FROM pgpipe.status()")
cpu_ms() { awk -v hz="$(getconf CLK_TCK)" '{print int(($14 + $15) * 1000 / hz)}' "/proc/$WORKER_PID/stat"; }
CPU0=$(cpu_ms)
for round in $(seq "${ROUNDS:-2}"); do
    # Which one goes first alternates too.
    if ((round % 2)); then before; after; else after; before; fi
done
"${PSQL[@]}" -c "SELECT pgpipe.subscribe('bench')" >/dev/null
echo "median of ${ROUNDS:-2} rounds: trigger $(median "${RESULTS[trigger]}") tps, trigger+wake $(median "${RESULTS[trigger+wake]}") tps"
NOTIFIES=$("${PSQL[@]}" -At -c "SELECT notifies_sent FROM pgpipe.status()")
echo "  worker: $NOTIFIES NOTIFYs, $(( $(cpu_ms) - CPU0 )) ms CPU during the trigger runs"
"${PSQL[@]}" -At 2>&1 <<'SQL' | sed 's/^NOTICE:  /  /'
DO $$
DECLARE
    w boolean;
    t0 timestamptz; t1 timestamptz; t2 timestamptz;
BEGIN
    t0 := clock_timestamp();
    FOR i IN 1..1000000 LOOP w := true; END LOOP;
    t1 := clock_timestamp();
    FOR i IN 1..1000000 LOOP w := pgpipe.mark_wakeup(); END LOOP;
    t2 := clock_timestamp();
    RAISE NOTICE 'writer side: pgpipe.mark_wakeup() costs % ns per call (plpgsql assignment)',
        round(extract(epoch FROM (t2 - t1) - (t1 - t0)) * 1000);
END $$;
SQL
"${PSQL[@]}" -c "CREATE TRIGGER zz_notify AFTER INSERT ON bench FOR EACH STATEMENT EXECUTE FUNCTION public.notify_each()"
run trigger+notify
"${PSQL[@]}" -c "DROP TRIGGER zz_notify ON bench"
# The first WAL subscription creates the slot: a transaction of its own.
"${PSQL[@]}" -c "SELECT pgpipe.subscribe('bench', mode => 'wal')" >/dev/null
run wal
sleep 2
"${PSQL[@]}" -At -c "SELECT 'worker after the wal run: ' || worker_state || ', lag ' || pg_size_pretty(lag_bytes) FROM pgpipe.status()"
