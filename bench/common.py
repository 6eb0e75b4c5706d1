"""Settings (environment), paths and small helpers shared by every bench module."""

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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The entry point; peers (sink, receiver) run as `bench.py sink|receiver ...`.
BENCH_PY = os.path.join(ROOT, "bench", "bench.py")
RESULTS_DIR = os.environ.get("BENCH_RESULTS_DIR", os.path.join(ROOT, "bench", "results"))
BENCHMARKS_MD = os.environ.get("BENCH_MD", os.path.join(ROOT, "BENCHMARKS.md"))
MD_BEGIN = "<!-- bench:generated:begin -->"
MD_END = "<!-- bench:generated:end -->"


def env_int(name, default):
    return int(os.environ.get(name, default))


def env_list(name, default):
    return [x.strip() for x in os.environ.get(name, default).split(",") if x.strip()]


# Parameters (environment). Defaults keep `make bench` around 15 minutes on 2 cores.
P = {
    "phases": env_list("BENCH_PHASES",
                       "capture,breakdown,perf,e2e,latency,fanout,delivery,live,failure,nats,groups,snapshot,capture_wal,decoding"),
    "capture_secs": env_int("BENCH_CAPTURE_SECS", 5),
    "rounds": env_int("BENCH_ROUNDS", 3),
    "clients": [int(c) for c in env_list("BENCH_CLIENTS", "1,8,32")],
    "variant_clients": [int(c) for c in env_list("BENCH_VARIANT_CLIENTS", "8")],
    "breakdown_rows": env_int("BENCH_BREAKDOWN_ROWS", 100000),
    "prefill": env_int("BENCH_PREFILL", 200000),
    "burst": env_int("BENCH_BURST", 100000),
    "sustain_secs": env_int("BENCH_SUSTAIN_SECS", 30),
    "sustain_rate": env_int("BENCH_SUSTAIN_RATE", 20000),
    "lat_secs": env_int("BENCH_LAT_SECS", 10),
    "lat_rates": [int(r) for r in env_list("BENCH_LAT_RATES", "100,1000,10000")],
    "lat_polls": env_list("BENCH_LAT_POLLS", "50ms,5ms"),
    # Extra latency runs with the default poll interval and the worker's
    # pgpipe.notify_min_interval set to this (empty: none).
    "lat_notify": os.environ.get("BENCH_LAT_NOTIFY", "5ms"),
    "decode_rows": env_int("BENCH_DECODE_ROWS", 100000),
    "fanout_clients": [int(c) for c in env_list("BENCH_FANOUT_CLIENTS", "10,100,250,500")],
    "fanout_secs": env_int("BENCH_FANOUT_SECS", 10),
    "hold_secs": env_int("BENCH_HOLD_SECS", 60),
    "perf_secs": env_int("BENCH_PERF_SECS", 5),
}
PG_BIN = os.environ.get("PG_BIN", "/usr/lib/postgresql/%s/bin" % os.environ.get("PG_MAJOR", "15"))
PGPIPE = os.environ.get("PGPIPE", os.path.join(ROOT, "target", "release", "pgpipe"))
KEEP = os.environ.get("BENCH_KEEP") == "1"
IS_ROOT = os.geteuid() == 0


def log(*a):
    print("[bench %s]" % time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def rnd(x, n=1):
    return None if x is None else round(x, n)


def proc_status(pid):
    out = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(("VmRSS", "VmHWM")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) / 1024.0  # MiB
    except OSError:
        pass
    return out
