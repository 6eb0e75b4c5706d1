"""Delivery at scale (issue 13): webhook throughput (single, batched, a 20 ms receiver),
the pre-filled drain to a file against a baseline binary, and live fan-out to hundreds of
SSE and WebSocket clients. Every run checks loss, duplicates and per-key order.

The peers are one Rust process each (tests/src/bin/pgpipe-bench-peer.rs: a webhook
receiver; N SSE or WS clients), so that the load generator is not what is measured.

Phases (BENCH_PHASES): `delivery` (webhook + drain), `live` (SSE/WS fan-out).
Parameters: BENCH_DELIVERY_EVENTS (webhook drain size), BENCH_DRAIN_EVENTS,
BENCH_LIVE_CLIENTS (e.g. 250,1000), BENCH_LIVE_EVENTS (events written at 1,000/s),
PGPIPE_BASELINE (a forwarder binary built from an earlier commit, drained side by side).
"""

import json
import os
import subprocess
import sys
import time

from common import *  # noqa: F401,F403
from processes import *  # noqa: F401,F403
from cluster import TABLE_DDL, INSERT_N_SQL

PEER = os.environ.get("BENCH_PEER", os.path.join(ROOT, "target", "release", "pgpipe-bench-peer"))
BASELINE = os.environ.get("PGPIPE_BASELINE", "")
D = {
    "webhook_events": env_int("BENCH_DELIVERY_EVENTS", 20000),
    "slow_events": env_int("BENCH_SLOW_EVENTS", 10000),
    "drain_events": env_int("BENCH_DRAIN_EVENTS", 200000),
    "drain_rounds": env_int("BENCH_DRAIN_ROUNDS", 2),
    "live_clients": [int(c) for c in env_list("BENCH_LIVE_CLIENTS", "250,1000")],
    "live_events": env_int("BENCH_LIVE_EVENTS", 10000),
    "keys": env_int("BENCH_KEYS", 1000),
}


def keyed_table(cl):
    """`b_keyed`: D["keys"] rows; events are UPDATEs v = v + 1 of all rows per statement,
    so per key the delivered v must be 1, 2, 3, ... (check_events)."""
    if getattr(cl, "_keyed_ready", False):
        return
    cl.psql(TABLE_DDL.format(t="b_keyed", n=D["keys"]))
    cl.psql("SELECT pgpipe.subscribe('b_keyed');")
    cl._keyed_ready = True


def prefill_keyed(bench, n):
    """Resets the queue and the table's v, then queues n UPDATE events (one commit per
    statement of D["keys"] rows)."""
    cl = bench.cl
    cl.psql("ALTER TABLE b_keyed DISABLE TRIGGER USER; UPDATE b_keyed SET v = 0; "
            "ALTER TABLE b_keyed ENABLE TRIGGER USER;")
    bench.reset_queue()
    stmts = max(1, n // D["keys"])
    cl.psql("UPDATE b_keyed SET v = v + 1;\n" * stmts)
    return stmts * D["keys"]


def drain(bench, label, adapter, n, env=None, extra=None, binary=None, delay_ms=None, prefilled=None):
    """Drains a pre-filled queue of keyed UPDATEs with one adapter; events/s from the
    first event delivered to the last, forwarder CPU per event, and the check."""
    cl = bench.cl
    produced = prefilled if prefilled is not None else prefill_keyed(bench, n)
    name = "dl_" + label
    cl.psql("SELECT pgpipe.register_consumer('%s', ARRAY['b_keyed'], start => 'beginning');" % name)
    extra = list(extra or [])
    recv = None
    if delay_ms is not None:
        rport = free_port()
        out = os.path.join(bench.work, name + ".recv")
        recv = subprocess.Popen([PEER, "receiver", str(rport), out, str(delay_ms)])
        PEERS.append(recv)
        time.sleep(0.3)
        extra += ["--url", "http://127.0.0.1:%d/hook" % rport]
    fw = forwarder(cl, bench.work, name, adapter, env, extra, binary)
    out_path = out if recv else fw.out
    watch = Watcher(out_path, b'"source":"')
    t_start = time.time()
    t_done, t_first = watch.wait_for(produced, timeout=max(60, produced / 300), alive=fw.alive)
    cpu = proc_cpu_s(fw.proc.pid)
    mem = fw.stop()
    watch.poll()
    watch.close()
    if recv:
        recv.terminate()
        recv.wait()
    res = {"events": produced, "binary": os.path.basename(binary or PGPIPE), "rss_mb_peak": rnd(mem.get("VmHWM"))}
    if t_done:
        res["events_per_s"] = rnd(produced / max(t_done - (t_first or t_start), 1e-6), 0)
        res["drain_s_from_start"] = rnd(t_done - t_start, 2)
        res["forwarder_cpu_us_per_event"] = rnd(cpu * 1e6 / produced, 2)
    else:
        res["timeout"] = True
        res["delivered"] = watch.count
    unordered = (env or {}).get("PGPIPE_WEBHOOK_ORDERING") == "none"
    res["check"] = check_events(parse_events(out_path), produced, ordered=not unordered)
    cl.psql("SELECT pgpipe.drop_consumer('%s');" % name, check=False)
    log("delivery %-28s %s" % (label, json.dumps(res)))
    return res


def forwarder(cl, work, name, adapter, env, extra, binary):
    """A Forwarder, run from `binary` when given (the baseline)."""
    import processes
    if binary:
        old = processes.PGPIPE
        processes.PGPIPE = binary
        try:
            return Forwarder(cl, work, name, "b_keyed", adapter=adapter, env=env, extra=extra)
        finally:
            processes.PGPIPE = old
    return Forwarder(cl, work, name, "b_keyed", adapter=adapter, env=env, extra=extra)


def phase_delivery(self):
    if not os.path.exists(PEER):
        self.res["phases"]["delivery"] = {"error": "%s missing: cargo build --release -p pgpipe_tests --bin pgpipe-bench-peer" % PEER}
        return
    cl = self.cl
    keyed_table(cl)
    res = {"load_before": loadavg(), "webhook": {}, "drain": {}}
    n = D["webhook_events"]
    slow = D["slow_events"]
    webhook = [
        # label, env, events, receiver delay (ms)
        ("single_key", {}, n, 0),
        ("single_none_c100", {"PGPIPE_WEBHOOK_ORDERING": "none", "PGPIPE_WEBHOOK_CONCURRENCY": "100"}, n, 0),
        ("batch100_key", {"PGPIPE_WEBHOOK_BATCH_SIZE": "100"}, n, 0),
        ("batch100_none_c16", {"PGPIPE_WEBHOOK_BATCH_SIZE": "100", "PGPIPE_WEBHOOK_ORDERING": "none",
                               "PGPIPE_WEBHOOK_CONCURRENCY": "16"}, n, 0),
        ("slow20ms_single_key", {}, 500, 20),
        ("slow20ms_single_none_c100", {"PGPIPE_WEBHOOK_ORDERING": "none", "PGPIPE_WEBHOOK_CONCURRENCY": "100"}, slow, 20),
        ("slow20ms_batch100_key", {"PGPIPE_WEBHOOK_BATCH_SIZE": "100"}, slow, 20),
        # 100 requests in flight at 20 ms cap single POSTs at 5,000/s: the ceiling moves
        # with webhook.concurrency (one request per key, 1,000 keys here).
        ("slow20ms_single_key_c250", {"PGPIPE_WEBHOOK_CONCURRENCY": "250"}, slow, 20),
    ]
    for label, env, events, delay in webhook:
        try:
            res["webhook"][label] = drain(self, label, "webhook", events, env=env, delay_ms=delay)
        except Exception as e:  # noqa: BLE001
            res["webhook"][label] = {"error": str(e)[:500]}
    # The pre-filled drain to a file, this build against the baseline, interleaved.
    variants = [("file_fsync_never", {"PGPIPE_FILE_FSYNC": "never"}, []),
                ("file_batch5000", {"PGPIPE_FILE_FSYNC": "never"}, ["--batch-size", "5000", "--max-in-flight", "50000"])]
    binaries = [("current", None)]
    if BASELINE and os.path.exists(BASELINE):
        binaries.append(("baseline", BASELINE))
    produced = prefill_keyed(self, D["drain_events"])
    # A consumer that never acknowledges keeps retention from dropping the pre-filled
    # events between the drains (each drain reads them from the beginning).
    cl.psql("SELECT pgpipe.register_consumer('dl_hold', ARRAY['b_keyed'], start => 'beginning');")
    for r in range(D["drain_rounds"]):
        for label, env, extra in variants:
            for which, binary in binaries:
                key = "%s_%s" % (label, which)
                try:
                    x = drain(self, "%s_r%d" % (key, r), "file", None, env=env, extra=extra,
                              binary=binary, prefilled=produced)
                except Exception as e:  # noqa: BLE001
                    x = {"error": str(e)[:500]}
                res["drain"].setdefault(key, []).append(x)
    for label, _, _ in variants:
        cur = [x.get("forwarder_cpu_us_per_event") for x in res["drain"].get(label + "_current", [])]
        base = [x.get("forwarder_cpu_us_per_event") for x in res["drain"].get(label + "_baseline", [])]
        cur_r = [x.get("events_per_s") for x in res["drain"].get(label + "_current", [])]
        base_r = [x.get("events_per_s") for x in res["drain"].get(label + "_baseline", [])]
        if med(cur) and med(base):
            res["drain"][label + "_ratio"] = {"cpu_per_event_current_over_baseline": rnd(med(cur) / med(base), 3),
                                              "events_per_s_current_over_baseline": rnd(med(cur_r) / med(base_r), 3)
                                              if med(cur_r) and med(base_r) else None}
    res["load_after"] = loadavg()
    self.res["phases"]["delivery"] = res


def phase_live(self):
    if not os.path.exists(PEER):
        self.res["phases"]["live"] = {"error": "%s missing" % PEER}
        return
    cl = self.cl
    cl.psql(TABLE_DDL.format(t="b_live", n=0))
    cl.psql("SELECT pgpipe.subscribe('b_live');")
    events = D["live_events"]
    res = {"rate": 1000, "events": events, "runs": {}}
    for kind in ("sse", "ws"):
        for n in D["live_clients"]:
            self.reset_queue()
            port = free_port()
            name = "live_%s_%d" % (kind, n)
            fw = Forwarder(cl, self.work, name, "b_live", adapter=kind,
                           extra=["--sse-addr", "127.0.0.1:%d" % port])
            fw.wait_ready()
            path = "/events/b_live" if kind == "sse" else "/ws/b_live"
            scheme = "http" if kind == "sse" else "ws"
            secs = int(events / 1000) + 30
            peer_err = os.path.join(self.work, name + ".peer.log")
            with open(peer_err, "w") as err:
                peer = subprocess.Popen([PEER, kind, "%s://127.0.0.1:%d%s" % (scheme, port, path), str(n),
                                         str(events), str(secs)], stdout=subprocess.PIPE, stderr=err, text=True)
            PEERS.append(peer)
            deadline = time.time() + 60
            while time.time() < deadline and "connected" not in open(peer_err).read():
                time.sleep(0.1)
            before = int(cl.val("SELECT count(*) FROM b_live"))
            cpu0 = proc_cpu_s(fw.proc.pid)
            # `events` rows at 1,000/s: 10-row commits at 100/s from 2 clients (1,000
            # single-row commits/s is more than pgbench holds on a loaded 2-core machine,
            # and the fan-out, not the commit rate, is what this phase measures).
            per_tx = 10
            pbr = cl.pgbench(INSERT_N_SQL.format(t="b_live", n=per_tx), 2,
                             transactions=events // per_tx // 2, rate=1000 // per_tx, name=name)
            produced = int(cl.val("SELECT count(*) FROM b_live")) - before
            out, _ = peer.communicate(timeout=secs + 30)
            cpu = proc_cpu_s(fw.proc.pid) - cpu0
            metrics = subprocess.run(["curl", "-s", "--max-time", "5", "http://127.0.0.1:%d/metrics" % port],
                                     capture_output=True, text=True).stdout
            mem = fw.mem()
            fw.stop()
            try:
                r = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                r = {"error": "peer said: %s %s" % (out[-500:], open(peer_err).read()[-500:])}
            dropped = delivered = 0
            for line in metrics.splitlines():
                if line.startswith("pgpipe_events_dropped_total") and ('"%s"' % kind) in line:
                    dropped += int(float(line.split()[-1]))
                if line.startswith("pgpipe_events_delivered_total") and ('"%s"' % kind) in line:
                    delivered += int(float(line.split()[-1]))
            # Handed to client buffers (delivered) + dropped = produced x clients when
            # every client was connected throughout; what a client did not see beyond the
            # drops was lost between its buffer and its socket.
            r.update({"produced": produced, "dropped_metric": dropped, "delivered_metric": delivered, "rss_mb": rnd(mem.get("VmRSS")),
                      "forwarder_cpu_s": rnd(cpu, 2),
                      "forwarder_cpu_us_per_event_per_client": rnd(cpu * 1e6 / max(1, produced * n), 3),
                      "writer_sched_lag_avg_ms": pbr.get("sched_lag_avg_ms"), "load": loadavg()})
            r["ok"] = (r.get("complete") == n and r.get("out_of_order") == 0 and dropped == 0
                       and produced == events)
            res["runs"]["%s_%d" % (kind, n)] = r
            log("live %s" % json.dumps(r))
    self.res["phases"]["live"] = res


def render(ph):
    """The BENCHMARKS.md section of these phases."""
    L = []
    d = ph.get("delivery")
    if d:
        L.append("#### Delivery (issue 13): webhook to a Rust receiver, pre-filled drain to a file")
        L.append("")
        L.append("Pre-filled queue of keyed UPDATEs (%d keys; `check` = no loss, no duplicate, per-key order of v)." % D["keys"])
        L.append("")
        L.append("| run | events | events/s | forwarder µs/event | check |")
        L.append("|---|---|---|---|---|")
        for label, x in (d.get("webhook") or {}).items():
            L.append("| webhook %s | %s | %s | %s | %s |" % (label, x.get("events"), x.get("events_per_s"),
                     x.get("forwarder_cpu_us_per_event"), json.dumps(x.get("check") or x.get("error"))))
        for label, runs in (d.get("drain") or {}).items():
            if isinstance(runs, dict):
                L.append("| %s | | | %s | |" % (label, json.dumps(runs)))
                continue
            for x in runs:
                L.append("| %s (%s) | %s | %s | %s | %s |" % (label, x.get("binary"), x.get("events"), x.get("events_per_s"),
                         x.get("forwarder_cpu_us_per_event"), json.dumps(x.get("check") or x.get("error"))))
        L.append("")
    lv = ph.get("live")
    if lv:
        L.append("#### Live fan-out (issue 13): %s events at 1,000/s to N clients of one Rust process" % lv.get("events"))
        L.append("")
        L.append("| run | complete | min/median/max | out of order | dropped (metric) | forwarder CPU s | RSS MB | ok |")
        L.append("|---|---|---|---|---|---|---|---|")
        for label, x in (lv.get("runs") or {}).items():
            L.append("| %s | %s/%s | %s/%s/%s | %s | %s | %s | %s | %s |" % (
                label, x.get("complete"), x.get("clients"), x.get("min"), x.get("median"), x.get("max"),
                x.get("out_of_order"), x.get("dropped_metric"), x.get("forwarder_cpu_s"), x.get("rss_mb"), x.get("ok")))
        L.append("")
    return L


def targets(ph):
    """Issue 13's targets: (name, measured, met)."""
    out = []
    wh = (ph.get("delivery") or {}).get("webhook") or {}

    def rate(label):
        x = wh.get(label) or {}
        return x.get("events_per_s") if (x.get("check") or {}).get("ok") else None

    def best(labels):
        rates = [(rate(l), l) for l in labels if rate(l)]
        return max(rates) if rates else (None, None)

    r, l = best(["single_key", "single_none_c100"])
    out.append(("≥ 20,000 events/s single POST to a local receiver (%s)" % l, r, (r or 0) >= 20000))
    r, l = best(["slow20ms_single_none_c100", "slow20ms_single_key_c250", "slow20ms_batch100_key"])
    out.append(("≥ 5,000 events/s to a 20 ms receiver (%s)" % l, r, (r or 0) >= 5000))
    dr = (ph.get("delivery") or {}).get("drain") or {}
    rates = [x.get("events_per_s") for k, v in dr.items() if k.endswith("_current") for x in v
             if (x.get("check") or {}).get("ok")]
    r = max(rates) if rates else None
    out.append(("≥ 100,000 events/s pre-filled drain to a file", r, (r or 0) >= 100000))
    for label, x in (((ph.get("live") or {}).get("runs")) or {}).items():
        if label.endswith("_1000"):
            out.append(("1,000 %s clients at 1,000 events/s, 0 drops" % label.split("_")[0].upper(),
                        "%s/%s complete, %s dropped" % (x.get("complete"), x.get("clients"), x.get("dropped_metric")),
                        bool(x.get("ok"))))
    return out
