"""The report: BENCHMARKS.md's generated part from a run's results."""

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
from snapshot import render_snapshot


def fmt(x, unit=""):
    if x is None:
        return "–"
    if isinstance(x, float) and x >= 100:
        x = int(round(x))
    if isinstance(x, int) and x >= 10000:
        return "{:,}".format(x) + unit
    return "%s%s" % (x, unit)


def verdict(ok):
    return "met" if ok else "**missed**"


def get(d, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def render_md(r, prev):
    m = r["machine"]
    ph = r["phases"]
    L = []
    L.append("### Run %s" % r["stamp"])
    L.append("")
    L.append("- machine: %s, %s cores, %s GiB, kernel %s; %s" % (m["cpu"], m["cores"], m["mem_gb"], m["kernel"], m["postgres"]))
    L.append("- git %s; forwarder `%s`; extension `%s` (%s build)" % (m["git"], os.path.relpath(m["forwarder_binary"], ROOT), m["extension_so"], m["extension_build"]))
    L.append("- load: `%s` at start, `%s` at end; whole run %ss" % (m["uptime_start"], m.get("uptime_end"), r.get("total_s")))
    L.append("- parameters: `%s`" % json.dumps(r["params"], separators=(",", ":")))
    L.append("")
    targets = []

    cap = dict(ph.get("capture", {}))
    capw = ph.get("capture_wal", {})
    if cap.get("table") or capw.get("table"):
        merged = json.loads(json.dumps(cap.get("table") or {}))
        for op, by_c in (capw.get("table") or {}).items():
            for c, cell in by_c.items():
                m = merged.setdefault(op, {}).setdefault(c, {})
                m.update(cell)
                if m.get("wal") and m.get("plain"):
                    m["wal_ratio_vs_plain_noslot"] = rnd(m["wal"] / m["plain"], 3)
        cap["table"] = merged
        cap["wal_available"] = capw.get("wal_available")
        cap["wal_error"] = capw.get("wal_error") or ("capture_wal phase not run" if not capw else capw.get("error"))
    if cap.get("table"):
        L.append("#### 1. Capture cost on writers (pgbench -M prepared, tps, median of %s interleaved rounds of %ss; ratio to plain)" % (r["params"]["rounds"], r["params"]["capture_secs"]))
        L.append("")
        L.append("load before/after: %s / %s (WAL block: %s / %s). `trigger` = pgpipe.capture_row as shipped (a, native since issue 11); `trigger_plpgsql` = the PL/pgSQL trigger it replaced (p, SECURITY DEFINER + SET search_path, SPI INSERT); `trigger_nosp` = that PL/pgSQL body without SECURITY DEFINER/SET search_path (b); `trigger_1idx` = the PL/pgSQL body into a queue with PRIMARY KEY (xid, id) only (c). `wal` is measured in a second block against `plain_slot` (plain while the slot decodes), because a logical slot, once there, decodes every write; it runs after the throughput and latency phases so that they do not pay for decoding." % (cap.get("load_before"), cap.get("load_after"), capw.get("load_before"), capw.get("load_after")))
        L.append("")
        L.append("| op | clients | plain | trigger (a) | ratio | PL/pgSQL (p) | ratio | no search_path (b) | ratio | 1-index queue (c) | ratio | plain with slot | wal | ratio |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for op in ("insert", "update"):
            for c in sorted(cap["table"].get(op, {}), key=int):
                x = cap["table"][op][c]
                L.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                    op, c, fmt(x.get("plain")), fmt(x.get("trigger")), fmt(x.get("trigger_ratio")),
                    fmt(x.get("trigger_plpgsql")), fmt(x.get("trigger_plpgsql_ratio")),
                    fmt(x.get("trigger_nosp")), fmt(x.get("trigger_nosp_ratio")),
                    fmt(x.get("trigger_1idx")), fmt(x.get("trigger_1idx_ratio")),
                    fmt(x.get("plain_slot")), fmt(x.get("wal")), fmt(x.get("wal_ratio"))))
        L.append("")
        if not cap.get("wal_available"):
            L.append("WAL mode: not yet (%s)." % cap.get("wal_error"))
            L.append("")
        cpu = json.loads(json.dumps(cap.get("cpu_us_per_tx") or {}))
        for op, by_c in (capw.get("cpu_us_per_tx") or {}).items():
            for c, cell in by_c.items():
                cpu.setdefault(op, {}).setdefault(c, {}).update(cell)
        if cpu:
            L.append("Machine-wide CPU per transaction (µs, /proc/stat busy time ÷ transactions; pgbench, WAL writer and all included; median):")
            L.append("")
            L.append("| op | clients | plain | trigger (a) | (p) | (b) | (c) | plain with slot | wal |")
            L.append("|---|---|---|---|---|---|---|---|---|")
            for op in ("insert", "update"):
                for c in sorted(cpu.get(op, {}), key=int):
                    x = cpu[op][c]
                    L.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (op, c, fmt(x.get("plain")), fmt(x.get("trigger")), fmt(x.get("trigger_plpgsql")), fmt(x.get("trigger_nosp")), fmt(x.get("trigger_1idx")), fmt(x.get("plain_slot")), fmt(x.get("wal"))))
            L.append("")
        walb = (capw.get("wal_bytes_per_tx") or cap.get("wal_bytes_per_tx") or {})
        if walb:
            L.append("WAL bytes per transaction (pg_current_wal_lsn difference ÷ transactions, median; includes the WAL-mode worker's own queue writes once it runs): " + "; ".join(
                "%s c=%s: %s" % (op, c, ", ".join("%s %s" % (t, fmt(b)) for t, b in sorted(by_t.items())))
                for op, by_c in walb.items() for c, by_t in sorted(by_c.items(), key=lambda kv: int(kv[0]))))
            L.append("")
        workb = cap.get("worker_cpu_us_per_tx") or {}
        if workb:
            L.append("The pgpipe worker's CPU per writer transaction (µs, /proc/PID/stat; in trigger mode it only sends the coalesced wake-up NOTIFY): " + "; ".join(
                "%s c=%s: %s" % (op, c, ", ".join("%s %s" % (t, fmt(b)) for t, b in sorted(by_t.items())))
                for op, by_c in workb.items() for c, by_t in sorted(by_c.items(), key=lambda kv: int(kv[0]))))
            L.append("")
        for op in ("insert", "update"):
            # Issue 11: trigger capture ≥ 0.85 × plain at 8 and at 32 clients.
            for c in ("8", "32"):
                tr = get(cap, "table", op, c, "trigger_ratio")
                if tr is not None:
                    targets.append(("trigger ≥ 0.85 × plain at %s clients (%s)" % (c, op), tr, tr >= 0.85))
            wr = get(cap, "table", op, "8", "wal_ratio")
            targets.append(("WAL ≥ 0.85 × plain at 8 clients (%s)" % op, wr if wr is not None else "not yet", (wr or 0) >= 0.85 if wr is not None else None))
        if prev:
            L.append("Compared with %s (trigger ratio at 8 clients): insert %s → %s, update %s → %s." % (
                prev["_file"], get(prev, "phases", "capture", "table", "insert", "8", "trigger_ratio"),
                get(cap, "table", "insert", "8", "trigger_ratio"),
                get(prev, "phases", "capture", "table", "update", "8", "trigger_ratio"),
                get(cap, "table", "update", "8", "trigger_ratio")))
            L.append("")
    elif "capture" in ph:
        L.append("#### 1. Capture cost: failed: %s" % cap.get("error"))
        L.append("")

    bd = ph.get("breakdown", {})
    if bd.get("us_per_row"):
        L.append("#### 1b. Where a captured row's time goes (one session, set-based INSERT of %s rows, µs per row, median of 3)" % bd["rows"])
        L.append("")
        L.append("| step | µs/row | trigger overhead µs/row |")
        L.append("|---|---|---|")
        for k, v in bd["us_per_row"].items():
            L.append("| %s | %s | %s |" % (k, v, fmt(bd["trigger_overhead_us_per_row"].get(k))))
        if bd.get("us_per_statement_loop"):
            L.append("The same trigger at three granularities (µs): per row in one set-based INSERT (above), per single-row INSERT statement in a loop inside one transaction, per single-row transaction (pgbench 1 client, `synchronous_commit=off`, 1/tps, client round trip included):")
            L.append("")
            L.append("| capture | per row (set-based) | per statement (loop) | per transaction (1 client, async commit) |")
            L.append("|---|---|---|---|")
            rows_map = {"no trigger": "insert, no trigger", "pgpipe trigger (a)": "insert, pgpipe trigger (a)",
                        "without SET search_path (b)": "insert, trigger without SET search_path (b)",
                        "1-index queue (c)": "insert, trigger into 1-index queue (c)"}
            for k, rk in rows_map.items():
                L.append("| %s | %s | %s | %s |" % (k, bd["us_per_row"].get(rk), bd["us_per_statement_loop"].get(k), bd["us_per_tx_1client_async"].get(k)))
            L.append("")
    pf = ph.get("perf", {})
    if pf.get("trigger"):
        L.append("#### 1c. perf (system-wide, 8 clients INSERT, %ss)" % r["params"]["perf_secs"])
        L.append("")
        for label in ("plain", "trigger"):
            L.append("%s, postgres processes by DSO:" % label)
            L.append("```")
            L.extend(pf[label]["by_dso"][:10])
            L.append("```")
        if pf.get("waits_8_clients"):
            L.append("What the 8 pgbench backends were doing (pg_stat_activity sampled every 10 ms; % of samples; Client:ClientRead = waiting for pgbench, CPU = running):")
            L.append("")
            L.append("| workload | tps | top wait events |")
            L.append("|---|---|---|")
            for label, x in pf["waits_8_clients"].items():
                L.append("| %s | %s | %s |" % (label, fmt(x["tps"]), ", ".join("%s %s%%" % (w, p) for w, p in x["share"])))
            L.append("")
        L.append("trigger, top postgres symbols:")
        L.append("```")
        L.extend(pf["trigger"]["postgres_top_symbols"][:25])
        L.append("```")
        L.append("")

    e2e = ph.get("e2e", {})
    if e2e.get("prefill") is not None:
        L.append("#### 2. End-to-end throughput (forwarder release build)")
        L.append("")
        L.append("Pre-filled queue of %s events (1,000-row transactions) written with the forwarder stopped, then drained; rate = events / (last − first delivery). Load before/after: %s / %s." % (r["params"]["prefill"], e2e.get("load_before"), e2e.get("load_after")))
        L.append("")
        L.append("| adapter | events | events/s | drain from start s | forwarder CPU µs/event | RSS peak MB | delivered = produced | dups | order violations |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for label, x in e2e["prefill"].items():
            if "error" in x:
                L.append("| %s | failed: %s | | | | | | | |" % (label, x["error"][:150].replace("|", "/").replace("\n", " ")))
                continue
            c = x.get("check", {})
            L.append("| %s | %s | %s | %s | %s | %s | %s (%s/%s) | %s | %s |" % (
                label, fmt(x.get("events")), fmt(x.get("events_per_s")), fmt(x.get("drain_s_from_start")),
                fmt(x.get("forwarder_cpu_us_per_event")), fmt(x.get("rss_mb_peak")),
                "yes" if c.get("ok") else "**no**", c.get("unique"), c.get("produced"), c.get("duplicates"), c.get("order_violations")))
        L.append("")
        pbp = get(e2e, "prefill", "file_fsync_always", "perf_by_process")
        if pbp:
            L.append("Where the CPU goes while the file adapter drains (perf, system-wide, by process; then the top symbols of the forwarder and of Postgres):")
            L.append("```")
            L.extend(pbp)
            L.append("")
            L.extend(get(e2e, "prefill", "file_fsync_always", "perf_forwarder_top") or [])
            L.append("")
            L.extend(get(e2e, "prefill", "file_fsync_always", "perf_postgres_top") or [])
            L.append("```")
            L.append("")
        fr = get(e2e, "prefill", "file_fsync_always", "events_per_s")
        targets.append(("≥ 50,000 events/s through the file adapter (pre-filled drain, fsync always)", fr, (fr or 0) >= 50000))
        b = e2e.get("burst", {})
        if b and "error" not in b:
            L.append("Burst: one transaction of %s rows (INSERT took %s s): first event %s s and all %s s after commit (%s events/s); correct: %s (dups %s). One 1,000-event page from the middle of that batch: pgpipe.read %s ms; with the long-transaction fix %s ms; with the paging fix (PK order from last_id: `enable_sort`/`enable_bitmapscan` off, custom plan) %s ms, same rows: %s." % (
                b.get("rows"), b.get("insert_tx_s"), b.get("first_event_after_commit_s"), b.get("all_delivered_after_commit_s"),
                fmt(b.get("events_per_s")), get(b, "check", "ok"), get(b, "check", "duplicates"),
                b.get("page_ms_mid_batch"), b.get("page_ms_mid_batch_fix"), b.get("page_ms_mid_batch_paging_fix"), b.get("paging_fix_same_rows")))
        elif b:
            L.append("Burst failed: %s" % b.get("error"))
        L.append("")
        s = e2e.get("sustained", {})
        if s and "error" not in s:
            L.append("Sustained %ss, writer open-loop at %s events/s (8 clients, %s rows per transaction incl. 1 UPDATE): produced %s events/s, delivered during the run %s events/s, backlog at writer end %s, caught up %s s later; forwarder RSS max %s MB; correct: %s (dups %s, order violations %s)." % (
                s.get("secs"), fmt(s.get("target_events_per_s")), s.get("rows_per_tx"), fmt(s.get("produced_per_s")),
                fmt(s.get("delivered_during_write_per_s")), fmt(s.get("backlog_at_writer_end")), s.get("catch_up_s"),
                s.get("rss_mb_max_sampled"), get(s, "check", "ok"), get(s, "check", "duplicates"), get(s, "check", "order_violations")))
        elif s:
            L.append("Sustained failed: %s" % s.get("error"))
        L.append("")
        idle = e2e.get("rss_idle_mb")
        peak = max([x.get("rss_mb_peak") or 0 for x in e2e["prefill"].values()] + [s.get("rss_mb_peak") or 0, (b or {}).get("rss_mb_peak") or 0])
        L.append("#### 5. Forwarder memory: RSS idle %s MB; peak under load %s MB" % (idle, peak))
        L.append("")
        targets.append(("RSS idle ≤ 20 MB", idle, (idle or 999) <= 20))
        targets.append(("RSS under load ≤ 100 MB", peak, peak <= 100))
        if prev:
            L.append("Compared with %s: file adapter drain %s → %s events/s." % (prev["_file"], get(prev, "phases", "e2e", "prefill", "file_fsync_always", "events_per_s"), fr))
            L.append("")

    lat = ph.get("latency", {})
    if lat.get("runs"):
        L.append("#### 3. Latency commit → delivery (stdout adapter into a reader that timestamps lines; commit time from track_commit_timestamp), %ss per run" % r["params"]["lat_secs"])
        L.append("")
        L.append("Worker's `pgpipe.notify_min_interval` default: %s." % lat.get("notify_min_interval_default"))
        L.append("")
        L.append("| rate events/s | rows/tx | forwarder poll | notify_min_interval | p50 ms | p99 ms | max ms | events | correct | writer lag avg ms |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for name, x in lat["runs"].items():
            L.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                fmt(x["rate"]), x["rows_per_tx"], x["poll"], x.get("notify_min_interval", "default"), x.get("p50_ms"), x.get("p99_ms"), x.get("max_ms"), x.get("n"),
                get(x, "check", "ok"), x.get("writer_sched_lag_avg_ms")))
        L.append("")
        for name, x in lat["runs"].items():
            if x["rate"] == 1000:
                ok = (x.get("p50_ms") or 1e9) <= 5 and (x.get("p99_ms") or 1e9) <= 25
                targets.append(("p50 ≤ 5 ms and p99 ≤ 25 ms at 1,000/s (poll %s, notify_min_interval %s)" % (x["poll"], x.get("notify_min_interval", "default")), "p50 %s / p99 %s" % (x.get("p50_ms"), x.get("p99_ms")), ok))

    dec = ph.get("decoding", {})
    if dec.get("rows"):
        L.append("#### 4. Decoding limit (%s rows in %s-row transactions, backlog drained)" % (dec["rows"], dec.get("rows_per_tx")))
        L.append("")
        L.append("- pg_recvlogical + test_decoding: %s rows/s (%s s)" % (fmt(dec.get("pg_recvlogical_rows_per_s")), dec.get("pg_recvlogical_test_decoding_s")))
        if dec.get("wal_worker_rows_per_s"):
            L.append("- pgpipe WAL-mode worker: %s rows/s (%s s), %s µs of worker CPU per event" % (fmt(dec.get("wal_worker_rows_per_s")), dec.get("wal_worker_s"), dec.get("wal_worker_cpu_us_per_event")))
            if dec.get("wal_worker_rss_anon_kb"):
                L.append("- worker private memory (RssAnon) before / after the drain: %s / %s kB" % tuple(dec["wal_worker_rss_anon_kb"]))
            if dec.get("pg_recvlogical_rows_per_s"):
                L.append("- worker ÷ pg_recvlogical: %s (target ≥ 0.5)" % rnd(dec["wal_worker_rows_per_s"] / dec["pg_recvlogical_rows_per_s"], 3))
            if dec.get("wal_worker_reads"):
                L.append("- %s reads; each byte of the %s bytes of WAL they covered (the %s-byte backlog plus the worker's own queue writes) was decoded %s times; %s bytes decoded per backlog byte; the worker's queue writes add %s bytes of WAL per event; time decoding %s s, converting + inserting %s s, confirming %s s" % (
                    dec["wal_worker_reads"], fmt(dec.get("wal_worker_span_wal_bytes")), fmt(dec.get("wal_worker_backlog_wal_bytes")),
                    dec.get("wal_worker_decode_overlap"), dec.get("wal_worker_decoded_per_backlog_byte"),
                    fmt(dec.get("wal_worker_own_wal_bytes_per_event")), dec.get("wal_worker_decode_s"), dec.get("wal_worker_write_s"), dec.get("wal_worker_confirm_s")))
            if dec.get("wal_worker_perf_top"):
                L.append("")
                L.append("Worker profile while it drains (perf -p <worker pid>):")
                L.append("```")
                L.extend(dec["wal_worker_perf_top"])
                L.append("```")
        else:
            L.append("- pgpipe WAL-mode worker: %s" % (dec.get("wal_worker") or dec.get("wal_worker_error")))
        L.append("")

    fo = ph.get("fanout", {})
    if fo.get("runs"):
        L.append("#### 6. SSE fan-out at 1,000 events/s for %ss" % fo.get("secs"))
        L.append("")
        L.append("| clients | produced | min received | clients complete | dropped (metric) | RSS MB |")
        L.append("|---|---|---|---|---|---|")
        for n, x in fo["runs"].items():
            L.append("| %s | %s | %s | %s | %s | %s |" % (n, x["produced"], x["min_received"], x["clients_complete"], "; ".join(x["dropped_metric"]) or "–", x["rss_mb"]))
        L.append("")
    elif fo:
        L.append("#### 6. SSE fan-out: %s" % (fo.get("status") or fo.get("error")))
        L.append("")

    fl = ph.get("failure", {})
    if fl.get("latency_by_window"):
        L.append("#### 7. Failure phase: a transaction held open %s s while 1,000 events/s are written" % fl["hold_s"])
        L.append("")
        L.append("| window (by commit time) | events | p50 ms | p99 ms | max ms |")
        L.append("|---|---|---|---|---|")
        for k, x in fl["latency_by_window"].items():
            L.append("| %s | %s | %s | %s | %s |" % (k, x.get("n"), x.get("p50_ms"), x.get("p99_ms"), x.get("max_ms")))
        L.append("")
        L.append("One `pgpipe.read` (an empty or small batch, as the forwarder polls it): %s ms before the hold, %s ms at its end, when the scan from the held xid covers %s queue rows. The proposed fix (`bench.read`, a copy of pgpipe.read with `(xid >= xmax(prev) AND xid < xmax(cur)) OR xid = ANY(xip(prev))` instead of `xid >= xmin(prev) AND xid < xmax(cur)`, and `plan_cache_mode = force_custom_plan`): %s ms before, %s ms at the end; same rows as pgpipe.read: %s." % (
            fl.get("read_ms_before_hold"), fl.get("read_ms_end_of_hold"), fmt(fl.get("queue_rows_since_held_xid_at_end_of_hold")),
            fl.get("read_xip_ms_before_hold"), fl.get("read_xip_ms_end_of_hold"), fl.get("read_xip_same_rows")))
        L.append("")
        L.append("Held transaction's event delivered: %s; correct: %s (dups %s, order violations %s)." % (
            fl.get("held_event_delivered"), get(fl, "check", "ok"), get(fl, "check", "duplicates"), get(fl, "check", "order_violations")))
        L.append("")
    elif fl:
        L.append("#### 7. Failure phase: %s" % fl.get("error"))
        L.append("")

    import delivery
    L.extend(delivery.render(ph))
    targets.extend(delivery.targets(ph))
    L.extend(render_snapshot(ph))
    # Scale-out phases (bench/scale.py).
    from scale import render_scale_md
    L.extend(render_scale_md(r))

    if targets:
        L.append("#### Targets")
        L.append("")
        L.append("| target | measured | verdict |")
        L.append("|---|---|---|")
        for name, val, ok in targets:
            L.append("| %s | %s | %s |" % (name, fmt(val), "not yet" if ok is None else verdict(ok)))
        L.append("")
    return "\n".join(L)


def write_md(generated):
    if os.path.exists(BENCHMARKS_MD):
        with open(BENCHMARKS_MD) as f:
            text = f.read()
    else:
        text = "# pgpipe benchmarks\n\n%s\n%s\n" % (MD_BEGIN, MD_END)
    if MD_BEGIN in text and MD_END in text:
        head, rest = text.split(MD_BEGIN, 1)
        _, tail = rest.split(MD_END, 1)
        text = head + MD_BEGIN + "\n" + generated + "\n" + MD_END + tail
    else:
        text = text + "\n" + MD_BEGIN + "\n" + generated + "\n" + MD_END + "\n"
    with open(BENCHMARKS_MD, "w") as f:
        f.write(text)
