#!/usr/bin/env bash
# The benchmarks (issue 7): `make bench` installs the extension, builds the release
# forwarder and runs this. It starts a Postgres of its own (never the machine's), runs the
# phases in bench/phases.py, capture.py, decoding.py, delivery.py, scale.py, snapshot.py (entry bench/bench.py), prints a report, writes bench/results/<stamp>.json and the
# generated part of BENCHMARKS.md. Parameters come from the environment (BENCH_*; see
# bench/common.py and BENCHMARKS.md), e.g. a longer run:
#   BENCH_CAPTURE_SECS=20 BENCH_ROUNDS=5 make bench
# or one phase only:
#   BENCH_PHASES=latency scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."

export PG_BIN="${PG_BIN:-/usr/lib/postgresql/${PG_MAJOR:-15}/bin}"
export PGPIPE="${PGPIPE:-$PWD/target/release/pgpipe}"

for tool in "$PG_BIN/initdb" "$PG_BIN/pg_ctl" "$PG_BIN/pgbench" psql pg_recvlogical curl python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "bench: $tool is missing (run make setup)" >&2; exit 1; }
done
[ -x "$PGPIPE" ] || { echo "bench: $PGPIPE is missing: cargo build --release -p pgpipe_forwarder" >&2; exit 1; }
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
  echo "bench: running as root needs the postgres OS user (Postgres refuses to run as root)" >&2; exit 1
fi
command -v perf >/dev/null 2>&1 || echo "bench: perf not found (apt-get install linux-perf): the profile phase is skipped" >&2

echo "bench: $(uptime)" >&2
exec python3 bench/bench.py
