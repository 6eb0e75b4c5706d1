#!/usr/bin/env python3
"""pgpipe benchmarks (issue 7). Run through `make bench` (or scripts/bench.sh).

Modules: common (settings), cluster (its Postgres), processes (forwarder, sinks,
receivers), phases (the measurements, with capture and decoding mixed in), delivery (webhook, drain and live fan-out at
scale, issue 13), scale (NATS and consumer groups), report (BENCHMARKS.md).

Starts a Postgres 15 of its own (initdb in a temp dir as the `postgres` OS user, a free
port, wal_level=logical, shared_preload_libraries=pgpipe, track_commit_timestamp=on),
then runs the phases named in BENCH_PHASES, each with its baseline in the same run,
interleaved (A B A B), and writes bench/results/<stamp>.json plus the generated part of
BENCHMARKS.md. Only the Python standard library, psql, pgbench, pg_recvlogical, curl and
(optionally) perf are used.

Subcommands used internally as peers of the forwarder:
  bench.py sink OUT TIMELINE        stdin -> OUT, records (time_ns, lines so far) per read
  bench.py receiver PORT OUT        minimal HTTP/1.1 webhook receiver, bodies -> OUT lines
"""

import sys

import delivery
from phases import Bench
from processes import receiver_main, sink_main

# Phases of their own modules, by subject.
Bench.phase_delivery = delivery.phase_delivery
Bench.phase_live = delivery.phase_live


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "sink":
        sink_main(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "receiver":
        receiver_main(int(sys.argv[2]), sys.argv[3])
    else:
        Bench().run()
