"""Phase `snapshot` (issue 16): snapshot rows/s of a table alone and under concurrent
writes, with the writers' tps during it, side by side in one run.

Rounds of two cells, in alternating order (the snapshot alone; the snapshot while
pgbench UPDATE writers run), then the same writers alone. A snapshot's rate is rows / (finished -
started) from pgpipe.snapshot_jobs; the writers' tps during a snapshot is the mean of
pgbench's per-second progress over the seconds the snapshot ran, and the baseline the
mean over the same seconds of the run without it. pgpipe.snapshot_rows_per_second = 0 (no
limit) for the phase.
"""

import re
import subprocess
import time

from common import env_int, log, loadavg, med, rnd, PG_BIN
from cluster import TABLE_DDL

ROWS = env_int("BENCH_SNAPSHOT_ROWS", 1000000)
CLIENTS = env_int("BENCH_SNAPSHOT_CLIENTS", 8)
ROUNDS = env_int("BENCH_SNAPSHOT_ROUNDS", 2)
WRITE_SQL = "\\set k random(1, {n})\nUPDATE b_snap SET v = v + 1 WHERE id = :k;\n"


def writers(cl, secs):
    """pgbench UPDATE writers for `secs` with per-second progress; (process, start time)."""
    path = "%s/pgbench_snap.sql" % cl.dir
    with open(path, "w") as f:
        f.write(WRITE_SQL.format(n=ROWS))
    cmd = [PG_BIN + "/pgbench", "-n", "-M", "prepared", "-h", cl.dir, "-p", str(cl.port), "-U", "postgres",
           "-c", str(CLIENTS), "-j", "2", "-f", path, "-T", str(secs), "-P", "1", cl.db]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), time.time()


def progress(proc):
    """pgbench's per-second tps: [(seconds since start, tps)]."""
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError("pgbench failed: %s" % (err[-2000:] + out[-2000:]))
    return [(float(m.group(1)), float(m.group(2)))
            for m in re.finditer(r"progress: ([\d.]+) s, ([\d.]+) tps", err)]


def tps_between(samples, start, end):
    """Mean tps of the progress samples whose second lies in [start, end] (relative)."""
    vals = [t for s, t in samples if start < s <= end + 1]
    return sum(vals) / len(vals) if vals else None


def run_snapshot(cl, timeout=600):
    """Starts a snapshot of b_snap and waits for it; (rows, seconds, start offset) with
    the start as time.time()."""
    cl.psql("TRUNCATE pgpipe.events;")
    t0 = time.time()
    job = cl.val("SELECT pgpipe.snapshot('b_snap')")
    while time.time() - t0 < timeout:
        state = cl.val("SELECT state FROM pgpipe.snapshot_jobs WHERE id = %s" % job)
        if state != "running":
            break
        time.sleep(0.2)
    line = cl.val("SELECT state, rows, extract(epoch FROM finished_at - started_at) "
                  "FROM pgpipe.snapshot_jobs WHERE id = %s" % job)
    state, rows, secs = line.split("\t")
    if state != "done":
        raise RuntimeError("snapshot %s ended %s" % (job, state))
    return int(rows), float(secs), t0


def phase_snapshot(bench):
    cl = bench.cl
    res = {"rows": ROWS, "clients": CLIENTS, "rounds": ROUNDS, "load_before": loadavg(), "raw": []}
    cl.psql(TABLE_DDL.format(t="b_snap", n=ROWS))
    cl.psql("SELECT pgpipe.subscribe('b_snap');")
    cl.psql("ALTER SYSTEM SET pgpipe.snapshot_rows_per_second = 0; SELECT pg_reload_conf();")
    time.sleep(0.5)
    try:
        for r in range(ROUNDS):
            row = {}
            for cell in (["alone", "both"] if r % 2 == 0 else ["both", "alone"]):
                cl.psql("TRUNCATE pgpipe.events; VACUUM b_snap; CHECKPOINT;")
                if cell == "alone":
                    rows, secs, _ = run_snapshot(cl)
                    row["alone_rows_per_s"] = rows / secs
                    row["alone_s"] = secs
                    log("snapshot round %d alone: %d rows in %.1f s = %.0f rows/s  load %s"
                        % (r + 1, rows, secs, rows / secs, loadavg()))
                else:
                    budget = int(max(10, 3 * (row.get("alone_s") or 20))) + 5
                    proc, w0 = writers(cl, budget)
                    time.sleep(2)
                    rows, secs, t0 = run_snapshot(cl, timeout=budget - 3)
                    samples = progress(proc)
                    start = t0 - w0
                    row["both_rows_per_s"] = rows / secs
                    row["both_s"] = secs
                    row["window"] = (start, start + secs)
                    row["both_writer_tps"] = tps_between(samples, start, start + secs)
                    log("snapshot round %d under writes: %.0f rows/s, writers %.0f tps  load %s"
                        % (r + 1, rows / secs, row["both_writer_tps"] or 0, loadavg()))
            # The writers alone, over the same seconds of their run as the snapshot above.
            start, end = row["window"]
            cl.psql("TRUNCATE pgpipe.events; VACUUM b_snap; CHECKPOINT;")
            proc, _ = writers(cl, int(end) + 3)
            row["writers_alone_tps"] = tps_between(progress(proc), start, end)
            log("snapshot round %d writers alone: %.0f tps" % (r + 1, row["writers_alone_tps"] or 0))
            res["raw"].append(row)
    finally:
        cl.psql("ALTER SYSTEM RESET pgpipe.snapshot_rows_per_second; SELECT pg_reload_conf();", check=False)
        cl.psql("TRUNCATE pgpipe.events;", check=False)
    for key in ("alone_rows_per_s", "both_rows_per_s", "both_writer_tps", "writers_alone_tps"):
        res[key] = rnd(med([x.get(key) for x in res["raw"]]), 0)
    if res["alone_rows_per_s"] and res["both_rows_per_s"]:
        res["rows_ratio_under_writes"] = rnd(res["both_rows_per_s"] / res["alone_rows_per_s"], 2)
    if res["writers_alone_tps"] and res["both_writer_tps"]:
        res["writer_tps_ratio_during_snapshot"] = rnd(res["both_writer_tps"] / res["writers_alone_tps"], 2)
    res["load_after"] = loadavg()
    bench.res["phases"]["snapshot"] = res


def render_snapshot(ph):
    """The phase's part of BENCHMARKS.md (a list of lines, empty when it did not run)."""
    s = ph.get("snapshot", {})
    if not s.get("raw"):
        return ["#### Snapshot: %s" % s.get("error"), ""] if s.get("error") else []
    L = ["#### 8. Snapshot of a %s-row table (trigger mode, chunks of pgpipe.snapshot_chunk_size, no rate limit), "
         "alone and under %s pgbench UPDATE clients" % (format(s["rows"], ","), s["clients"]), "",
         "| | snapshot rows/s | writers' tps |", "|---|---|---|",
         "| snapshot alone | %s | – |" % s.get("alone_rows_per_s"),
         "| writers alone (same seconds) | – | %s |" % s.get("writers_alone_tps"),
         "| snapshot under writes | %s | %s |" % (s.get("both_rows_per_s"), s.get("both_writer_tps")),
         "",
         "Ratios (medians of %s rounds, cells interleaved): snapshot rows/s under writes ÷ alone = %s; "
         "writers' tps during the snapshot ÷ without it = %s. Load %s → %s." % (
             s["rounds"], s.get("rows_ratio_under_writes"), s.get("writer_tps_ratio_during_snapshot"),
             s.get("load_before"), s.get("load_after")), ""]
    return L
