//! `#[pg_test]`s: the SQL API inside Postgres, each in a rolled-back transaction.

use pgrx::prelude::*;

/// The tests live in schema `tests`, where pgrx's runner calls them.
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::uuid7::{encode, next_stamp};

    #[pg_test]
    fn uuid_v7_has_version_variant_and_time() {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let id = crate::uuid7::uuid_generate_v7();
        let b = id.as_bytes();
        assert_eq!(b[6] >> 4, 7, "version");
        assert_eq!(b[8] >> 6, 0b10, "variant");
        let mut ms = [0u8; 8];
        ms[2..].copy_from_slice(&b[..6]);
        let ms = u64::from_be_bytes(ms);
        assert!(
            ms >= before && ms < before + 1000,
            "timestamp {ms} vs {before}"
        );
    }

    #[pg_test]
    fn uuid_v7_is_strictly_increasing_within_a_backend() {
        let ids: Vec<[u8; 16]> = (0..10_000)
            .map(|_| *crate::uuid7::uuid_generate_v7().as_bytes())
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }

    #[pg_test]
    fn stamp_bumps_past_a_clock_that_stands_still_or_goes_back() {
        let first = next_stamp(0, 1_000, 500_000);
        assert_eq!(first, (1_000 << 12) | 2048);
        assert_eq!(next_stamp(first, 1_000, 500_000), first + 1);
        assert_eq!(next_stamp(first, 999, 0), first + 1);
        let bytes = encode(first, u64::MAX);
        assert_eq!(&bytes[..6], &[0, 0, 0, 0, 0x03, 0xE8]);
        assert_eq!(bytes[6], 0x78);
        assert_eq!(bytes[8], 0xBF);
    }

    fn setup_orders() {
        Spi::run("CREATE TABLE public.orders (id int PRIMARY KEY, status text, total numeric, meta jsonb)")
            .unwrap();
    }

    #[pg_test]
    fn trigger_captures_typed_rows() {
        setup_orders();
        let channel = Spi::get_one::<String>("SELECT pgpipe.subscribe('orders')").unwrap();
        assert_eq!(channel.as_deref(), Some("orders"));
        Spi::run("INSERT INTO orders VALUES (1, 'new', 10.50, '{\"k\": \"v\"}')").unwrap();
        Spi::run("UPDATE orders SET status = 'paid' WHERE id = 1").unwrap();
        Spi::run("DELETE FROM orders").unwrap();
        Spi::run("TRUNCATE orders").unwrap();
        let ops = Spi::get_one::<String>(
            "SELECT string_agg(operation, ',' ORDER BY id) FROM pgpipe.events WHERE channel = 'orders'",
        )
        .unwrap();
        assert_eq!(ops.as_deref(), Some("INSERT,UPDATE,DELETE,TRUNCATE"));
        let update = Spi::get_one::<pgrx::JsonB>(
            "SELECT payload FROM pgpipe.events WHERE operation = 'UPDATE'",
        )
        .unwrap()
        .unwrap()
        .0;
        assert_eq!(
            update,
            serde_json::json!({
                "op": "UPDATE", "schema": "public", "table": "orders",
                "row": {"id": 1, "status": "paid", "total": 10.50, "meta": {"k": "v"}},
                "old": {"id": 1, "status": "new", "total": 10.50, "meta": {"k": "v"}}
            })
        );
    }

    #[pg_test]
    fn subscribe_is_idempotent_and_replaces_options() {
        setup_orders();
        Spi::run("SELECT pgpipe.subscribe('orders')").unwrap();
        Spi::run("SELECT pgpipe.subscribe('orders', 'shop:orders', ARRAY['insert'])").unwrap();
        let subs = Spi::get_one::<i64>("SELECT count(*) FROM pgpipe.subscriptions").unwrap();
        assert_eq!(subs, Some(1));
        Spi::run("INSERT INTO orders VALUES (1, 'new', 1, NULL)").unwrap();
        Spi::run("UPDATE orders SET status = 'paid'").unwrap();
        let events = Spi::get_one::<String>(
            "SELECT string_agg(channel || ' ' || operation, ',') FROM pgpipe.events",
        )
        .unwrap();
        assert_eq!(events.as_deref(), Some("shop:orders INSERT"));
        assert_eq!(
            Spi::get_one::<bool>("SELECT pgpipe.unsubscribe('orders')").unwrap(),
            Some(true)
        );
        assert_eq!(
            Spi::get_one::<bool>("SELECT pgpipe.unsubscribe('orders')").unwrap(),
            Some(false)
        );
    }

    #[pg_test]
    fn default_channel_is_schema_qualified_outside_public() {
        Spi::run("CREATE SCHEMA shop; CREATE TABLE shop.items (id int PRIMARY KEY)").unwrap();
        let channel = Spi::get_one::<String>("SELECT pgpipe.subscribe('shop.items')").unwrap();
        assert_eq!(channel.as_deref(), Some("shop.items"));
    }

    #[pg_test(error = "relation \"missing\" does not exist")]
    fn subscribe_rejects_a_missing_table() {
        Spi::run("SELECT pgpipe.subscribe('missing')").unwrap();
    }

    #[pg_test(error = "unknown operation 'UPSERT'")]
    fn subscribe_rejects_an_unknown_operation() {
        setup_orders();
        Spi::run("SELECT pgpipe.subscribe('orders', operations => ARRAY['insert', 'upsert'])")
            .unwrap();
    }

    #[pg_test(error = "invalid channel name 'no spaces'")]
    fn subscribe_rejects_a_bad_channel() {
        setup_orders();
        Spi::run("SELECT pgpipe.subscribe('orders', 'no spaces')").unwrap();
    }

    #[pg_test]
    fn emit_queues_an_event_with_its_operation() {
        let id = Spi::get_one::<pgrx::Uuid>("SELECT pgpipe.emit('billing', '{\"invoice\": 7}')")
            .unwrap()
            .unwrap();
        let row = Spi::get_two::<String, String>(&format!(
            "SELECT operation, source FROM pgpipe.events WHERE id = '{id}'"
        ))
        .unwrap();
        assert_eq!(row, (Some("EMIT".into()), Some("emit".into())));
        Spi::run("SELECT pgpipe.emit('billing', '{}', 'PAID')").unwrap();
    }

    #[pg_test]
    fn read_leaves_out_uncommitted_events() {
        Spi::run("SELECT pgpipe.register_consumer('c1', ARRAY['a'])").unwrap();
        Spi::run("SELECT pgpipe.emit('a', to_jsonb(g)) FROM generate_series(1, 5) g").unwrap();
        Spi::run("SELECT pgpipe.emit('b', '1')").unwrap();
        // Events written by this (still open) transaction are not committed: a new batch
        // cannot contain them, so reading returns only a position row.
        let n = Spi::get_one::<i64>("SELECT count(id) FROM pgpipe.read('c1')").unwrap();
        assert_eq!(n, Some(0));
    }

    #[pg_test(error = "invalid position 'garbage'")]
    fn ack_rejects_a_malformed_position() {
        Spi::run("SELECT pgpipe.register_consumer('c1')").unwrap();
        Spi::run("SELECT pgpipe.ack('c1', 'garbage')").unwrap();
    }

    #[pg_test(error = "consumer 'nobody' does not exist")]
    fn read_rejects_an_unknown_consumer() {
        Spi::run("SELECT * FROM pgpipe.read('nobody')").unwrap();
    }

    // --- WAL capture and the background worker (issue 3). The worker and the slot need
    // shared_preload_libraries and a transaction that has not written: scenarios
    // (tests/tests/wal_*.rs) cover them; here, what a plain backend can check.

    #[pg_test]
    fn without_preloading_there_is_no_worker_and_wakeups_are_no_ops() {
        assert_eq!(
            Spi::get_one::<bool>("SELECT pgpipe.mark_wakeup()").unwrap(),
            Some(false)
        );
        let state =
            Spi::get_two::<String, String>("SELECT worker_state, detail FROM pgpipe.status()")
                .unwrap();
        assert_eq!(state.0.as_deref(), Some("not_loaded"));
        assert!(state.1.unwrap().contains("shared_preload_libraries"));
        // Capture still works.
        setup_orders();
        Spi::run(
            "SELECT pgpipe.subscribe('orders'); INSERT INTO orders VALUES (1, 'new', 1, NULL)",
        )
        .unwrap();
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM pgpipe.events").unwrap(),
            Some(1)
        );
    }

    #[pg_test(
        error = "table public.no_key has no primary key or replica identity, so its changes cannot be captured from the WAL"
    )]
    fn wal_mode_refuses_a_table_without_key() {
        Spi::run("CREATE TABLE public.no_key (v text)").unwrap();
        Spi::run("SELECT pgpipe.subscribe('no_key', mode => 'wal')").unwrap();
    }

    #[pg_test(
        error = "mode 'wal' needs the pgpipe background worker, which runs only when pgpipe is preloaded"
    )]
    fn wal_mode_needs_the_worker() {
        setup_orders();
        Spi::run("SELECT pgpipe.subscribe('orders', mode => 'wal')").unwrap();
    }

    #[pg_test]
    fn the_publication_exists_and_holds_no_pgpipe_table() {
        let publication = Spi::get_one::<String>(
            "SELECT pubname::text FROM pg_publication WHERE pubname = pgpipe.publication_name()",
        )
        .unwrap();
        assert_eq!(publication.as_deref(), Some("pgpipe"));
        assert_eq!(
            Spi::get_one::<i64>(
                "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'pgpipe' AND schemaname = 'pgpipe'"
            )
            .unwrap(),
            Some(0)
        );
    }

    #[pg_test(
        error = "replication slot pgpipe is healthy; recreating it would lose the changes it holds"
    )]
    fn recreate_slot_refuses_to_replace_a_healthy_slot() {
        // A physical slot under the name stands in for a healthy one (creating it needs
        // no clean transaction).
        Spi::run("SELECT pg_create_physical_replication_slot('pgpipe', false, true)").unwrap();
        Spi::run("SELECT pgpipe.recreate_slot()").unwrap();
    }

    #[pg_test]
    fn settings_are_registered() {
        for (name, value) in [
            ("pgpipe.database", "postgres"),
            ("pgpipe.poll_interval", "200ms"),
            ("pgpipe.batch_size", "1000"),
            ("pgpipe.slot_name", "pgpipe"),
            ("pgpipe.publication", "pgpipe"),
            ("pgpipe.rotate_interval", "1min"),
        ] {
            let shown = Spi::get_one::<String>(&format!("SHOW {name}")).unwrap();
            assert_eq!(shown.as_deref(), Some(value), "{name}");
        }
        Spi::run("SET pgpipe.partition_xids = 1000").unwrap();
    }

    /// The capture trigger runs as its definer without pinning search_path (it is the
    /// hot path): a writer's own operators and functions must not be reachable from it.
    #[pg_test]
    fn capture_ignores_the_writers_search_path() {
        setup_orders();
        Spi::run("SELECT pgpipe.subscribe('orders')").unwrap();
        Spi::run(
            "CREATE SCHEMA evil;
             CREATE FUNCTION evil.hijack(text, text) RETURNS boolean LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'hijacked'; END $$;
             CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.hijack);
             CREATE FUNCTION evil.to_jsonb(anyelement) RETURNS jsonb LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'hijacked'; END $$;
             SET LOCAL search_path = evil, pg_catalog, public;",
        )
        .unwrap();
        Spi::run("INSERT INTO orders VALUES (1, 'new', 1, NULL)").unwrap();
        Spi::run("UPDATE orders SET status = 'paid'").unwrap();
        let captured = Spi::get_one::<i64>("SELECT count(*) FROM pgpipe.events").unwrap();
        assert_eq!(captured, Some(2));
    }
}
