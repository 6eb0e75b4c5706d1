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

    /// The key follows the table's primary key as it changes within one backend (the
    /// per-relation cache is refreshed by the relcache invalidation of ALTER TABLE).
    #[pg_test]
    fn trigger_key_follows_the_primary_key() {
        Spi::run("CREATE TABLE public.k (a int, b text, c numeric)").unwrap();
        Spi::run("SELECT pgpipe.subscribe('k')").unwrap();
        let last_key = || {
            Spi::get_one::<pgrx::JsonB>(
                "SELECT key FROM pgpipe.events WHERE channel = 'k' ORDER BY id DESC LIMIT 1",
            )
            .unwrap()
            .map(|k| k.0)
        };
        Spi::run("INSERT INTO k VALUES (1, 'x', 1.50)").unwrap();
        assert_eq!(last_key(), None, "no primary key, no key");
        Spi::run("ALTER TABLE k ADD PRIMARY KEY (b, c)").unwrap();
        Spi::run("INSERT INTO k VALUES (2, 'y', 2.50)").unwrap();
        assert_eq!(last_key(), Some(serde_json::json!({"b": "y", "c": 2.50})));
        Spi::run("DELETE FROM k WHERE a = 1").unwrap();
        assert_eq!(
            last_key(),
            Some(serde_json::json!({"b": "x", "c": 1.50})),
            "DELETE: the old row's key"
        );
        Spi::run("ALTER TABLE k DROP CONSTRAINT k_pkey, ADD PRIMARY KEY (a)").unwrap();
        Spi::run("UPDATE k SET a = 3").unwrap();
        assert_eq!(
            last_key(),
            Some(serde_json::json!({"a": 3})),
            "UPDATE: the new row's key"
        );
        Spi::run("TRUNCATE k").unwrap();
        assert_eq!(last_key(), None, "TRUNCATE has no key");
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

    /// The message and hint of the error `sql` raises.
    fn error_of(sql: &str) -> String {
        Spi::run(
            "CREATE OR REPLACE FUNCTION pg_temp.error_of(sql text) RETURNS text LANGUAGE plpgsql AS $$
             DECLARE m text; h text; c text;
             BEGIN
                 EXECUTE sql;
                 RETURN 'no error';
             EXCEPTION WHEN OTHERS THEN
                 GET STACKED DIAGNOSTICS m = MESSAGE_TEXT, h = PG_EXCEPTION_HINT, c = RETURNED_SQLSTATE;
                 RETURN c || ': ' || m || ' HINT: ' || h;
             END $$",
        )
        .unwrap();
        Spi::get_one_with_args::<String>("SELECT pg_temp.error_of($1)", &[sql.into()])
            .unwrap()
            .unwrap()
    }

    #[pg_test]
    fn a_mixed_case_name_gets_a_hint_to_quote_it() {
        Spi::run(r#"CREATE SCHEMA "Shop"; CREATE TABLE "Shop"."MixedCase" (id int PRIMARY KEY)"#)
            .unwrap();
        let e = error_of("SELECT pgpipe.subscribe('Shop.MixedCase')");
        assert!(
            e.starts_with("3F000: schema \"shop\" does not exist"),
            "{e}"
        );
        assert!(
            e.contains(
                r#"to name table "Shop"."MixedCase", double-quote it: '"Shop"."MixedCase"'."#
            ),
            "{e}"
        );
        Spi::run(r#"SET LOCAL search_path = "Shop", public"#).unwrap();
        let e = error_of("SELECT pgpipe.subscribe('MixedCase', mode => 'trigger')");
        assert!(
            e.starts_with("42P01: relation \"mixedcase\" does not exist"),
            "{e}"
        );
        assert!(e.contains(r#"double-quote it: '"MixedCase"'."#), "{e}");
        for call in [
            "pgpipe.unsubscribe('MixedCase')",
            "pgpipe.snapshot('MixedCase')",
            "pgpipe.cancel_snapshot('MixedCase')",
        ] {
            let e = error_of(&format!("SELECT {call}"));
            assert!(
                e.contains(r#"double-quote it: '"MixedCase"'."#),
                "{call}: {e}"
            );
        }
        // Quoted, by regclass, by name => and without a table of that name at all.
        let channel = Spi::get_one::<String>(r#"SELECT pgpipe.subscribe('"MixedCase"')"#).unwrap();
        assert_eq!(channel.as_deref(), Some("Shop.MixedCase"));
        let channel = Spi::get_one::<String>(
            r#"SELECT pgpipe.subscribe('"MixedCase"'::regclass, channel => 'mc')"#,
        )
        .unwrap();
        assert_eq!(channel.as_deref(), Some("mc"));
        let channel =
            Spi::get_one::<String>(r#"SELECT pgpipe.subscribe("table" => '"Shop"."MixedCase"')"#)
                .unwrap();
        assert_eq!(channel.as_deref(), Some("Shop.MixedCase"));
        let e = error_of("SELECT pgpipe.subscribe('nothing_like_it')");
        assert_eq!(
            e, "42P01: relation \"nothing_like_it\" does not exist HINT: ",
            "no hint"
        );
        let e = error_of("SELECT pgpipe.subscribe(NULL)");
        assert!(e.contains("no table given"), "{e}");
        // The text overloads of unsubscribe and snapshot reach the regclass ones.
        let removed = Spi::get_one::<bool>(r#"SELECT pgpipe.unsubscribe('"MixedCase"')"#).unwrap();
        assert_eq!(removed, Some(true));
        let again = Spi::get_one::<bool>(r#"SELECT pgpipe.unsubscribe('"MixedCase"')"#).unwrap();
        assert_eq!(again, Some(false), "no longer subscribed");
    }

    #[pg_test]
    fn a_table_name_that_is_no_channel_gets_a_hint_to_pass_channel() {
        Spi::run(r#"CREATE TABLE "Order Items" (id int PRIMARY KEY)"#).unwrap();
        let e = error_of(r#"SELECT pgpipe.subscribe('"Order Items"')"#);
        assert!(e.starts_with("22023: invalid channel name 'Order Items': the default channel is the table's name"), "{e}");
        assert!(
            e.contains(
                r#"SELECT pgpipe.subscribe('public."Order Items"', channel => 'Order_Items');"#
            ),
            "{e}"
        );
        let channel = Spi::get_one::<String>(
            r#"SELECT pgpipe.subscribe('"Order Items"', channel => 'Order_Items')"#,
        )
        .unwrap();
        assert_eq!(channel.as_deref(), Some("Order_Items"));
        // A channel given that is no valid name: the plain message, no hint about `channel =>`.
        let e = error_of(r#"SELECT pgpipe.subscribe('"Order Items"', channel => 'a b')"#);
        assert!(
            e.starts_with("22023: invalid channel name 'a b'") && !e.contains("channel =>"),
            "{e}"
        );
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
            ("pgpipe.batch_size", "10000"),
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

    // --- The native capture trigger (issue 11).

    fn setup_typed() {
        Spi::run(
            "CREATE TYPE public.mood AS ENUM ('sad', 'happy');
             CREATE DOMAIN public.positive AS int CHECK (VALUE > 0);
             CREATE TABLE public.typed (
                 id int PRIMARY KEY, n numeric, f float8, b bool, t text, j jsonb, js json,
                 ts timestamptz, d date, a int[], m public.mood, p public.positive,
                 u uuid, bt bytea, iv interval, nothing text);
             ALTER TABLE public.typed DROP COLUMN nothing;
             ALTER TABLE public.typed ADD COLUMN added text DEFAULT 'missing-attr';",
        )
        .unwrap();
    }

    /// The payload the PL/pgSQL trigger built, computed in SQL from the table's rows.
    fn expected_payload(op: &str, row: &str, old: &str) -> String {
        Spi::get_one::<String>(&format!(
            "SELECT jsonb_build_object('op', '{op}', 'schema', 'public', 'table', 'typed', \
             'row', {row}, 'old', {old})::text"
        ))
        .unwrap()
        .unwrap()
    }

    fn payloads(op: &str) -> Vec<String> {
        Spi::connect(|client| {
            client
                .select(
                    &format!(
                        "SELECT payload::text FROM pgpipe.events WHERE operation = '{op}' ORDER BY id"
                    ),
                    None,
                    &[],
                )
                .unwrap()
                .map(|row| row.get::<String>(1).unwrap().unwrap())
                .collect()
        })
    }

    #[pg_test]
    fn native_trigger_payloads_equal_to_jsonb() {
        setup_typed();
        Spi::run("SELECT pgpipe.subscribe('typed')").unwrap();
        Spi::run(
            "INSERT INTO typed (id, n, f, b, t, j, js, ts, d, a, m, p, u, bt, iv) VALUES
             (1, 12.50, 'NaN', true, 'quote \" and \\ and é', '{\"k\": [1, 2.0]}', '{\"x\":  1}',
              '2026-12-01 10:00:00.123456+00', 'infinity', '{1,NULL,3}', 'happy', 5,
              'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\x00ff', '1 day 2 hours')",
        )
        .unwrap();
        // Incompressible and long: stored out of line (TOAST).
        Spi::run(
            "INSERT INTO typed (id, t) SELECT 2, string_agg(md5(g::text), '') FROM generate_series(1, 400) g",
        )
        .unwrap();
        let want_insert = [
            expected_payload(
                "INSERT",
                "(SELECT to_jsonb(r) FROM typed r WHERE id = 1)",
                "NULL",
            ),
            expected_payload(
                "INSERT",
                "(SELECT to_jsonb(r) FROM typed r WHERE id = 2)",
                "NULL",
            ),
        ];
        Spi::run("CREATE TEMP TABLE before_update AS SELECT * FROM typed WHERE id = 1").unwrap();
        Spi::run("UPDATE typed SET n = -0.001, m = 'sad', a = NULL WHERE id = 1").unwrap();
        let want_update = expected_payload(
            "UPDATE",
            "(SELECT to_jsonb(r) FROM typed r WHERE id = 1)",
            "(SELECT to_jsonb(r) FROM before_update r)",
        );
        Spi::run("CREATE TEMP TABLE before_delete AS SELECT * FROM typed WHERE id = 2").unwrap();
        Spi::run("DELETE FROM typed WHERE id = 2").unwrap();
        let want_delete = expected_payload(
            "DELETE",
            "(SELECT to_jsonb(r) FROM before_delete r)",
            "NULL",
        );
        Spi::run("TRUNCATE typed").unwrap();
        let want_truncate = expected_payload("TRUNCATE", "NULL", "NULL");

        assert_eq!(payloads("INSERT"), want_insert);
        assert_eq!(payloads("UPDATE"), vec![want_update]);
        assert_eq!(payloads("DELETE"), vec![want_delete]);
        assert_eq!(payloads("TRUNCATE"), vec![want_truncate]);
        // The columns beside the payload, as the defaults of pgpipe.events give them.
        let ok = Spi::get_one::<bool>(
            "SELECT bool_and(channel = 'typed' AND source = 'trigger' AND lsn IS NULL
                             AND xid = pg_current_xact_id() AND payload->>'op' = operation
                             AND created_at <= clock_timestamp() AND created_at >= now())
                    AND count(DISTINCT id) = 5
             FROM pgpipe.events",
        )
        .unwrap();
        assert_eq!(ok, Some(true));
    }

    /// A table of Postgres's own types only is converted by the trigger itself, one
    /// conversion per column type decided once (`capture::json`), not through `to_jsonb`:
    /// its payloads and keys are what `to_jsonb` gives, beside it in the same statement.
    #[pg_test]
    fn native_trigger_converts_builtin_types_as_to_jsonb_does() {
        Spi::run(
            "CREATE DOMAIN public.pos AS int CHECK (VALUE > 0);
             CREATE TABLE public.scalars (
                 id bigint PRIMARY KEY, b bool, s int2, i int4, f4 real, f8 float8, n numeric,
                 d date, ts timestamp, tz timestamptz, j jsonb, t text, c char(4), u uuid,
                 ip inet, by bytea, iv interval, tm time, ttz timetz, m money, dom public.pos,
                 gone text, x xml);
             ALTER TABLE public.scalars DROP COLUMN gone;
             ALTER TABLE public.scalars ADD COLUMN added text DEFAULT 'missing-attr';
             CREATE TABLE public.side (n serial, r jsonb, o jsonb);
             CREATE FUNCTION public.side() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                 INSERT INTO public.side (r, o) VALUES (
                     CASE WHEN TG_OP = 'DELETE' THEN to_jsonb(OLD) ELSE to_jsonb(NEW) END,
                     CASE WHEN TG_OP = 'UPDATE' THEN to_jsonb(OLD) END);
                 RETURN NULL; END $$;
             CREATE TRIGGER zz_side AFTER INSERT OR UPDATE OR DELETE ON public.scalars
                 FOR EACH ROW EXECUTE FUNCTION public.side();
             SELECT pgpipe.subscribe('scalars');",
        )
        .unwrap();
        Spi::run(
            "INSERT INTO scalars (id, b, s, i, f4, f8, n, d, ts, tz, j, t, c, u, ip, by, iv, tm, ttz, m, dom, x) VALUES
             (1, true, -32768, 2147483647, 1.5, 'NaN', 'NaN', '2024-02-29', '2024-01-02 03:04:05.678',
              '2024-01-02 03:04:05+02', '{\"a\": [1, 2.50, {\"b\": null}]}', 'quote \" \\ é', 'ab',
              'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '10.0.0.1/8', '\\x00ff', '1 day 2 hours',
              '12:00', '12:00+03', 12.34, 5, '<a>1</a>'),
             (2, false, 0, -1, 'Infinity', '-Infinity', 'Infinity', 'infinity', '-infinity', 'infinity',
              '5', '', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
             (3, NULL, NULL, NULL, -0.0, 1e-300, -0.00, '0001-01-01 BC', NULL, NULL, '\"s\"',
              NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
             (4, NULL, NULL, NULL, NULL, 0.1, 12.50, NULL, NULL, NULL, 'null', NULL, NULL, NULL,
              NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
        )
        .unwrap();
        // Long and incompressible: stored out of line (TOAST).
        Spi::run(
            "INSERT INTO scalars (id, t, j) SELECT 5, string_agg(md5(g::text), ''),
                    jsonb_build_object('k', string_agg(md5(g::text), ''))
             FROM generate_series(1, 400) g",
        )
        .unwrap();
        Spi::run(
            "UPDATE scalars SET n = CASE id WHEN 1 THEN -0.001 ELSE 1e100 END, j = '[true]'
             WHERE id IN (1, 5)",
        )
        .unwrap();
        Spi::run("DELETE FROM scalars WHERE id = 2").unwrap();
        let same = || {
            Spi::get_one::<String>(
                "SELECT count(*) || ' ' || bool_and(e.payload->'row' = s.r
                        AND e.payload->'old' = coalesce(s.o, 'null')
                        -- jsonb = compares numbers by value: the text shows a scale.
                        AND (e.payload->'row')::text = s.r::text
                        AND (e.payload->'old')::text = coalesce(s.o, 'null')::text
                        AND e.key = jsonb_build_object('id', s.r->'id')
                        AND e.payload - 'row' - 'old' = jsonb_build_object(
                            'op', e.operation, 'schema', 'public', 'table', 'scalars'))
                 FROM (SELECT row_number() OVER (ORDER BY id) AS n, * FROM pgpipe.events) e
                 JOIN side s USING (n)",
            )
            .unwrap()
            .unwrap()
        };
        assert_eq!(same(), "8 true");
        // A column choice: the row holds just those columns, the key still its own.
        Spi::run(
            "TRUNCATE side, pgpipe.events;
             SELECT pgpipe.subscribe('scalars', columns => ARRAY['id', 'f8', 'tz', 'j']);
             INSERT INTO scalars (id, f8, tz, j, t) VALUES (6, 2.5, '2026-12-01 10:00+00', '[]', 'left out')",
        )
        .unwrap();
        let chosen = Spi::get_one::<bool>(
            "SELECT e.payload->'row' = (SELECT jsonb_object_agg(k, v) FROM jsonb_each(s.r) AS f(k, v)
                                        WHERE k IN ('id', 'f8', 'tz', 'j'))
                    AND e.key = '{\"id\": 6}'
             FROM pgpipe.events e, side s",
        )
        .unwrap();
        assert_eq!(chosen, Some(true));
    }

    #[pg_test]
    fn native_trigger_routes_to_the_xid_partition_and_maintains_indexes() {
        // Partitions are shared by the tests running in parallel, so this one creates
        // none (queue_retention.rs routes into rotate()'s range partitions): the rows land
        // in the partition Postgres itself prunes to for this xid.
        Spi::run("CREATE TABLE public.routed (id int PRIMARY KEY, v text)").unwrap();
        Spi::run("SELECT pgpipe.subscribe('routed')").unwrap();
        Spi::run("INSERT INTO routed SELECT g, 'x' FROM generate_series(1, 50) g").unwrap();
        let partition = Spi::get_one::<String>(
            "SELECT string_agg(DISTINCT tableoid::regclass::text, ',') FROM pgpipe.events",
        )
        .unwrap()
        .unwrap();
        let pruned_to = Spi::get_one::<String>(
            "SELECT string_agg(DISTINCT tableoid::regclass::text, ',') FROM pgpipe.events
             WHERE xid = pg_current_xact_id()",
        )
        .unwrap()
        .unwrap();
        assert_eq!(partition, pruned_to);
        // Both indexes hold every row: count through each with sequential scans off.
        Spi::run("SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off").unwrap();
        let by_xid = Spi::get_one::<i64>(
            "SELECT count(*) FROM pgpipe.events WHERE xid = pg_current_xact_id()",
        )
        .unwrap();
        let by_id = Spi::get_one::<i64>(
            "SELECT count(*) FROM pgpipe.events WHERE id > '00000000-0000-0000-0000-000000000000'",
        )
        .unwrap();
        assert_eq!((by_xid, by_id), (Some(50), Some(50)));
    }

    #[pg_test]
    fn native_trigger_rows_roll_back_with_a_subtransaction() {
        Spi::run("CREATE TABLE public.rolled (id int PRIMARY KEY, status text)").unwrap();
        Spi::run("SELECT pgpipe.subscribe('rolled')").unwrap();
        Spi::run(
            "DO $$ BEGIN
                 INSERT INTO rolled VALUES (1, 'kept');
                 BEGIN
                     INSERT INTO rolled VALUES (2, 'rolled back');
                     RAISE EXCEPTION 'undo';
                 EXCEPTION WHEN raise_exception THEN NULL;
                 END;
             END $$",
        )
        .unwrap();
        let rows = Spi::get_one::<String>(
            "SELECT string_agg(payload->'row'->>'status', ',') FROM pgpipe.events",
        )
        .unwrap();
        assert_eq!(rows.as_deref(), Some("kept"));
    }

    /// A writer with no right on pgpipe's tables writes a subscribed table; a cast to json
    /// on its column type runs as that writer, not as a superuser.
    #[pg_test]
    fn native_trigger_runs_as_the_writer_who_needs_no_queue_rights() {
        Spi::run(
            "CREATE ROLE pgpipe_test_writer NOSUPERUSER;
             CREATE SCHEMA writer_space AUTHORIZATION pgpipe_test_writer;
             SET LOCAL ROLE pgpipe_test_writer;
             CREATE TABLE writer_space.seen (who text, session_who text, was_superuser bool);
             CREATE TYPE writer_space.tag AS ENUM ('a', 'b');
             CREATE FUNCTION writer_space.tag_json(writer_space.tag) RETURNS json
             LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO writer_space.seen
                 SELECT current_user, session_user, rolsuper FROM pg_roles WHERE rolname = current_user;
                 RETURN to_json($1::text);
             END $$;
             CREATE CAST (writer_space.tag AS json) WITH FUNCTION writer_space.tag_json(writer_space.tag);
             CREATE TABLE writer_space.things (id int PRIMARY KEY, tag writer_space.tag);
             RESET ROLE;",
        )
        .unwrap();
        Spi::run("SELECT pgpipe.subscribe('writer_space.things')").unwrap();
        Spi::run(
            "SET LOCAL ROLE pgpipe_test_writer; INSERT INTO writer_space.things VALUES (1, 'b')",
        )
        .unwrap();
        Spi::run("RESET ROLE").unwrap();
        // The writer has no right on the queue itself.
        let rights = Spi::get_one::<bool>(
            "SELECT has_table_privilege('pgpipe_test_writer', 'pgpipe.events', 'INSERT')
                 OR has_table_privilege('pgpipe_test_writer', 'pgpipe.events_default', 'INSERT')",
        )
        .unwrap();
        assert_eq!(rights, Some(false));
        let seen = Spi::get_two::<String, bool>("SELECT who, was_superuser FROM writer_space.seen")
            .unwrap();
        assert_eq!(seen, (Some("pgpipe_test_writer".into()), Some(false)));
        let payload = Spi::get_one::<pgrx::JsonB>(
            "SELECT payload FROM pgpipe.events WHERE channel = 'writer_space.things'",
        )
        .unwrap()
        .unwrap()
        .0;
        assert_eq!(payload["row"], serde_json::json!({"id": 1, "tag": "b"}));
    }

    /// A row filter as Postgres stored it, printed with every column qualified by the
    /// alias (quoted where needed) and built-in names as the pinned search_path sees
    /// them; a user's operator of the same name in the caller's search_path changes
    /// nothing.
    #[pg_test]
    fn row_filter_sql_qualifies_the_columns() {
        Spi::run(
            "CREATE TABLE public.f (id int PRIMARY KEY, \"Total\" numeric, status text);
             CREATE FUNCTION public.never(text, text) RETURNS boolean LANGUAGE sql AS 'SELECT false';
             CREATE OPERATOR public.<> (LEFTARG = text, RIGHTARG = text, FUNCTION = public.never);",
        )
        .unwrap();
        let sql = |alias: &str| {
            Spi::get_one::<String>(&format!(
                "SELECT pgpipe.row_filter_sql(pgpipe.check_row_filter('public.f', \
                 '\"Total\" > 100 AND status <> ''x'' AND id IS NOT NULL', false, false), 'public.f', '{alias}')"
            ))
            .unwrap()
            .unwrap()
        };
        assert_eq!(
            sql("new"),
            "((new.\"Total\" > (100)::numeric) AND (new.status <> 'x'::text) AND (new.id IS NOT NULL))"
        );
        assert_eq!(
            sql("t"),
            "((t.\"Total\" > (100)::numeric) AND (t.status <> 'x'::text) AND (t.id IS NOT NULL))"
        );
        // Where the caller's search_path would find another operator, the built-in one is
        // printed qualified.
        Spi::run("SET LOCAL search_path = public, pg_catalog").unwrap();
        assert!(
            sql("old").contains("(old.status OPERATOR(pg_catalog.<>) 'x'::text)"),
            "{}",
            sql("old")
        );
        // The trigger's WHEN clause uses the built-in <>, not public.<>: a row that
        // matches is captured.
        Spi::run("SELECT pgpipe.subscribe('public.f', \"where\" => 'status <> ''x''')").unwrap();
        Spi::run("INSERT INTO public.f VALUES (1, 5, 'a'), (2, 5, 'x')").unwrap();
        let captured =
            Spi::get_one::<i64>("SELECT count(*) FROM pgpipe.events WHERE channel = 'f'").unwrap();
        assert_eq!(captured, Some(1));
    }
    /// The filter read back from each capture trigger's WHEN clause (on OLD, on NEW, both,
    /// under NOT) is the filter subscribe stored, with the columns' current names; the
    /// view prints it unqualified.
    #[pg_test]
    fn when_filter_sql_reads_the_filter_of_every_capture_trigger() {
        Spi::run(
            "CREATE TABLE public.w (id int PRIMARY KEY, total numeric, status text);
             SELECT pgpipe.subscribe('public.w', \"where\" => 'total > 100 OR status = ''vip''');",
        )
        .unwrap();
        let stored = Spi::get_one::<String>(
            "SELECT row_filter FROM pgpipe.subscription WHERE relid = 'public.w'::regclass",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            stored,
            "((total > (100)::numeric) OR (status = 'vip'::text))"
        );
        Spi::run("ALTER TABLE public.w RENAME COLUMN total TO amount").unwrap();
        let read = Spi::get_one::<Vec<String>>(
            "SELECT array_agg(tgname || ': ' || pgpipe.when_filter_sql(tgqual, tgrelid, 't') ORDER BY tgname)
             FROM pg_trigger WHERE tgrelid = 'public.w'::regclass AND tgqual IS NOT NULL",
        )
        .unwrap()
        .unwrap();
        let expected: Vec<String> = [
            "pgpipe_capture_delete",
            "pgpipe_capture_insert",
            "pgpipe_capture_update",
            "pgpipe_capture_update_in",
            "pgpipe_capture_update_out",
        ]
        .iter()
        .map(|name| format!("{name}: ((t.amount > (100)::numeric) OR (t.status = 'vip'::text))"))
        .collect();
        assert_eq!(read, expected);
        let shown = Spi::get_one::<String>(
            "SELECT \"where\" FROM pgpipe.subscriptions WHERE \"table\" = 'public.w'::regclass",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            shown,
            "((amount > (100)::numeric) OR (status = 'vip'::text))"
        );
    }

    /// JSON text as a jsonb datum, by jsonb's input function (exact, unlike a round trip
    /// through serde_json).
    fn jsonb_datum(text: &str) -> pg_sys::Datum {
        let text = std::ffi::CString::new(text).unwrap();
        let mut input = pg_sys::Oid::INVALID;
        let mut io_param = pg_sys::Oid::INVALID;
        // SAFETY: out-parameters, then jsonb's input function on a NUL-terminated string.
        unsafe {
            pg_sys::getTypeInputInfo(pg_sys::JSONBOID, &mut input, &mut io_param);
            pg_sys::OidInputFunctionCall(input, text.as_ptr().cast_mut(), io_param, -1)
        }
    }

    /// True when the datum (jsonb) equals the SQL expression `expected` (same jsonb).
    fn jsonb_is(datum: pg_sys::Datum, expected: &str) -> bool {
        // SAFETY: a jsonb datum built in this transaction.
        let arg = unsafe { pgrx::datum::DatumWithOid::new(datum, pg_sys::JSONBOID) };
        Spi::get_one_with_args::<bool>(
            &format!("SELECT $1 = ({expected}) AND $1::text = ({expected})::text"),
            &[arg],
        )
        .unwrap()
        .unwrap()
    }

    /// The WAL worker's payload without SQL is what its batch INSERT built with
    /// `jsonb_build_object`: `row`/`old` embedded as JSON (not quoted), NULL as null,
    /// `unchanged_toast` only when given.
    #[pg_test]
    fn wal_payload_is_the_jsonb_build_object_envelope() {
        use crate::queue::envelope;
        let row_text =
            r#"{"id": 1, "n": 1.000000000000000000001, "doc": {"k": [1, "x"]}, "s": "a\"b"}"#;
        let old_text = r#"{"id": 1}"#;
        let row = jsonb_datum(row_text);
        let old = jsonb_datum(old_text);
        let toast = jsonb_datum(r#"["doc"]"#);
        let change = |old| envelope::Change {
            op: b"UPDATE",
            schema: b"shop",
            table: b"orders \"x\"",
            row: Some(row),
            old,
        };
        // The SQL the worker ran before (worker/queue.rs INSERT_SQL).
        let build = |old: &str, toast: Option<&str>| {
            format!(
                "pg_catalog.jsonb_build_object('op', 'UPDATE', 'schema', 'shop', 'table', 'orders \"x\"', \
                 'row', '{row_text}'::jsonb, 'old', {old}{})",
                toast.map(|t| format!(", 'unchanged_toast', '{t}'::jsonb")).unwrap_or_default()
            )
        };
        // SAFETY: jsonb datums of this transaction.
        unsafe {
            let payload = envelope::jsonb_payload(&change(Some(old)), None);
            assert!(jsonb_is(
                payload,
                &build(&format!("'{old_text}'::jsonb"), None)
            ));
            let payload = envelope::jsonb_payload(&change(None), None);
            assert!(jsonb_is(payload, &build("NULL::jsonb", None)));
            let payload = envelope::jsonb_payload(&change(None), Some(toast));
            assert!(jsonb_is(payload, &build("NULL::jsonb", Some(r#"["doc"]"#))));
        }
    }

    /// An emitted message's payload, source and key, taken out without SQL, are what the
    /// batch INSERT took out with `->`, `->>` and `jsonb_typeof`.
    #[pg_test]
    fn emitted_message_fields_are_those_sql_took_out() {
        use crate::queue::Source;
        let messages = [
            r#"{"channel": "c", "operation": "EMIT", "payload": {"n": 1.000000000000000000001, "a": [1, null]}, "key": {"id": 7}}"#,
            r#"{"channel": "c", "operation": "EMIT", "payload": 3, "key": 5, "source": "ddl"}"#,
            r#"{"channel": "c", "operation": "EMIT", "payload": "text", "source": ["ddl"]}"#,
            r#"{"channel": "c", "operation": "EMIT", "payload": null, "key": null, "source": null}"#,
            r#"{"channel": "c", "operation": "EMIT", "key": {}}"#,
        ];
        for message in messages {
            let m = format!("'{message}'::jsonb");
            let datum = jsonb_datum(message);
            // SAFETY: a jsonb datum just built.
            let (payload, source, key) = unsafe { crate::worker::queue::emitted(datum) };
            assert!(
                jsonb_is(
                    payload,
                    &format!("coalesce({m} -> 'payload', 'null'::jsonb)")
                ),
                "{message}"
            );
            let ddl = Spi::get_one::<bool>(&format!(
                "SELECT coalesce(({m} ->> 'source') = 'ddl', false)"
            ))
            .unwrap()
            .unwrap();
            assert_eq!(
                source,
                if ddl { Source::Ddl } else { Source::Emit },
                "{message}"
            );
            let sql_key =
                format!("CASE WHEN jsonb_typeof({m} -> 'key') = 'object' THEN {m} -> 'key' END");
            match key {
                Some(key) => assert!(jsonb_is(key, &sql_key), "{message}"),
                None => assert!(
                    Spi::get_one::<bool>(&format!("SELECT ({sql_key}) IS NULL"))
                        .unwrap()
                        .unwrap(),
                    "{message}"
                ),
            }
        }
    }
}
