"""The benchmark phases (end to end, latency, fan-out, failure, ...), each against its baseline in the same run;
capture cost (capture.py), the decoding limit (decoding.py), NATS and groups (scale.py) are mixed in."""

import bisect
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from common import *  # noqa: F401,F403
from cluster import *  # noqa: F401,F403
from processes import *  # noqa: F401,F403
from report import *  # noqa: F401,F403
from snapshot import phase_snapshot
from scale import ScalePhases
from capture import CapturePhases
from decoding import DecodingPhases


class Bench(CapturePhases, DecodingPhases, ScalePhases):
    def __init__(self):
        self.cl = Cluster()
        self.work = os.path.join(self.cl.dir, "work")
        os.makedirs(self.work)
        self.res = {"params": P, "phases": {}}
        self.wal_ok = None
        self.wal_error = None
        self.has_xip = False
        self.cpu_raw = {}
        self.wal_raw = {}
        self.worker_cpu_raw = {}

    # ---- setup -------------------------------------------------------------------
    def setup(self):
        cl = self.cl
        cl.start()
        # A fresh cluster creates (and zero-fills) a new 16 MB WAL segment every 16 MB of
        # WAL; a cluster in service recycles old ones. Generate ~1.5 GB of WAL once so that
        # the measurements see recycled segments (min_wal_size keeps them).
        t = time.time()
        cl.psql("CREATE TABLE warm AS SELECT g, repeat('x', 700) AS pad FROM generate_series(1, %d) g; "
                "DROP TABLE warm; CHECKPOINT; CHECKPOINT;" % env_int("BENCH_WARM_ROWS", 2000000))
        log("WAL warm-up %.1fs" % (time.time() - t))
        cl.psql("CREATE EXTENSION pgpipe; CREATE SCHEMA bench;")
        # Partitions ahead exist as they would under a running forwarder.
        cl.psql("SELECT * FROM pgpipe.rotate();")
        # pgpipe.capture_row is native now; (p) is the PL/pgSQL trigger it replaced.
        self.capture_fn = PLPGSQL_CAPTURE_ROW
        cl.psql("CREATE FUNCTION bench.capture_row_plpgsql() RETURNS trigger LANGUAGE plpgsql "
                "SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$%s$body$;" % self.capture_fn)
        # (b) the same trigger body without SECURITY DEFINER / SET search_path.
        cl.psql("CREATE FUNCTION bench.capture_row_nosp() RETURNS trigger LANGUAGE plpgsql AS $body$%s$body$;"
                % self.capture_fn)
        # (c) a queue with one index: PRIMARY KEY (xid, id) and no separate xid index,
        # partitioned like pgpipe.events.
        parts = cl.psql("SELECT lower_xid, upper_xid FROM pgpipe.event_partitions ORDER BY 1")
        ddl = ["CREATE TABLE bench.events_1idx (LIKE pgpipe.events INCLUDING DEFAULTS, "
               "PRIMARY KEY (xid, id)) PARTITION BY RANGE (xid);",
               "CREATE TABLE bench.events_1idx_default PARTITION OF bench.events_1idx DEFAULT;"]
        for i, line in enumerate(parts.splitlines()):
            lo, hi = line.split("\t")
            ddl.append("CREATE TABLE bench.events_1idx_%d PARTITION OF bench.events_1idx "
                       "FOR VALUES FROM ('%s') TO ('%s');" % (i, lo, hi))
        cl.psql("\n".join(ddl))
        body_1idx = self.capture_fn.replace("INSERT INTO pgpipe.events", "INSERT INTO bench.events_1idx")
        cl.psql("CREATE FUNCTION bench.capture_row_1idx() RETURNS trigger LANGUAGE plpgsql "
                "SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$%s$body$;" % body_1idx)
        self.has_xip = self.make_read_xip()
        for t in ("b_plain", "b_trig", "b_plpg", "b_nosp", "b_1idx", "b_wal"):
            cl.psql(TABLE_DDL.format(t=t, n=100000))
        cl.psql("SELECT pgpipe.subscribe('b_trig');")
        cl.psql("CREATE TRIGGER bench_capture AFTER INSERT OR UPDATE OR DELETE ON b_plpg "
                "FOR EACH ROW EXECUTE FUNCTION bench.capture_row_plpgsql('b_plpg');")
        cl.psql("CREATE TRIGGER bench_capture AFTER INSERT OR UPDATE OR DELETE ON b_nosp "
                "FOR EACH ROW EXECUTE FUNCTION bench.capture_row_nosp('b_nosp');")
        cl.psql("CREATE TRIGGER bench_capture AFTER INSERT OR UPDATE OR DELETE ON b_1idx "
                "FOR EACH ROW EXECUTE FUNCTION bench.capture_row_1idx('b_1idx');")
        self.res["capture_row_source"] = self.capture_fn
        cl.psql("""
CREATE FUNCTION bench.elapsed_ms(q text) RETURNS float8 LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz := clock_timestamp();
BEGIN EXECUTE q; RETURN extract(epoch FROM clock_timestamp() - t0) * 1000; END $$;
-- What pgbench's backends are doing, sampled every dt seconds: their wait events, 'CPU'
-- when running, Client:ClientRead while waiting for pgbench.
CREATE FUNCTION bench.sample_waits(n int, dt float8) RETURNS TABLE (w text, samples bigint)
LANGUAGE plpgsql AS $$
BEGIN
    CREATE TEMP TABLE IF NOT EXISTS _w (w text);
    TRUNCATE _w;
    FOR i IN 1..n LOOP
        PERFORM pg_stat_clear_snapshot();
        INSERT INTO _w SELECT coalesce(a.wait_event_type || ':' || a.wait_event, 'CPU')
        FROM pg_stat_activity a WHERE a.application_name = 'pgbench' AND a.backend_type = 'client backend';
        PERFORM pg_sleep(dt);
    END LOOP;
    RETURN QUERY SELECT _w.w, count(*) FROM _w GROUP BY 1 ORDER BY 2 DESC;
END $$;
""")

    def reset_queue(self):
        self.cl.psql("TRUNCATE pgpipe.events, bench.events_1idx; DELETE FROM pgpipe.consumers;")

    def between_cells(self):
        if self.wal_ok:
            self.wait_wal_caught_up()
        self.reset_queue()
        self.cl.psql("VACUUM b_plain, b_trig, b_plpg, b_nosp, b_1idx, b_wal; CHECKPOINT;")

    def wait_wal_caught_up(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            lag = self.cl.val("SELECT coalesce(lag_bytes, 0) FROM pgpipe.status()")
            if float(lag or 0) < 256 * 1024:
                return True
            time.sleep(0.2)
        log("WAL worker did not catch up within %ss" % timeout)
        return False

    def try_wal(self):
        """Subscribes b_wal in WAL mode, if WAL mode works in this build."""
        try:
            self.cl.psql("SELECT pgpipe.subscribe('b_wal', mode => 'wal');")
            # One change must come through the worker for WAL mode to count as working.
            self.cl.psql("UPDATE b_wal SET v = v WHERE id = 1;")
            deadline = time.time() + 20
            while time.time() < deadline:
                if self.cl.val("SELECT count(*) FROM pgpipe.events WHERE channel = 'b_wal'") != "0":
                    self.wal_ok = True
                    return True
                time.sleep(0.2)
            st = self.cl.psql("SELECT worker_state, last_error, detail FROM pgpipe.status()")
            raise RuntimeError("no WAL-mode event within 20 s; status: %s" % st)
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            self.wal_ok = False
            self.wal_error = str(e).splitlines()[0][:300]
            log("WAL mode not available: %s" % self.wal_error)
            return False

    # ---- 2. end-to-end throughput ------------------------------------------------
    def e2e_table(self):
        if getattr(self, "_e2e_ready", False):
            return
        self.cl.psql(TABLE_DDL.format(t="b_e2e", n=10000))
        self.cl.psql("SELECT pgpipe.subscribe('b_e2e');")
        self._e2e_ready = True

    def produced_since(self, base):
        """Changes committed to b_e2e since `base` = (rows, sum of v): INSERTs + UPDATEs."""
        rows, vs = self.cl.val("SELECT count(*), coalesce(sum(v), 0) FROM b_e2e").split("\t")
        return (int(rows) - base[0]) + (int(vs) - base[1])

    def e2e_base(self):
        rows, vs = self.cl.val("SELECT count(*), coalesce(sum(v), 0) FROM b_e2e").split("\t")
        return int(rows), int(vs)

    def run_prefill(self, label, adapter, env=None, extra=None, receiver=False, n=None, profile=False):
        cl = self.cl
        n = n or P["prefill"]
        self.reset_queue()
        cl.psql("CHECKPOINT;")
        name = "pf_" + label
        cl.psql("SELECT pgpipe.register_consumer('%s', ARRAY['b_e2e'], start => 'now');" % name)
        base = self.e2e_base()
        t0 = time.time()
        cl.pgbench(INSERT_N_SQL.format(t="b_e2e", n=1000), 2, transactions=max(1, n // 2000), name="prefill")
        write_s = time.time() - t0
        produced = self.produced_since(base)
        recv = None
        env = dict(env or {})
        extra = list(extra or [])
        if receiver:
            rport = free_port()
            recv_out = os.path.join(self.work, name + ".recv")
            if os.path.exists(recv_out):
                os.unlink(recv_out)
            recv = subprocess.Popen([sys.executable, BENCH_PY, "receiver", str(rport), recv_out])
            PEERS.append(recv)
            time.sleep(0.5)
            extra += ["--url", "http://127.0.0.1:%d/hook" % rport]
        perf = None
        perf_data = os.path.join(self.work, name + ".perf.data")
        if profile and shutil.which("perf"):
            perf = subprocess.Popen(["perf", "record", "-F", "499", "-a", "-g", "-o", perf_data],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            PEERS.append(perf)
            time.sleep(0.5)
        fw = Forwarder(cl, self.work, name, "b_e2e", adapter=adapter, env=env, extra=extra)
        out_path = recv_out if receiver else fw.out
        watch = Watcher(out_path, b'"source":"' if receiver else b"\n")
        t_start = time.time()
        t_done, t_first = watch.wait_for(produced, timeout=max(60, produced / 500), alive=fw.alive)
        cpu = proc_cpu_s(fw.proc.pid)
        if perf:
            perf.send_signal(signal.SIGINT)
            perf.wait()
        mem = fw.stop()
        watch.poll()
        watch.close()
        if recv:
            recv.terminate()
            recv.wait()
        events = parse_events(out_path)
        res = {"events": produced, "write_s": rnd(write_s, 2), "load": loadavg(),
               "rss_mb_end": rnd(mem.get("VmRSS")), "rss_mb_peak": rnd(mem.get("VmHWM"))}
        if t_done:
            res["drain_s_from_start"] = rnd(t_done - t_start, 3)
            res["drain_s_from_first"] = rnd(t_done - t_first, 3)
            res["events_per_s"] = rnd(produced / max(t_done - t_first, 1e-6), 0)
        else:
            res["timeout"] = True
        res["forwarder_cpu_s"] = rnd(cpu, 2)
        if t_done:
            res["forwarder_cpu_us_per_event"] = rnd(cpu * 1e6 / produced, 1)
        if perf:
            res["perf_by_process"] = perf_lines(perf_data, ["--sort", "comm"], 10)
            res["perf_forwarder_top"] = perf_lines(perf_data, ["--comm", "pgpipe,tokio-rt-worker", "--sort", "dso,symbol", "-g", "none"], 20, 0.5)
            res["perf_postgres_top"] = perf_lines(perf_data, ["--comm", "postgres", "--sort", "dso,symbol", "-g", "none"], 20, 0.5)
        res["check"] = check_events(events, produced)
        return res

    def phase_e2e(self):
        self.e2e_table()
        cl = self.cl
        res = {"load_before": loadavg(), "prefill": {}}
        # Idle RSS.
        self.reset_queue()
        fw = Forwarder(cl, self.work, "idle", "b_e2e", adapter="file")
        fw.wait_ready()
        time.sleep(3)
        res["rss_idle_mb"] = rnd(fw.mem().get("VmRSS"))
        fw.stop()
        # Pre-filled queue, drained by each adapter (the forwarder's own cost).
        small = min(P["prefill"], 20000)
        configs = [("stdout_sink", "stdout", {}, [], False, None, False),
                   ("file_fsync_always", "file", {}, [], False, None, True),
                   ("file_fsync_never", "file", {"PGPIPE_FILE_FSYNC": "never"}, [], False, None, False),
                   ("file_batch5000", "file", {}, ["--batch-size", "5000", "--max-in-flight", "50000"], False, None, False),
                   ("webhook_single", "webhook", {}, [], True, small, False),
                   ("webhook_batch100", "webhook", {"PGPIPE_WEBHOOK_BATCH_SIZE": "100"}, [], True, None, False)]
        for label, adapter, env, extra, receiver, n, profile in configs:
            try:
                r = self.run_prefill(label, adapter, env, extra, receiver, n, profile)
            except Exception as e:  # noqa: BLE001
                r = {"error": str(e)[:500]}
            res["prefill"][label] = r
            log("prefill %-18s %s" % (label, json.dumps(r)))
        # Burst: one transaction of N rows, forwarder running (file adapter).
        try:
            res["burst"] = self.run_burst()
        except Exception as e:  # noqa: BLE001
            res["burst"] = {"error": str(e)[:500]}
        log("burst %s" % json.dumps(res["burst"]))
        try:
            res["sustained"] = self.run_sustained()
        except Exception as e:  # noqa: BLE001
            res["sustained"] = {"error": str(e)[:500]}
        log("sustained %s" % json.dumps(res["sustained"]))
        res["load_after"] = loadavg()
        self.res["phases"]["e2e"] = res

    def run_burst(self):
        cl = self.cl
        n = P["burst"]
        self.reset_queue()
        cl.psql("CHECKPOINT;")
        cl.psql("SELECT pgpipe.register_consumer('burst', ARRAY['b_e2e'], start => 'now');")
        fw = Forwarder(cl, self.work, "burst", "b_e2e", adapter="file")
        fw.wait_ready()
        watch = Watcher(fw.out)
        base = self.e2e_base()
        t0 = time.time()
        xid = cl.val("BEGIN; %s SELECT pg_current_xact_id(); COMMIT;" % INSERT_N_SQL.format(t="b_e2e", n=n))
        t_client_commit = time.time()
        t_done, t_first = watch.wait_for(n, timeout=max(60, n / 500), alive=fw.alive)
        mem = fw.stop()
        watch.close()
        ct = commit_times(cl, {int(xid)})[int(xid)] / 1e6
        produced = self.produced_since(base)
        res = {"rows": n, "insert_tx_s": rnd(t_client_commit - t0, 3), "load": loadavg(),
               "rss_mb_peak": rnd(mem.get("VmHWM"))}
        if t_done:
            res["first_event_after_commit_s"] = rnd(t_first - ct, 3)
            res["all_delivered_after_commit_s"] = rnd(t_done - ct, 3)
            res["events_per_s"] = rnd(n / max(t_done - ct, 1e-6), 0)
        else:
            res["timeout"] = True
        events = parse_events(fw.out)
        res["check"] = check_events(events, produced)
        # One page in the middle of the burst's batch, as the forwarder reads it, and the
        # same with the proposed pgpipe.read (bench.read).
        x = int(xid)
        ids = sorted(e["id"] for e in events)
        if len(ids) > 2:
            pos = "%d:%d:/%d:%d:/%s" % (x, x, x + 1, x + 1, ids[len(ids) // 2])
            q = "SELECT bench.elapsed_ms('SELECT count(*) FROM %s(''burst'', ''" + pos + "'', 1000)')"
            res["page_ms_mid_batch"] = rnd(med([float(cl.val(q % "pgpipe.read")) for _ in range(5)]), 2)
            if self.has_xip:
                res["page_ms_mid_batch_fix"] = rnd(med([float(cl.val(q % "bench.read")) for _ in range(5)]), 2)
                res["page_ms_mid_batch_paging_fix"] = rnd(med([float(cl.val(q % "benchp.read")) for _ in range(5)]), 2)
                same = ("SELECT (SELECT md5(string_agg(position || id::text, ',' ORDER BY id)) FROM pgpipe.read('burst', '%s', 1000)) "
                        "= (SELECT md5(string_agg(position || id::text, ',' ORDER BY id)) FROM benchp.read('burst', '%s', 1000))" % (pos, pos))
                res["paging_fix_same_rows"] = cl.val(same)
        return res

    def run_sustained(self):
        cl = self.cl
        rate_ev = P["sustain_rate"]
        rows_per_tx = 50
        tx_rate = max(1, rate_ev // rows_per_tx)
        secs = P["sustain_secs"]
        self.reset_queue()
        cl.psql("CHECKPOINT;")
        cl.psql("SELECT pgpipe.register_consumer('sustained', ARRAY['b_e2e'], start => 'now');")
        fw = Forwarder(cl, self.work, "sustained", "b_e2e", adapter="file")
        fw.wait_ready()
        watch = Watcher(fw.out)
        base = self.e2e_base()
        script = ("\\set k random(1, 10000)\nBEGIN;\n" + INSERT_N_SQL.format(t="b_e2e", n=rows_per_tx - 1)
                  + "UPDATE b_e2e SET v = v + 1 WHERE id = :k;\nCOMMIT;\n")
        t0 = time.time()
        pb = cl.pgbench_async(script, 8, secs, rate=tx_rate, name="sustained")
        samples = []
        rss_max = 0.0
        while pb.poll() is None:
            time.sleep(1)
            samples.append((rnd(time.time() - t0, 1), watch.poll()))
            rss_max = max(rss_max, fw.mem().get("VmRSS", 0))
        t_end = time.time()
        pbr = pgbench_result(pb)
        delivered_at_end = watch.poll()
        produced = self.produced_since(base)
        t_done, _ = watch.wait_for(produced, timeout=300, alive=fw.alive)
        mem = fw.stop()
        watch.close()
        res = {"target_events_per_s": tx_rate * rows_per_tx, "rows_per_tx": rows_per_tx,
               "writer_tx_per_s": rnd(pbr["tps"], 0), "writer_sched_lag_avg_ms": pbr.get("sched_lag_avg_ms"),
               "produced": produced, "secs": rnd(t_end - t0, 1),
               "produced_per_s": rnd(produced / (t_end - t0), 0),
               "delivered_during_write_per_s": rnd(delivered_at_end / (t_end - t0), 0),
               "backlog_at_writer_end": produced - delivered_at_end,
               "catch_up_s": rnd(t_done - t_end, 2) if t_done else None,
               "rss_mb_max_sampled": rnd(rss_max), "rss_mb_peak": rnd(mem.get("VmHWM")),
               "load": loadavg(), "delivered_per_second": samples}
        res["check"] = check_events(parse_events(fw.out), produced)
        return res

    # ---- 2b. the proposed pgpipe.read fixes, A/B on the pre-filled drain ----------------
    def phase_readfix(self):
        """Drains the pre-filled queue through stdout with pgpipe.read as shipped (A) and
        with pgpipe.read replaced, in this throw-away database only, by a wrapper that pages
        with bench/benchp.read (B): the long-transaction and the paging fixes."""
        cl = self.cl
        if not self.has_xip:
            self.res["phases"]["readfix"] = {"status": "pgpipe.read changed; fix not applicable"}
            return
        self.e2e_table()
        orig = cl.psql("SELECT pg_get_functiondef('pgpipe.read'::regproc)")
        head, rest = orig.split("AS $function$", 1)
        wrapper = head + """AS $function$
BEGIN
    IF split_part(coalesce(after, pgpipe.consumer_position(consumer)), '/', 3) <> '' THEN
        RETURN QUERY SELECT * FROM benchp.read(consumer, after, max_events);
    ELSE
        RETURN QUERY SELECT * FROM bench.read(consumer, after, max_events);
    END IF;
END
$function$
"""
        res = {"load_before": loadavg(), "runs": {}}
        try:
            for r in range(2):
                for label in (("orig", "fixed") if r % 2 == 0 else ("fixed", "orig")):
                    cl.psql(orig if label == "orig" else wrapper)
                    x = self.run_prefill("%s_%d" % (label, r), "stdout")
                    res["runs"].setdefault(label, []).append(x)
                    log("readfix %s %s" % (label, json.dumps({k: x.get(k) for k in ("events_per_s", "drain_s_from_start")})))
        finally:
            cl.psql(orig)
        res["events_per_s"] = {k: rnd(med([x.get("events_per_s") for x in v]), 0) for k, v in res["runs"].items()}
        res["all_correct"] = all(x.get("check", {}).get("ok") for v in res["runs"].values() for x in v)
        res["load_after"] = loadavg()
        self.res["phases"]["readfix"] = res

    # ---- 3. latency commit -> delivery ----------------------------------------------
    def phase_latency(self):
        cl = self.cl
        cl.psql(TABLE_DDL.format(t="b_lat", n=0))
        cl.psql("SELECT pgpipe.subscribe('b_lat');")
        res = {"load_before": loadavg(), "runs": {}}
        has_notify_guc = self.cl.val("SELECT count(*) FROM pg_settings WHERE name = 'pgpipe.notify_min_interval'") != "0"
        res["notify_min_interval_default"] = self.cl.val("SHOW pgpipe.notify_min_interval") if has_notify_guc else None
        for rate in P["lat_rates"]:
            rows_per_tx = 1 if rate <= 1000 else 10
            tx_rate = rate // rows_per_tx
            script = (INSERT_SQL.format(t="b_lat") if rows_per_tx == 1
                      else INSERT_N_SQL.format(t="b_lat", n=rows_per_tx))
            variants = [(poll, None) for poll in P["lat_polls"]]
            if P["lat_notify"] and has_notify_guc:
                variants.append(("50ms", P["lat_notify"]))
            for poll, notify in variants:
                self.set_notify_interval(notify)
                self.reset_queue()
                cl.psql("CHECKPOINT;")
                name = "lat_%d_%s" % (rate, poll) + ("_notify%s" % notify if notify else "")
                cl.psql("SELECT pgpipe.register_consumer('%s', ARRAY['b_lat'], start => 'now');" % name)
                before = int(cl.val("SELECT count(*) FROM b_lat"))
                fw = Forwarder(cl, self.work, name, "b_lat", adapter="stdout", poll=poll)
                fw.wait_ready()
                pbr = cl.pgbench(script, 4, secs=P["lat_secs"], rate=tx_rate, name=name)
                produced = int(cl.val("SELECT count(*) FROM b_lat")) - before
                watch = Watcher(fw.out)
                watch.wait_for(produced, timeout=60, alive=fw.alive)
                watch.close()
                fw.stop()
                events = parse_events(fw.out)
                lats, _ = latencies(cl, fw, events)
                r = lat_stats(lats)
                r.update({"rate": rate, "rows_per_tx": rows_per_tx, "poll": poll,
                          "notify_min_interval": notify or "default",
                          "writer_sched_lag_avg_ms": pbr.get("sched_lag_avg_ms"),
                          "load": loadavg(), "check": check_events(events, produced)})
                res["runs"][name] = r
                log("latency %s %s" % (name, json.dumps(r)))
        self.set_notify_interval(None)
        self.res["phases"]["latency"] = res

    def set_notify_interval(self, value):
        """ALTER SYSTEM pgpipe.notify_min_interval (None: back to the default)."""
        if value:
            self.cl.psql("ALTER SYSTEM SET pgpipe.notify_min_interval = '%s'; SELECT pg_reload_conf();" % value)
        else:
            self.cl.psql("ALTER SYSTEM RESET pgpipe.notify_min_interval; SELECT pg_reload_conf();", check=False)
        time.sleep(0.3)

    # ---- 8. snapshots (bench/snapshot.py) -----------------------------------------
    def phase_snapshot(self):
        phase_snapshot(self)

    # ---- 6. SSE fan-out ----------------------------------------------------------------
    def phase_fanout(self):
        cl = self.cl
        help_text = subprocess.run([PGPIPE, "listen", "--help"], capture_output=True, text=True).stdout
        if "sse" not in help_text:
            self.res["phases"]["fanout"] = {"status": "not yet: no sse adapter"}
            return
        cl.psql(TABLE_DDL.format(t="b_fan", n=0))
        cl.psql("SELECT pgpipe.subscribe('b_fan');")
        res = {"rate": 1000, "secs": P["fanout_secs"], "runs": {}}
        for n in P["fanout_clients"]:
            self.reset_queue()
            port = free_port()
            name = "fan_%d" % n
            fw = Forwarder(cl, self.work, name, "b_fan", adapter="sse",
                           extra=["--sse-addr", "127.0.0.1:%d" % port])
            fw.wait_ready()
            time.sleep(0.5)
            clients = []
            for i in range(n):
                path = os.path.join(self.work, "%s_c%d.txt" % (name, i))
                clients.append((path, subprocess.Popen(
                    ["curl", "-sN", "--max-time", str(P["fanout_secs"] + 30), "-o", path,
                     "http://127.0.0.1:%d/events/b_fan" % port])))
                PEERS.append(clients[-1][1])
            time.sleep(1.0 + n / 100.0)
            before = int(cl.val("SELECT count(*) FROM b_fan"))
            pbr = cl.pgbench(INSERT_SQL.format(t="b_fan"), 4, secs=P["fanout_secs"], rate=1000, name=name)
            produced = int(cl.val("SELECT count(*) FROM b_fan")) - before
            time.sleep(2)
            metrics = ""
            try:
                metrics = subprocess.run(["curl", "-s", "--max-time", "5", "http://127.0.0.1:%d/metrics" % port],
                                         capture_output=True, text=True).stdout
            except Exception:  # noqa: BLE001
                pass
            mem = fw.mem()
            for _, p in clients:
                p.terminate()
            for _, p in clients:
                p.wait()
            fw.stop()
            counts = []
            for path, _ in clients:
                try:
                    with open(path, "rb") as f:
                        counts.append(sum(1 for line in f if line.startswith(b"id:")))
                except OSError:
                    counts.append(0)
            dropped = [l for l in metrics.splitlines() if l.startswith("pgpipe_events_dropped_total")]
            r = {"clients": n, "produced": produced, "min_received": min(counts), "max_received": max(counts),
                 "clients_complete": sum(1 for c in counts if c >= produced),
                 "dropped_metric": dropped, "rss_mb": rnd(mem.get("VmRSS")),
                 "writer_sched_lag_avg_ms": pbr.get("sched_lag_avg_ms"), "load": loadavg()}
            res["runs"][str(n)] = r
            log("fanout %s" % json.dumps(r))
        self.res["phases"]["fanout"] = res

    # ---- 7. failure phase: a transaction held open -----------------------------------
    def phase_failure(self):
        cl = self.cl
        hold = P["hold_secs"]
        cl.psql(TABLE_DDL.format(t="b_fail", n=0))
        cl.psql("SELECT pgpipe.subscribe('b_fail');")
        self.reset_queue()
        cl.psql("CHECKPOINT;")
        cl.psql("SELECT pgpipe.register_consumer('fail', ARRAY['b_fail'], start => 'now');")
        fw = Forwarder(cl, self.work, "fail", "b_fail", adapter="stdout")
        fw.wait_ready()
        warm, after = 10, 30
        total = warm + hold + after
        t0 = time.time()
        pb = cl.pgbench_async(INSERT_SQL.format(t="b_fail"), 4, total, rate=1000, name="fail")
        # The proposed fix of pgpipe.read (see BENCHMARKS.md), built from the installed
        # function's text in the bench database only: "not visible in prev" is
        # "xid >= xmax(prev) OR xid in xip(prev)", which an index can scan narrowly.
        has_xip = self.has_xip
        time.sleep(warm - 1)
        read_q = "SELECT bench.elapsed_ms('SELECT count(*) FROM pgpipe.read(''fail'')')"
        xip_q = "SELECT bench.elapsed_ms('SELECT count(*) FROM bench.read(''fail'')')"
        read_before = [float(cl.val(read_q)) for _ in range(5)]
        xip_before = [float(cl.val(xip_q)) for _ in range(5)] if has_xip else []
        time.sleep(1)
        holder = subprocess.Popen(cl.psql_cmd() + ["-f", "-"], stdin=subprocess.PIPE, text=True,
                                  stdout=subprocess.PIPE)
        holder.stdin.write("BEGIN; INSERT INTO b_fail (v, name, amount) VALUES (0, 'held', 1); SELECT pg_current_xact_id();\n")
        holder.stdin.flush()
        held_xid = int(holder.stdout.readline().strip())
        t_hold = time.time()
        time.sleep(max(0, hold - 2))
        read_end = [float(cl.val(read_q)) for _ in range(5)]
        xip_end = [float(cl.val(xip_q)) for _ in range(5)] if has_xip else []
        same = None
        if has_xip:
            # Both read the same fixed position (prev of the consumer, one `cur` snapshot).
            same = cl.val(
                "WITH p AS (SELECT split_part(pgpipe.consumer_position('fail'), '/', 1) || '/' "
                "|| pg_current_snapshot()::text || '/' AS pos) "
                "SELECT (SELECT md5(string_agg(id::text, ',' ORDER BY id)) || count(*) FROM pgpipe.read('fail', p.pos, 1000000)) "
                "IS NOT DISTINCT FROM (SELECT md5(string_agg(id::text, ',' ORDER BY id)) || count(*) FROM bench.read('fail', p.pos, 1000000)) FROM p")
        rows_since_hold = int(cl.val("SELECT count(*) FROM pgpipe.events WHERE xid >= '%d'::xid8" % held_xid))
        time.sleep(max(0, t_hold + hold - time.time()))
        holder.stdin.write("COMMIT;\n")
        holder.stdin.close()
        holder.wait()
        t_release = time.time()
        pgbench_result(pb)
        produced = int(cl.val("SELECT count(*) FROM b_fail"))
        watch = Watcher(fw.out)
        watch.wait_for(produced, timeout=120, alive=fw.alive)
        watch.close()
        fw.stop()
        events = parse_events(fw.out)
        lats, per_event = latencies(cl, fw, events)
        # Latency by commit-time window: before, during, after the hold.
        windows = {"before": [], "during": [], "after_0_5s": [], "after_5s_plus": []}
        for c, lat in per_event:
            c = c / 1e6
            if c < t_hold:
                windows["before"].append(lat)
            elif c < t_release:
                windows["during"].append(lat)
            elif c < t_release + 5:
                windows["after_0_5s"].append(lat)
            else:
                windows["after_5s_plus"].append(lat)
        held = [e for e in events if e["transaction"]["xid"] == held_xid]
        tl = fw.timeline_times()
        per_sec = {}
        for t, c in tl:
            per_sec[int(t / 1e9 - t0)] = c
        res = {"hold_s": hold, "rate": 1000, "produced": produced, "load": loadavg(),
               "latency_by_window": {k: lat_stats(v) for k, v in windows.items()},
               "held_event_delivered": bool(held),
               "read_ms_before_hold": rnd(med(read_before), 2),
               "read_ms_end_of_hold": rnd(med(read_end), 2),
               "read_xip_ms_before_hold": rnd(med(xip_before), 2),
               "read_xip_ms_end_of_hold": rnd(med(xip_end), 2),
               "read_xip_same_rows": same,
               "queue_rows_since_held_xid_at_end_of_hold": rows_since_hold,
               "check": check_events(events, produced),
               "delivered_cumulative_by_second": sorted(per_sec.items())}
        # Read cost during the hold: how long one pgpipe.read takes with the old xmin.
        self.res["phases"]["failure"] = res
        log("failure %s" % json.dumps({k: v for k, v in res.items() if k != "delivered_cumulative_by_second"}))

    def make_read_xip(self):
        cl = self.cl
        src = cl.psql("SELECT pg_get_functiondef('pgpipe.read'::regproc)")
        old = ("WHERE e.xid >= pg_snapshot_xmin(pos.prev)\n"
               "          AND e.xid < pg_snapshot_xmax(pos.cur)")
        if old not in src:
            log("pgpipe.read changed: the read_xip variant is not measured")
            return False
        # Not visible in prev <=> xid >= xmax(prev) OR xid in xip(prev): two narrow index
        # scans (BitmapOr) instead of everything from xmin(prev), which a long transaction
        # holds back. A custom plan per call: the generic one falls back to the wide range.
        new = ("WHERE ((e.xid >= pg_snapshot_xmax(pos.prev) AND e.xid < pg_snapshot_xmax(pos.cur))\n"
               "                 OR e.xid = ANY (ARRAY(SELECT pg_snapshot_xip(pos.prev))))")
        orig = src
        src = src.replace(old, new).replace("FUNCTION pgpipe.read(", "FUNCTION bench.read(", 1)
        cl.psql(src)
        cl.psql("ALTER FUNCTION bench.read(text, text, integer) SET plan_cache_mode = force_custom_plan;")
        # The paging fix: pages after the first (last_id set) walk the (id, xid) primary key
        # from last_id instead of the batch's whole xid range + a sort (the planner's row
        # estimate for just-written xids is ~1, so it picks the range + sort).
        cl.psql("CREATE SCHEMA IF NOT EXISTS benchp;")
        cl.psql(orig.replace("FUNCTION pgpipe.read(", "FUNCTION benchp.read(", 1))
        cl.psql("ALTER FUNCTION benchp.read(text, text, integer) SET enable_sort = off; "
                "ALTER FUNCTION benchp.read(text, text, integer) SET enable_bitmapscan = off; "
                "ALTER FUNCTION benchp.read(text, text, integer) SET plan_cache_mode = force_custom_plan;")
        return True

    # ---- run -------------------------------------------------------------------------
    def machine(self):
        def sh(cmd):
            try:
                return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
            except Exception:  # noqa: BLE001
                return ""
        so = sh("%s/pg_config --pkglibdir" % PG_BIN) + "/pgpipe.so"
        ext_profile = "unknown"
        if os.path.exists(so):
            ext_profile = "debug" if ".debug_info" in sh("readelf -S %s" % so) else "release"
        return {
            "host": platform.node(),
            "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip(),
            "cores": os.cpu_count(),
            "mem_gb": rnd(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "kernel": platform.release(),
            "postgres": sh("%s/postgres --version" % PG_BIN),
            "git": sh("git -C %s rev-parse --short HEAD" % ROOT) + (" (dirty)" if sh("git -C %s status --porcelain" % ROOT) else ""),
            "forwarder_binary": PGPIPE,
            "extension_so": so,
            "extension_build": ext_profile,
            "uptime_start": sh("uptime"),
        }

    def run(self):
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.res["stamp"] = stamp
        self.res["machine"] = self.machine()
        log("machine: %s" % json.dumps(self.res["machine"]))
        t_all = time.time()
        try:
            self.setup()
            for ph in P["phases"]:
                fn = getattr(self, "phase_" + ph, None)
                if fn is None:
                    log("unknown phase %s" % ph)
                    continue
                log("phase %s (load %s)" % (ph, loadavg()))
                t = time.time()
                try:
                    fn()
                except Exception as e:  # noqa: BLE001 - one failing phase does not stop the rest
                    log("phase %s failed: %s" % (ph, e))
                    self.res["phases"][ph] = {"error": str(e)[:1000]}
                finally:
                    for fw in list(Forwarder.running):
                        fw.stop(timeout=10)
                    stop_peers()
                self.res["phases"].setdefault(ph, {})["phase_s"] = rnd(time.time() - t, 1)
        finally:
            for fw in list(Forwarder.running):
                fw.stop(timeout=10)
            self.res["total_s"] = rnd(time.time() - t_all, 1)
            self.res["machine"]["uptime_end"] = subprocess.run("uptime", shell=True, capture_output=True, text=True).stdout.strip()
            self.cl.stop()
            if KEEP:
                log("cluster kept in %s" % self.cl.dir)
        os.makedirs(RESULTS_DIR, exist_ok=True)
        prev = previous_result(stamp)
        path = os.path.join(RESULTS_DIR, stamp + ".json")
        with open(path, "w") as f:
            json.dump(self.res, f, indent=1, sort_keys=True)
        md = render_md(self.res, prev)
        write_md(md)
        print(md)
        log("results: %s (and the generated part of BENCHMARKS.md)" % path)


def previous_result(stamp):
    if not os.path.isdir(RESULTS_DIR):
        return None
    files = sorted(f for f in os.listdir(RESULTS_DIR) if f.endswith(".json") and f[:-5] < stamp)
    for f in reversed(files):
        try:
            with open(os.path.join(RESULTS_DIR, f)) as fh:
                r = json.load(fh)
            r["_file"] = f
            return r
        except (OSError, ValueError):
            continue
    return None
