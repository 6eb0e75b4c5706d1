"""Scale-out phases (issue 14): events/s into NATS JetStream next to the file adapter, and
consumer groups of 1, 2 and 3 members on one workload. Each phase measures its baseline in
the same run, interleaved (A B A B); `Bench` inherits these as phase_nats, phase_groups."""

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

from common import P, env_int, free_port, loadavg, log, rnd, med, IS_ROOT
from cluster import TABLE_DDL, INSERT_N_SQL
from processes import Forwarder, Watcher, parse_events, check_events

NATS_SERVER = os.environ.get("BENCH_NATS_SERVER", shutil.which("nats-server") or "/usr/sbin/nats-server")
SCALE = {
    "events": env_int("BENCH_SCALE_EVENTS", 50000),
    "rounds": env_int("BENCH_SCALE_ROUNDS", 2),
    "keys": env_int("BENCH_GROUP_KEYS", 1000),
    "group_sizes": [int(x) for x in os.environ.get("BENCH_GROUP_SIZES", "1,2,3").split(",")],
}


class NatsServer:
    """nats-server -js with file storage in a store of its own, and its monitoring port."""

    def __init__(self, workdir):
        self.store = tempfile.mkdtemp(prefix="nats-", dir=workdir)
        self.port, self.mon = free_port(), free_port()
        self.log = open(os.path.join(self.store, "server.log"), "w")
        self.proc = subprocess.Popen([NATS_SERVER, "-js", "-sd", self.store, "-a", "127.0.0.1",
                                      "-p", str(self.port), "-m", str(self.mon)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                self.messages()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nats-server did not start")

    def url(self):
        return "nats://127.0.0.1:%d" % self.port

    def messages(self):
        with urllib.request.urlopen("http://127.0.0.1:%d/jsz" % self.mon, timeout=2) as r:
            return int(json.load(r).get("messages", 0))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.store, ignore_errors=True)


class ScalePhases:
    """Mixed into `Bench` (phases.py): uses self.cl, self.work, self.res."""

    def scale_table(self):
        if getattr(self, "_scale_ready", False):
            return
        self.cl.psql(TABLE_DDL.format(t="b_scale", n=SCALE["keys"]))
        self.cl.psql("INSERT INTO b_scale (v, name, amount) SELECT 0, 'k', 1 FROM generate_series(1, %d);"
                     "SELECT pgpipe.subscribe('b_scale');" % SCALE["keys"])
        self._scale_ready = True

    def scale_reset(self):
        self.cl.psql("TRUNCATE pgpipe.events; DELETE FROM pgpipe.consumers; "
                     "DELETE FROM pgpipe.consumer_groups; CHECKPOINT;")

    def scale_prefill(self, transactions, per_tx):
        """UPDATEs (v = v + 1) of random keys, `per_tx` rows per transaction."""
        script = ("\\set k random(1, %d)\n"
                  "UPDATE b_scale SET v = v + 1 WHERE id BETWEEN :k AND :k + %d;\n" % (SCALE["keys"], per_tx - 1))
        t0 = time.time()
        self.cl.pgbench(script, 2, transactions=max(1, transactions // 2), name="scale")
        return time.time() - t0

    def produced(self):
        return int(self.cl.val("SELECT count(*) FROM pgpipe.events WHERE channel = 'b_scale'"))

    # ---- NATS JetStream next to the file adapter -----------------------------------
    def drain_one(self, label, adapter, extra, count, alive_check=True):
        """A pre-filled queue drained by one forwarder; `count()` says how many arrived."""
        self.scale_reset()
        name = "sc_" + label
        self.cl.psql("SELECT pgpipe.register_consumer('%s', ARRAY['b_scale'], start => 'now');" % name)
        write_s = self.scale_prefill(SCALE["events"] // 10, 10)
        produced = self.produced()
        fw = Forwarder(self.cl, self.work, name, "b_scale", adapter=adapter, extra=extra)
        t_start = time.time()
        t_first = t_done = None
        deadline = t_start + max(60, produced / 500)
        while time.time() < deadline:
            if not fw.alive():
                raise RuntimeError("forwarder exited: %s" % open(fw.errlog).read()[-1500:])
            c = count(fw)
            now = time.time()
            if c > 0 and t_first is None:
                t_first = now
            if c >= produced:
                t_done = now
                break
            time.sleep(0.01)
        mem = fw.stop()
        res = {"events": produced, "write_s": rnd(write_s, 2), "load": loadavg(),
               "rss_mb_peak": rnd(mem.get("VmHWM"))}
        if t_done:
            res["drain_s"] = rnd(t_done - t_first, 3)
            res["events_per_s"] = rnd(produced / max(t_done - t_first, 1e-6), 0)
        else:
            res["timeout"] = True
            res["arrived"] = count(fw)
        return res, fw

    def phase_nats(self):
        if not os.path.exists(NATS_SERVER):
            self.res["phases"]["nats"] = {"error": "nats-server not found (make setup installs it)"}
            return
        self.scale_table()
        res = {"load_before": loadavg(), "file": [], "nats": []}
        for rnd_i in range(SCALE["rounds"]):
            # file (fsync per batch, the default) ...
            watch = {}

            def file_count(fw):
                w = watch.setdefault("w", Watcher(fw.out))
                return w.poll()
            r, fw = self.drain_one("file%d" % rnd_i, "file", [], file_count)
            r["check"] = check_events(parse_events(fw.out), r["events"])
            watch["w"].close()
            res["file"].append(r)
            log("nats phase: file %s" % json.dumps(r))
            # ... and JetStream with file storage, in the same run.
            server = NatsServer(self.work)
            try:
                r, fw = self.drain_one("nats%d" % rnd_i, "nats", ["--nats-url", server.url()],
                                       lambda fw: server.messages())
                r["stream_messages"] = server.messages()
            finally:
                server.stop()
            res["nats"].append(r)
            log("nats phase: nats %s" % json.dumps(r))
        f = med([x.get("events_per_s") for x in res["file"]])
        n = med([x.get("events_per_s") for x in res["nats"]])
        res["file_events_per_s"], res["nats_events_per_s"] = f, n
        res["nats_vs_file"] = rnd(n / f, 3) if f and n else None
        res["load_after"] = loadavg()
        self.res["phases"]["nats"] = res

    # ---- consumer groups of 1, 2, 3 members ----------------------------------------
    def run_group(self, size, label):
        """`size` members (file adapter each) drain one pre-filled workload.

        The members start on an empty queue and wait (the group's row is locked while the
        workload is written, so no batch opens), then all of them share the first batch:
        every group size drains the same events."""
        self.scale_reset()
        group = "bg_" + label
        # The wait below must not look like dead members: a long member timeout.
        members = [Forwarder(self.cl, self.work, "%s_%d" % (group, i), "b_scale", adapter="file",
                             extra=["--group", group, "--group-member-timeout", "600s"])
                   for i in range(size)]
        for m in members:
            m.wait_ready()
        deadline = time.time() + 20
        while time.time() < deadline and int(self.cl.val(
                "SELECT count(*) FROM pgpipe.group_members WHERE \"group\" = '%s' AND alive" % group)) < size:
            time.sleep(0.05)
        gate = subprocess.Popen(self.cl.psql_cmd() + ["-c", "BEGIN; LOCK TABLE pgpipe.consumer_groups IN EXCLUSIVE MODE; SELECT pg_sleep(3600);"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        write_s = self.scale_prefill(SCALE["events"] // 10, 10)
        produced = self.produced()
        watchers = [Watcher(m.out) for m in members]
        self.cl.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE query LIKE '%%LOCK TABLE pgpipe.consumer_groups%%' AND pid <> pg_backend_pid();")
        gate.wait(10)
        t_start = time.time()
        t_done = None
        deadline = t_start + max(60, produced / 300)
        while time.time() < deadline:
            if not all(m.alive() for m in members):
                raise RuntimeError("a member exited")
            if sum(w.poll() for w in watchers) >= produced:
                t_done = time.time()
                break
            time.sleep(0.01)
        shares = self.cl.psql("SELECT member, events FROM pgpipe.group_members WHERE \"group\" = '%s' ORDER BY 1" % group)
        for m in members:
            m.stop()
        for w in watchers:
            w.close()
        events = []
        per_member = []
        for m in members:
            e = parse_events(m.out)
            per_member.append(len(e))
            events.extend(e)
        res = {"members": size, "events": produced, "write_s": rnd(write_s, 2), "load": loadavg(),
               "delivered_per_member": per_member, "group_members": shares.splitlines(),
               "check": check_events(events, produced)}
        if t_done:
            res["drain_s"] = rnd(t_done - t_start, 3)
            res["events_per_s"] = rnd(produced / max(t_done - t_start, 1e-6), 0)
        else:
            res["timeout"] = True
        return res

    def phase_groups(self):
        self.scale_table()
        res = {"load_before": loadavg(), "runs": {str(s): [] for s in SCALE["group_sizes"]}}
        for rnd_i in range(SCALE["rounds"]):
            for size in SCALE["group_sizes"]:
                r = self.run_group(size, "%d_%d" % (size, rnd_i))
                res["runs"][str(size)].append(r)
                log("groups phase: %d members %s" % (size, json.dumps(r)))
        base = med([x.get("events_per_s") for x in res["runs"].get("1", [])])
        res["events_per_s"] = {}
        res["ratio_vs_1"] = {}
        for size, runs in res["runs"].items():
            v = med([x.get("events_per_s") for x in runs])
            res["events_per_s"][size] = v
            res["ratio_vs_1"][size] = rnd(v / base, 3) if v and base else None
        res["load_after"] = loadavg()
        self.res["phases"]["groups"] = res


def render_scale_md(r):
    """The NATS and consumer group sections of BENCHMARKS.md's generated part."""
    ph = r["phases"]
    L = []
    n = ph.get("nats", {})
    if n.get("file"):
        L.append("#### Scale-out: NATS JetStream (file storage) next to the file adapter")
        L.append("")
        L.append("%s events (UPDATEs, 10 per transaction) pre-filled with the forwarder stopped, then drained by one forwarder; rate = events / (last − first delivery), median of %s interleaved rounds. Load before/after: %s / %s." % (
            SCALE["events"], SCALE["rounds"], n.get("load_before"), n.get("load_after")))
        L.append("")
        L.append("| adapter | events/s per round | median | ratio to file |")
        L.append("|---|---|---|---|")
        L.append("| file (fsync per batch) | %s | %s | 1 |" % (", ".join(str(x.get("events_per_s")) for x in n["file"]), n.get("file_events_per_s")))
        L.append("| nats (JetStream, file storage) | %s | %s | %s |" % (", ".join(str(x.get("events_per_s")) for x in n["nats"]), n.get("nats_events_per_s"), n.get("nats_vs_file")))
        L.append("")
    elif n:
        L.append("#### Scale-out: NATS phase: %s" % n.get("error"))
        L.append("")
    g = ph.get("groups", {})
    if g.get("runs"):
        L.append("#### Scale-out: consumer groups of 1, 2 and 3 members")
        L.append("")
        L.append("%s UPDATEs (10 per transaction) over %s keys, written while the members wait, then drained by the group (file adapter per member); rate = events / (release → all delivered), median of %s interleaved rounds. Load before/after: %s / %s." % (
            SCALE["events"], SCALE["keys"], SCALE["rounds"], g.get("load_before"), g.get("load_after")))
        L.append("")
        L.append("| members | events/s per round | median | ratio to 1 | delivered per member (last round) | correct (unique = produced, per-key order) |")
        L.append("|---|---|---|---|---|---|")
        for size, runs in g["runs"].items():
            last = runs[-1] if runs else {}
            L.append("| %s | %s | %s | %s | %s | %s |" % (
                size, ", ".join(str(x.get("events_per_s")) for x in runs), g["events_per_s"].get(size),
                g["ratio_vs_1"].get(size), last.get("delivered_per_member"), all((x.get("check") or {}).get("ok") for x in runs)))
        L.append("")
    return L
