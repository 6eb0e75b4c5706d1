"""Processes around the database: the forwarder, its sinks and receivers, and reading what they delivered."""

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


PEERS = []  # helper processes (receivers, perf, curl clients) to end after each phase


def stop_peers():
    for p in PEERS:
        if p.poll() is None:
            p.send_signal(signal.SIGINT if p.args and p.args[0] == "perf" else signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    PEERS.clear()


class Forwarder:
    """`pgpipe listen` with an adapter; stdout goes through the `sink` subcommand."""

    running = []  # started and not yet stopped; stopped by Bench after a failing phase

    def __init__(self, cl, workdir, name, channel, adapter="stdout", poll=None, env=None,
                 extra=None):
        self.cl = cl
        self.name = name
        self.out = os.path.join(workdir, name + ".out")
        self.timeline = os.path.join(workdir, name + ".timeline.json")
        self.errlog = os.path.join(workdir, name + ".log")
        for p in (self.out, self.timeline):
            if os.path.exists(p):
                os.unlink(p)
        cmd = [PGPIPE, "listen", "--db", cl.url, "-c", channel, "--consumer", name,
               "--log-level", "info", "-a", adapter]
        if poll:
            cmd += ["--poll-interval", poll]
        if adapter == "file":
            cmd += ["--file-path", self.out, "--file-max-size", "100G"]
        cmd += extra or []
        e = dict(os.environ)
        e.update(env or {})
        e.pop("PGPIPE_DATABASE_URL", None)
        self.err = open(self.errlog, "w")
        self.sink = None
        if adapter == "stdout":
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.err, env=e,
                                         cwd=workdir)
            self.sink = subprocess.Popen([sys.executable, BENCH_PY, "sink",
                                          self.out, self.timeline], stdin=self.proc.stdout)
            self.proc.stdout.close()
        else:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.err, env=e,
                                         cwd=workdir)
        self.started = time.time()
        Forwarder.running.append(self)

    def wait_ready(self, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("forwarder exited: %s" % open(self.errlog).read()[-2000:])
            with open(self.errlog) as f:
                if "reading the pgpipe queue" in f.read():
                    return time.time() - self.started
            time.sleep(0.02)
        raise RuntimeError("forwarder not ready after %ss: %s" % (timeout, open(self.errlog).read()[-2000:]))

    def mem(self):
        return proc_status(self.proc.pid)

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=30):
        if self in Forwarder.running:
            Forwarder.running.remove(self)
        mem = self.mem()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.sink:
            self.sink.wait(timeout)
        self.err.close()
        return mem

    def timeline_times(self):
        """Receive time (ns) of every line, from the sink's timeline."""
        if not self.sink:
            return None
        with open(self.timeline) as f:
            tl = json.load(f)
        return tl


def line_time(tl_cum, tl_t, i):
    """Receive time of line i (0-based) given the timeline's cumulative counts."""
    k = bisect.bisect_right(tl_cum, i)
    return tl_t[k] if k < len(tl_t) else None


class Watcher:
    """Counts occurrences of `needle` in a growing file (delivered events)."""

    def __init__(self, path, needle=b"\n"):
        self.path, self.needle = path, needle
        self.f = None
        self.count = 0
        self.carry = b""

    def poll(self):
        if self.f is None:
            if not os.path.exists(self.path):
                return self.count
            self.f = open(self.path, "rb")
        data = self.f.read()
        if data:
            buf = self.carry + data
            self.count += buf.count(self.needle)
            # A needle cut at the chunk's end is completed (and counted) next time.
            keep = len(self.needle) - 1
            self.carry = buf[-keep:] if keep else b""
        return self.count

    def wait_for(self, n, timeout, interval=0.01, alive=None):
        """Time when the count reached n (None on timeout), and time of the first event."""
        deadline = time.time() + timeout
        first = None
        while time.time() < deadline:
            if alive is not None and not alive():
                raise RuntimeError("the forwarder exited while %d of %d events were delivered" % (self.count, n))
            c = self.poll()
            now = time.time()
            if c > 0 and first is None:
                first = now
            if c >= n:
                return now, first
            time.sleep(interval)
        return None, first

    def close(self):
        if self.f:
            self.f.close()


def parse_events(path):
    """Events of an output file: JSON lines, or webhook bodies (an object or an array)."""
    events = []
    with open(path, "rb") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            obj = json.loads(line)
            if isinstance(obj, list):
                events.extend(obj)
            else:
                events.append(obj)
    return events


def check_events(events, produced=None, key_start=None, ordered=True):
    """Exact correctness: delivered vs produced, duplicate ids, per-key order of `v`.

    Every UPDATE in the benchmarks is `v = v + 1` and every INSERT has v = 0, so per key
    the delivered v must be consecutive (a gap is a lost or reordered event). With
    `ordered=False` (a delivery that promises no order, e.g. `webhook.ordering: none`)
    reordering is counted but is not a failure; loss and duplicates still are."""
    ids = set()
    dups = 0
    per_key = {}
    for e in events:
        if e["id"] in ids:
            dups += 1
            continue
        ids.add(e["id"])
        row = (e.get("payload") or {}).get("row") or {}
        if "id" in row and "v" in row:
            per_key.setdefault(row["id"], []).append(row["v"])
    order_violations = 0
    for vs in per_key.values():
        for a, b in zip(vs, vs[1:]):
            if b != a + 1:
                order_violations += 1
    out = {"delivered": len(events), "unique": len(ids), "duplicates": dups,
           "keys": len(per_key), "order_violations": order_violations}
    if produced is not None:
        out["produced"] = produced
        out["ok"] = (len(ids) == produced and (order_violations == 0 or not ordered))
    return out


def commit_times(cl, xids):
    """Commit time (epoch µs) of each xid (xid8 as int), from track_commit_timestamp."""
    if not xids:
        return {}
    xs = ",".join(str(x) for x in sorted(xids))
    out = cl.psql("SELECT x, (extract(epoch FROM pg_xact_commit_timestamp((x %% 4294967296)::text::xid)) "
                  "* 1000000)::bigint FROM unnest('{%s}'::bigint[]) x" % xs)
    res = {}
    for line in out.splitlines():
        x, t = line.split("\t")
        if t:
            res[int(x)] = int(t)
    return res


def latencies(cl, fw, events=None):
    """Commit -> delivery latency (ms) of every event on a stdout forwarder."""
    if events is None:
        events = parse_events(fw.out)
    tl = fw.timeline_times()
    cum = [c for _, c in tl]
    ts = [t for t, _ in tl]
    ct = commit_times(cl, {e["transaction"]["xid"] for e in events})
    lats = []
    per_event = []
    for i, e in enumerate(events):
        c = ct.get(e["transaction"]["xid"])
        r = line_time(cum, ts, i)
        if c is None or r is None:
            continue
        lat = (r / 1000.0 - c) / 1000.0
        lats.append(lat)
        per_event.append((c, lat))
    return lats, per_event


def lat_stats(lats):
    s = sorted(lats)
    if not s:
        return {"n": 0}
    return {"n": len(s), "p50_ms": rnd(pct(s, 50), 2), "p99_ms": rnd(pct(s, 99), 2),
            "max_ms": rnd(s[-1], 2), "min_ms": rnd(s[0], 2)}


def sink_main(out_path, timeline_path):
    tl = []
    n = 0
    with open(out_path, "wb", buffering=0) as out:
        while True:
            b = os.read(0, 1 << 20)
            if not b:
                break
            t = time.time_ns()
            out.write(b)
            n += b.count(b"\n")
            tl.append((t, n))
    with open(timeline_path, "w") as f:
        json.dump(tl, f)


def receiver_main(port, out_path):
    """A minimal keep-alive HTTP/1.1 receiver: every request body becomes one line."""
    import asyncio

    out = open(out_path, "wb", buffering=1 << 20)
    flusher_stop = threading.Event()

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:].strip())
                body = await reader.readexactly(length) if length else b""
                out.write(body.replace(b"\n", b" ") + b"\n")
                out.flush()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    signal.signal(signal.SIGTERM, lambda *_: (out.flush(), os._exit(0)))
    del flusher_stop
    asyncio.run(main())
