#!/usr/bin/env bash
# Installs an unpacked pgpipe package: the extension into the Postgres of $PG_CONFIG
# (default: pg_config on PATH), the forwarder into $BINDIR (default /usr/local/bin).
# Run as root (or a user who may write those directories). It installs files only:
# then preload the library (shared_preload_libraries = 'pgpipe', restart Postgres) and
# run CREATE EXTENSION pgpipe, or ALTER EXTENSION pgpipe UPDATE in databases that have
# an older version.
set -euo pipefail
cd "$(dirname "$0")"
PG_CONFIG="${PG_CONFIG:-$(command -v pg_config || true)}"
BINDIR="${BINDIR:-/usr/local/bin}"
if [ -z "$PG_CONFIG" ] || [ ! -x "$PG_CONFIG" ]; then
  echo "install: pg_config not found; set PG_CONFIG=/usr/lib/postgresql/<major>/bin/pg_config" >&2
  exit 1
fi
built_for="$(ls lib/pgpipe.so >/dev/null && basename "$PWD" | sed -E 's/.*-pg([0-9]+)-.*/\1/')"
target="$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')"
if [ "$built_for" != "$target" ]; then
  echo "install: this package is built for Postgres $built_for, $PG_CONFIG is Postgres $target" >&2
  exit 1
fi
install -m 755 lib/pgpipe.so "$("$PG_CONFIG" --pkglibdir)/"
install -m 644 extension/* "$("$PG_CONFIG" --sharedir)/extension/"
install -m 755 bin/pgpipe "$BINDIR/"
echo "install: pgpipe.so -> $("$PG_CONFIG" --pkglibdir), scripts -> $("$PG_CONFIG" --sharedir)/extension, pgpipe -> $BINDIR"
echo "install: the forwarder as a service: see systemd/pgpipe.service"
