#!/usr/bin/env bash
# `make package`: a tarball with the extension for the Postgres of $PG_CONFIG (built by
# `cargo pgrx package`, release), every install and upgrade script of sql/upgrade/, the
# release forwarder `pgpipe`, a systemd unit and an install script.
#
#   target/package/pgpipe-<version>-pg<major>-<arch>.tar.gz
#     lib/pgpipe.so                  -> $(pg_config --pkglibdir)
#     extension/pgpipe.control, pgpipe--*.sql -> $(pg_config --sharedir)/extension
#     bin/pgpipe                     -> /usr/local/bin
#     systemd/pgpipe.service, systemd/pgpipe.yaml.example
#     install.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"
OUT="${PACKAGE_DIR:-target/package}"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' pgpipe_ext/Cargo.toml | head -n 1)"
pg_major="$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')"
name="pgpipe-${version}-pg${pg_major}-$(uname -m)"
stage="$OUT/$name"

rm -rf "$stage" "$OUT/pgrx"
mkdir -p "$stage/lib" "$stage/extension" "$stage/bin" "$stage/systemd"

# pgrx lays the files out under the full paths pg_config names; take them from there.
(cd pgpipe_ext && cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "../$OUT/pgrx")
so="$(find "$OUT/pgrx" -name pgpipe.so -print -quit)"
control="$(find "$OUT/pgrx" -name pgpipe.control -print -quit)"
if [ -z "$so" ] || [ -z "$control" ]; then
  echo "package: cargo pgrx package wrote no pgpipe.so / pgpipe.control under $OUT/pgrx" >&2
  exit 1
fi
install -m 755 "$so" "$stage/lib/"
install -m 644 "$(dirname "$control")"/pgpipe.control "$(dirname "$control")"/pgpipe--*.sql "$stage/extension/"
# pgrx writes only this version's script: older versions' and the upgrade hops come from the repo.
install -m 644 sql/upgrade/*.sql "$stage/extension/"
if [ ! -f "$stage/extension/pgpipe--${version}.sql" ]; then
  echo "package: pgpipe--${version}.sql missing from the pgrx package" >&2
  exit 1
fi

cargo build --release -p pgpipe_forwarder
install -m 755 target/release/pgpipe "$stage/bin/"
install -m 644 packaging/pgpipe.service packaging/pgpipe.yaml.example "$stage/systemd/"
install -m 755 packaging/install.sh "$stage/install.sh"

tar -C "$OUT" -czf "$OUT/$name.tar.gz" "$name"
rm -rf "$OUT/pgrx"
echo "package: $OUT/$name.tar.gz"
tar -tzf "$OUT/$name.tar.gz"
