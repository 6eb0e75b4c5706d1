"""The decoding limit (issue 11): the WAL worker queueing a backlog beside pg_recvlogical reading
the same WAL, with the worker's own accounting. Mixed into phases.Bench."""

import json
import os
import re
import statistics
import subprocess
import time
from common import *  # noqa: F401,F403
from cluster import *  # noqa: F401,F403
from processes import *  # noqa: F401,F403


class DecodingPhases:
    # ---- 4. decoding limit -------------------------------------------------------
    def phase_decoding(self):
        cl = self.cl
        n = P["decode_rows"]
        res = {"rows": n, "rows_per_tx": 10, "load_before": loadavg()}
        cl.psql(TABLE_DDL.format(t="b_dec", n=0))
        cl.psql("SELECT pg_create_logical_replication_slot('bench_td', 'test_decoding');")
        t0 = time.time()
        cl.pgbench(INSERT_N_SQL.format(t="b_dec", n=10), 4, transactions=n // 40, name="dec")
        res["write_s"] = rnd(time.time() - t0, 2)
        end = cl.val("SELECT pg_current_wal_lsn()")
        t0 = time.time()
        subprocess.run(["pg_recvlogical", "-h", self.cl.dir, "-p", str(cl.port), "-U", "postgres",
                        "-d", cl.db, "--slot", "bench_td", "--start", "-E", end, "--no-loop",
                        "-f", "/dev/null"], check=True, capture_output=True)
        dt = time.time() - t0
        res["pg_recvlogical_test_decoding_s"] = rnd(dt, 3)
        res["pg_recvlogical_rows_per_s"] = rnd(n / dt, 0)
        cl.psql("SELECT pg_drop_replication_slot('bench_td');")
        if self.wal_ok is None:
            self.try_wal()
        if self.wal_ok:
            try:
                res.update(self.wal_worker_drain(n))
            except Exception as e:  # noqa: BLE001
                res["wal_worker_error"] = str(e)[:300]
        else:
            res["wal_worker"] = "not yet: %s" % self.wal_error
        res["load_after"] = loadavg()
        self.res["phases"]["decoding"] = res

    def wal_worker_drain(self, n):
        """The worker's rate on a backlog: pgpipe.events is locked while the workload is
        written (the worker blocks on its first insert), then released."""
        cl = self.cl
        cl.psql(TABLE_DDL.format(t="b_decw", n=0))
        cl.psql("SELECT pgpipe.subscribe('b_decw', mode => 'wal');")
        self.wait_wal_caught_up()
        self.reset_queue()
        locker = subprocess.Popen(cl.psql_cmd() + ["-f", "-"], stdin=subprocess.PIPE, text=True,
                                  stdout=subprocess.DEVNULL)
        locker.stdin.write("BEGIN; LOCK TABLE pgpipe.events IN SHARE MODE; SELECT 1;\n")
        locker.stdin.flush()
        time.sleep(0.5)
        cl.pgbench(INSERT_N_SQL.format(t="b_decw", n=10), 4, transactions=n // 40, name="decw")
        pid = cl.val("SELECT worker_pid FROM pgpipe.status()")
        perf = None
        perf_data = os.path.join(self.work, "worker.perf.data")
        if pid and shutil.which("perf"):
            perf = subprocess.Popen(["perf", "record", "-F", "999", "-g", "-p", pid, "-o", perf_data],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            PEERS.append(perf)
            time.sleep(0.3)
        # The worker logs each read at debug1: where its peek started decoding (the slot's
        # restart LSN), how far it got, and the time in peek, convert+insert and advance.
        log_path = os.path.join(cl.dir, "postgres.log")
        log_offset = os.path.getsize(log_path)
        cl.psql("ALTER SYSTEM SET log_min_messages = debug1; SELECT pg_reload_conf();")
        backlog_start = cl.val("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'pgpipe'")
        backlog_end = cl.val("SELECT pg_current_wal_lsn()")
        # What the reorder buffer replayed to pgoutput (pg_stat_replication_slots): the
        # worker's own queue writes are replayed too (BENCHMARKS.md, issue 11).
        slot_stats = "SELECT total_txns || ' ' || total_bytes FROM pg_stat_replication_slots WHERE slot_name = 'pgpipe'"
        stats0 = cl.val(slot_stats)
        cpu0 = proc_cpu_s(int(pid)) if pid else None
        rss0 = proc_rss_anon_kb(int(pid)) if pid else None
        t0 = time.time()
        locker.stdin.write("COMMIT;\n")
        locker.stdin.close()
        locker.wait()
        while True:
            c = int(cl.val("SELECT count(*) FROM pgpipe.events WHERE channel = 'b_decw'"))
            if c >= n or time.time() - t0 > 300:
                break
            time.sleep(0.1)
        dt = time.time() - t0
        # Only the worker writes while it drains: what its queue writes cost in WAL.
        own_wal = float(cl.val("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '%s')" % backlog_end))
        cpu1 = proc_cpu_s(int(pid)) if pid else None
        rss1 = proc_rss_anon_kb(int(pid)) if pid else None
        stats1 = cl.val(slot_stats)
        cl.psql("ALTER SYSTEM RESET log_min_messages; SELECT pg_reload_conf();")
        out = {"wal_worker_events": c, "wal_worker_s": rnd(dt, 3), "wal_worker_rows_per_s": rnd(c / dt, 0)}
        if c:
            out["wal_worker_own_wal_bytes_per_event"] = rnd(own_wal / c, 0)
        try:
            (txns0, bytes0), (txns1, bytes1) = (map(int, x.split()) for x in (stats0, stats1))
            out["wal_worker_replayed_txns"] = txns1 - txns0
            if c:
                out["wal_worker_replayed_bytes_per_event"] = rnd((bytes1 - bytes0) / c, 1)
        except ValueError:
            pass
        out.update(self.worker_decode_accounting(log_path, log_offset, backlog_start, backlog_end))
        if rss0 is not None and rss1 is not None:
            out["wal_worker_rss_anon_kb"] = [rss0, rss1]
        if cpu0 is not None and cpu1 is not None and c:
            out["wal_worker_cpu_us_per_event"] = rnd((cpu1 - cpu0) * 1e6 / c, 1)
        if perf:
            perf.send_signal(signal.SIGINT)
            perf.wait()
            out["wal_worker_perf_top"] = perf_lines(perf_data, ["--sort", "dso,symbol", "-g", "none"], 25, 0.7)
        return out

    @staticmethod
    def worker_decode_accounting(log_path, offset, start, end):
        """How much WAL the worker decoded for a backlog, from its debug1 lines: each read
        decodes from its start (the slot's restart LSN for a new decoding context; with
        peek + advance, every read) to its end."""
        def lsn(text):
            hi, lo = text.split("/")
            return (int(hi, 16) << 32) | int(lo, 16)
        pat = re.compile(r"pgpipe worker: read (\d+) events; decoded from (\S+) \((?:restart|start)\) over (\S+) "
                         r"\(confirmed\) to (\S+): (?:peek|decode) ([\d.]+) ms, convert\+insert ([\d.]+) ms, (?:advance|confirm) ([\d.]+) ms")
        with open(log_path, errors="replace") as f:
            f.seek(offset)
            reads = [m.groups() for m in pat.finditer(f.read())]
        if not reads:
            return {"wal_worker_reads": 0}
        backlog = lsn(end) - lsn(start)
        decoded = sum(lsn(to) - lsn(frm) for _, frm, _, to in (r[:4] for r in reads))
        # The WAL the reads covered, once: the backlog plus the worker's own queue writes
        # (pgpipe's tables are not published, but their WAL is decoded all the same).
        span = max(lsn(r[3]) for r in reads) - min(lsn(r[1]) for r in reads)
        return {
            "wal_worker_reads": len(reads),
            "wal_worker_backlog_wal_bytes": backlog,
            "wal_worker_span_wal_bytes": span,
            # Bytes decoded, summed over reads, per byte of WAL covered: 1.0 = each once.
            "wal_worker_decode_overlap": rnd(decoded / span, 2) if span > 0 else None,
            "wal_worker_decoded_per_backlog_byte": rnd(decoded / backlog, 2) if backlog > 0 else None,
            "wal_worker_decode_s": rnd(sum(float(r[4]) for r in reads) / 1e3, 3),
            "wal_worker_write_s": rnd(sum(float(r[5]) for r in reads) / 1e3, 3),
            "wal_worker_confirm_s": rnd(sum(float(r[6]) for r in reads) / 1e3, 3),
        }
