# pgpipe: `make demo` runs it against a Postgres of its own; `make test` runs every test.
PG_MAJOR   ?= 15
PG_CONFIG  ?= /usr/lib/postgresql/$(PG_MAJOR)/bin/pg_config
# Postgres refuses to run as root: pgrx's #[pg_test] cluster runs as this OS user.
PG_TEST_USER ?= postgres
PGRX_TEST_DATA ?= /tmp/pgpipe-pgrx-test-data
INSTALL_FLAGS ?=
# Where Postgres looks for extension scripts (pgrx installs only the current version's).
EXTENSION_DIR = $(shell $(PG_CONFIG) --sharedir)/extension

.PHONY: setup install build package test test-unit test-pg test-scenarios lint demo bench clean docker-build docker-up

setup:
	scripts/setup.sh

## Builds the extension and installs it into the Postgres of $(PG_CONFIG), with the
## released install scripts and the upgrade scripts (sql/upgrade/) beside it.
install: setup
	cd pgpipe_ext && cargo pgrx install --pg-config $(PG_CONFIG) $(INSTALL_FLAGS)
	install -m 644 sql/upgrade/*.sql $(EXTENSION_DIR)/

## Builds the forwarder binary `pgpipe` (target/debug/pgpipe).
build:
	cargo build -p pgpipe_forwarder

## target/package/pgpipe-<version>-pg$(PG_MAJOR)-<arch>.tar.gz: the extension (release,
## `cargo pgrx package`) with every script of sql/upgrade/, the release forwarder, a
## systemd unit and install.sh (scripts/package.sh).
package: setup
	PG_CONFIG=$(PG_CONFIG) scripts/package.sh

## Unit tests, #[pg_test]s in Postgres, then the scenarios against a real Postgres.
test: test-unit test-pg test-scenarios

test-unit:
	cargo test -p pgpipe_pgoutput -p pgpipe_forwarder

test-pg: setup
	mkdir -p $(PGRX_TEST_DATA) && chown $(PG_TEST_USER) $(PGRX_TEST_DATA)
	# One test at a time: they share one database, and a test that creates queue
	# partitions (pgpipe.rotate()) holds their locks until its transaction ends.
	cd pgpipe_ext && CARGO_PGRX_TEST_RUNAS=$(PG_TEST_USER) CARGO_PGRX_TEST_PGDATA=$(PGRX_TEST_DATA)/data \
		RUST_TEST_THREADS=1 cargo pgrx test pg$(PG_MAJOR)

test-scenarios: install build
	cargo test -p pgpipe_tests -- --test-threads=4

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

## Starts a Postgres of its own, subscribes a demo table, writes rows, shows the events.
demo: install build
	scripts/demo.sh

# Benchmarks measure the release build of the extension too.
bench: INSTALL_FLAGS += --release
bench: install
	cargo build --release -p pgpipe_forwarder
	scripts/bench.sh

## Images: Postgres $(PG_MAJOR) with pgpipe preloaded, and the forwarder (needs Docker).
docker-build:
	docker build -f Dockerfile.postgres --build-arg PG_MAJOR=$(PG_MAJOR) -t pgpipe-postgres .
	docker build -f Dockerfile.postgres --build-arg PG_MAJOR=$(PG_MAJOR) --target forwarder -t pgpipe .

## Postgres + forwarder (webhook, SSE, WebSocket) with docker compose.
docker-up:
	docker compose up --build

clean:
	cargo clean
