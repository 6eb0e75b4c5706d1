"""Capture cost on writers (issue 11): pgbench on captured tables beside plain ones, trigger and
WAL mode, the per-row breakdown and a system-wide perf profile. Mixed into phases.Bench."""

import json
import os
import re
import statistics
import subprocess
import time
from common import *  # noqa: F401,F403
from cluster import *  # noqa: F401,F403
from processes import *  # noqa: F401,F403


class CapturePhases:
    # ---- 1. capture cost --------------------------------------------------------
    def cell(self, table, op, clients, secs):
        script = (INSERT_SQL if op == "insert" else UPDATE_SQL).format(t=table)
        lsn0 = self.cl.val("SELECT pg_current_wal_lsn()")
        # The pgpipe worker's own CPU: in trigger mode it only sends wake-up NOTIFYs, at
        # most one per pgpipe.notify_min_interval, so a figure that grows with the
        # commit rate is a worker that spins.
        worker = int(self.cl.val("SELECT coalesce(max(pid), 0) FROM pg_stat_activity "
                                 "WHERE backend_type = 'pgpipe worker'"))
        worker_cpu0 = proc_cpu_s(worker) if worker else None
        r = self.cl.pgbench(script, clients, secs=secs, name="%s_%s" % (table, op))
        wal = float(self.cl.val("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '%s')" % lsn0))
        if r.get("tx"):
            self.wal_raw.setdefault(op, {}).setdefault(str(clients), {}).setdefault(table, []).append(wal / r["tx"])
            worker_cpu1 = proc_cpu_s(worker) if worker else None
            if worker_cpu0 is not None and worker_cpu1 is not None:
                self.worker_cpu_raw.setdefault(op, {}).setdefault(str(clients), {}).setdefault(
                    table, []).append((worker_cpu1 - worker_cpu0) * 1e6 / r["tx"])
        return r["tps"], r.get("cpu_us_per_tx")

    def capture_rounds(self, variants, plan, rounds, secs):
        """plan: list of (op, clients, [variant names]); A B A B rounds, the order of the
        variants reversed every other round. Returns {op: {clients: {variant: [tps]}}}."""
        out = {}
        for r in range(rounds):
            for op, clients, names in plan:
                order = names if r % 2 == 0 else list(reversed(names))
                for v in order:
                    self.between_cells()
                    tps, cpu = self.cell(variants[v], op, clients, secs)
                    out.setdefault(op, {}).setdefault(str(clients), {}).setdefault(v, []).append(tps)
                    self.cpu_raw.setdefault(op, {}).setdefault(str(clients), {}).setdefault(v, []).append(cpu)
                    log("capture round %d %s c=%d %-12s %8.0f tps  load %s" % (r + 1, op, clients, v, tps, loadavg()))
        return out

    def phase_capture(self):
        variants = self.CAPTURE_VARIANTS
        plan = []
        for op in ("insert", "update"):
            for c in P["clients"]:
                names = ["plain", "trigger", "trigger_plpgsql"]
                if c in P["variant_clients"]:
                    names += ["trigger_nosp", "trigger_1idx"]
                plan.append((op, c, names))
        load_before = loadavg()
        raw = self.capture_rounds(variants, plan, P["rounds"], P["capture_secs"])
        res = {"load_before": load_before, "load_after": loadavg(), "raw_tps": raw, "table": {},
               "cpu_us_per_tx": self.cpu_summary(), "wal_bytes_per_tx": self.wal_summary(),
               "worker_cpu_us_per_tx": self.worker_cpu_summary()}
        self.summarize_capture(raw, res["table"])
        self.res["phases"]["capture"] = res

    CAPTURE_VARIANTS = {"plain": "b_plain", "trigger": "b_trig", "trigger_plpgsql": "b_plpg",
                        "trigger_nosp": "b_nosp",
                        "trigger_1idx": "b_1idx", "plain_slot": "b_plain", "wal": "b_wal"}

    def phase_capture_wal(self):
        """WAL mode. Once a logical slot exists every write in the cluster is decoded, so
        this runs after the phases that must not pay for it, with its own interleaved
        plain baseline ("plain_slot")."""
        res = {"load_before": loadavg()}
        if not self.try_wal():
            res.update({"wal_available": False, "wal_error": self.wal_error})
            self.res["phases"]["capture_wal"] = res
            return
        plan = [(op, c, ["plain_slot", "wal"]) for op in ("insert", "update") for c in P["clients"]]
        raw = self.capture_rounds(self.CAPTURE_VARIANTS, plan, P["rounds"], P["capture_secs"])
        self.wait_wal_caught_up()
        res.update({"wal_available": True, "raw_tps": raw, "load_after": loadavg(), "table": {},
                    "cpu_us_per_tx": self.cpu_summary(), "wal_bytes_per_tx": self.wal_summary()})
        self.summarize_capture(raw, res["table"])
        self.res["phases"]["capture_wal"] = res

    def wal_summary(self):
        """Median WAL bytes per transaction per cell (by table)."""
        return {op: {c: {t: rnd(med(vals), 0) for t, vals in by_t.items()} for c, by_t in by_c.items()}
                for op, by_c in self.wal_raw.items()}

    def worker_cpu_summary(self):
        """Median CPU µs of the pgpipe worker per writer transaction per cell (by table)."""
        return {op: {c: {t: rnd(med(vals), 2) for t, vals in by_t.items()} for c, by_t in by_c.items()}
                for op, by_c in self.worker_cpu_raw.items()}

    def cpu_summary(self):
        """Median machine-wide CPU µs per transaction (pgbench included) per cell."""
        return {op: {c: {v: rnd(med(vals), 1) for v, vals in by_v.items()} for c, by_v in by_c.items()}
                for op, by_c in self.cpu_raw.items()}

    @staticmethod
    def summarize_capture(raw, table):
        for op, by_c in raw.items():
            for c, by_v in by_c.items():
                cell = table.setdefault(op, {}).setdefault(c, {})
                for v, vals in by_v.items():
                    cell[v] = rnd(med(vals), 0)
                for v in list(cell):
                    base = cell.get("plain_slot") if v == "wal" else cell.get("plain")
                    if v not in ("plain", "plain_slot") and base:
                        cell[v + "_ratio"] = rnd(cell[v] / base, 3)

    # ---- 1b. where the trigger's time goes (single session, set-based) -----------
    def phase_breakdown(self):
        cl = self.cl
        n = P["breakdown_rows"]
        cl.psql("""
CREATE OR REPLACE FUNCTION bench.trg_empty() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RETURN NULL; END $$;
CREATE OR REPLACE FUNCTION bench.trg_empty_sd() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN RETURN NULL; END $$;
CREATE OR REPLACE FUNCTION bench.trg_empty_sd_only() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER AS $$
BEGIN RETURN NULL; END $$;
CREATE OR REPLACE FUNCTION bench.trg_queue_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pgpipe.events (id, channel, operation, payload, source)
    VALUES (pgpipe.uuid_generate_v7(), TG_ARGV[0], TG_OP, '{}'::jsonb, 'trigger');
    RETURN NULL;
END $$;
""")
        trig = {"k_plain": None, "k_trig": "pgpipe", "k_plpg": "bench.capture_row_plpgsql",
                "k_nosp": "bench.capture_row_nosp",
                "k_1idx": "bench.capture_row_1idx", "k_empty": "bench.trg_empty",
                "k_emptysd": "bench.trg_empty_sd", "k_emptysdo": "bench.trg_empty_sd_only",
                "k_qonly": "bench.trg_queue_only"}
        for t, fn in trig.items():
            cl.psql("CREATE TABLE IF NOT EXISTS %s (LIKE b_plain INCLUDING ALL);" % t)
            if fn == "pgpipe":
                cl.psql("SELECT pgpipe.subscribe('%s');" % t)
            elif fn:
                cl.psql("CREATE TRIGGER bench_capture AFTER INSERT OR UPDATE OR DELETE ON %s "
                        "FOR EACH ROW EXECUTE FUNCTION %s('%s');" % (t, fn, t))
        tables = ", ".join(trig)
        ins = ("INSERT INTO %s (v, name, amount) SELECT 0, ''new-customer'', 12.50 FROM generate_series(1, "
               + str(n) + ")")
        upd = "UPDATE %s SET v = v + 1"
        fill = ("SET session_replication_role = replica; INSERT INTO %s (v, name, amount) "
                "SELECT 0, 'new-customer', 12.50 FROM generate_series(1, " + str(n) + "); VACUUM %s;")
        has_wakeup = cl.val("SELECT count(*) FROM pg_proc WHERE proname = 'mark_wakeup' "
                            "AND pronamespace = 'pgpipe'::regnamespace") != "0"
        # (name, timed statement, table to pre-fill for it)
        items = [
            ("insert, no trigger", ins % "k_plain", None),
            ("insert, empty plpgsql trigger", ins % "k_empty", None),
            ("insert, empty plpgsql trigger, SECURITY DEFINER only", ins % "k_emptysdo", None),
            ("insert, empty plpgsql trigger, SECURITY DEFINER + SET search_path", ins % "k_emptysd", None),
            ("insert, trigger: queue INSERT only ('{}' payload)", ins % "k_qonly", None),
            ("insert, pgpipe trigger (a)", ins % "k_trig", None),
            ("insert, PL/pgSQL trigger before issue 11 (p)", ins % "k_plpg", None),
            ("insert, trigger without SET search_path (b)", ins % "k_nosp", None),
            ("insert, trigger into 1-index queue (c)", ins % "k_1idx", None),
            ("update, no trigger", upd % "k_plain", "k_plain"),
            ("update, pgpipe trigger (a)", upd % "k_trig", "k_trig"),
            ("update, PL/pgSQL trigger before issue 11 (p)", upd % "k_plpg", "k_plpg"),
            ("update, trigger without SET search_path (b)", upd % "k_nosp", "k_nosp"),
            ("uuid_generate_v7()", "SELECT count(pgpipe.uuid_generate_v7()) FROM generate_series(1, %d)" % n, None),
            ("gen_random_uuid() (v4, for scale)", "SELECT count(gen_random_uuid()) FROM generate_series(1, %d)" % n, None),
            ("to_jsonb(row) + jsonb_build_object envelope",
             "SELECT count(jsonb_build_object(''op'', ''INSERT'', ''schema'', ''public'', ''table'', ''k'', "
             "''row'', to_jsonb(t), ''old'', NULL::jsonb)) FROM (SELECT * FROM b_plain LIMIT %d) t" % n, None),
            ("queue INSERT set-based (no trigger)",
             "INSERT INTO pgpipe.events (id, channel, operation, payload, source) "
             "SELECT pgpipe.uuid_generate_v7(), ''k'', ''INSERT'', ''{\"row\": {\"id\": 1}}''::jsonb, ''trigger'' "
             "FROM generate_series(1, %d)" % n, None),
            ("queue INSERT set-based into 1-index queue",
             "INSERT INTO bench.events_1idx (id, channel, operation, payload, source) "
             "SELECT pgpipe.uuid_generate_v7(), ''k'', ''INSERT'', ''{\"row\": {\"id\": 1}}''::jsonb, ''trigger'' "
             "FROM generate_series(1, %d)" % n, None),
        ]
        if has_wakeup:
            items.append(("pgpipe.mark_wakeup()", "SELECT count(pgpipe.mark_wakeup()) FROM generate_series(1, %d)" % n, None))
        times = {name: [] for name, _, _ in items}
        for r in range(3):
            for name, q, prefill in (items if r % 2 == 0 else list(reversed(items))):
                self.reset_queue()
                cl.psql("TRUNCATE %s;" % tables)
                if prefill:
                    cl.psql(fill % (prefill, prefill))
                cl.psql("CHECKPOINT;")
                ms = float(cl.val("SELECT bench.elapsed_ms('%s')" % q))
                times[name].append(ms)
        # Per statement: a loop of single-row INSERT statements in one transaction (no
        # per-transaction cost). Per transaction: pgbench, 1 client, synchronous_commit
        # off (no fsync wait), µs per transaction = 1 / tps.
        loop = ("DO $x$ BEGIN FOR i IN 1..%d LOOP INSERT INTO %%s (v, name, amount) "
                "VALUES (0, ''new-customer'', 12.50); END LOOP; END $x$" % (n // 5))
        per_stmt = {}
        per_tx = {}
        stmt_tables = [("no trigger", "k_plain"), ("pgpipe trigger (a)", "k_trig"),
                       ("PL/pgSQL trigger before issue 11 (p)", "k_plpg"),
                       ("without SET search_path (b)", "k_nosp"), ("1-index queue (c)", "k_1idx")]
        for r in range(2):
            for label, t in (stmt_tables if r % 2 == 0 else list(reversed(stmt_tables))):
                self.reset_queue()
                cl.psql("TRUNCATE %s; CHECKPOINT;" % tables)
                ms = float(cl.val("SELECT bench.elapsed_ms('%s')" % (loop % t)))
                per_stmt.setdefault(label, []).append(ms * 1000.0 / (n // 5))
                pb = cl.pgbench(INSERT_SQL.format(t=t), 1, secs=max(2, P["capture_secs"] - 1), name="tx_" + t,
                                env={"PGOPTIONS": "-c synchronous_commit=off"})
                per_tx.setdefault(label, []).append(1e6 / pb["tps"] if pb["tps"] else None)
        res = {"rows": n, "load": loadavg(), "us_per_row": {},
               "us_per_statement_loop": {k: rnd(med(v), 2) for k, v in per_stmt.items()},
               "us_per_tx_1client_async": {k: rnd(med(v), 2) for k, v in per_tx.items()}}
        for name, _, _ in items:
            res["us_per_row"][name] = rnd(med(times[name]) * 1000.0 / n, 2)
        over = {}
        for k, v in res["us_per_row"].items():
            for op in ("insert", "update"):
                base = res["us_per_row"].get("%s, no trigger" % op)
                if k.startswith(op + ", ") and k != "%s, no trigger" % op and base is not None:
                    over[k] = rnd(v - base, 2)
        res["trigger_overhead_us_per_row"] = over
        self.reset_queue()
        cl.psql("TRUNCATE %s;" % tables)
        self.res["phases"]["breakdown"] = res

    # ---- 1c. perf profile of the backends during the trigger INSERT workload -------
    def phase_perf(self):
        if not shutil.which("perf"):
            self.res["phases"]["perf"] = {"error": "perf not installed"}
            return
        out = {}
        for label, table in (("plain", "b_plain"), ("trigger", "b_trig")):
            self.between_cells()
            data = os.path.join(self.work, "perf_%s.data" % label)
            pb = self.cl.pgbench_async(INSERT_SQL.format(t=table), 8, P["perf_secs"] + 2, name="perf_" + label)
            time.sleep(1)
            subprocess.run(["perf", "record", "-F", "499", "-a", "-g", "-o", data, "--", "sleep",
                            str(P["perf_secs"])], capture_output=True)
            pgbench_result(pb)
            dsos = perf_lines(data, ["--comm", "postgres", "--sort", "dso"], 15, 1)
            syms = perf_lines(data, ["--comm", "postgres", "--sort", "dso,symbol", "-g", "none"], 30, 0.8)
            out[label] = {"by_dso": dsos[:15], "postgres_top_symbols": syms}
        waits = {}
        for label, table, op in (("plain insert", "b_plain", "insert"), ("trigger insert", "b_trig", "insert"),
                                 ("plain update", "b_plain", "update"), ("trigger update", "b_trig", "update")):
            self.between_cells()
            script = (INSERT_SQL if op == "insert" else UPDATE_SQL).format(t=table)
            pb = self.cl.pgbench_async(script, 8, P["perf_secs"] + 2, name="waits")
            time.sleep(1)
            rows = self.cl.psql("SELECT * FROM bench.sample_waits(%d, 0.01)" % (P["perf_secs"] * 50))
            r = pgbench_result(pb)
            hist = [line.split("\t") for line in rows.splitlines() if line]
            total = sum(int(c) for _, c in hist) or 1
            waits[label] = {"tps": r["tps"], "share": [(w, rnd(100.0 * int(c) / total, 1)) for w, c in hist[:8]]}
        out["waits_8_clients"] = waits
        out["load"] = loadavg()
        self.res["phases"]["perf"] = out
