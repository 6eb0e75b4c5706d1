#!/usr/bin/env python3
"""Quick probe of the capture path (issue 11): WAL per event by record type (pg_waldump),
µs per captured row, and a short interleaved pgbench run, for plain / native trigger /
the PL/pgSQL trigger it replaced. Uses bench/cluster.py's cluster. Run as `make bench` does
(under the extension lock, with the extension installed):

    flock /tmp/pgpipe-ext.lock python3 bench/capture_probe.py

Environment: PROBE_TX (transactions for the WAL probe, default 2000), PROBE_SECS (pgbench
seconds per cell, default 5), PROBE_ROUNDS (default 2), PROBE_CLIENTS (default 8,32),
PROBE_QUEUE_DDL (SQL run after CREATE EXTENSION, e.g. to try another queue layout).
"""

import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster as bench  # noqa: E402  (the cluster module re-exports common)

TX = int(os.environ.get("PROBE_TX", 2000))
SECS = int(os.environ.get("PROBE_SECS", 5))
ROUNDS = int(os.environ.get("PROBE_ROUNDS", 2))
CLIENTS = [int(c) for c in os.environ.get("PROBE_CLIENTS", "8,32").split(",") if c]
TABLES = {"plain": "b_plain", "native": "b_trig", "plpgsql": "b_plpg"}
# Statement-level capture with transition tables (issue 11, point 4), set-based through
# SPI: one INSERT ... SELECT per statement; UPDATE pairs old and new rows by position.
STMT_TRIGGER = """
CREATE FUNCTION bench.capture_stmt() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        INSERT INTO pgpipe.events (id, channel, operation, payload, source)
        SELECT pgpipe.uuid_generate_v7(), TG_ARGV[0], TG_OP,
               jsonb_build_object('op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
                                  'row', n.r, 'old', o.r), 'trigger'
        FROM (SELECT row_number() OVER () AS i, to_jsonb(t) AS r FROM new_rows t) n
        JOIN (SELECT row_number() OVER () AS i, to_jsonb(t) AS r FROM old_rows t) o USING (i)
        ORDER BY n.i;
    ELSE
        INSERT INTO pgpipe.events (id, channel, operation, payload, source)
        SELECT pgpipe.uuid_generate_v7(), TG_ARGV[0], TG_OP,
               jsonb_build_object('op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
                                  'row', to_jsonb(t), 'old', NULL), 'trigger'
        FROM new_rows t;
    END IF;
    PERFORM pgpipe.mark_wakeup();
    RETURN NULL;
END $$;
CREATE TRIGGER bench_capture_i AFTER INSERT ON b_stmt REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bench.capture_stmt('b_stmt');
CREATE TRIGGER bench_capture_u AFTER UPDATE ON b_stmt REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bench.capture_stmt('b_stmt');
"""
PHASES = os.environ.get("PROBE_PHASES", "wal,us,tps").split(",")


def waldump_stats(cl, start, end):
    """{record type: (count, bytes incl. FPI)} between two LSNs."""
    r = subprocess.run([bench.PG_BIN + "/pg_waldump", "-p", os.path.join(cl.data, "pg_wal"),
                        "-s", start, "-e", end, "--stats=record"], capture_output=True, text=True)
    out = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^(\S+(?: \S+)?)\s+(\d+)\s+\(\s*[\d.]+\)\s+(\d+)\s+\(\s*[\d.]+\)\s+(\d+)\s+\(\s*[\d.]+\)\s+(\d+)", line)
        if m and m.group(1) != "Total":
            out[m.group(1).strip()] = (int(m.group(2)), int(m.group(5)))
    return out


def main():
    cl = bench.Cluster()
    res = {}
    try:
        cl.start()
        cl.psql("CREATE EXTENSION pgpipe; CREATE SCHEMA bench;")
        if os.environ.get("PROBE_QUEUE_DDL"):
            cl.psql(os.environ["PROBE_QUEUE_DDL"])
        cl.psql("SELECT * FROM pgpipe.rotate();")
        cl.psql("CREATE FUNCTION bench.capture_row_plpgsql() RETURNS trigger LANGUAGE plpgsql "
                "SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$%s$body$;"
                % bench.PLPGSQL_CAPTURE_ROW)
        for t in TABLES.values():
            cl.psql(bench.TABLE_DDL.format(t=t, n=100000))
        cl.psql("SELECT pgpipe.subscribe('b_trig');")
        cl.psql(bench.TABLE_DDL.format(t="b_stmt", n=100000))
        cl.psql(STMT_TRIGGER)
        cl.psql("CREATE TRIGGER bench_capture AFTER INSERT OR UPDATE OR DELETE ON b_plpg "
                "FOR EACH ROW EXECUTE FUNCTION bench.capture_row_plpgsql('b_plpg');")

        def reset():
            cl.psql("TRUNCATE pgpipe.events; VACUUM b_plain, b_trig, b_plpg, b_stmt; CHECKPOINT;")

        # 1. WAL per transaction by record type, single-row INSERT / UPDATE, 1 client.
        wal = {}
        for op, script in ((("insert", bench.INSERT_SQL), ("update", bench.UPDATE_SQL))
                           if "wal" in PHASES else ()):
            for name, t in TABLES.items():
                reset()
                # Warm the pages so that few full-page images land in the window.
                cl.pgbench(script.format(t=t), 1, transactions=200, name="warm")
                l0 = cl.val("SELECT pg_current_wal_insert_lsn()")
                cl.pgbench(script.format(t=t), 1, transactions=TX, name="wal")
                l1 = cl.val("SELECT pg_current_wal_insert_lsn()")
                total = float(cl.val("SELECT pg_wal_lsn_diff('%s', '%s')" % (l1, l0)))
                stats = waldump_stats(cl, l0, l1)
                wal.setdefault(op, {})[name] = {
                    "bytes_per_tx": round(total / TX, 1),
                    "by_record_per_tx": {k: [round(c / TX, 2), round(b / TX, 1)]
                                         for k, (c, b) in sorted(stats.items(), key=lambda kv: -kv[1][1])},
                }
                bench.log("WAL %s %s: %.1f bytes/tx" % (op, name, total / TX))
        res["wal"] = wal

        # 2. µs per row: single-row INSERT statements in one transaction.
        us = {}
        for r in range(2 if "us" in PHASES else 0):
            for name, t in (list(TABLES.items()) if r == 0 else list(reversed(list(TABLES.items())))):
                reset()
                t0 = cl.val("SELECT clock_timestamp()")
                cl.psql("DO $x$ BEGIN FOR i IN 1..20000 LOOP INSERT INTO %s (v, name, amount) "
                        "VALUES (0, 'new-customer', 12.50); END LOOP; END $x$" % t)
                ms = float(cl.val("SELECT extract(epoch FROM clock_timestamp() - '%s'::timestamptz) * 1000" % t0))
                us.setdefault(name, []).append(ms * 1000 / 20000)
        res["us_per_insert_statement"] = {k: round(min(v), 2) for k, v in us.items()}
        res["queue_ddl"] = os.environ.get("PROBE_QUEUE_DDL")
        bench.log("µs per INSERT statement: %s" % res["us_per_insert_statement"])

        # 2b. µs per transaction, 1 client, synchronous_commit off (no fsync wait).
        per_tx = {}
        for r in range(2 if "us" in PHASES else 0):
            for op, script in (("insert", bench.INSERT_SQL), ("update", bench.UPDATE_SQL)):
                for name, t in TABLES.items():
                    reset()
                    out = cl.pgbench(script.format(t=t), 1, secs=3, name="tx",
                                     env={"PGOPTIONS": "-c synchronous_commit=off"})
                    per_tx.setdefault(op, {}).setdefault(name, []).append(1e6 / out["tps"])
        res["us_per_tx_1client_async"] = {op: {k: round(min(v), 2) for k, v in by.items()}
                                          for op, by in per_tx.items()}
        bench.log("µs per transaction: %s" % res["us_per_tx_1client_async"])

        # 2c. Multi-row statements (100 rows): native row trigger vs statement-level
        # capture with transition tables (set-based through SPI), µs per row.
        multi = {}
        stmts = {"insert": "INSERT INTO {t} (v, name, amount) SELECT 0, 'new-customer', 12.50 "
                           "FROM generate_series(1, 100);\n",
                 "update": "\\set k random(1, 99900)\nUPDATE {t} SET v = v + 1 WHERE id BETWEEN :k AND :k + 99;\n"}
        for r in range(int(os.environ.get("PROBE_MULTI_ROUNDS", 2)) if "multi" in PHASES else 0):
            for op, script in stmts.items():
                for name, t in (("plain", "b_plain"), ("native_row", "b_trig"), ("plpgsql_row", "b_plpg"),
                                ("plpgsql_statement_transition", "b_stmt")):
                    reset()
                    out = cl.pgbench(script.format(t=t), 1, secs=3, name="multi",
                                     env={"PGOPTIONS": "-c synchronous_commit=off"})
                    multi.setdefault(op, {}).setdefault(name, []).append(1e6 / out["tps"] / 100)
        if "multi" in PHASES:
            # Correctness of the statement-level variant: same row order as the row
            # trigger, UPDATE old/new pairs on the same row.
            reset()
            cl.psql("UPDATE b_trig SET v = v + 1 WHERE id BETWEEN 1000 AND 1099;"
                    "UPDATE b_stmt SET v = v + 1 WHERE id BETWEEN 1000 AND 1099;")
            order = {}
            for ch in ("b_trig", "b_stmt"):
                order[ch] = cl.val("SELECT string_agg(payload->'row'->>'id', ',' ORDER BY id) || ' / ' || "
                                   "bool_and(payload->'row'->'id' = payload->'old'->'id' AND "
                                   "(payload->'row'->>'v')::int = (payload->'old'->>'v')::int + 1) "
                                   "FROM pgpipe.events WHERE channel = '%s'" % ch)
            res["statement_level_same_order_and_pairs"] = (order["b_trig"] == order["b_stmt"]
                                                           and order["b_stmt"].endswith("/ true"))
            if not res["statement_level_same_order_and_pairs"]:
                res["statement_level_orders"] = order
        res["us_per_row_100_row_statements"] = {op: {k: round(min(v), 2) for k, v in by.items()}
                                                for op, by in multi.items()}
        bench.log("µs per row, 100-row statements: %s" % res["us_per_row_100_row_statements"])

        # 3. tps, interleaved.
        tps = {}
        for r in range(ROUNDS if "tps" in PHASES else 0):
            for op, script in (("insert", bench.INSERT_SQL), ("update", bench.UPDATE_SQL)):
                for c in CLIENTS:
                    names = list(TABLES) if r % 2 == 0 else list(reversed(list(TABLES)))
                    for name in names:
                        reset()
                        out = cl.pgbench(script.format(t=TABLES[name]), c, secs=SECS, name="tps")
                        tps.setdefault(op, {}).setdefault(str(c), {}).setdefault(name, []).append(out["tps"])
                        bench.log("round %d %s c=%d %-8s %8.0f tps" % (r + 1, op, c, name, out["tps"]))
        summary = {}
        for op, by_c in tps.items():
            for c, by_v in by_c.items():
                cell = {v: round(bench.med(x)) for v, x in by_v.items()}
                for v in ("native", "plpgsql"):
                    cell[v + "_ratio"] = round(cell[v] / cell["plain"], 3)
                summary.setdefault(op, {})[c] = cell
        res["tps"] = summary
        print(json.dumps(res, indent=1))
    finally:
        cl.stop()


if __name__ == "__main__":
    main()
