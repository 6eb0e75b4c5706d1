-- pgpipe: WAL capture and the background worker's status.

--------------------------------------------------------------------------------
-- WAL capture (subscribe(..., mode => 'wal')) and the background worker
--
-- Tables subscribed with mode => 'wal' are in one publication (setting
-- pgpipe.publication, default 'pgpipe'; never pgpipe's own tables). The background
-- worker (shared_preload_libraries = 'pgpipe', database pgpipe.database) reads the
-- logical replication slot pgpipe.slot_name (pgoutput) and writes one event per change,
-- in commit order, together with the slot position reached (pgpipe.wal_progress) in one
-- transaction; it advances the slot only after that commit. The slot is created by the
-- first WAL subscription and never silently recreated: when it is lost, pgpipe.status()
-- says so and pgpipe.recreate_slot() starts a new one.
--------------------------------------------------------------------------------

-- The slot position whose changes are in the queue, per slot: the end LSN of the last
-- source transaction written. Updated in the same transaction as the events.
CREATE TABLE pgpipe.wal_progress (
    slot_name   text        PRIMARY KEY,
    lsn         pg_lsn      NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON pgpipe.wal_progress FROM PUBLIC;

CREATE FUNCTION pgpipe.slot_name() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(pg_catalog.current_setting('pgpipe.slot_name', true), ''), 'pgpipe')
$$;

CREATE FUNCTION pgpipe.publication_name() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(pg_catalog.current_setting('pgpipe.publication', true), ''), 'pgpipe')
$$;

-- The publication exists before any slot: pgoutput fails on a publication that did not
-- exist yet at the position it decodes. publish_via_partition_root: changes of a
-- partitioned table come under its own name.
-- Below wal_level = logical, CREATE PUBLICATION warns about "subscriptions", which
-- trigger mode (the default) has nothing to do with: that warning is silenced. (A
-- NOTICE cannot say what is true instead: CREATE EXTENSION shows WARNINGs and worse
-- only.) WAL mode itself refuses with the fix: see prepare_wal_capture.
DO $$
DECLARE
    quiet text := pg_catalog.current_setting('client_min_messages');
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = pgpipe.publication_name()) THEN
        PERFORM pg_catalog.set_config('client_min_messages', 'error', true);
        EXECUTE pg_catalog.format('CREATE PUBLICATION %I WITH (publish_via_partition_root = true)',
                                  pgpipe.publication_name());
        PERFORM pg_catalog.set_config('client_min_messages', quiet, true);
    END IF;
END $$;

-- Creates pgpipe's replication slot if there is none yet and returns its confirmed LSN.
-- Must run before the transaction writes anything (a Postgres rule for slot creation).
-- Refuses to replace a slot that was lost: see pgpipe.recreate_slot().
CREATE FUNCTION pgpipe.ensure_slot() RETURNS pg_lsn
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    slot text := pgpipe.slot_name();
    s record;
    created pg_lsn;
BEGIN
    -- A transaction that has written cannot create the slot, and must not wait for the
    -- lock below: a creator holding it waits for this transaction to end (a deadlock).
    -- A slot still being created has no confirmed position yet.
    IF pg_current_xact_id_if_assigned() IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM pg_replication_slots r
            WHERE r.slot_name = slot AND r.confirmed_flush_lsn IS NOT NULL) THEN
        RAISE EXCEPTION 'pgpipe must create replication slot % before this transaction writes anything', quote_ident(slot)
            USING ERRCODE = 'active_sql_transaction',
                  HINT = 'Run the first pgpipe.subscribe(..., mode => ''wal'') in a transaction of its own, or SELECT pgpipe.ensure_slot() in one first.';
    END IF;
    -- One creator at a time: a second one waits here until the first one's slot is
    -- consistent and its transaction is over, then finds the slot.
    PERFORM pg_advisory_xact_lock(hashtextextended('pgpipe.ensure_slot', 0));
    SELECT r.slot_type, r.plugin, r.database, r.wal_status, r.confirmed_flush_lsn INTO s
    FROM pg_replication_slots r WHERE r.slot_name = slot;
    IF FOUND THEN
        IF s.slot_type <> 'logical' OR s.plugin IS DISTINCT FROM 'pgoutput' OR s.database IS DISTINCT FROM current_database() THEN
            RAISE EXCEPTION 'replication slot % exists but is not a pgoutput slot of database %',
                quote_ident(slot), quote_ident(current_database())
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'Set pgpipe.slot_name to an unused name in postgresql.conf and reload.';
        END IF;
        IF s.confirmed_flush_lsn IS NULL THEN
            -- Its creator failed and has not dropped it yet (it lets go of the lock first).
            RAISE EXCEPTION 'replication slot % is still being created or dropped by another session', quote_ident(slot)
                USING ERRCODE = 'object_in_use',
                      HINT = 'Try again in a moment.';
        END IF;
        IF s.wal_status = 'lost' THEN
            RAISE EXCEPTION 'replication slot % was invalidated; WAL-mode changes since then were lost', quote_ident(slot)
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'SELECT pgpipe.recreate_slot() starts a new slot; raise max_slot_wal_keep_size to keep it from happening again.';
        END IF;
        RETURN s.confirmed_flush_lsn;
    END IF;
    IF EXISTS (SELECT 1 FROM pgpipe.wal_progress p WHERE p.slot_name = slot) THEN
        RAISE EXCEPTION 'replication slot % was dropped; WAL-mode changes since then were not captured', quote_ident(slot)
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'SELECT pgpipe.recreate_slot() starts a new slot (the changes in between stay lost).';
    END IF;
    BEGIN
        SELECT c.lsn INTO created FROM pg_create_logical_replication_slot(slot, 'pgoutput') c;
    EXCEPTION WHEN active_sql_transaction THEN
        RAISE EXCEPTION 'pgpipe must create replication slot % before this transaction writes anything', quote_ident(slot)
            USING ERRCODE = 'active_sql_transaction',
                  HINT = 'Run the first pgpipe.subscribe(..., mode => ''wal'') in a transaction of its own, or SELECT pgpipe.ensure_slot() in one first.';
    END;
    INSERT INTO pgpipe.wal_progress (slot_name, lsn) VALUES (slot, created)
    ON CONFLICT (slot_name) DO UPDATE SET lsn = excluded.lsn, updated_at = now();
    RETURN created;
END $$;

-- Checks that a table can be captured from the WAL and that WAL capture can run here,
-- then makes sure the slot exists. Called by pgpipe.subscribe before it writes.
CREATE FUNCTION pgpipe.prepare_wal_capture(tbl regclass, replica_identity_full boolean) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    identity "char";
    worker record;
BEGIN
    SELECT c.relreplident INTO identity FROM pg_class c WHERE c.oid = tbl;
    IF NOT replica_identity_full AND (identity = 'n' OR (identity = 'd' AND NOT EXISTS (
            SELECT 1 FROM pg_index i WHERE i.indrelid = tbl AND i.indisprimary))) THEN
        RAISE EXCEPTION 'table % has no primary key or replica identity, so its changes cannot be captured from the WAL', tbl
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'Once in a publication, UPDATE and DELETE on such a table fail.',
                  HINT = 'Add a primary key, set REPLICA IDENTITY USING INDEX or FULL, or pass replica_identity_full => true to let pgpipe set REPLICA IDENTITY FULL.';
    END IF;
    IF current_setting('wal_level') <> 'logical' THEN
        RAISE EXCEPTION 'mode ''wal'' needs wal_level = logical (it is %)', current_setting('wal_level')
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Set wal_level = logical in postgresql.conf and restart Postgres, or use mode => ''trigger''.';
    END IF;
    SELECT * INTO worker FROM pgpipe.worker_status();
    IF NOT worker.preloaded THEN
        RAISE EXCEPTION 'mode ''wal'' needs the pgpipe background worker, which runs only when pgpipe is preloaded'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Add pgpipe to shared_preload_libraries and restart Postgres, or use mode => ''trigger''.';
    END IF;
    IF coalesce(nullif(current_setting('pgpipe.database', true), ''), 'postgres') <> current_database() THEN
        RAISE EXCEPTION 'the pgpipe background worker serves database %, not %',
            quote_ident(coalesce(nullif(current_setting('pgpipe.database', true), ''), 'postgres')), quote_ident(current_database())
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('Set pgpipe.database = %L in postgresql.conf and reload, or use mode => ''trigger''.', current_database());
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = pgpipe.publication_name()) THEN
        RAISE EXCEPTION 'publication % does not exist', quote_ident(pgpipe.publication_name())
            USING ERRCODE = 'undefined_object',
                  HINT = format('Create it in a transaction of its own before the slot exists: CREATE PUBLICATION %I WITH (publish_via_partition_root = true)',
                                pgpipe.publication_name());
    END IF;
    PERFORM pgpipe.ensure_slot();
END $$;

-- Waits until the worker has read the slot up to the current WAL position (everything
-- committed before this call is in the queue). Gives up after `timeout` with a WARNING
-- (returns false): e.g. when the worker is not running.
CREATE FUNCTION pgpipe.wait_for_wal_capture(timeout interval DEFAULT '10s') RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    target pg_lsn := pg_current_wal_lsn();
    deadline timestamptz := clock_timestamp() + timeout;
BEGIN
    LOOP
        IF EXISTS (SELECT 1 FROM pg_replication_slots r
                   WHERE r.slot_name = pgpipe.slot_name() AND r.confirmed_flush_lsn >= target) THEN
            RETURN true;
        END IF;
        IF clock_timestamp() > deadline THEN
            RAISE WARNING 'pgpipe: the worker has not read the WAL up to % within %; WAL events of the last changes may come after newer events',
                target, timeout
                USING HINT = 'Check SELECT * FROM pgpipe.status().';
            RETURN false;
        END IF;
        PERFORM pg_sleep(0.01);
    END LOOP;
END $$;

-- The secret part of the prefix of pgpipe's logical decoding messages. Any role may call
-- pg_logical_emit_message(), so the worker turns a message into an event only when its
-- prefix is 'pgpipe:' || key; nobody but the extension's owner can read the key.
CREATE TABLE pgpipe.wal_message_key (
    key  text NOT NULL
);
INSERT INTO pgpipe.wal_message_key (key)
SELECT md5(random()::text || clock_timestamp()::text) || md5(random()::text || pg_backend_pid()::text);
REVOKE ALL ON pgpipe.wal_message_key FROM PUBLIC;

-- pgpipe.emit() under SET pgpipe.emit_mode = 'wal': the event travels as a transactional
-- logical decoding message (prefix 'pgpipe:<key>', see above) and the worker queues it in commit order
-- with the WAL-mode changes of the same and other transactions. The worker mints its id
-- then (ids must follow commit order within the worker's batches), so emit returns NULL.
CREATE FUNCTION pgpipe.emit_wal(channel text, payload jsonb, operation text, key jsonb DEFAULT NULL) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    mode text := coalesce(nullif(current_setting('pgpipe.emit_mode', true), ''), 'queue');
BEGIN
    IF mode <> 'wal' THEN
        RAISE EXCEPTION 'unknown pgpipe.emit_mode %', quote_literal(mode)
            USING ERRCODE = 'invalid_parameter_value', HINT = 'pgpipe.emit_mode is ''queue'' (default) or ''wal''.';
    END IF;
    -- Without the slot nobody would ever read the message: refuse rather than lose it.
    IF NOT EXISTS (SELECT 1 FROM pg_replication_slots r
                   WHERE r.slot_name = pgpipe.slot_name() AND r.database = current_database()
                     AND r.wal_status IS DISTINCT FROM 'lost') THEN
        RAISE EXCEPTION 'pgpipe.emit_mode = ''wal'' needs pgpipe''s replication slot in this database'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Subscribe a table with mode => ''wal'' (or SELECT pgpipe.ensure_slot()) in this database first, or SET pgpipe.emit_mode = ''queue''.';
    END IF;
    PERFORM pg_logical_emit_message(true, 'pgpipe:' || (SELECT k.key FROM pgpipe.wal_message_key k LIMIT 1),
        jsonb_build_object('channel', pgpipe.check_channel(channel), 'operation', operation, 'payload', payload,
                           'key', key)::text);
    RETURN NULL;
END $$;

-- Puts a table into pgpipe's publication with a row filter (a tree from
-- pgpipe.check_row_filter; NULL: none), replacing the table's entry when its filter
-- differs. Only this table's entry changes, in the caller's transaction: the new filter
-- holds from its commit on.
CREATE FUNCTION pgpipe.publish(tbl regclass, row_filter pg_node_tree DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    current pg_node_tree;
BEGIN
    SELECT pr.prqual INTO current FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
    WHERE p.pubname = pgpipe.publication_name() AND pr.prrelid = tbl;
    IF FOUND THEN
        IF pg_get_expr(current, tbl) IS NOT DISTINCT FROM pg_get_expr(row_filter, tbl) THEN
            RETURN;
        END IF;
        EXECUTE format('ALTER PUBLICATION %I DROP TABLE %s', pgpipe.publication_name(), tbl);
    END IF;
    EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s%s', pgpipe.publication_name(), tbl,
        CASE WHEN row_filter IS NULL THEN '' ELSE format(' WHERE (%s)', pg_get_expr(row_filter, tbl)) END);
END $$;

-- Removes a table from pgpipe's publication (if there).
CREATE FUNCTION pgpipe.unpublish(tbl regclass) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
               WHERE p.pubname = pgpipe.publication_name() AND pr.prrelid = tbl) THEN
        EXECUTE format('ALTER PUBLICATION %I DROP TABLE %s', pgpipe.publication_name(), tbl);
    END IF;
END $$;

-- Starts a new replication slot after the old one was lost (dropped, or invalidated by
-- max_slot_wal_keep_size). Changes between the loss and now are NOT captured; that is
-- why it never happens on its own. force => true replaces a healthy slot too. Must run
-- in a transaction of its own. Returns the new slot's start LSN.
CREATE FUNCTION pgpipe.recreate_slot(force boolean DEFAULT false) RETURNS pg_lsn
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    slot text := pgpipe.slot_name();
    s record;
    created pg_lsn;
BEGIN
    SELECT r.wal_status, r.active_pid INTO s FROM pg_replication_slots r WHERE r.slot_name = slot;
    IF FOUND THEN
        IF s.wal_status IS DISTINCT FROM 'lost' AND NOT coalesce(force, false) THEN
            RAISE EXCEPTION 'replication slot % is healthy; recreating it would lose the changes it holds', quote_ident(slot)
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'Pass force => true to replace it anyway.';
        END IF;
        IF s.active_pid IS NOT NULL THEN
            RAISE EXCEPTION 'replication slot % is in use by process %', quote_ident(slot), s.active_pid
                USING ERRCODE = 'object_in_use', HINT = 'Try again in a moment.';
        END IF;
        PERFORM pg_drop_replication_slot(slot);
    END IF;
    BEGIN
        SELECT c.lsn INTO created FROM pg_create_logical_replication_slot(slot, 'pgoutput') c;
    EXCEPTION WHEN active_sql_transaction THEN
        RAISE EXCEPTION 'pgpipe.recreate_slot() must run before the transaction writes anything'
            USING ERRCODE = 'active_sql_transaction', HINT = 'Run it in a transaction of its own.';
    END;
    INSERT INTO pgpipe.wal_progress (slot_name, lsn) VALUES (slot, created)
    ON CONFLICT (slot_name) DO UPDATE SET lsn = excluded.lsn, updated_at = now();
    RAISE WARNING 'replication slot % recreated at %: WAL-mode changes before it that were not yet captured are lost',
        quote_ident(slot), created;
    RETURN created;
END $$;
REVOKE ALL ON FUNCTION pgpipe.recreate_slot(boolean), pgpipe.ensure_slot(),
    pgpipe.prepare_wal_capture(regclass, boolean), pgpipe.publish(regclass, pg_node_tree), pgpipe.unpublish(regclass) FROM PUBLIC;

-- The background worker and the slot at a glance. One row.
--   worker_state: not_loaded (pgpipe not preloaded), not_running, starting,
--     waiting_for_extension, idle (no WAL subscription), streaming, slot_missing,
--     slot_invalidated, error (see last_error).
--   slot_status: none (no WAL subscription yet), missing (dropped), invalidated, or
--     pg_replication_slots.wal_status (reserved, extended, unreserved).
--   lag_bytes: WAL written since the slot's confirmed position.
--   lag_seconds: time since the worker last reached the end of the WAL.
--   stale_consumers: consumers (the caller's own; pgpipe_admin: all) that acknowledged
--     nothing for pgpipe.consumer_stale_after and hold retention back.
--   consumer_groups: the members of the caller's consumer groups (pgpipe_admin: all),
--     each with alive, the slots it holds in the open batch, its events and share.
CREATE FUNCTION pgpipe.status()
RETURNS TABLE (
    worker_state      text,
    worker_pid        integer,
    database          text,
    slot_name         text,
    slot_status       text,
    confirmed_lsn     pg_lsn,
    current_lsn       pg_lsn,
    lag_bytes         numeric,
    lag_seconds       double precision,
    last_lsn          pg_lsn,
    events_written    bigint,
    notifies_sent     bigint,
    worker_started_at timestamptz,
    last_error        text,
    detail            text,
    stale_consumers   text[],
    consumer_groups   jsonb
)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH w AS (SELECT * FROM pgpipe.worker_status()),
         s AS (SELECT r.* FROM pg_replication_slots r WHERE r.slot_name = pgpipe.slot_name()),
         p AS (SELECT wp.lsn FROM pgpipe.wal_progress wp WHERE wp.slot_name = pgpipe.slot_name()),
         st AS (
            SELECT w.*, s.slot_name IS NOT NULL AS slot_exists, s.confirmed_flush_lsn, s.wal_status,
                   CASE WHEN s.slot_name IS NULL THEN CASE WHEN p.lsn IS NULL THEN 'none' ELSE 'missing' END
                        WHEN s.wal_status = 'lost' THEN 'invalidated'
                        ELSE coalesce(s.wal_status, 'unknown') END AS slot_status
            FROM w LEFT JOIN s ON true LEFT JOIN p ON true
         )
    SELECT st.state, st.pid, st.database, pgpipe.slot_name(), st.slot_status,
           st.confirmed_flush_lsn, pg_current_wal_lsn(),
           pg_wal_lsn_diff(pg_current_wal_lsn(), st.confirmed_flush_lsn),
           CASE WHEN st.slot_exists AND st.caught_up_at_us IS NOT NULL
                THEN greatest(0, extract(epoch FROM clock_timestamp()
                                 - to_timestamp(946684800 + st.caught_up_at_us / 1e6)))::double precision END,
           st.last_lsn::pg_lsn, st.events_written, st.notifies_sent,
           to_timestamp(946684800 + st.started_at_us / 1e6),
           st.last_error,
           CASE
             WHEN st.slot_status = 'missing' THEN format('replication slot %I was dropped: WAL-mode changes are not captured; SELECT pgpipe.recreate_slot() starts a new one (changes in between are lost)', pgpipe.slot_name())
             WHEN st.slot_status = 'invalidated' THEN format('replication slot %I was invalidated (max_slot_wal_keep_size): changes were lost; SELECT pgpipe.recreate_slot() starts a new one', pgpipe.slot_name())
             WHEN st.state = 'not_loaded' THEN 'pgpipe is not in shared_preload_libraries: no background worker, no WAL capture, no wake-up NOTIFY'
             WHEN st.state = 'waiting_for_extension' THEN format('the worker waits for CREATE EXTENSION pgpipe in database %I', st.database)
             WHEN st.state = 'not_running' THEN 'the worker is not running (Postgres restarts it within seconds)'
             WHEN st.database IS DISTINCT FROM current_database() THEN format('the worker serves database %I, not this one', st.database)
             WHEN st.state = 'error' THEN 'the worker retries every pgpipe.poll_interval; see last_error and the server log'
           END,
           ARRAY(SELECT c.name FROM pgpipe.consumers c
                 WHERE pgpipe.is_stale(c)
                   AND (pg_has_role(session_user, c.owner, 'USAGE') OR pgpipe.is_admin())
                 ORDER BY c.name),
           (SELECT coalesce(jsonb_agg(jsonb_build_object(
                       'group', m."group", 'member', m.member, 'alive', m.alive, 'batch', m.batch,
                       'slots', m.slots, 'events', m.events, 'share', m.share, 'holder', m.holder)
                       ORDER BY m."group", m.member), '[]'::jsonb)
            FROM pgpipe.group_members m)
    FROM st
$$;
