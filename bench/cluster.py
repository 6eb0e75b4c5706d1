"""The benchmark's own Postgres cluster, CPU accounting, pgbench, and the SQL of the workloads."""

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


class Cluster:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="pgpipe-bench-")
        os.chmod(self.dir, 0o755)
        if IS_ROOT:
            shutil.chown(self.dir, "postgres")
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        self.db = "bench"
        self.url = "postgres://postgres@127.0.0.1:%d/%s?sslmode=disable" % (self.port, self.db)

    def as_pg(self, cmd, **kw):
        if IS_ROOT:
            cmd = ["runuser", "-u", "postgres", "--"] + cmd
        return subprocess.run(cmd, check=True, **kw)

    def start(self):
        self.as_pg([PG_BIN + "/initdb", "-D", self.data, "-A", "trust", "-U", "postgres",
                    "--no-sync"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": "'%s'" % self.dir,
            "wal_level": "logical",
            "shared_preload_libraries": "'pgpipe'",
            "track_commit_timestamp": "on",
            "max_connections": "300",
            "shared_buffers": "512MB",
            "max_wal_size": "8GB",
            "min_wal_size": "2GB",
            "checkpoint_timeout": "30min",
            "max_replication_slots": "10",
            "max_wal_senders": "10",
            "pgpipe.database": "'%s'" % self.db,
            "log_min_messages": "warning",
        }
        # Extra settings to compare, e.g. BENCH_PG_CONF="pgpipe.batch_size=10000;work_mem=8MB".
        for item in os.environ.get("BENCH_PG_CONF", "").split(";"):
            if "=" in item:
                k, v = item.split("=", 1)
                conf[k.strip()] = v.strip()
        with open(os.path.join(self.data, "postgresql.auto.conf"), "a") as f:
            for k, v in conf.items():
                f.write("%s = %s\n" % (k, v))
        self.as_pg([PG_BIN + "/pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "postgres.log"),
                    "-w", "start"], stdout=subprocess.DEVNULL)
        self.psql("CREATE DATABASE %s" % self.db, db="postgres")

    def stop(self):
        try:
            self.as_pg([PG_BIN + "/pg_ctl", "-D", self.data, "-m", "immediate", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except subprocess.CalledProcessError:
            pass
        if not KEEP:
            shutil.rmtree(self.dir, ignore_errors=True)

    def psql_cmd(self, db=None):
        return ["psql", "-X", "-q", "-At", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-h", self.dir,
                "-p", str(self.port), "-U", "postgres", "-d", db or self.db]

    def psql(self, sql, db=None, check=True):
        r = subprocess.run(self.psql_cmd(db) + ["-f", "-"], input=sql, text=True,
                           capture_output=True)
        if check and r.returncode != 0:
            raise RuntimeError("psql failed: %s\n--- sql:\n%s" % (r.stderr.strip(), sql[:2000]))
        return r.stdout.strip()

    def val(self, sql):
        return self.psql(sql).split("\n")[-1]

    def pgbench(self, script_text, clients, secs=None, transactions=None, rate=None, name="s",
                extra=None, env=None):
        path = os.path.join(self.dir, "pgbench_%s.sql" % name)
        with open(path, "w") as f:
            f.write(script_text)
        cmd = [PG_BIN + "/pgbench", "-n", "-M", "prepared", "-h", self.dir, "-p", str(self.port),
               "-U", "postgres", "-c", str(clients), "-j", str(min(clients, 2)), "-f", path]
        if secs is not None:
            cmd += ["-T", str(secs)]
        if transactions is not None:
            cmd += ["-t", str(transactions)]
        if rate is not None:
            cmd += ["-R", str(rate)]
        cmd += extra or []
        cmd.append(self.db)
        busy0, _ = cpu_times()
        e = None
        if env:
            e = dict(os.environ)
            e.update(env)
        r = subprocess.run(cmd, capture_output=True, text=True, env=e)
        busy1, _ = cpu_times()
        if r.returncode != 0:
            raise RuntimeError("pgbench failed: %s" % (r.stderr[-2000:] + r.stdout[-2000:]))
        m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", r.stdout)
        out = {"tps": float(m.group(1)) if m else None}
        m = re.search(r"number of transactions actually processed: (\d+)", r.stdout)
        out["tx"] = int(m.group(1)) if m else None
        if out["tx"]:
            out["cpu_us_per_tx"] = (busy1 - busy0) * 1e6 / out["tx"]
        m = re.search(r"rate limit schedule lag: avg ([\d.]+) \(max ([\d.]+)\) ms", r.stdout)
        if m:
            out["sched_lag_avg_ms"], out["sched_lag_max_ms"] = float(m.group(1)), float(m.group(2))
        return out

    def pgbench_async(self, script_text, clients, secs, rate=None, name="a"):
        path = os.path.join(self.dir, "pgbench_%s.sql" % name)
        with open(path, "w") as f:
            f.write(script_text)
        cmd = [PG_BIN + "/pgbench", "-n", "-M", "prepared", "-h", self.dir, "-p", str(self.port),
               "-U", "postgres", "-c", str(clients), "-j", str(min(clients, 2)), "-f", path,
               "-T", str(secs)]
        if rate is not None:
            cmd += ["-R", str(rate)]
        cmd.append(self.db)
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cpu_times():
    """Machine-wide (busy, idle + iowait) CPU seconds from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = v[3] + v[4]
    busy = sum(v[:8]) - idle
    return busy / hz, idle / hz


def proc_rss_anon_kb(pid):
    """Private (anonymous) resident memory of a process, kB: what palloc'd memory grows."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except (OSError, IndexError, ValueError):
        pass
    return None


def proc_cpu_s(pid):
    """utime + stime of a process, seconds."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def perf_lines(data, args, limit, pct_limit=1):
    r = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children",
                        "--percent-limit", str(pct_limit)] + args, capture_output=True, text=True)
    out = []
    for l in r.stdout.splitlines():
        if l.strip() and not l.startswith("#") and "%" in l and not l.strip().startswith(("-", "|")):
            words = l.split()
            while words and words[-1] == "-":
                words.pop()
            out.append(" ".join(words)[:160])
    return out[:limit]


def pgbench_result(proc):
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError("pgbench failed: %s" % (err[-2000:] + out[-2000:]))
    res = {}
    m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    res["tps"] = float(m.group(1)) if m else None
    m = re.search(r"rate limit schedule lag: avg ([\d.]+) \(max ([\d.]+)\) ms", out)
    if m:
        res["sched_lag_avg_ms"], res["sched_lag_max_ms"] = float(m.group(1)), float(m.group(2))
    return res


TABLE_DDL = """
CREATE TABLE {t} (
    id bigserial PRIMARY KEY,
    v int NOT NULL DEFAULT 0,
    name text NOT NULL,
    amount numeric(10,2),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO {t} (v, name, amount) SELECT 0, 'customer-' || g, g % 1000 + 0.5
FROM generate_series(1, {n}) g;
VACUUM ANALYZE {t};
"""

# pgpipe.capture_row() as it was before issue 11 (PL/pgSQL, SECURITY DEFINER + SET
# search_path, SPI INSERT into the partitioned queue): the baseline the native trigger is
# measured against in the same run, and the body of variants (b) and (c).
PLPGSQL_CAPTURE_ROW = """
DECLARE
    new_row jsonb;
    old_row jsonb;
    woken boolean;
BEGIN
    IF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
        new_row := pg_catalog.to_jsonb(OLD);
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
        new_row := pg_catalog.to_jsonb(NEW);
        old_row := pg_catalog.to_jsonb(OLD);
    ELSE
        new_row := pg_catalog.to_jsonb(NEW);
    END IF;
    INSERT INTO pgpipe.events (id, channel, operation, payload, source)
    VALUES (pgpipe.uuid_generate_v7(), TG_ARGV[0], TG_OP,
            pg_catalog.jsonb_build_object('op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
                                          'row', new_row, 'old', old_row),
            'trigger');
    woken := pgpipe.mark_wakeup();
    RETURN NULL;
END
"""
INSERT_SQL = "INSERT INTO {t} (v, name, amount) VALUES (0, 'new-customer', 12.50);\n"
UPDATE_SQL = "\\set k random(1, 100000)\nUPDATE {t} SET v = v + 1 WHERE id = :k;\n"
INSERT_N_SQL = ("INSERT INTO {t} (v, name, amount) SELECT 0, 'new-customer', 12.50 "
                "FROM generate_series(1, {n});\n")
