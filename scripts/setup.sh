#!/usr/bin/env bash
# Installs what building and testing pgpipe needs on Debian 12, skipping what is present:
# Postgres 15 with server headers, libclang (bindgen), sudo, nats-server (JetStream, for the
# nats adapter's scenarios), cargo-pgrx 0.18.1 and its init.
set -euo pipefail

PG_MAJOR="${PG_MAJOR:-15}"
PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/${PG_MAJOR}/bin/pg_config}"
PGRX_VERSION="0.18.1"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# chromium: the live page scenario drives the page in a real headless browser.
# nats-server: the nats adapter's scenarios start their own (2.9, JetStream built in).
packages=(postgresql-"$PG_MAJOR" postgresql-server-dev-"$PG_MAJOR" libclang-dev clang sudo pkg-config chromium nats-server)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  echo "setup: installing cargo-pgrx $PGRX_VERSION (a few minutes)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

if ! grep -qs "pg${PG_MAJOR}" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
  cargo pgrx init --pg"$PG_MAJOR" "$PG_CONFIG"
fi
echo "setup: ok"
