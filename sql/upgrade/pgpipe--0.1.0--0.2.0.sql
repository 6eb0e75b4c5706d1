-- pgpipe 0.1.0 -> 0.2.0, run by ALTER EXTENSION pgpipe UPDATE (TO '0.2.0').
--
-- How this file grows: every SQL change of the 0.2.0 round has a section here, headed
-- `-- <feature>`, appended at the end by the change that makes it. A section does to a
-- database created at 0.1.0 (and updated by the sections above it) what the feature's
-- change to sql/*.sql does to a fresh install: CREATE the new objects, CREATE OR REPLACE
-- the changed functions with the very text of their new definition (a changed result
-- type or parameter name takes DROP FUNCTION first), ALTER TABLE for new columns (added
-- at the END of the table in sql/*.sql too, so both column orders agree), backfill the
-- rows the new objects need, and the REVOKE ... FROM PUBLIC and GRANTs that
-- sql/grants.sql gives its objects. The upgrade scenario (tests/tests/upgrade.rs)
-- compares the catalog of a database updated by this file with a fresh 0.2.0 install
-- and names the first object that differs, so a forgotten section fails the tests.
-- A function that a later section changes again is defined only there (read, emit,
-- events_after, emit_wal, subscribe, status): the 0.1.0 definition serves until then.
--
-- Once 0.2.0 is released this file is never edited again: the next round's changes go
-- into pgpipe--0.2.0--0.3.0.sql.

\echo Use "ALTER EXTENSION pgpipe UPDATE TO '0.2.0'" to load this file. \quit

--------------------------------------------------------------------------------
-- 0.2.0 base: roles and least privilege, consumer leases in rows, channel sources,
-- the native capture trigger, settings read through the library, WAL message keys
-- (the sql/pgpipe.sql of 0.1.0 split into sql/*.sql)
--------------------------------------------------------------------------------

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['pgpipe_consumer', 'pgpipe_producer', 'pgpipe_admin'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created a moment ago by CREATE EXTENSION in another database
            END;
        END IF;
    END LOOP;
    FOREACH r IN ARRAY ARRAY['pgpipe_consumer', 'pgpipe_producer'] LOOP
        IF NOT pg_catalog.pg_has_role('pgpipe_admin', r, 'MEMBER') THEN
            BEGIN
                EXECUTE pg_catalog.format('GRANT %I TO pgpipe_admin', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
END $$;

-- The calling role has pgpipe_admin's rights (superusers always do).
CREATE FUNCTION pgpipe.is_admin() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_has_role(session_user, 'pgpipe_admin', 'USAGE')
$$;

-- Settings the SQL reads through the library (so a session cannot fake them with a
-- placeholder of the same name), as pgrx declares them in the 0.2.0 install script.
CREATE FUNCTION pgpipe.consumer_stale_after() RETURNS INT
STRICT STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'consumer_stale_after_wrapper';

CREATE FUNCTION pgpipe.partition_xids() RETURNS INT
STRICT STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'partition_xids_wrapper';

-- Capture (sql/capture.sql). The capture functions keep their oids, so the triggers of
-- subscribed tables call the native trigger from now on.
-- Row trigger: TG_ARGV[0] is the channel. Native (pgpipe_ext/src/capture/): it builds the
-- payload with to_jsonb and writes the queue row straight into the partition of
-- pgpipe.events, without SPI. It is deliberately NOT SECURITY DEFINER: casts and output
-- functions of the captured columns run as the role that wrote the row, and writers need
-- no privilege on pgpipe's tables. No NOTIFY here: NOTIFY takes a global lock at commit
-- and would serialize writers; the committed transaction wakes the background worker.
CREATE OR REPLACE FUNCTION pgpipe.capture_row() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'pgpipe_capture_row';

-- Statement trigger for TRUNCATE (row triggers do not fire for it); the same path.
CREATE OR REPLACE FUNCTION pgpipe.capture_truncate() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'pgpipe_capture_truncate';

-- Every table that ever carried its changes on a channel. Kept after unsubscribe (and
-- after the table is dropped): the events it queued stay in the queue, so who may read
-- the channel is still decided by that table.
CREATE TABLE pgpipe.channel_sources (
    channel  text NOT NULL,
    relid    oid  NOT NULL,
    PRIMARY KEY (channel, relid)
);
COMMENT ON TABLE pgpipe.channel_sources IS
    'pgpipe: the tables whose changes a channel carries or carried; they decide who may read and emit on it';
-- The channels of 0.1.0: each subscription's table, and for events still queued on a
-- channel no subscription carries any more, the table the event names (its partitioned
-- parent for a partition; oid 0 when it was dropped, so only pgpipe_admin reads it).
INSERT INTO pgpipe.channel_sources (channel, relid)
SELECT s.channel, s.relid FROM pgpipe.subscription s
ON CONFLICT DO NOTHING;
INSERT INTO pgpipe.channel_sources (channel, relid)
SELECT DISTINCT q.channel,
       coalesce(CASE WHEN c.relispartition THEN pg_catalog.pg_partition_root(c.oid) ELSE c.oid END, 0)
FROM (SELECT DISTINCT e.channel, e.payload->>'schema' AS nspname, e.payload->>'table' AS relname
      FROM pgpipe.events e
      WHERE e.source IN ('trigger', 'wal')
        AND NOT EXISTS (SELECT 1 FROM pgpipe.channel_sources cs WHERE cs.channel = e.channel)) q
LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = q.nspname
LEFT JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = q.relname
ON CONFLICT DO NOTHING;

-- Why the calling role may not read `chan`, or NULL when it may. A channel is readable
-- when the role may SELECT every table that carries (or carried) changes on it, without
-- row-level security hiding rows from it: an event holds the whole row. A channel that
-- no table ever used (emit only) is readable by every pgpipe_consumer.
CREATE FUNCTION pgpipe.channel_read_denial(chan text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
             WHEN c.oid IS NULL THEN
               format('channel %s carried the changes of a table that was dropped (oid %s); only pgpipe_admin reads it',
                      quote_literal(chan), s.relid)
             WHEN NOT has_table_privilege(session_user, c.oid, 'SELECT') THEN
               format('channel %s carries the changes of table %s, which role %s may not SELECT',
                      quote_literal(chan), c.oid::regclass, quote_ident(session_user))
             ELSE
               format('channel %s carries the changes of table %s, whose row-level security hides rows from role %s',
                      quote_literal(chan), c.oid::regclass, quote_ident(session_user))
           END
    FROM pgpipe.channel_sources s
    LEFT JOIN pg_class c ON c.oid = s.relid
    WHERE s.channel = chan
      AND NOT pgpipe.is_admin()
      AND (c.oid IS NULL
           OR NOT has_table_privilege(session_user, c.oid, 'SELECT')
           OR (c.relrowsecurity
               AND NOT pg_has_role(session_user, c.relowner, 'USAGE')
               AND NOT (SELECT r.rolbypassrls FROM pg_roles r WHERE r.rolname = session_user)))
    ORDER BY s.relid
    LIMIT 1
$$;

-- Refuses unless the calling role may read every channel of `chans`; NULL (all channels)
-- only for pgpipe_admin. `what` names the action in the message.
CREATE FUNCTION pgpipe.require_channels_readable(chans text[], what text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    chan text;
    denial text;
BEGIN
    IF chans IS NULL THEN
        IF NOT pgpipe.is_admin() THEN
            RAISE EXCEPTION 'role % may not % every channel: only pgpipe_admin may', quote_ident(session_user), what
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'Name the channels: pgpipe.register_consumer(name, ARRAY[''orders'', ...]).';
        END IF;
        RETURN;
    END IF;
    FOREACH chan IN ARRAY chans LOOP
        denial := pgpipe.channel_read_denial(chan);
        IF denial IS NOT NULL THEN
            RAISE EXCEPTION 'role % may not % channel %: %', quote_ident(session_user), what, quote_literal(chan), denial
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'The table''s owner can GRANT SELECT ON the table TO the role; or leave the channel out.';
        END IF;
    END LOOP;
END $$;

-- Why the calling role may not put events on `chan` (emit, or subscribe a table other
-- than `except_table` to it), or NULL when it may: it needs INSERT, UPDATE or DELETE on
-- every table whose changes the channel carries, so nobody forges another table's
-- changes. A channel of a dropped table takes pgpipe_admin.
CREATE FUNCTION pgpipe.channel_write_denial(chan text, except_table oid DEFAULT NULL) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
             WHEN c.oid IS NULL THEN
               format('channel %s carried the changes of a table that was dropped (oid %s); only pgpipe_admin writes to it',
                      quote_literal(chan), s.relid)
             ELSE
               format('channel %s carries the changes of table %s, on which role %s has no INSERT, UPDATE or DELETE right',
                      quote_literal(chan), c.oid::regclass, quote_ident(session_user))
           END
    FROM pgpipe.channel_sources s
    LEFT JOIN pg_class c ON c.oid = s.relid
    WHERE s.channel = chan
      AND s.relid IS DISTINCT FROM except_table
      AND NOT pgpipe.is_admin()
      AND (c.oid IS NULL OR NOT has_table_privilege(session_user, c.oid, 'INSERT, UPDATE, DELETE'))
    ORDER BY s.relid
    LIMIT 1
$$;

-- Refuses unless the calling role owns `tbl` (or is a member of its owner). Only a
-- table's owner adds or removes its capture.
CREATE FUNCTION pgpipe.require_table_owner(tbl regclass, what text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    owner oid := (SELECT relowner FROM pg_class WHERE oid = tbl);
BEGIN
    IF owner IS NULL OR NOT pg_has_role(session_user, owner, 'USAGE') THEN
        RAISE EXCEPTION 'must be the owner of table % to % it', tbl, what
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('Run it as %s, the table''s owner (or a member of that role).',
                                coalesce(quote_ident(owner::regrole::text), 'its owner'));
    END IF;
END $$;

-- Drops pgpipe's capture triggers from a table (if present).
CREATE OR REPLACE FUNCTION pgpipe.drop_capture_triggers(tbl regclass) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    trigger_name name;
BEGIN
    PERFORM pgpipe.require_table_owner(tbl, 'remove capture from');
    FOR trigger_name IN
        SELECT tgname FROM pg_trigger
        WHERE tgrelid = tbl AND tgname LIKE 'pgpipe\_capture%'
          AND tgfoid IN ('pgpipe.capture_row()'::regprocedure, 'pgpipe.capture_truncate()'::regprocedure)
        ORDER BY tgname
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', trigger_name, tbl);
    END LOOP;
END $$;

-- Removes capture from a table. Returns false when it was not subscribed.
CREATE OR REPLACE FUNCTION pgpipe.unsubscribe("table" regclass) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pgpipe.require_table_owner("table", 'unsubscribe');
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', "table");
    IF EXISTS (SELECT 1 FROM pgpipe.subscription s WHERE s.relid = "table" AND s.mode = 'wal') THEN
        -- The table's last WAL changes are queued under its channel first.
        PERFORM pgpipe.wait_for_wal_capture();
    END IF;
    PERFORM pgpipe.drop_capture_triggers("table");
    PERFORM pgpipe.unpublish("table");
    DELETE FROM pgpipe.subscription WHERE relid = "table";
    RETURN FOUND;
END $$;

-- Consumers (sql/consumers.sql): an owner and a lease in the row. A consumer of 0.1.0
-- belonged to nobody (every role could use it); it now belongs to the extension's owner,
-- who hands it to a forwarder's role with
--   UPDATE pgpipe.consumers SET owner = 'that_role'::regrole WHERE name = '...';
ALTER TABLE pgpipe.consumers
    ADD COLUMN owner oid,
    ADD COLUMN holder_pid integer,
    ADD COLUMN holder_started timestamptz,
    ADD COLUMN claimed_at timestamptz;
UPDATE pgpipe.consumers
SET owner = (SELECT e.extowner FROM pg_catalog.pg_extension e WHERE e.extname = 'pgpipe');
ALTER TABLE pgpipe.consumers ALTER COLUMN owner SET NOT NULL;
COMMENT ON COLUMN pgpipe.consumers.channels IS 'channels the consumer reads; NULL means all (pgpipe_admin only)';
COMMENT ON COLUMN pgpipe.consumers.owner IS 'the role that registered the consumer; only it (or pgpipe_admin) may use it';

-- The consumer `name`, when the calling role owns it or is pgpipe_admin; otherwise an
-- error naming the owner. `for_update` locks its row.
CREATE FUNCTION pgpipe.owned_consumer(name text, what text, for_update boolean DEFAULT false)
RETURNS pgpipe.consumers
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c pgpipe.consumers;
BEGIN
    IF for_update THEN
        SELECT * INTO c FROM pgpipe.consumers WHERE consumers.name = owned_consumer.name FOR UPDATE;
    ELSE
        SELECT * INTO c FROM pgpipe.consumers WHERE consumers.name = owned_consumer.name;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'consumer % does not exist', coalesce(quote_literal(name), 'NULL')
            USING ERRCODE = 'undefined_object',
                  HINT = 'Create it with pgpipe.register_consumer().';
    END IF;
    IF NOT pg_has_role(session_user, c.owner, 'USAGE') AND NOT pgpipe.is_admin() THEN
        RAISE EXCEPTION 'role % may not % consumer %: it belongs to role %',
            quote_ident(session_user), what, quote_literal(name), coalesce(quote_ident(c.owner::regrole::text), c.owner::text)
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Register a consumer of your own under another name (pgpipe listen --consumer NAME).';
    END IF;
    RETURN c;
END $$;

-- Registers a consumer, or updates the channels of an existing one (its position is kept).
-- start => 'beginning' reads every event still in the queue; 'now' only later ones.
-- Returns the consumer's position.
CREATE OR REPLACE FUNCTION pgpipe.register_consumer(name text, channels text[] DEFAULT NULL, start text DEFAULT 'beginning')
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c text;
    existing pgpipe.consumers;
BEGIN
    IF name IS NULL OR name !~ '^[A-Za-z0-9_.:,+-]{1,200}$' THEN
        RAISE EXCEPTION 'invalid consumer name %', coalesce(quote_literal(name), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use 1 to 200 letters, digits, ''_'', ''.'', '':'', '','', ''+'' or ''-''.';
    END IF;
    IF channels IS NOT NULL THEN
        FOREACH c IN ARRAY channels LOOP
            PERFORM pgpipe.check_channel(c);
        END LOOP;
    END IF;
    IF start NOT IN ('beginning', 'now') THEN
        RAISE EXCEPTION 'invalid start %', coalesce(quote_literal(start), 'NULL')
            USING ERRCODE = 'invalid_parameter_value', HINT = 'start is ''beginning'' or ''now''.';
    END IF;
    PERFORM pgpipe.require_channels_readable(channels, 'read');
    IF EXISTS (SELECT 1 FROM pgpipe.consumers WHERE consumers.name = register_consumer.name) THEN
        existing := pgpipe.owned_consumer(name, 'change', true);
        UPDATE pgpipe.consumers SET channels = register_consumer.channels
        WHERE consumers.name = register_consumer.name;
        RETURN pgpipe.format_position(ROW(existing.prev, existing.cur, existing.last_id));
    END IF;
    INSERT INTO pgpipe.consumers (name, channels, prev, owner)
    VALUES (register_consumer.name, register_consumer.channels,
            CASE WHEN start = 'now' THEN pg_current_snapshot() ELSE '1:1:'::pg_snapshot END,
            (SELECT r.oid FROM pg_roles r WHERE r.rolname = session_user))
    ON CONFLICT ON CONSTRAINT consumers_pkey DO NOTHING
    RETURNING pgpipe.format_position(ROW(prev, cur, last_id)) INTO c;
    IF c IS NULL THEN
        -- Registered by another session a moment ago.
        RETURN pgpipe.register_consumer(name, channels, start);
    END IF;
    RETURN c;
END $$;

-- Removes a consumer (its owner or pgpipe_admin). Returns false when there was none.
CREATE OR REPLACE FUNCTION pgpipe.drop_consumer(name text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgpipe.consumers c WHERE c.name = drop_consumer.name) THEN
        RETURN false;
    END IF;
    PERFORM pgpipe.owned_consumer(name, 'drop', true);
    DELETE FROM pgpipe.consumers c WHERE c.name = drop_consumer.name;
    RETURN true;
END $$;

-- Takes the consumer's lease for this session, so a second forwarder for the same
-- consumer waits as a hot standby. Returns false when another live session holds it.
-- The lease is the holder's backend (pid and start time) in the consumer's row, not an
-- advisory lock: any role can take an advisory lock on any key, so a lease made of one
-- could be squatted. It ends when the holding session ends.
CREATE OR REPLACE FUNCTION pgpipe.try_claim_consumer(name text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c pgpipe.consumers := pgpipe.owned_consumer(name, 'claim', true);
    me_started timestamptz := (SELECT a.backend_start FROM pg_stat_activity a WHERE a.pid = pg_backend_pid());
BEGIN
    IF c.holder_pid = pg_backend_pid() AND c.holder_started = me_started THEN
        RETURN true;
    END IF;
    IF c.holder_pid IS NOT NULL AND EXISTS (
            SELECT 1 FROM pg_stat_activity a
            WHERE a.pid = c.holder_pid AND a.backend_start = c.holder_started) THEN
        RETURN false;
    END IF;
    UPDATE pgpipe.consumers
    SET holder_pid = pg_backend_pid(), holder_started = me_started, claimed_at = now()
    WHERE consumers.name = try_claim_consumer.name;
    RETURN true;
END $$;

-- The consumer's acknowledged position.
CREATE OR REPLACE FUNCTION pgpipe.consumer_position(name text) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c pgpipe.consumers := pgpipe.owned_consumer(name, 'read');
BEGIN
    RETURN pgpipe.format_position(ROW(c.prev, c.cur, c.last_id));
END $$;

-- Records that everything up to `position` has been handled.
CREATE OR REPLACE FUNCTION pgpipe.ack(consumer text, "position" text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    pos pgpipe.read_position := pgpipe.parse_position("position");
BEGIN
    PERFORM pgpipe.owned_consumer(consumer, 'acknowledge');
    UPDATE pgpipe.consumers c
    SET prev = pos.prev, cur = pos.cur, last_id = pos.last_id, acked_at = now()
    WHERE c.name = ack.consumer;
END $$;

-- A consumer that acknowledged nothing (since it was registered) for
-- pgpipe.consumer_stale_after: it holds retention back and nobody may be running it.
CREATE FUNCTION pgpipe.is_stale(c pgpipe.consumers) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(c.acked_at, c.created_at) < now() - make_interval(secs => pgpipe.consumer_stale_after())
$$;

-- Each consumer's acknowledged position and how many committed events it has not yet
-- acked; a role sees its own consumers (pgpipe_admin: all). `holder` is the session
-- holding its lease; `stale` means no ack for pgpipe.consumer_stale_after, and
-- `holds_retention` that it is the one keeping the oldest events in the queue.
CREATE OR REPLACE VIEW pgpipe.consumer_lag WITH (security_barrier) AS
SELECT c.name,
       c.channels,
       c.prev::text || '/' || coalesce(c.cur::text, '') || '/' || coalesce(c.last_id::text, '') AS "position",
       c.acked_at,
       pending.events AS pending_events,
       pending.oldest AS oldest_pending_at,
       c.owner::regrole AS owner,
       holder.description AS holder,
       pgpipe.is_stale(c) AS stale,
       pg_snapshot_xmin(c.prev) = (SELECT min(pg_snapshot_xmin(o.prev)) FROM pgpipe.consumers o) AS holds_retention
FROM pgpipe.consumers c
CROSS JOIN LATERAL (
    SELECT count(*) AS events, min(e.created_at) AS oldest
    FROM pgpipe.events e
    WHERE e.xid >= pg_snapshot_xmin(c.prev)
      AND NOT pg_visible_in_snapshot(e.xid, c.prev)
      AND (c.cur IS NULL OR c.last_id IS NULL OR NOT pg_visible_in_snapshot(e.xid, c.cur) OR e.id > c.last_id)
      AND (c.channels IS NULL OR e.channel = ANY (c.channels))
) pending
LEFT JOIN LATERAL (
    SELECT format('pid %s (%s%s)', a.pid, coalesce(nullif(a.application_name, ''), 'no application_name'),
                  coalesce(' from ' || host(a.client_addr), '')) AS description
    FROM pg_stat_activity a
    WHERE a.pid = c.holder_pid AND a.backend_start = c.holder_started
) holder ON true
WHERE pg_has_role(session_user, c.owner, 'USAGE') OR pg_has_role(session_user, 'pgpipe_admin', 'USAGE');

-- Retention (sql/retention.sql).
-- Creates partitions ahead and removes the ones every consumer is past. Returns what it
-- did. `partition_xids` (setting pgpipe.partition_xids, default 1000000) is the number
-- of transaction ids a partition covers. pgpipe_admin only (sql/grants.sql).
CREATE OR REPLACE FUNCTION pgpipe.rotate() RETURNS TABLE (action text, partition_name text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
-- Bounds every lock it waits for; a function-level SET, so the caller's transaction gets
-- its own lock_timeout back afterwards.
SET lock_timeout = '200ms' AS $$
DECLARE
    -- From the extension's own setting (superuser-only), not a session's placeholder.
    size bigint := pgpipe.partition_xids();
    next_xid bigint := pg_snapshot_xmax(pg_current_snapshot())::text::bigint;
    horizon xid8 := pgpipe.retention_horizon();
    lower_bound bigint;
    p pgpipe.event_partitions;
    stale record;
BEGIN
    IF size < 1000 THEN
        RAISE EXCEPTION 'pgpipe.partition_xids must be at least 1000' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- One rotation at a time.
    IF NOT pg_try_advisory_xact_lock(hashtextextended('pgpipe.rotate', 0)) THEN
        RETURN;
    END IF;

    -- Keep at least one partition's worth of xids covered ahead.
    lower_bound := (SELECT max(upper_xid)::text::bigint FROM pgpipe.event_partitions);
    IF lower_bound IS NULL OR lower_bound < next_xid + size THEN
        BEGIN
            -- Rows above the last partition went to the default partition; new ranges
            -- start after them. The lock makes that maximum final.
            LOCK TABLE pgpipe.events_default IN ACCESS EXCLUSIVE MODE;
            lower_bound := greatest(coalesce(lower_bound, next_xid),
                                    (SELECT max(xid)::text::bigint + 1 FROM pgpipe.events_default));
            WHILE lower_bound < next_xid + size LOOP
                partition_name := 'events_' || lower_bound;
                EXECUTE format('CREATE TABLE pgpipe.%I PARTITION OF pgpipe.events FOR VALUES FROM (%L) TO (%L)',
                               partition_name, lower_bound, lower_bound + size);
                INSERT INTO pgpipe.event_partitions (name, lower_xid, upper_xid)
                VALUES (partition_name, lower_bound::text::xid8, (lower_bound + size)::text::xid8);
                action := 'created';
                RETURN NEXT;
                lower_bound := lower_bound + size;
            END LOOP;
        EXCEPTION WHEN lock_not_available THEN
            action := 'busy'; partition_name := NULL;
            RETURN NEXT;
        END;
    END IF;

    -- Never silence: a consumer nobody runs any more keeps every event from its
    -- position on.
    FOR stale IN
        SELECT c.name, c.owner::regrole AS owner, coalesce(c.acked_at, c.created_at) AS since
        FROM pgpipe.consumers c
        WHERE pgpipe.is_stale(c)
        ORDER BY c.name
    LOOP
        RAISE WARNING 'pgpipe: consumer % (role %) has acknowledged nothing since % and holds queue retention back',
            quote_literal(stale.name), stale.owner, stale.since
            USING HINT = format('Run its forwarder again, or drop it: SELECT pgpipe.drop_consumer(%L);', stale.name);
    END LOOP;

    IF horizon IS NULL THEN
        RETURN;
    END IF;
    FOR p IN SELECT * FROM pgpipe.event_partitions WHERE upper_xid <= horizon ORDER BY lower_xid LOOP
        partition_name := p.name;
        -- Dropping a partition locks the parent, which writers hold all the time;
        -- truncating locks only the partition. So: truncate first, drop when we can.
        IF NOT p.truncated THEN
            BEGIN
                EXECUTE format('TRUNCATE pgpipe.%I', p.name);
                UPDATE pgpipe.event_partitions SET truncated = true WHERE name = p.name;
                action := 'truncated';
                RETURN NEXT;
            EXCEPTION WHEN lock_not_available THEN
                CONTINUE;
            END;
        END IF;
        BEGIN
            EXECUTE format('DROP TABLE pgpipe.%I', p.name);
            DELETE FROM pgpipe.event_partitions WHERE name = p.name;
            action := 'dropped';
            RETURN NEXT;
        EXCEPTION WHEN lock_not_available THEN
            NULL;
        END;
    END LOOP;
    BEGIN
        IF EXISTS (SELECT 1 FROM pgpipe.events_default) THEN
            LOCK TABLE pgpipe.events_default IN ACCESS EXCLUSIVE MODE;
            IF NOT EXISTS (SELECT 1 FROM pgpipe.events_default WHERE xid >= horizon) THEN
                TRUNCATE pgpipe.events_default;
                action := 'truncated'; partition_name := 'events_default';
                RETURN NEXT;
            END IF;
        END IF;
    EXCEPTION WHEN lock_not_available THEN
        NULL;
    END;
END $$;

-- Dead letters (sql/dead_letters.sql).
-- Records one dead letter (the event envelope as JSON) and returns its id. SECURITY
-- DEFINER, like pgpipe.ack: the forwarder's role needs no rights on the table itself.
-- Only for an event in the queue on a channel the calling role may read, and what
-- `dlq replay` will deliver is the queue's own channel, operation and payload, never
-- the caller's: a role cannot plant an event through the dead letters. (pgpipe_admin
-- may record any event, e.g. one of the listen_notify detector.)
CREATE OR REPLACE FUNCTION pgpipe.dead_letter(event jsonb, adapter text, error text, attempts integer)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_id bigint;
    queued record;
    event_uuid uuid;
BEGIN
    IF event IS NULL OR jsonb_typeof(event) <> 'object' OR NOT (event ? 'id') THEN
        RAISE EXCEPTION 'pgpipe.dead_letter: event must be a JSON object with an "id"'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    BEGIN
        event_uuid := (event->>'id')::uuid;
    EXCEPTION WHEN invalid_text_representation THEN
        RAISE EXCEPTION 'pgpipe.dead_letter: event id % is not a UUID', quote_literal(event->>'id')
            USING ERRCODE = 'invalid_parameter_value';
    END;
    SELECT e.channel, e.operation, e.payload INTO queued FROM pgpipe.events e WHERE e.id = event_uuid;
    IF FOUND THEN
        PERFORM pgpipe.require_channels_readable(ARRAY[queued.channel], 'dead-letter an event of');
        event := event || jsonb_build_object('channel', queued.channel, 'operation', queued.operation,
                                             'payload', queued.payload);
    ELSIF NOT pgpipe.is_admin() THEN
        RAISE EXCEPTION 'pgpipe.dead_letter: event % is not in pgpipe.events', event_uuid
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'A forwarder''s role records dead letters only of queued events it may read.',
                  HINT = 'Events of the listen_notify and wal detectors are dead-lettered by a pgpipe_admin role.';
    END IF;
    INSERT INTO pgpipe.dead_letters (event_id, channel, event, adapter, error, attempts)
    VALUES (event_uuid, coalesce(event->>'channel', ''), event,
            dead_letter.adapter, dead_letter.error, dead_letter.attempts)
    RETURNING id INTO new_id;
    RETURN new_id;
END $$;

-- WAL capture (sql/wal.sql). Logical decoding messages of 0.1.0 (prefix 'pgpipe', no
-- key) are not events any more.
-- The secret part of the prefix of pgpipe's logical decoding messages. Any role may call
-- pg_logical_emit_message(), so the worker turns a message into an event only when its
-- prefix is 'pgpipe:' || key; nobody but the extension's owner can read the key.
CREATE TABLE pgpipe.wal_message_key (
    key  text NOT NULL
);
INSERT INTO pgpipe.wal_message_key (key)
SELECT md5(random()::text || clock_timestamp()::text) || md5(random()::text || pg_backend_pid()::text);
REVOKE ALL ON pgpipe.wal_message_key FROM PUBLIC;

-- status() has a new column (stale_consumers): its result type changes.
-- Privileges (sql/grants.sql): 0.1.0 let PUBLIC use the schema and execute every
-- function; from now on only the roles of sql/roles.sql may.
REVOKE ALL ON SCHEMA pgpipe FROM PUBLIC;
GRANT USAGE ON SCHEMA pgpipe TO pgpipe_consumer, pgpipe_producer, pgpipe_admin;

-- Tables: written only through the functions; nobody but the owner reads them directly.
REVOKE ALL ON ALL TABLES IN SCHEMA pgpipe FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgpipe FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgpipe FROM PUBLIC;

-- Everyone with a capability: the subscriptions, and the UUIDv7 generator.
GRANT SELECT ON pgpipe.subscriptions TO pgpipe_consumer, pgpipe_producer;
GRANT EXECUTE ON FUNCTION pgpipe.uuid_generate_v7() TO pgpipe_consumer, pgpipe_producer;

-- Consumers: their own consumers (each function checks the owner) and the channels
-- whose tables they may read. consumer_lag shows a role its own consumers.
GRANT EXECUTE ON FUNCTION
    pgpipe.register_consumer(text, text[], text),
    pgpipe.read(text, text, integer),
    pgpipe.ack(text, text),
    pgpipe.try_claim_consumer(text),
    pgpipe.consumer_position(text),
    pgpipe.drop_consumer(text),
    pgpipe.lag(text),
    pgpipe.consumer_stale_after(),
    pgpipe.is_stale(pgpipe.consumers),
    pgpipe.events_after(uuid, text[], integer),
    pgpipe.dead_letter(jsonb, text, text, integer),
    pgpipe.status()
TO pgpipe_consumer;
GRANT SELECT ON pgpipe.consumer_lag TO pgpipe_consumer;

-- Producers: emit, and capture of the tables they own (subscribe checks the owner).
GRANT EXECUTE ON FUNCTION
    pgpipe.emit(text, jsonb, text),
    pgpipe.subscribe(regclass, text, text[], text, boolean),
    pgpipe.unsubscribe(regclass)
TO pgpipe_producer;

-- Admins: retention, the replication slot, dead letters (pgpipe dlq list | replay |
-- purge), and all of the above through membership.
GRANT EXECUTE ON FUNCTION
    pgpipe.rotate(),
    pgpipe.partition_xids(),
    pgpipe.recreate_slot(boolean),
    pgpipe.ensure_slot(),
    pgpipe.wait_for_wal_capture(interval)
TO pgpipe_admin;
GRANT SELECT, DELETE ON pgpipe.dead_letters TO pgpipe_admin;

-- pg_dump keeps the channels' tables too.
SELECT pg_catalog.pg_extension_config_dump('pgpipe.channel_sources', '');

--------------------------------------------------------------------------------
-- The sections of this round's features follow, in merge order, each headed
-- `-- <feature>` (see the header above).
--------------------------------------------------------------------------------

--------------------------------------------------------------------------------
-- ordering key (issue 13): pgpipe.events.key, returned by read() and events_after(),
-- emit(..., key => ...); column choice (issue 15): pgpipe.subscription.column_attnums,
-- subscriptions.columns, captured_attnums (subscribe's columns => and exclude_columns =>
-- come with its last definition, in the snapshots section below)
--------------------------------------------------------------------------------

ALTER TABLE pgpipe.events ADD COLUMN key jsonb;
ALTER TABLE pgpipe.subscription ADD COLUMN column_attnums int2[];
-- Row filters (issue 15; their functions are in the section "row filters" at the end).
ALTER TABLE pgpipe.subscription ADD COLUMN row_filter text;

DROP VIEW pgpipe.subscriptions;
-- A subscription's row filter as SQL (NULL: none), from what Postgres keeps current, so
-- a renamed column is printed by its new name: in WAL mode the table's entry in pgpipe's
-- publication, in trigger mode the WHEN clause of one of its capture triggers
-- (pgpipe.when_filter_sql). Only when neither is there (a trigger-mode subscription of
-- TRUNCATE alone has no row trigger) the stored text. `alias` qualifies the columns
-- (t.total, for a snapshot's query); '' leaves them as they are.
CREATE FUNCTION pgpipe.subscription_row_filter(tbl oid, alias text) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s pgpipe.subscription;
    live text;
BEGIN
    SELECT * INTO s FROM pgpipe.subscription x WHERE x.relid = tbl;
    IF s.row_filter IS NULL THEN
        RETURN NULL;
    END IF;
    IF s.mode = 'wal' THEN
        SELECT pgpipe.row_filter_sql(pr.prqual, pr.prrelid, alias) INTO live
        FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
        WHERE p.pubname = pgpipe.publication_name() AND pr.prrelid = tbl;
    ELSE
        SELECT pgpipe.when_filter_sql(t.tgqual, t.tgrelid, alias) INTO live
        FROM pg_trigger t
        WHERE t.tgrelid = tbl AND t.tgqual IS NOT NULL
          AND t.tgname IN ('pgpipe_capture_insert', 'pgpipe_capture_update', 'pgpipe_capture_update_in',
                           'pgpipe_capture_update_out', 'pgpipe_capture_delete')
        ORDER BY t.tgname LIMIT 1;
    END IF;
    RETURN coalesce(live, s.row_filter);
END $$;

-- `columns`: the captured columns by their current names (NULL: all of them); `where`:
-- the row filter as Postgres prints it (NULL: every row).
CREATE VIEW pgpipe.subscriptions AS
SELECT s.relid::regclass AS "table", s.channel, s.operations, s.mode, s.created_at, s.updated_at,
       (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_catalog.pg_attribute a
        WHERE a.attrelid = s.relid AND a.attnum = ANY (s.column_attnums) AND NOT a.attisdropped) AS columns,
       pgpipe.subscription_row_filter(s.relid, '') AS "where"
FROM pgpipe.subscription s
JOIN pg_catalog.pg_class c ON c.oid = s.relid;

GRANT SELECT ON pgpipe.subscriptions TO pgpipe_consumer, pgpipe_producer;
REVOKE ALL ON FUNCTION pgpipe.subscription_row_filter(oid, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgpipe.subscription_row_filter(oid, text) TO pgpipe_consumer, pgpipe_producer;

DROP FUNCTION pgpipe.read(text, text, integer);
DROP FUNCTION pgpipe.events_after(uuid, text[], integer);
DROP FUNCTION pgpipe.emit(text, jsonb, text);
DROP FUNCTION pgpipe.emit_wal(text, jsonb, text);
DROP FUNCTION pgpipe.subscribe(regclass, text, text[], text, boolean);

-- Reads up to max_events events after a position (default: the consumer's acknowledged
-- one). Every row carries the position just after it; ack the last row's position once
-- its events are handled. When the batch ends (fewer than max_events events, or none),
-- a last row comes back with only a position (id IS NULL): acking it moves the consumer
-- on to the next batch.
CREATE FUNCTION pgpipe.read(consumer text, after text DEFAULT NULL, max_events integer DEFAULT 1000)
RETURNS TABLE (
    "position"  text,
    id          uuid,
    channel     text,
    operation   text,
    payload     jsonb,
    source      text,
    created_at  timestamptz,
    xid         xid8,
    lsn         pg_lsn,
    key         jsonb
)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c pgpipe.consumers;
    chans text[];
    pos pgpipe.read_position;
    prefix text;
    rows_returned integer;
BEGIN
    IF max_events IS NULL OR max_events < 1 THEN
        RAISE EXCEPTION 'max_events must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    c := pgpipe.owned_consumer(consumer, 'read');
    chans := c.channels;
    -- On every read: a table subscribed to one of its channels since, or a grant
    -- revoked, must not leak through an old consumer.
    PERFORM pgpipe.require_channels_readable(chans, 'read');
    pos := pgpipe.parse_position(coalesce(after, pgpipe.format_position(ROW(c.prev, c.cur, c.last_id))));
    IF pos.cur IS NULL THEN
        -- Start a new batch: everything committed from here on is visible to the query
        -- below, which runs with a later statement snapshot.
        pos.cur := pg_current_snapshot();
        pos.last_id := NULL;
    END IF;

    -- The page comes in the order its function returns it (id order: the function scan
    -- reads its result as produced), so it is not sorted again; the position's snapshots
    -- are printed once per page, not per row.
    prefix := pos.prev::text || '/' || pos.cur::text || '/';
    IF pos.last_id IS NULL THEN
        RETURN QUERY SELECT prefix || p.id::text, p.id, p.channel, p.operation, p.payload,
                            p.source, p.created_at, p.xid, p.lsn, p.key
                     FROM pgpipe.batch_first_page(pos.prev, pos.cur, chans, max_events) p;
    ELSE
        RETURN QUERY SELECT prefix || p.id::text, p.id, p.channel, p.operation, p.payload,
                            p.source, p.created_at, p.xid, p.lsn, p.key
                     FROM pgpipe.batch_page_after(pos.prev, pos.cur, pos.last_id, chans, max_events) p;
    END IF;
    GET DIAGNOSTICS rows_returned = ROW_COUNT;

    IF rows_returned < max_events THEN
        -- The batch is finished: the next one starts after `cur`.
        RETURN QUERY SELECT pos.cur::text || '//', NULL::uuid, NULL::text, NULL::text, NULL::jsonb,
                            NULL::text, NULL::timestamptz, NULL::xid8, NULL::pg_lsn, NULL::jsonb;
    END IF;
END $$;

CREATE FUNCTION pgpipe.events_after(event_id uuid, channels text[] DEFAULT NULL, max_events integer DEFAULT 1000)
RETURNS TABLE (
    id          uuid,
    channel     text,
    operation   text,
    payload     jsonb,
    source      text,
    created_at  timestamptz,
    xid         xid8,
    lsn         pg_lsn,
    key         jsonb
)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    last_xid xid8;
BEGIN
    IF max_events IS NULL OR max_events < 1 THEN
        RAISE EXCEPTION 'max_events must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The same rule as pgpipe.read(): only channels the role may read; all of them only
    -- for pgpipe_admin.
    PERFORM pgpipe.require_channels_readable(channels, 'replay');
    SELECT e.xid INTO last_xid FROM pgpipe.events e
    WHERE e.id = events_after.event_id
      AND (events_after.channels IS NULL OR e.channel = ANY (events_after.channels));
    IF NOT FOUND THEN
        RAISE EXCEPTION 'event % is not in the queue (retention removed it, or it never existed)',
            coalesce(event_id::text, 'NULL')
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN QUERY
    SELECT e.id, e.channel, e.operation, e.payload, e.source, e.created_at, e.xid, e.lsn, e.key
    FROM pgpipe.events e
    WHERE (e.id > events_after.event_id OR e.xid > last_xid)
      AND (events_after.channels IS NULL OR e.channel = ANY (events_after.channels))
    ORDER BY e.id
    LIMIT max_events;
END $$;

-- Queues an application event in the caller's transaction. Returns its id. Needs the
-- pgpipe_producer role (sql/roles.sql). `key` is the event's ordering key (a JSON object,
-- e.g. '{"order_id": 7}'; NULL: none): adapters keep one key's events in order.
CREATE FUNCTION pgpipe.emit(channel text, payload jsonb, operation text DEFAULT 'EMIT', key jsonb DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_id uuid := pgpipe.uuid_generate_v7();
    woken boolean;
    denial text;
BEGIN
    IF operation IS NULL OR btrim(operation) = '' THEN
        RAISE EXCEPTION 'operation must be a non-empty string' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF key IS NOT NULL AND jsonb_typeof(key) <> 'object' THEN
        RAISE EXCEPTION 'key must be a JSON object or NULL, not a JSON %', jsonb_typeof(key)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass key => ''{"order_id": 7}''::jsonb, the columns that identify what the event is about.';
    END IF;
    channel := pgpipe.check_channel(channel);
    -- A channel that carries a table's changes takes write rights on that table: no
    -- role forges another table's changes.
    denial := pgpipe.channel_write_denial(channel);
    IF denial IS NOT NULL THEN
        RAISE EXCEPTION 'role % may not emit on channel %: %', quote_ident(session_user), quote_literal(channel), denial
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Emit on a channel of your own, or have the table''s owner GRANT INSERT ON it to the role.';
    END IF;
    IF coalesce(nullif(current_setting('pgpipe.emit_mode', true), ''), 'queue') <> 'queue' THEN
        -- Through the WAL, in commit order with WAL-mode captures (see "WAL capture").
        RETURN pgpipe.emit_wal(channel, coalesce(payload, 'null'::jsonb), operation, key);
    END IF;
    INSERT INTO pgpipe.events (id, channel, operation, payload, source, key)
    VALUES (new_id, channel, operation, coalesce(payload, 'null'::jsonb), 'emit', key);
    woken := pgpipe.mark_wakeup();
    RETURN new_id;
END $$;

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

-- The attribute numbers of the columns a subscription captures: `columns`, or every
-- column but `exclude_columns` (NULL when neither is given: all columns, also later ones).
-- Refuses unknown columns, both lists at once, an empty choice, and leaving out a
-- primary-key column: the primary key is every event's `key`, so it is always captured.
CREATE FUNCTION pgpipe.captured_attnums(tbl regclass, columns text[], exclude_columns text[]) RETURNS int2[]
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    col text;
    chosen int2[];
    missing text;
BEGIN
    IF columns IS NULL AND exclude_columns IS NULL THEN
        RETURN NULL;
    END IF;
    IF columns IS NOT NULL AND exclude_columns IS NOT NULL THEN
        RAISE EXCEPTION 'pass columns or exclude_columns, not both'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH col IN ARRAY coalesce(columns, exclude_columns) LOOP
        IF col IS NULL OR NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = tbl
                          AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped) THEN
            RAISE EXCEPTION 'column % of table % does not exist', coalesce(quote_ident(col), 'NULL'), tbl
                USING ERRCODE = 'undefined_column',
                      HINT = format('The columns of %s are: %s.', tbl,
                          (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) FROM pg_attribute a
                           WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped));
        END IF;
    END LOOP;
    chosen := ARRAY(SELECT a.attnum FROM pg_attribute a
                    WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped
                      AND CASE WHEN columns IS NOT NULL THEN a.attname::text = ANY (columns)
                               ELSE NOT a.attname::text = ANY (exclude_columns) END
                    ORDER BY a.attnum);
    IF cardinality(chosen) = 0 THEN
        RAISE EXCEPTION 'no column of table % would be captured', tbl
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Capture at least one column.';
    END IF;
    SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO missing
    FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[])
    WHERE i.indrelid = tbl AND i.indisprimary AND NOT a.attnum = ANY (chosen);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'primary-key column % of table % cannot be left out', missing, tbl
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'The primary key is every event''s key (its ordering key), so its columns always reach the queue.',
                  HINT = 'Capture the primary-key columns too, or give the table a primary key that holds nothing secret.';
    END IF;
    RETURN chosen;
END $$;

REVOKE ALL ON FUNCTION
    pgpipe.read(text, text, integer),
    pgpipe.events_after(uuid, text[], integer),
    pgpipe.emit(text, jsonb, text, jsonb),
    pgpipe.emit_wal(text, jsonb, text, jsonb),
    pgpipe.captured_attnums(regclass, text[], text[])
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    pgpipe.read(text, text, integer),
    pgpipe.events_after(uuid, text[], integer)
TO pgpipe_consumer;
GRANT EXECUTE ON FUNCTION pgpipe.emit(text, jsonb, text, jsonb) TO pgpipe_producer;

--------------------------------------------------------------------------------
-- snapshots (issue 16): pgpipe.snapshot_jobs, pgpipe.snapshots, snapshot(),
-- cancel_snapshot(), subscribe(..., snapshot => true), the worker's chunk functions;
-- schema-change events: the DDL event triggers (sql/snapshot.sql and sql/ddl.sql, whole)
--------------------------------------------------------------------------------

-- pgpipe: snapshots, the existing rows of a subscribed table as READ events.
--
-- pgpipe.snapshot('orders') queues one event per row already in the table, operation
-- 'READ' and source 'snapshot', on the table's channel, in chunks of
-- pgpipe.snapshot_chunk_size rows read by the background worker in key order (keyset
-- over the primary key), at most pgpipe.snapshot_rows_per_second. Writers go on while it
-- runs, in trigger and in WAL mode.
--
-- Why applying the delivered events in order yields the table (README "Snapshots"): a
-- chunk is read with SELECT ... FOR SHARE in the same transaction that queues its READ
-- events and records its progress. A change of one of its rows either committed before
-- the chunk locked the row (the READ then carries that change or a later one, and every
-- later change of the row is delivered after the READ) or waits for the chunk's commit
-- (its event is minted, and in WAL mode decoded, after the chunk committed, so the queue
-- orders it after the READ). Per row, the stream of events is in commit order, so the
-- last event applied is the newest state.
--
-- Resumable: a chunk's READ events and its progress (last_key) commit together; after a
-- crash or restart the worker goes on from the last finished chunk.
--
-- Tables without a primary key are refused: an UPDATE or DELETE of a row without a key
-- names no row a consumer could apply it to, so no snapshot of such a table could be
-- kept consistent with the stream.

CREATE TABLE pgpipe.snapshot_jobs (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    relid         oid         NOT NULL,
    schema_name   text        NOT NULL,
    table_name    text        NOT NULL,
    -- The primary key's columns, in index order: the keyset the chunks walk.
    key_columns   text[]      NOT NULL,
    state         text        NOT NULL DEFAULT 'running'
                              CHECK (state IN ('running', 'done', 'failed', 'cancelled')),
    -- The key (as text, one element per key column) up to which rows are queued.
    last_key      text[],
    rows          bigint      NOT NULL DEFAULT 0,
    chunks        bigint      NOT NULL DEFAULT 0,
    requested_by  oid         NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    error         text
);
COMMENT ON TABLE pgpipe.snapshot_jobs IS
    'pgpipe: snapshots of subscribed tables (READ events), their progress; see pgpipe.snapshots';
-- One running snapshot per table.
CREATE UNIQUE INDEX snapshot_jobs_running ON pgpipe.snapshot_jobs (relid) WHERE state = 'running';

-- Every snapshot with its progress; a role sees those of tables it may SELECT
-- (pgpipe_admin: all).
CREATE VIEW pgpipe.snapshots WITH (security_barrier) AS
SELECT j.id,
       -- Schema-qualified whatever the reader's search_path (and after a DROP).
       coalesce(format('%I.%I', n.nspname, c.relname), format('%I.%I', j.schema_name, j.table_name)) AS "table",
       j.state, j.rows, j.chunks,
       j.started_at AS started, j.finished_at AS finished, j.error
FROM pgpipe.snapshot_jobs j
LEFT JOIN pg_catalog.pg_class c ON c.oid = j.relid
LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE pg_catalog.pg_has_role(session_user, 'pgpipe_admin', 'USAGE')
   OR (c.oid IS NOT NULL AND pg_catalog.has_table_privilege(session_user, c.oid, 'SELECT'));

-- The primary key's columns of a table, in index order (NULL without one).
CREATE FUNCTION pgpipe.key_columns(tbl regclass) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT array_agg(a.attname::text ORDER BY k.n)
    FROM pg_index i
    CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE i.indrelid = tbl AND i.indisprimary
    HAVING count(*) > 0
$$;

-- Starts a snapshot of a subscribed table: the background worker queues its rows as READ
-- events. Only the table's owner may. Returns the snapshot's id (that of the running one
-- when there is one already).
CREATE FUNCTION pgpipe.snapshot("table" regclass) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel record;
    keys text[];
    worker record;
    job bigint;
    filter text;
    message text;
BEGIN
    IF "table" IS NULL THEN
        RAISE EXCEPTION 'no table given' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pgpipe.require_table_owner("table", 'snapshot');
    SELECT c.relname, n.nspname INTO rel
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = "table";
    IF NOT EXISTS (SELECT 1 FROM pgpipe.subscription s WHERE s.relid = "table") THEN
        RAISE EXCEPTION 'table % is not subscribed', "table"
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'A snapshot''s READ events go on the table''s channel, and only capture keeps them up to date.',
                  HINT = format('Subscribe it with the snapshot: SELECT pgpipe.subscribe(%L, snapshot => true);', "table"::text);
    END IF;
    keys := pgpipe.key_columns("table");
    IF keys IS NULL THEN
        RAISE EXCEPTION 'table % has no primary key, so it cannot be snapshotted', "table"
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'The snapshot reads the table in primary-key order, and a consumer needs the key to apply later UPDATEs and DELETEs to the rows it read.',
                  HINT = 'Add a primary key (ALTER TABLE ... ADD PRIMARY KEY); the change events of the table flow without one.';
    END IF;
    -- The row filter comes from the triggers or the publication, which Postgres keeps
    -- current; without either (trigger mode capturing TRUNCATE alone) from the text
    -- stored at subscribe, which names the columns as they were then.
    filter := pgpipe.subscription_row_filter("table", 't');
    IF filter IS NOT NULL THEN
        BEGIN
            EXECUTE format('SELECT FROM ONLY %s t WHERE (%s) LIMIT 0', "table", filter);
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS message = MESSAGE_TEXT;
            RAISE EXCEPTION 'the row filter of table % no longer fits the table: %', "table", message
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = format('The filter as subscribed: %s.', filter),
                      HINT = 'A column it names was renamed or dropped since: subscribe the table again with its filter (pgpipe.subscribe(..., "where" => ...)), then snapshot.';
        END;
    END IF;
    SELECT * INTO worker FROM pgpipe.worker_status();
    IF NOT worker.preloaded THEN
        RAISE EXCEPTION 'snapshots need the pgpipe background worker, which runs only when pgpipe is preloaded'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Add pgpipe to shared_preload_libraries and restart Postgres.';
    END IF;
    IF coalesce(nullif(current_setting('pgpipe.database', true), ''), 'postgres') <> current_database() THEN
        RAISE EXCEPTION 'the pgpipe background worker serves database %, not %, so it cannot run the snapshot',
            quote_ident(coalesce(nullif(current_setting('pgpipe.database', true), ''), 'postgres')), quote_ident(current_database())
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('Set pgpipe.database = %L in postgresql.conf and reload.', current_database());
    END IF;
    SELECT j.id INTO job FROM pgpipe.snapshot_jobs j WHERE j.relid = "table" AND j.state = 'running';
    IF FOUND THEN
        RAISE NOTICE 'a snapshot of % is already running (id %)', "table", job;
        RETURN job;
    END IF;
    INSERT INTO pgpipe.snapshot_jobs (relid, schema_name, table_name, key_columns, requested_by)
    VALUES ("table", rel.nspname, rel.relname, keys,
            (SELECT r.oid FROM pg_roles r WHERE r.rolname = session_user))
    RETURNING id INTO job;
    -- Wakes the worker at commit, which then starts on it.
    PERFORM pgpipe.mark_wakeup();
    RETURN job;
END $$;

-- Cancels the running snapshot of a table (its owner). Events already queued stay.
-- Returns false when none was running.
CREATE FUNCTION pgpipe.cancel_snapshot("table" regclass) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pgpipe.require_table_owner("table", 'cancel the snapshot of');
    UPDATE pgpipe.snapshot_jobs j SET state = 'cancelled', finished_at = now()
    WHERE j.relid = "table" AND j.state = 'running';
    RETURN FOUND;
END $$;

-- For the worker: the next running snapshot to read a chunk of, locked, with the two
-- queries of a chunk. Skips (and ends) snapshots whose table is gone, unsubscribed or
-- has another key now. The queries run as the table's owner:
--   bounds_sql ($1 last key text[], $2 chunk size): the key of the chunk's last row by
--     the statement's snapshot, no row when fewer rows are left;
--   rows_sql ($1 last key, $2 upper key text[] or NULL): the chunk's rows locked FOR
--     SHARE, as (key jsonb text, row jsonb text). Rows whose key a concurrent UPDATE moved
--     out of (last, upper] are left to the chunk that covers their new key.
CREATE FUNCTION pgpipe.snapshot_next_chunk(
    OUT job bigint, OUT owner oid, OUT last_key text[], OUT bounds_sql text, OUT rows_sql text)
RETURNS record
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    j pgpipe.snapshot_jobs;
    rel record;
    key_list text;
    key_object text;
    key_text text;
    lower_key text;
    upper_key text;
    source text;
    row_expr text;
    filter text;
BEGIN
    LOOP
        SELECT * INTO j FROM pgpipe.snapshot_jobs s WHERE s.state = 'running'
        ORDER BY s.id LIMIT 1 FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        SELECT c.oid, c.relowner, c.relkind INTO rel FROM pg_class c WHERE c.oid = j.relid;
        IF rel.oid IS NULL THEN
            UPDATE pgpipe.snapshot_jobs SET state = 'failed', finished_at = now(), error = 'the table was dropped'
            WHERE id = j.id;
        ELSIF NOT EXISTS (SELECT 1 FROM pgpipe.subscription s WHERE s.relid = j.relid) THEN
            UPDATE pgpipe.snapshot_jobs SET state = 'cancelled', finished_at = now(), error = 'the table was unsubscribed'
            WHERE id = j.id;
        ELSIF pgpipe.key_columns(j.relid) IS DISTINCT FROM j.key_columns THEN
            UPDATE pgpipe.snapshot_jobs SET state = 'failed', finished_at = now(),
                error = 'the table''s primary key changed; start a new snapshot'
            WHERE id = j.id;
        ELSE
            EXIT;
        END IF;
    END LOOP;
    job := j.id;
    owner := rel.relowner;
    last_key := j.last_key;
    SELECT string_agg(format('t.%I', a.attname), ', ' ORDER BY k.n),
           string_agg(format('%L, t.%I', a.attname, a.attname), ', ' ORDER BY k.n),
           string_agg(format('t.%I::pg_catalog.text', a.attname), ', ' ORDER BY k.n),
           string_agg(format('$1[%s]::%s', k.n, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY k.n),
           string_agg(format('$2[%s]::%s', k.n, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY k.n)
    INTO key_list, key_object, key_text, lower_key, upper_key
    FROM unnest(j.key_columns) WITH ORDINALITY AS k(name, n)
    JOIN pg_attribute a ON a.attrelid = j.relid AND a.attname = k.name;
    -- The subscription's column choice (pgpipe.captured_attnums): left-out columns never
    -- reach the queue, in READ events either.
    SELECT '(SELECT pg_catalog.to_jsonb(x) FROM (SELECT '
           || string_agg(format('t.%I', a.attname), ', ' ORDER BY a.attnum) || ') x)'
    INTO row_expr
    FROM pgpipe.subscription s
    JOIN pg_attribute a ON a.attrelid = s.relid AND a.attnum = ANY (s.column_attnums)
    WHERE s.relid = j.relid AND NOT a.attisdropped;
    row_expr := coalesce(row_expr, 'pg_catalog.to_jsonb(t)');
    -- The subscription's row filter: only matching rows are read (and count for a chunk).
    -- From the triggers or the publication (pgpipe.subscription_row_filter), current
    -- after a column rename.
    filter := coalesce(' AND (' || pgpipe.subscription_row_filter(j.relid, 't') || ') IS TRUE', '');
    -- ONLY: trigger capture sees the table's own rows, not those of inheritance
    -- children (a partitioned table's rows are all in its partitions).
    source := CASE WHEN rel.relkind = 'p' THEN '' ELSE 'ONLY ' END || j.relid::regclass::text || ' t';
    bounds_sql := format('SELECT ARRAY[%s] FROM %s %s%s ORDER BY %s OFFSET $2 - 1 LIMIT 1',
        key_text, source,
        CASE WHEN j.last_key IS NULL THEN 'WHERE $1 IS NULL' ELSE format('WHERE (%s) > (%s)', key_list, lower_key) END,
        filter, key_list);
    rows_sql := format('SELECT pg_catalog.jsonb_build_object(%s)::pg_catalog.text, %s::pg_catalog.text '
                       'FROM %s WHERE %s AND ($2 IS NULL OR (%s) <= (%s))%s ORDER BY %s FOR SHARE OF t',
        key_object, row_expr, source,
        CASE WHEN j.last_key IS NULL THEN '$1 IS NULL' ELSE format('(%s) > (%s)', key_list, lower_key) END,
        key_list, upper_key, filter, key_list);
END $$;

-- For the worker: queues a chunk's rows as READ events on the table's channel and records
-- the chunk (in the worker's transaction, with the rows still locked). upper_key NULL:
-- it was the last chunk. The one place READ events are written.
CREATE FUNCTION pgpipe.queue_read_events(job bigint, keys text[], rows text[], upper_key text[])
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    j pgpipe.snapshot_jobs;
    chan text;
    rel record;
BEGIN
    SELECT * INTO j FROM pgpipe.snapshot_jobs s WHERE s.id = job FOR UPDATE;
    SELECT s.channel INTO chan FROM pgpipe.subscription s WHERE s.relid = j.relid;
    SELECT c.relname, n.nspname INTO rel
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = j.relid;
    -- keys: the rows' primary keys as jsonb (the envelope's key, as capture gives it).
    INSERT INTO pgpipe.events (channel, operation, payload, source, key)
    SELECT chan, 'READ',
           jsonb_build_object('op', 'READ', 'schema', rel.nspname, 'table', rel.relname,
                              'row', r.rw::jsonb, 'old', NULL),
           'snapshot', r.k::jsonb
    FROM ROWS FROM (unnest(keys), unnest(rows)) WITH ORDINALITY AS r(k, rw, n)
    ORDER BY r.n;
    UPDATE pgpipe.snapshot_jobs s
    SET rows = s.rows + coalesce(cardinality(queue_read_events.rows), 0),
        chunks = s.chunks + 1,
        last_key = coalesce(upper_key, s.last_key),
        state = CASE WHEN upper_key IS NULL THEN 'done' ELSE s.state END,
        finished_at = CASE WHEN upper_key IS NULL THEN now() END
    WHERE s.id = job;
    IF coalesce(cardinality(rows), 0) > 0 THEN
        PERFORM pgpipe.mark_wakeup();
    END IF;
END $$;

-- For the worker: a snapshot that keeps failing ends as failed, with the error.
CREATE FUNCTION pgpipe.fail_snapshot(job bigint, error text) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    UPDATE pgpipe.snapshot_jobs s SET state = 'failed', finished_at = now(), error = fail_snapshot.error
    WHERE s.id = job AND s.state = 'running'
$$;

-- pgpipe: schema-change events (operation 'DDL', source 'ddl').
--
-- An event trigger queues one event per command that changes a subscribed table (ALTER
-- TABLE: columns added, dropped, renamed or retyped, the table renamed, ...; DROP TABLE)
-- on the table's channel, with the command tag and the table's column list after it.
-- Order with the table's data changes: in trigger mode the event is written in the
-- command's transaction (ALTER TABLE and DROP TABLE hold an ACCESS EXCLUSIVE lock, so no
-- write of the table is concurrent with it); in WAL mode it travels through the WAL as
-- one of pgpipe's logical decoding messages, so the worker queues it in commit order
-- with the table's changes. The statement's text is not included: current_query() holds
-- the whole string the client sent, which may carry other statements (and secrets).

-- The columns of a table as the DDL event lists them.
CREATE FUNCTION pgpipe.table_columns(tbl oid) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'name', a.attname, 'type', format_type(a.atttypid, a.atttypmod),
               'not_null', a.attnotnull, 'position', a.attnum) ORDER BY a.attnum), '[]'::jsonb)
    FROM pg_attribute a
    WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped
$$;

-- Queues a DDL event of a subscribed table: into the queue (trigger mode), or through
-- the WAL (WAL mode, see pgpipe.emit_wal) so that it keeps its place among the changes.
CREATE FUNCTION pgpipe.queue_ddl_event(s pgpipe.subscription, payload jsonb) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    woken boolean;
BEGIN
    IF s.mode = 'wal' THEN
        PERFORM pg_logical_emit_message(true, 'pgpipe:' || (SELECT k.key FROM pgpipe.wal_message_key k LIMIT 1),
            jsonb_build_object('channel', s.channel, 'operation', 'DDL', 'payload', payload,
                               'source', 'ddl')::text);
    ELSE
        INSERT INTO pgpipe.events (channel, operation, payload, source)
        VALUES (s.channel, 'DDL', payload, 'ddl');
        woken := pgpipe.mark_wakeup();
    END IF;
END $$;

-- ddl_command_end: a DDL event for every subscribed table the command changed.
CREATE FUNCTION pgpipe.capture_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cmd record;
    s pgpipe.subscription;
    rel record;
BEGIN
    FOR cmd IN
        SELECT DISTINCT d.objid, d.command_tag
        FROM pg_event_trigger_ddl_commands() d
        WHERE d.classid = 'pg_class'::regclass
    LOOP
        SELECT * INTO s FROM pgpipe.subscription sub WHERE sub.relid = cmd.objid;
        CONTINUE WHEN NOT FOUND;
        SELECT c.relname, n.nspname INTO rel
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = cmd.objid;
        PERFORM pgpipe.queue_ddl_event(s, jsonb_build_object(
            'op', 'DDL', 'schema', rel.nspname, 'table', rel.relname,
            'command', cmd.command_tag, 'columns', pgpipe.table_columns(cmd.objid),
            'primary_key', to_jsonb(pgpipe.key_columns(cmd.objid))));
    END LOOP;
END $$;
CREATE EVENT TRIGGER pgpipe_capture_ddl ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE')
    EXECUTE FUNCTION pgpipe.capture_ddl();

-- sql_drop: a subscribed table that is dropped gets a last DDL event ('DROP TABLE',
-- columns null) and a NOTICE saying its capture is gone. (The subscription row itself is
-- removed by pgpipe_forget_dropped_tables, which fires after this trigger: event
-- triggers of one event fire in name order.)
CREATE FUNCTION pgpipe.capture_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    d record;
    s pgpipe.subscription;
BEGIN
    FOR d IN
        SELECT o.objid, o.schema_name, o.object_name
        FROM pg_event_trigger_dropped_objects() o
        WHERE o.classid = 'pg_class'::regclass AND o.objsubid = 0 AND o.object_type = 'table'
    LOOP
        SELECT * INTO s FROM pgpipe.subscription sub WHERE sub.relid = d.objid;
        CONTINUE WHEN NOT FOUND;
        PERFORM pgpipe.queue_ddl_event(s, jsonb_build_object(
            'op', 'DDL', 'schema', d.schema_name, 'table', d.object_name,
            'command', 'DROP TABLE', 'columns', NULL, 'primary_key', NULL));
        UPDATE pgpipe.snapshot_jobs j SET state = 'cancelled', finished_at = now(), error = 'the table was dropped'
        WHERE j.relid = d.objid AND j.state = 'running';
        RAISE NOTICE 'pgpipe: table %.% was subscribed on channel %; its capture is removed',
            quote_ident(d.schema_name), quote_ident(d.object_name), quote_literal(s.channel)
            USING DETAIL = 'A last event with operation DDL and command DROP TABLE is queued on the channel.';
    END LOOP;
END $$;
CREATE EVENT TRIGGER pgpipe_capture_drop ON sql_drop
    WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA', 'DROP OWNED')
    EXECUTE FUNCTION pgpipe.capture_drop();

-- ddl_command_start of a DROP: when WAL-mode tables are subscribed, let the worker queue
-- the WAL changes committed so far first, while their tables (and owners) still exist:
-- a change decoded after its table is gone can only carry its values as text (no owner
-- is left to run the conversion as). Not when the transaction has written already: its
-- own changes come after the position it would wait for.
CREATE FUNCTION pgpipe.before_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    caught_up boolean;
BEGIN
    IF pg_current_xact_id_if_assigned() IS NULL
       AND EXISTS (SELECT 1 FROM pgpipe.subscription s WHERE s.mode = 'wal') THEN
        caught_up := pgpipe.wait_for_wal_capture('5s');
    END IF;
END $$;
CREATE EVENT TRIGGER pgpipe_before_drop ON ddl_command_start
    WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA', 'DROP OWNED')
    EXECUTE FUNCTION pgpipe.before_drop();

-- Installs capture on a table. Idempotent: subscribing again replaces the channel,
-- operations and mode of the existing subscription. Returns the channel.
-- mode => 'wal' captures through logical decoding in the background worker (see "WAL
-- capture" below); replica_identity_full => true lets a table without a primary key be
-- captured that way by setting REPLICA IDENTITY FULL on it; snapshot => true also queues
-- the rows already there as READ events (pgpipe.snapshot).
-- columns => ARRAY[...] captures only those columns, exclude_columns => ARRAY[...] all but
-- those (see pgpipe.captured_attnums); left-out columns never reach the queue, in `row`,
-- `old` or `key`. The choice is resolved now: a column added later is captured only
-- after subscribing again (without a choice, every column is, always).
-- Switching modes locks the table against writers for the switch, so every change is
-- captured exactly once: by the trigger before, by the WAL after (or the other way).
CREATE FUNCTION pgpipe.subscribe(
    "table"    regclass,
    channel    text   DEFAULT NULL,
    operations text[] DEFAULT ARRAY['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE'],
    mode       text   DEFAULT 'trigger',
    replica_identity_full boolean DEFAULT false,
    columns    text[] DEFAULT NULL,
    exclude_columns text[] DEFAULT NULL,
    snapshot   boolean DEFAULT false,
    "where"    text   DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel record;
    ops text[];
    row_ops text[];
    denial text;
    attnums int2[];
    row_filter pg_node_tree;
BEGIN
    IF "table" IS NULL THEN
        RAISE EXCEPTION 'no table given' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT c.relname, c.relkind, n.nspname INTO rel
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = "table";
    IF rel.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table', "table"
            USING ERRCODE = 'wrong_object_type',
                  HINT = 'Only ordinary and partitioned tables can be subscribed.';
    END IF;
    IF rel.nspname = 'pgpipe' THEN
        RAISE EXCEPTION 'pgpipe''s own table % cannot be subscribed', "table"
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pgpipe.require_table_owner("table", 'subscribe');
    PERFORM pgpipe.check_partitions("table");
    mode := lower(coalesce(mode, ''));
    IF mode NOT IN ('trigger', 'wal') THEN
        RAISE EXCEPTION 'unknown mode %', quote_literal(mode)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'mode is ''trigger'' or ''wal''.';
    END IF;
    channel := pgpipe.subscription_channel("table", channel);
    ops := pgpipe.check_operations(operations);
    attnums := pgpipe.captured_attnums("table", columns, exclude_columns);
    denial := pgpipe.channel_write_denial(channel, "table");
    IF denial IS NOT NULL THEN
        RAISE EXCEPTION 'cannot subscribe % to channel %: %', "table", quote_literal(channel), denial
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Pass another channel => ''...'' (the default is the table''s name).';
    END IF;
    IF mode = 'wal' AND NOT pgpipe.is_admin()
       AND NOT (SELECT r.rolreplication FROM pg_roles r WHERE r.rolname = session_user) THEN
        -- WAL mode creates and holds a replication slot, which retains WAL for everyone.
        RAISE EXCEPTION 'mode ''wal'' needs the REPLICATION attribute or the pgpipe_admin role (role % has neither)',
            quote_ident(session_user)
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('A superuser runs: GRANT pgpipe_admin TO %I; or use mode => ''trigger''.', session_user);
    END IF;
    IF mode = 'wal' THEN
        -- First, before this transaction writes: it may have to create the slot.
        PERFORM pgpipe.prepare_wal_capture("table", coalesce(replica_identity_full, false));
    END IF;
    -- After that: checking the filter writes (a scratch publication).
    row_filter := pgpipe.check_row_filter("table", "where", mode = 'wal', coalesce(replica_identity_full, false));

    -- Writers wait while capture switches over (see above).
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', "table");
    IF EXISTS (SELECT 1 FROM pgpipe.subscription s WHERE s.relid = "table" AND s.mode = 'wal') THEN
        -- Changing a WAL-mode subscription: let the worker queue the table's last WAL
        -- changes under the old channel and operations first (and, when leaving WAL
        -- mode, before the trigger's events).
        PERFORM pgpipe.wait_for_wal_capture();
    END IF;
    PERFORM pgpipe.drop_capture_triggers("table");
    IF mode = 'wal' THEN
        IF replica_identity_full THEN
            EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', "table");
        END IF;
        PERFORM pgpipe.publish("table", row_filter);
        row_ops := '{}';
    ELSE
        PERFORM pgpipe.unpublish("table");
        row_ops := ARRAY(SELECT o FROM unnest(ops) o WHERE o <> 'TRUNCATE');
    END IF;
    PERFORM pgpipe.create_row_triggers("table", channel, row_ops, attnums, row_filter);
    IF mode = 'trigger' AND 'TRUNCATE' = ANY (ops) THEN
        EXECUTE format(
            'CREATE TRIGGER pgpipe_capture_truncate AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION pgpipe.capture_truncate(%L)',
            "table", channel);
    END IF;

    INSERT INTO pgpipe.channel_sources (channel, relid) VALUES (channel, "table")
    ON CONFLICT DO NOTHING;
    -- The filter as text (search_path is pg_catalog: other schemas' names are qualified).
    INSERT INTO pgpipe.subscription AS s (relid, channel, operations, mode, column_attnums, row_filter)
    VALUES ("table", channel, ops, mode, attnums, pg_get_expr(row_filter, "table"))
    ON CONFLICT (relid) DO UPDATE
        SET channel = excluded.channel, operations = excluded.operations,
            mode = excluded.mode, column_attnums = excluded.column_attnums,
            row_filter = excluded.row_filter, updated_at = now();
    IF snapshot THEN
        -- The existing rows as READ events (sql/snapshot.sql), once capture is in place.
        PERFORM pgpipe.snapshot("table");
    END IF;
    RETURN channel;
END $$;

REVOKE ALL ON ALL TABLES IN SCHEMA pgpipe FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgpipe FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgpipe FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    pgpipe.subscribe(regclass, text, text[], text, boolean, text[], text[], boolean, text),
    pgpipe.snapshot(regclass),
    pgpipe.cancel_snapshot(regclass)
TO pgpipe_producer;
GRANT SELECT ON pgpipe.snapshots TO pgpipe_consumer, pgpipe_producer;

--------------------------------------------------------------------------------
-- consumer groups (issue 14): pgpipe.consumer_groups, group_members, join_group,
-- read_group, ack_group, group_heartbeat, leave_group, drop_group (sql/groups.sql, whole);
-- the members' columns of pgpipe.consumers; is_stale, retention_horizon and status()
-- take groups into account
--------------------------------------------------------------------------------

-- group_events is filled by an UPDATE rather than a fast default, so the table's catalog
-- equals a fresh install's (no "missing value" kept for old rows).
ALTER TABLE pgpipe.consumers
    ADD COLUMN group_name      text,
    ADD COLUMN group_position  text,
    ADD COLUMN group_events    bigint,
    ADD COLUMN seen_at         timestamptz;
UPDATE pgpipe.consumers SET group_events = 0;
ALTER TABLE pgpipe.consumers
    ALTER COLUMN group_events SET DEFAULT 0,
    ALTER COLUMN group_events SET NOT NULL;

-- pgpipe: consumer groups (forwarders that share channels, each event delivered by one).

--------------------------------------------------------------------------------
-- Consumer groups
--
-- A group reads the queue in the same snapshot batches as a consumer (sql/consumers.sql),
-- one batch at a time. When a batch opens, its members are the group's live members,
-- sorted; an event belongs to slot hash(key) mod N (N = that member count; keyless events
-- hash their transaction id, so a transaction's keyless events stay together) and slot i
-- to the i-th member. Every member reads the whole batch and keeps its slots' events. The
-- next batch opens only when every member of this one has acknowledged its share, so the
-- events of one key are delivered in commit order by one member while membership is
-- stable, and a membership change (a join, a leave, a death) takes effect at a batch
-- boundary, where nothing of the key is in flight.
--
-- A member that dies inside a batch (its session ended, or it was not seen for the
-- group's member_timeout) hands its unfinished slots to the live members: the batch's
-- assignment gets a new version, a row of `slots`. A member's position names the batch,
-- the version it read under and the last event id it got; reading again under a newer
-- version returns, in id order, the events of its new slots from the batch's start plus
-- the rest of its old slots. Slots only ever move away from departed members, so nothing
-- of a key reaches the new owner before the key's earlier events of the batch: they all
-- go through the new owner again (at least once, never reordered).
--
-- Each member is a consumer (pgpipe.consumers, group_name set) of the role that joined:
-- its own lease (holder_pid/holder_started), owner checks, is_stale. Retention keeps
-- everything after the group's `prev` (pgpipe.retention_horizon).
--
-- A member's position is text 'g:<batch>:<version>:<last>', <last> being empty (nothing
-- read yet), the last event id read, or 'done' (its share of the batch is complete).
--------------------------------------------------------------------------------

CREATE TABLE pgpipe.consumer_groups (
    name            text        PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.:,+-]{1,200}$'),
    -- NULL means all channels (pgpipe_admin only), as for consumers.
    channels        text[],
    -- The role that made the group: only it (or pgpipe_admin) joins it.
    owner           oid         NOT NULL,
    -- The snapshot that closed the last finished batch.
    prev            pg_snapshot NOT NULL,
    -- The open batch's snapshot; NULL while no batch is open.
    cur             pg_snapshot,
    -- Number of the open (or last) batch.
    batch           bigint      NOT NULL DEFAULT 0,
    -- The open batch's assignment: slots[v + 1][i] is the member delivering slot i at
    -- version v (a two-dimensional array; one row per version).
    slots           text[],
    -- A member not seen for this long is dead even if its session lingers.
    member_timeout  interval    NOT NULL DEFAULT '30 seconds',
    -- When `prev` last moved (an idle group moves it only now and then).
    prev_at         timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pgpipe.consumer_groups IS
    'pgpipe consumer groups: members share the events of their channels by key; see pgpipe.group_members';
CREATE INDEX consumers_group_name_idx ON pgpipe.consumers (group_name) WHERE group_name IS NOT NULL;

-- The slot (1..slots) of an event: by its key, or by its transaction when it has none
-- (jsonb's text form is canonical, so equal keys hash alike).
CREATE FUNCTION pgpipe.group_slot(e pgpipe.events, slots integer) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT 1 + ((hashtextextended(coalesce(nullif(e.key, 'null'::jsonb)::text, 'xid:' || e.xid::text), 0)
                 & 9223372036854775807) % slots)::integer
$$;

-- Whether a member is alive: its session holds its lease and it called within the
-- group's member_timeout.
CREATE FUNCTION pgpipe.group_member_alive(c pgpipe.consumers, member_timeout interval) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(c.seen_at > now() - member_timeout, false)
       AND EXISTS (SELECT 1 FROM pg_stat_activity a
                   WHERE a.pid = c.holder_pid AND a.backend_start = c.holder_started)
$$;

-- The assignment row of version v of a group's open batch.
CREATE FUNCTION pgpipe.group_version_slots(g pgpipe.consumer_groups, v integer) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN g.slots IS NOT NULL THEN ARRAY(SELECT unnest(g.slots[v + 1 : v + 1])) END
$$;

-- The current assignment row (slot i -> member) of a group's open batch; NULL without one.
CREATE FUNCTION pgpipe.group_current_slots(g pgpipe.consumer_groups) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT pgpipe.group_version_slots(g, array_length(g.slots, 1) - 1)
$$;

CREATE TYPE pgpipe.group_position AS (batch bigint, version integer, last text);

CREATE FUNCTION pgpipe.parse_group_position(pos text) RETURNS pgpipe.group_position
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    parts text[] := string_to_array(pos, ':');
    result pgpipe.group_position;
BEGIN
    IF pos IS NULL OR cardinality(parts) <> 4 OR parts[1] <> 'g'
       OR parts[2] !~ '^[0-9]{1,18}$' OR parts[3] !~ '^[0-9]{1,9}$'
       OR NOT (parts[4] IN ('', 'done') OR parts[4] ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$') THEN
        RAISE EXCEPTION 'invalid group position %', coalesce(quote_literal(pos), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass a position returned by pgpipe.read_group().';
    END IF;
    result.batch := parts[2]::bigint;
    result.version := parts[3]::integer;
    result.last := parts[4];
    RETURN result;
END $$;

-- The member `member` for `what`: the caller owns it (or is pgpipe_admin), it belongs to
-- a group, and this session holds its lease. Marks it seen (at most every tenth of the
-- group's member_timeout, so an idle member does not write on every poll).
CREATE FUNCTION pgpipe.group_member(member text, what text) RETURNS pgpipe.consumers
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c pgpipe.consumers := pgpipe.owned_consumer(member, what);
    lease_timeout interval;
BEGIN
    IF c.group_name IS NULL THEN
        RAISE EXCEPTION 'consumer % is not a member of a consumer group', quote_literal(member)
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Read it with pgpipe.read(), or join a group with pgpipe.join_group().';
    END IF;
    IF c.holder_pid IS DISTINCT FROM pg_backend_pid() OR c.holder_started IS DISTINCT FROM
       (SELECT a.backend_start FROM pg_stat_activity a WHERE a.pid = pg_backend_pid()) THEN
        RAISE EXCEPTION 'member % of consumer group % is not held by this session', quote_literal(member), quote_literal(c.group_name)
            USING ERRCODE = 'object_in_use',
                  HINT = 'Take it with pgpipe.join_group() first; another session may hold it.';
    END IF;
    SELECT g.member_timeout INTO lease_timeout FROM pgpipe.consumer_groups g WHERE g.name = c.group_name;
    IF c.seen_at IS NULL OR c.seen_at < now() - lease_timeout / 10 THEN
        UPDATE pgpipe.consumers SET seen_at = now() WHERE consumers.name = member;
        c.seen_at := now();
    END IF;
    RETURN c;
END $$;

-- Moves group `group_name` on: hands the unfinished slots of departed members to live
-- ones, closes the open batch once every member of it is done, and (with may_open) opens
-- the next batch when events are waiting. Returns the group's row as it then is.
-- Decides without a lock and takes the group's row lock only to change something.
CREATE FUNCTION pgpipe.group_advance(group_name text, may_open boolean) RETURNS pgpipe.consumer_groups
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    g pgpipe.consumer_groups;
    locked boolean := false;
    live text[];
    current_slots text[];
    version integer;
    gone text[];
    next_slots text[];
    i integer;
    k integer := 0;
    snap pg_snapshot;
BEGIN
    LOOP
        IF locked THEN
            SELECT * INTO g FROM pgpipe.consumer_groups cg WHERE cg.name = group_name FOR UPDATE;
        ELSE
            SELECT * INTO g FROM pgpipe.consumer_groups cg WHERE cg.name = group_name;
        END IF;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'consumer group % does not exist', quote_literal(group_name)
                USING ERRCODE = 'undefined_object', HINT = 'Join it with pgpipe.join_group().';
        END IF;
        live := ARRAY(SELECT c.name FROM pgpipe.consumers c
                      WHERE c.group_name = g.name AND pgpipe.group_member_alive(c, g.member_timeout)
                      ORDER BY c.name);

        IF g.cur IS NOT NULL THEN
            version := array_length(g.slots, 1) - 1;
            current_slots := pgpipe.group_current_slots(g);
            -- Members of the batch that are gone before finishing their share.
            gone := ARRAY(
                SELECT DISTINCT s FROM unnest(current_slots) s
                WHERE NOT s = ANY (live)
                  AND NOT EXISTS (SELECT 1 FROM pgpipe.consumers c
                                  WHERE c.name = s AND c.group_name = g.name
                                    AND c.group_position = format('g:%s:%s:done', g.batch, version)));
            IF cardinality(gone) > 0 AND cardinality(live) > 0 THEN
                IF NOT locked THEN
                    locked := true;
                    CONTINUE;
                END IF;
                -- Their slots go round the live members, one new version.
                next_slots := current_slots;
                FOR i IN 1 .. cardinality(next_slots) LOOP
                    IF next_slots[i] = ANY (gone) THEN
                        next_slots[i] := live[1 + k % cardinality(live)];
                        k := k + 1;
                    END IF;
                END LOOP;
                UPDATE pgpipe.consumer_groups cg SET slots = cg.slots || next_slots
                WHERE cg.name = g.name RETURNING * INTO g;
                version := version + 1;
                current_slots := next_slots;
                -- Members that were done read again under the new version.
                PERFORM pg_notify('pgpipe_group', g.name);
                RAISE LOG 'pgpipe: consumer group % batch %: members % are gone, their slots go to %',
                    g.name, g.batch, gone, live;
            END IF;
            -- Closed when every member holding a slot has acknowledged its share.
            IF NOT EXISTS (
                SELECT 1 FROM unnest(current_slots) s
                WHERE NOT EXISTS (SELECT 1 FROM pgpipe.consumers c
                                  WHERE c.name = s AND c.group_name = g.name
                                    AND c.group_position = format('g:%s:%s:done', g.batch, version))) THEN
                IF NOT locked THEN
                    locked := true;
                    CONTINUE;
                END IF;
                UPDATE pgpipe.consumer_groups cg SET prev = cg.cur, cur = NULL, slots = NULL, prev_at = now()
                WHERE cg.name = g.name RETURNING * INTO g;
                UPDATE pgpipe.consumers c SET prev = g.prev WHERE c.group_name = g.name;
                -- Members waiting for the next batch read at once.
                PERFORM pg_notify('pgpipe_group', g.name);
            ELSE
                RETURN g;
            END IF;
        END IF;

        -- No batch open.
        IF NOT may_open OR cardinality(live) = 0 THEN
            RETURN g;
        END IF;
        snap := pg_current_snapshot();
        IF NOT EXISTS (
            SELECT 1 FROM pgpipe.events e
            WHERE e.xid >= pg_snapshot_xmin(g.prev) AND e.xid < pg_snapshot_xmax(snap)
              AND pg_visible_in_snapshot(e.xid, snap) AND NOT pg_visible_in_snapshot(e.xid, g.prev)
              AND (g.channels IS NULL OR e.channel = ANY (g.channels))) THEN
            -- Nothing to share. Move an idle group's snapshot on now and then (retention,
            -- shorter scans), not on every poll (each move is a write).
            IF g.prev_at < now() - g.member_timeout / 10 THEN
                UPDATE pgpipe.consumer_groups cg SET prev = snap, prev_at = now()
                WHERE cg.name = g.name AND cg.cur IS NULL AND cg.prev::text = g.prev::text
                RETURNING * INTO g;
                IF FOUND THEN
                    UPDATE pgpipe.consumers c SET prev = g.prev WHERE c.group_name = g.name;
                END IF;
            END IF;
            RETURN g;
        END IF;
        IF NOT locked THEN
            locked := true;
            CONTINUE;
        END IF;
        -- Every committed transaction of `snap` is visible to the members' later reads.
        UPDATE pgpipe.consumer_groups cg
        SET cur = pg_current_snapshot(), batch = cg.batch + 1, slots = ARRAY[live]
        WHERE cg.name = g.name RETURNING * INTO g;
        -- Members that are gone for good leave no row behind (a live one that was only
        -- slow joins again).
        DELETE FROM pgpipe.consumers c WHERE c.group_name = g.name AND NOT c.name = ANY (live);
        RETURN g;
    END LOOP;
END $$;

-- Joins consumer group `group_name` as `member` (a consumer of the calling role), making
-- the group on first use with `channels`, `start` ('beginning' or 'now', as for
-- register_consumer) and `member_timeout`. Takes the member's lease for this session.
-- Returns the member's position, or NULL while another session holds this member.
CREATE FUNCTION pgpipe.join_group(group_name text, member text, channels text[],
                                  start text DEFAULT 'beginning',
                                  member_timeout interval DEFAULT '30 seconds')
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    g pgpipe.consumer_groups;
    c pgpipe.consumers;
    me oid := (SELECT r.oid FROM pg_roles r WHERE r.rolname = session_user);
    wanted text[] := ARRAY(SELECT DISTINCT x FROM unnest(channels) x ORDER BY 1);
    chan text;
BEGIN
    IF group_name IS NULL OR group_name !~ '^[A-Za-z0-9_.:,+-]{1,200}$' THEN
        RAISE EXCEPTION 'invalid consumer group name %', coalesce(quote_literal(group_name), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use 1 to 200 letters, digits, ''_'', ''.'', '':'', '','', ''+'' or ''-''.';
    END IF;
    IF member_timeout IS NULL OR member_timeout < interval '1 second' THEN
        RAISE EXCEPTION 'member_timeout must be at least 1 second' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF start IS NULL OR start NOT IN ('beginning', 'now') THEN
        RAISE EXCEPTION 'invalid start %', coalesce(quote_literal(start), 'NULL')
            USING ERRCODE = 'invalid_parameter_value', HINT = 'start is ''beginning'' or ''now''.';
    END IF;
    IF channels IS NOT NULL THEN
        FOREACH chan IN ARRAY channels LOOP
            PERFORM pgpipe.check_channel(chan);
        END LOOP;
    ELSE
        wanted := NULL;
    END IF;
    PERFORM pgpipe.require_channels_readable(wanted, 'read');

    INSERT INTO pgpipe.consumer_groups (name, channels, owner, prev, member_timeout)
    VALUES (group_name, wanted, me,
            CASE WHEN start = 'now' THEN pg_current_snapshot() ELSE '1:1:'::pg_snapshot END,
            join_group.member_timeout)
    ON CONFLICT ON CONSTRAINT consumer_groups_pkey DO NOTHING;
    SELECT * INTO g FROM pgpipe.consumer_groups cg WHERE cg.name = group_name;
    IF NOT pg_has_role(session_user, g.owner, 'USAGE') AND NOT pgpipe.is_admin() THEN
        RAISE EXCEPTION 'role % may not join consumer group %: it belongs to role %',
            quote_ident(session_user), quote_literal(group_name), coalesce(quote_ident(g.owner::regrole::text), g.owner::text)
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Start your forwarders with a group of your own (pgpipe listen --group NAME).';
    END IF;
    IF g.channels IS DISTINCT FROM wanted THEN
        RAISE EXCEPTION 'consumer group % reads channels %, not %', quote_literal(group_name),
            coalesce(array_to_string(g.channels, ','), 'all'), coalesce(array_to_string(wanted, ','), 'all')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Start every member with the same --channel list, or use another --group.';
    END IF;

    SELECT * INTO c FROM pgpipe.consumers WHERE consumers.name = member;
    IF FOUND THEN
        c := pgpipe.owned_consumer(member, 'join', true);
        IF c.group_name IS DISTINCT FROM join_group.group_name THEN
            RAISE EXCEPTION 'consumer % exists and is not a member of consumer group %', quote_literal(member), quote_literal(group_name)
                USING ERRCODE = 'duplicate_object',
                      HINT = 'Give the member another name (pgpipe listen --group-member NAME).';
        END IF;
    ELSE
        IF member IS NULL OR member !~ '^[A-Za-z0-9_.:,+-]{1,200}$' THEN
            RAISE EXCEPTION 'invalid member name %', coalesce(quote_literal(member), 'NULL')
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Use 1 to 200 letters, digits, ''_'', ''.'', '':'', '','', ''+'' or ''-''.';
        END IF;
        INSERT INTO pgpipe.consumers (name, channels, prev, owner, group_name, group_position)
        VALUES (member, wanted, g.prev, me, group_name, 'g:0:0:')
        ON CONFLICT ON CONSTRAINT consumers_pkey DO NOTHING;
        IF NOT FOUND THEN
            -- Made by another session a moment ago.
            RETURN pgpipe.join_group(group_name, member, channels, start, member_timeout);
        END IF;
    END IF;
    IF NOT pgpipe.try_claim_consumer(member) THEN
        RETURN NULL;
    END IF;
    UPDATE pgpipe.consumers SET seen_at = now() WHERE consumers.name = member
    RETURNING group_position INTO c.group_position;
    RETURN c.group_position;
END $$;

-- This member's share of the open batch: the events of the slots it holds, in id order,
-- pages of at most max_events after a position (default: its acknowledged one). Every row
-- carries the position just after it; ack the last one (pgpipe.ack_group) once its events
-- are handled. With nothing (more) to deliver one row comes back with only a position.
CREATE FUNCTION pgpipe.read_group(member text, after text DEFAULT NULL, max_events integer DEFAULT 1000)
RETURNS TABLE (
    "position"  text,
    id          uuid,
    channel     text,
    operation   text,
    payload     jsonb,
    source      text,
    created_at  timestamptz,
    xid         xid8,
    lsn         pg_lsn,
    key         jsonb
)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c pgpipe.consumers;
    g pgpipe.consumer_groups;
    pos pgpipe.group_position;
    version integer;
    now_slots text[];
    then_slots text[];
    then_finished boolean := false;
    last_id uuid;
    prefix text;
    rows_returned integer;
BEGIN
    IF max_events IS NULL OR max_events < 1 THEN
        RAISE EXCEPTION 'max_events must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    c := pgpipe.group_member(member, 'read');
    PERFORM pgpipe.require_channels_readable(c.channels, 'read');
    pos := pgpipe.parse_group_position(coalesce(after, c.group_position));
    g := pgpipe.group_advance(c.group_name, true);
    version := coalesce(array_length(g.slots, 1) - 1, 0);
    now_slots := pgpipe.group_current_slots(g);
    prefix := format('g:%s:%s:', g.batch, version);
    IF g.cur IS NULL OR NOT member = ANY (now_slots) THEN
        -- No batch, or one opened before this member joined: wait for the next.
        RETURN QUERY SELECT prefix || 'done', NULL::uuid, NULL::text, NULL::text, NULL::jsonb,
                            NULL::text, NULL::timestamptz, NULL::xid8, NULL::pg_lsn, NULL::jsonb;
        RETURN;
    END IF;
    IF pos.batch > g.batch OR (pos.batch = g.batch AND pos.version > version) THEN
        RAISE EXCEPTION 'invalid group position %: consumer group % is at batch % version %',
            quote_literal(coalesce(after, c.group_position)), quote_literal(c.group_name), g.batch, version
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass a position returned by pgpipe.read_group().';
    END IF;
    IF pos.batch < g.batch THEN
        -- A new batch: the whole share under the current assignment.
        then_slots := now_slots;
    ELSE
        then_slots := pgpipe.group_version_slots(g, pos.version);
        then_finished := pos.last = 'done';
        last_id := nullif(nullif(pos.last, ''), 'done')::uuid;
        IF then_finished AND pos.version = version THEN
            RETURN QUERY SELECT prefix || 'done', NULL::uuid, NULL::text, NULL::text, NULL::jsonb,
                                NULL::text, NULL::timestamptz, NULL::xid8, NULL::pg_lsn, NULL::jsonb;
            RETURN;
        END IF;
    END IF;

    RETURN QUERY
    WITH page AS (
        SELECT * FROM pgpipe.group_page(g.prev, g.cur, g.channels, member, now_slots, then_slots,
                                        then_finished, last_id, max_events)
        WHERE NOT (then_slots = now_slots AND last_id IS NOT NULL)
        UNION ALL
        SELECT * FROM pgpipe.group_page_after(g.prev, g.cur, g.channels, member, now_slots,
                                              last_id, max_events)
        WHERE then_slots = now_slots AND last_id IS NOT NULL
    ), numbered AS (
        SELECT p.*, row_number() OVER (ORDER BY p.id) AS n, count(*) OVER () AS total
        FROM page p
    )
    SELECT prefix || CASE WHEN nb.n = nb.total AND nb.total < max_events THEN 'done' ELSE nb.id::text END,
           nb.id, nb.channel, nb.operation, nb.payload, nb.source, nb.created_at, nb.xid, nb.lsn, nb.key
    FROM numbered nb
    ORDER BY nb.id;
    GET DIAGNOSTICS rows_returned = ROW_COUNT;

    IF rows_returned = 0 THEN
        RETURN QUERY SELECT prefix || 'done', NULL::uuid, NULL::text, NULL::text, NULL::jsonb,
                            NULL::text, NULL::timestamptz, NULL::xid8, NULL::pg_lsn, NULL::jsonb;
    ELSE
        UPDATE pgpipe.consumers SET group_events = group_events + rows_returned
        WHERE consumers.name = member;
    END IF;
END $$;

-- A page of a member's share from the batch's start: the events of its slots under
-- `now_slots` that it did not already get under `then_slots` (an older assignment of the
-- same batch, read up to `then_last`, or completely when `then_finished`).
CREATE FUNCTION pgpipe.group_page(prev pg_snapshot, cur pg_snapshot, chans text[], member text,
                                  now_slots text[], then_slots text[], then_finished boolean,
                                  then_last uuid, max_events integer)
RETURNS SETOF pgpipe.events
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT e.* FROM pgpipe.events e
    CROSS JOIN LATERAL (SELECT pgpipe.group_slot(e, cardinality(now_slots)) AS slot) s
    WHERE e.xid >= pg_snapshot_xmin(prev) AND e.xid < pg_snapshot_xmax(cur)
      AND pg_visible_in_snapshot(e.xid, cur) AND NOT pg_visible_in_snapshot(e.xid, prev)
      AND (chans IS NULL OR e.channel = ANY (chans))
      AND now_slots[s.slot] = member
      AND (then_slots[s.slot] <> member OR (NOT then_finished AND (then_last IS NULL OR e.id > then_last)))
    ORDER BY e.id
    LIMIT max_events
$$;

-- Later pages walk the primary key from the last id, as pgpipe.batch_page_after does.
CREATE FUNCTION pgpipe.group_page_after(prev pg_snapshot, cur pg_snapshot, chans text[], member text,
                                        now_slots text[], last_id uuid, max_events integer)
RETURNS SETOF pgpipe.events
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp SET enable_sort = off SET enable_bitmapscan = off
SET plan_cache_mode = force_custom_plan AS $$
    SELECT e.* FROM pgpipe.events e
    WHERE e.id > last_id
      AND e.xid >= pg_snapshot_xmin(prev) AND e.xid < pg_snapshot_xmax(cur)
      AND pg_visible_in_snapshot(e.xid, cur) AND NOT pg_visible_in_snapshot(e.xid, prev)
      AND (chans IS NULL OR e.channel = ANY (chans))
      AND now_slots[pgpipe.group_slot(e, cardinality(now_slots))] = member
    ORDER BY e.id
    LIMIT max_events
$$;

-- Records that this member handled everything up to `position`; a share completed
-- ('...:done') may close the batch.
CREATE FUNCTION pgpipe.ack_group(member text, "position" text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c pgpipe.consumers := pgpipe.group_member(member, 'acknowledge');
    pos pgpipe.group_position := pgpipe.parse_group_position("position");
BEGIN
    UPDATE pgpipe.consumers
    SET group_position = ack_group."position", acked_at = now(), seen_at = now()
    WHERE consumers.name = member;
    IF pos.last = 'done' THEN
        PERFORM pgpipe.group_advance(c.group_name, false);
    END IF;
END $$;

-- Tells the group this member is alive while it reads nothing (its adapters are busy).
CREATE FUNCTION pgpipe.group_heartbeat(member text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pgpipe.group_member(member, 'keep alive');
END $$;

-- Leaves the group: the member's row goes, and slots it had not finished go to the others
-- at once. Returns false when there was no such member.
CREATE FUNCTION pgpipe.leave_group(member text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c pgpipe.consumers;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgpipe.consumers WHERE consumers.name = member) THEN
        RETURN false;
    END IF;
    c := pgpipe.owned_consumer(member, 'leave with', true);
    IF c.group_name IS NULL THEN
        RAISE EXCEPTION 'consumer % is not a member of a consumer group', quote_literal(member)
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Drop it with pgpipe.drop_consumer().';
    END IF;
    DELETE FROM pgpipe.consumers WHERE consumers.name = member;
    PERFORM pgpipe.group_advance(c.group_name, false);
    RETURN true;
END $$;

-- Removes a group and its members (its owner or pgpipe_admin). Returns false when there
-- was none.
CREATE FUNCTION pgpipe.drop_group(group_name text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    g pgpipe.consumer_groups;
BEGIN
    SELECT * INTO g FROM pgpipe.consumer_groups cg WHERE cg.name = group_name FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF NOT pg_has_role(session_user, g.owner, 'USAGE') AND NOT pgpipe.is_admin() THEN
        RAISE EXCEPTION 'role % may not drop consumer group %: it belongs to role %',
            quote_ident(session_user), quote_literal(group_name), coalesce(quote_ident(g.owner::regrole::text), g.owner::text)
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    DELETE FROM pgpipe.consumers c WHERE c.group_name = g.name;
    DELETE FROM pgpipe.consumer_groups cg WHERE cg.name = g.name;
    RETURN true;
END $$;

-- Each group's members: whether they are alive, the slots they hold in the open batch,
-- the events the group gave them and their share of those. A role sees its own groups
-- (pgpipe_admin: all).
CREATE VIEW pgpipe.group_members WITH (security_barrier) AS
SELECT g.name AS "group",
       c.name AS member,
       c.owner::regrole AS owner,
       holder.description AS holder,
       pgpipe.group_member_alive(c, g.member_timeout) AS alive,
       g.batch,
       (SELECT count(*) FROM unnest(pgpipe.group_current_slots(g)) s WHERE s = c.name) AS slots,
       c.group_position AS "position",
       c.group_events AS events,
       round(c.group_events::numeric / nullif(sum(c.group_events) OVER (PARTITION BY g.name), 0), 3) AS share,
       c.seen_at
FROM pgpipe.consumer_groups g
JOIN pgpipe.consumers c ON c.group_name = g.name
LEFT JOIN LATERAL (
    SELECT format('pid %s (%s%s)', a.pid, coalesce(nullif(a.application_name, ''), 'no application_name'),
                  coalesce(' from ' || host(a.client_addr), '')) AS description
    FROM pg_stat_activity a
    WHERE a.pid = c.holder_pid AND a.backend_start = c.holder_started
) holder ON true
WHERE pg_has_role(session_user, g.owner, 'USAGE') OR pg_has_role(session_user, 'pgpipe_admin', 'USAGE');

-- A consumer that acknowledged nothing (since it was registered) for
-- pgpipe.consumer_stale_after: it holds retention back and nobody may be running it.
CREATE OR REPLACE FUNCTION pgpipe.is_stale(c pgpipe.consumers) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    -- A group member waiting for others acknowledges nothing new but is seen (seen_at).
    SELECT greatest(c.acked_at, c.seen_at, c.created_at) < now() - make_interval(secs => pgpipe.consumer_stale_after())
$$;

-- The oldest transaction id some consumer may still need; NULL without consumers
-- (then nothing is removed). A consumer group waits for every member: its `prev` moves
-- only when all of them finished a batch, and it counts even while no member runs.
CREATE OR REPLACE FUNCTION pgpipe.retention_horizon() RETURNS xid8
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT min(x) FROM (
        SELECT pg_snapshot_xmin(prev) AS x FROM pgpipe.consumers
        UNION ALL
        SELECT pg_snapshot_xmin(prev) FROM pgpipe.consumer_groups
    ) horizons
$$;

DROP FUNCTION pgpipe.status();
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

REVOKE ALL ON ALL TABLES IN SCHEMA pgpipe FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgpipe FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgpipe FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgpipe.status() TO pgpipe_consumer;
GRANT EXECUTE ON FUNCTION
    pgpipe.join_group(text, text, text[], text, interval),
    pgpipe.read_group(text, text, integer),
    pgpipe.ack_group(text, text),
    pgpipe.group_heartbeat(text),
    pgpipe.leave_group(text),
    pgpipe.drop_group(text),
    pgpipe.group_member_alive(pgpipe.consumers, interval),
    pgpipe.group_current_slots(pgpipe.consumer_groups),
    pgpipe.group_version_slots(pgpipe.consumer_groups, integer)
TO pgpipe_consumer;
GRANT SELECT ON pgpipe.group_members TO pgpipe_consumer;
SELECT pg_catalog.pg_extension_config_dump('pgpipe.consumer_groups', '');

-- Newcomers' messages and partitions (issue 17): a partition's events name its
-- subscribed table (native trigger), subscribing a partition of a subscribed table (or
-- its parent) is refused, a default channel that is no valid channel name says to pass
-- channel =>, and subscribe('MixedCase') hints to double-quote the name.
-- The channel of a subscription: `channel`, or the table's name (schema-qualified
-- outside public) when none is given; checked, with a hint when the name made it.
CREATE FUNCTION pgpipe.subscription_channel(tbl regclass, channel text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    derived text;
BEGIN
    IF channel IS NOT NULL THEN
        RETURN pgpipe.check_channel(channel);
    END IF;
    SELECT CASE WHEN n.nspname = 'public' THEN c.relname ELSE n.nspname || '.' || c.relname END INTO derived
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = tbl;
    IF derived !~ '^[A-Za-z0-9_.:-]{1,63}$' THEN
        RAISE EXCEPTION 'invalid channel name %: the default channel is the table''s name, and % is no valid channel name',
            quote_literal(derived), tbl
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('Pass a channel of 1 to 63 letters, digits, ''_'', ''.'', '':'' or ''-'': SELECT pgpipe.subscribe(%L, channel => %L);',
                                tbl::text, left(regexp_replace(derived, '[^A-Za-z0-9_.:-]+', '_', 'g'), 63));
    END IF;
    RETURN pgpipe.check_channel(derived);
END $$;

-- Refuses to subscribe a partition of a subscribed table, or a partitioned table one of
-- whose partitions is subscribed: the parent's capture covers its partitions (its events
-- name the parent), so the partition's changes would be captured twice.
CREATE FUNCTION pgpipe.check_partitions(tbl regclass) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    other regclass;
BEGIN
    SELECT s.relid INTO other FROM pgpipe.subscription s
    WHERE s.relid IN (SELECT a.relid FROM pg_partition_ancestors(tbl) a) AND s.relid <> tbl;
    IF other IS NOT NULL THEN
        RAISE EXCEPTION 'cannot subscribe %: it is a partition of %, which is subscribed', tbl, other
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = format('The changes of %s are captured as events of %s already (named after %s).', tbl, other, other),
                  HINT = format('Subscribe one of the two: keep %s, or SELECT pgpipe.unsubscribe(%L); first.', other, other::text);
    END IF;
    SELECT s.relid INTO other FROM pgpipe.subscription s
    WHERE s.relid IN (SELECT t.relid FROM pg_partition_tree(tbl) t) AND s.relid <> tbl;
    IF other IS NOT NULL THEN
        RAISE EXCEPTION 'cannot subscribe %: its partition % is subscribed', tbl, other
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = format('A subscription of %s captures the changes of its partitions, so those of %s would be captured twice.', tbl, other),
                  HINT = format('Subscribe one of the two: keep %s, or SELECT pgpipe.unsubscribe(%L); first.', other, other::text);
    END IF;
END $$;

-- The table a name means, as regclass input resolves it (through the caller's
-- search_path, unquoted names folded to lower case); when it means none but the name
-- with its case kept does ('MixedCase' for "MixedCase"), the error says how to write it.
CREATE FUNCTION pgpipe.table_named(name text) RETURNS regclass
LANGUAGE plpgsql STABLE AS $$
DECLARE
    code text;
    message text;
    quoted text;
BEGIN
    RETURN name::pg_catalog.regclass;
EXCEPTION WHEN undefined_table OR invalid_schema_name THEN
    GET STACKED DIAGNOSTICS code = RETURNED_SQLSTATE, message = MESSAGE_TEXT;
    quoted := (SELECT pg_catalog.string_agg(pg_catalog.quote_ident(u.part), '.' ORDER BY u.n)
               FROM pg_catalog.unnest(pg_catalog.string_to_array(name, '.')) WITH ORDINALITY AS u(part, n));
    IF pg_catalog.strpos(name, '"') = 0 AND pg_catalog.to_regclass(quoted) IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message,
            HINT = pg_catalog.format('Unquoted names are folded to lower case: to name table %s, double-quote it: %L.',
                                     pg_catalog.to_regclass(quoted), quoted);
    END IF;
    RAISE;
END $$;

-- subscribe() with the table's name as text, which an unquoted literal picks
-- (subscribe('orders')): the regclass version, with table_named's hint when the name's
-- case matters. Takes the same arguments.
CREATE FUNCTION pgpipe.subscribe(
    "table"    text,
    channel    text   DEFAULT NULL,
    operations text[] DEFAULT ARRAY['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE'],
    mode       text   DEFAULT 'trigger',
    replica_identity_full boolean DEFAULT false,
    columns    text[] DEFAULT NULL,
    exclude_columns text[] DEFAULT NULL,
    snapshot   boolean DEFAULT false,
    "where"    text   DEFAULT NULL
) RETURNS text
LANGUAGE sql AS $$
    SELECT pgpipe.subscribe(pgpipe.table_named($1), $2, $3, $4, $5, $6, $7, $8, $9)
$$;

REVOKE ALL ON FUNCTION
    pgpipe.subscription_channel(regclass, text),
    pgpipe.check_partitions(regclass),
    pgpipe.table_named(text),
    pgpipe.subscribe(text, text, text[], text, boolean, text[], text[], boolean, text)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    pgpipe.subscribe(text, text, text[], text, boolean, text[], text[], boolean, text),
    pgpipe.table_named(text)
TO pgpipe_producer;

--------------------------------------------------------------------------------
-- row filters (issue 15): subscribe(..., "where" => ...), pgpipe.subscription.row_filter
-- and subscriptions."where" (with subscription_row_filter, in the column choice's section
-- above), check_row_filter, row_filter_sql, when_filter_sql, create_row_triggers, publish
-- with a filter; drop_capture_triggers, subscribe and snapshot_next_chunk are edited
-- where they are defined above
--------------------------------------------------------------------------------

DROP FUNCTION pgpipe.publish(regclass);
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

-- Row filters: subscribe(..., "where" => 'total > 100') captures only the rows that match.
-- A filter may hold exactly what Postgres accepts in a publication's row filter (CREATE
-- PUBLICATION ... WHERE): the table's columns, constants, built-in immutable operators
-- and functions, built-in types; no user-defined function, operator, type or collation,
-- no subquery, aggregate, window function or system column. Why: in WAL mode Postgres's
-- own pgoutput evaluates the filter inside pgpipe's background worker, a superuser
-- process, and refuses user code there by construction; trigger mode (a WHEN clause,
-- evaluated as the writer) takes the same rule, so both modes give the same events.
-- So no filter ever runs user code with elevated rights, and checking one runs none:
-- Postgres parses and checks it as it checks a publication's.
--
-- pgpipe.check_row_filter returns the filter as Postgres stored it (the prqual of a
-- scratch publication, dropped at once), NULL without one. Everything afterwards (the
-- publication, the triggers' WHEN clauses, the text pgpipe.subscription keeps) is made
-- from that tree, never from the caller's text, which only ever goes inside the scratch
-- CREATE PUBLICATION: one statement (a ';' is refused), in a subtransaction. In WAL
-- mode (`wal`) a filter on a column outside the replica identity is refused too:
-- Postgres would then fail every UPDATE and DELETE of the table (pgpipe's publication
-- publishes them for all its tables, whichever operations a subscription captures).
-- The WARNING that wal_level is too low for publications is silenced for this step.
CREATE FUNCTION pgpipe.check_row_filter(tbl regclass, filter text, wal boolean, replica_identity_full boolean)
RETURNS pg_node_tree
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET client_min_messages = error AS $$
DECLARE
    scratch text := format('pgpipe_row_filter_check_%s', pg_backend_pid());
    hint text := 'A row filter may use the table''s columns, constants and built-in immutable operators and functions '
                 'of built-in types, as a publication''s WHERE may: no user-defined functions, operators, types or '
                 'collations, no subqueries, aggregates, window functions or system columns.';
    shown text := '"' || filter || '"';
    depth int := 0;
    ch text;
    qual pg_node_tree;
    used text[];
    state text;
    message text;
    detail text;
    pg_hint text;
    offender record;
BEGIN
    IF filter IS NULL THEN
        RETURN NULL;
    END IF;
    IF btrim(filter) = '' THEN
        RAISE EXCEPTION 'row filter of table % is empty', tbl
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass a condition such as "where" => ''total > 100'', or leave "where" out to capture every row.';
    END IF;
    -- The text goes inside WHERE ( ... ): it must not end that statement or close the
    -- parenthesis early. Quoted strings and identifiers are skipped when counting.
    IF strpos(filter, ';') > 0 THEN
        RAISE EXCEPTION 'row filter % of table % is not valid: it contains a ";"', shown, tbl
            USING ERRCODE = 'syntax_error', HINT = hint;
    END IF;
    FOREACH ch IN ARRAY regexp_split_to_array(
            regexp_replace(filter, '''([^'']|'''')*''|"([^"]|"")*"', '', 'g'), '') LOOP
        depth := depth + CASE ch WHEN '(' THEN 1 WHEN ')' THEN -1 ELSE 0 END;
        EXIT WHEN depth < 0;
    END LOOP;
    IF depth <> 0 THEN
        RAISE EXCEPTION 'row filter % of table % is not valid: its parentheses do not match', shown, tbl
            USING ERRCODE = 'syntax_error', HINT = hint;
    END IF;
    BEGIN
        EXECUTE format(E'CREATE PUBLICATION %I FOR TABLE %s WHERE (%s\n) WITH (publish_via_partition_root = true)',
                       scratch, tbl, filter);
        SELECT pr.prqual,
               ARRAY(SELECT a.attname::text FROM pg_depend d
                     JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                     WHERE d.classid = 'pg_publication_rel'::regclass AND d.objid = pr.oid
                       AND d.refclassid = 'pg_class'::regclass AND d.refobjid = tbl AND d.refobjsubid > 0
                     ORDER BY a.attnum)
        INTO qual, used
        FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
        WHERE p.pubname = scratch AND pr.prrelid = tbl;
        EXECUTE format('DROP PUBLICATION %I', scratch);
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT,
                                detail = PG_EXCEPTION_DETAIL, pg_hint = PG_EXCEPTION_HINT;
        message := format('row filter %s of table %s is not valid: %s', shown, tbl, message);
        hint := concat_ws(' ', nullif(pg_hint, ''), hint);
        IF detail = '' THEN
            RAISE EXCEPTION USING MESSAGE = message, ERRCODE = state, HINT = hint;
        END IF;
        RAISE EXCEPTION USING MESSAGE = message, ERRCODE = state, DETAIL = detail, HINT = hint;
    END;
    IF qual IS NULL THEN
        RAISE EXCEPTION 'row filter % of table % is not valid', shown, tbl
            USING ERRCODE = 'syntax_error', HINT = hint;
    END IF;
    IF wal THEN
        -- Postgres checks the table, or each of its partitions (where rows are written),
        -- against its own replica identity; FULL holds every column.
        SELECT p.relid::regclass AS rel, string_agg(quote_ident(col.name), ', ' ORDER BY col.n) AS names
        INTO offender
        FROM (SELECT tbl::oid AS relid UNION SELECT t.relid FROM pg_partition_tree(tbl) t WHERE t.isleaf) p
        JOIN pg_class c ON c.oid = p.relid
        CROSS JOIN unnest(used) WITH ORDINALITY AS col(name, n)
        WHERE c.relkind <> 'p'
          AND c.relreplident <> 'f' AND NOT (replica_identity_full AND p.relid = tbl)
          AND NOT EXISTS (
              SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[])
              WHERE i.indrelid = p.relid AND a.attname = col.name
                AND CASE c.relreplident WHEN 'd' THEN i.indisprimary WHEN 'i' THEN i.indisreplident ELSE false END)
        GROUP BY p.relid
        ORDER BY p.relid
        LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'row filter % of table % uses column % outside the replica identity of %, which mode ''wal'' cannot filter on',
                shown, tbl, offender.names, offender.rel
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = 'Postgres refuses UPDATE and DELETE on a published table whose row filter uses a column outside its replica identity.',
                      HINT = CASE WHEN offender.rel = tbl
                                  THEN 'Pass replica_identity_full => true (REPLICA IDENTITY FULL), filter on the primary-key columns only, or use mode => ''trigger''.'
                                  ELSE format('Run ALTER TABLE %s REPLICA IDENTITY FULL, filter on the primary-key columns only, or use mode => ''trigger''.', offender.rel)
                             END;
        END IF;
    END IF;
    RETURN qual;
END $$;

-- A row filter's tree as SQL whose columns are qualified by `alias` (new, old, t; '':
-- unqualified): the WHEN clauses of the capture triggers, the snapshot's WHERE. Native
-- (pgpipe_ext/src/capture/filter.rs): Postgres's own deparser, so the text means the tree.
CREATE FUNCTION pgpipe.row_filter_sql(filter pg_node_tree, tbl regclass, alias text) RETURNS text
LANGUAGE c STABLE STRICT AS 'MODULE_PATHNAME', 'pgpipe_row_filter_sql';

-- The row filter in the WHEN clause of a capture trigger of pgpipe.create_row_triggers
-- (pg_trigger.tgqual) as SQL, as row_filter_sql; NULL when the clause holds none.
CREATE FUNCTION pgpipe.when_filter_sql("when" pg_node_tree, tbl regclass, alias text) RETURNS text
LANGUAGE c STABLE STRICT AS 'MODULE_PATHNAME', 'pgpipe_when_filter_sql';

-- Creates the row triggers of a trigger-mode subscription for the row operations `ops`.
-- Their arguments, positional: the channel; the captured columns ('2 3 5'; '' or none:
-- every column); the event's operation when it is not the one that fired (an UPDATE that
-- moves a row into or out of the row filter is an INSERT or a DELETE).
-- Without a row filter one trigger, pgpipe_capture, fires for them all. With one, each
-- case has its own trigger whose WHEN clause holds the filter, so a row that does not
-- match costs no trigger call; the filter is TRUE or it does not match (NULL: no), as in
-- a publication. `ops` are the events' operations: an UPDATE into the filter is captured
-- when INSERT is, one out of it when DELETE is (as WAL mode, where pgoutput turns them
-- into an INSERT and a DELETE before the worker sees them).
CREATE FUNCTION pgpipe.create_row_triggers(tbl regclass, channel text, ops text[], attnums int2[], row_filter pg_node_tree)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    columns text := coalesce(array_to_string(attnums, ' '), '');
    new_matches text;
    old_matches text;
    t record;
BEGIN
    IF row_filter IS NULL THEN
        IF cardinality(ops) > 0 THEN
            EXECUTE format(
                'CREATE TRIGGER pgpipe_capture AFTER %s ON %s FOR EACH ROW EXECUTE FUNCTION pgpipe.capture_row(%L%s)',
                array_to_string(ops, ' OR '), tbl, channel,
                CASE WHEN attnums IS NULL THEN '' ELSE format(', %L', columns) END);
        END IF;
        RETURN;
    END IF;
    new_matches := format('(%s) IS TRUE', pgpipe.row_filter_sql(row_filter, tbl, 'new'));
    old_matches := format('(%s) IS TRUE', pgpipe.row_filter_sql(row_filter, tbl, 'old'));
    FOR t IN
        SELECT * FROM (VALUES
            ('pgpipe_capture_insert', 'INSERT', 'INSERT', new_matches, NULL),
            ('pgpipe_capture_update', 'UPDATE', 'UPDATE', old_matches || ' AND ' || new_matches, NULL),
            ('pgpipe_capture_update_in', 'UPDATE', 'INSERT', 'NOT ' || old_matches || ' AND ' || new_matches, 'INSERT'),
            ('pgpipe_capture_update_out', 'UPDATE', 'DELETE', old_matches || ' AND NOT ' || new_matches, 'DELETE'),
            ('pgpipe_capture_delete', 'DELETE', 'DELETE', old_matches, NULL)
        ) AS v(name, fires_on, operation, condition, event_operation)
        WHERE v.operation = ANY (ops)
    LOOP
        EXECUTE format(
            'CREATE TRIGGER %I AFTER %s ON %s FOR EACH ROW WHEN (%s) EXECUTE FUNCTION pgpipe.capture_row(%L, %L%s)',
            t.name, t.fires_on, tbl, t.condition, channel, columns,
            CASE WHEN t.event_operation IS NULL THEN '' ELSE format(', %L', t.event_operation) END);
    END LOOP;
END $$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgpipe FROM PUBLIC;

--------------------------------------------------------------------------------
-- unsubscribe(text), snapshot(text), cancel_snapshot(text): the name as text, with
-- table_named's hint to double-quote a mixed-case name (issue 17)
--------------------------------------------------------------------------------
-- unsubscribe() with the table's name as text (see subscribe(text, ...)).
CREATE FUNCTION pgpipe.unsubscribe("table" text) RETURNS boolean
LANGUAGE sql AS $$
    SELECT pgpipe.unsubscribe(pgpipe.table_named($1))
$$;

-- snapshot() and cancel_snapshot() with the table's name as text (see subscribe(text, ...)).
CREATE FUNCTION pgpipe.snapshot("table" text) RETURNS bigint
LANGUAGE sql AS $$
    SELECT pgpipe.snapshot(pgpipe.table_named($1))
$$;
CREATE FUNCTION pgpipe.cancel_snapshot("table" text) RETURNS boolean
LANGUAGE sql AS $$
    SELECT pgpipe.cancel_snapshot(pgpipe.table_named($1))
$$;

REVOKE ALL ON FUNCTION
    pgpipe.unsubscribe(text),
    pgpipe.snapshot(text),
    pgpipe.cancel_snapshot(text)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    pgpipe.unsubscribe(text),
    pgpipe.snapshot(text),
    pgpipe.cancel_snapshot(text)
TO pgpipe_producer;

--------------------------------------------------------------------------------
-- ATTACH PARTITION of a subscribed table under a subscribed one is refused (issue 17)
--------------------------------------------------------------------------------
-- ATTACH PARTITION of a subscribed table under a subscribed one (at any level) is
-- refused, as subscribing either of them then is (pgpipe.check_partitions): the parent's
-- capture covers the new partition, so its changes would be captured twice. (In trigger
-- mode Postgres usually refuses first: the parent's trigger clone collides by name.)
CREATE FUNCTION pgpipe.refuse_double_capture() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    child regclass;
    parent regclass;
BEGIN
    SELECT s.relid, p.relid INTO child, parent
    FROM pgpipe.subscription s
    CROSS JOIN LATERAL pg_partition_ancestors(s.relid) a
    JOIN pgpipe.subscription p ON p.relid = a.relid
    WHERE a.relid <> s.relid
    ORDER BY s.relid
    LIMIT 1;
    IF child IS NOT NULL THEN
        RAISE EXCEPTION 'cannot make % a partition of %: both are subscribed', child, parent
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = format('A subscription of %s captures the changes of its partitions, so those of %s would be captured twice.', parent, child),
                  HINT = format('Unsubscribe one of the two first: SELECT pgpipe.unsubscribe(%L);', child::text);
    END IF;
END $$;
CREATE EVENT TRIGGER pgpipe_refuse_double_capture ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE')
    EXECUTE FUNCTION pgpipe.refuse_double_capture();
REVOKE ALL ON FUNCTION pgpipe.refuse_double_capture() FROM PUBLIC;

--------------------------------------------------------------------------------
-- pgpipe.ensure_slot() refuses a transaction that has written before it waits (issue 11)
--------------------------------------------------------------------------------
-- A writing transaction cannot create the slot; waiting for the creators' lock while
-- another creator waited for it to end was a deadlock, and the creator the deadlock
-- detector aborted could leave its half-made slot visible to the next one for a moment.
-- (Its grants stay as they were.)
-- Creates pgpipe's replication slot if there is none yet and returns its confirmed LSN.
-- Must run before the transaction writes anything (a Postgres rule for slot creation).
-- Refuses to replace a slot that was lost: see pgpipe.recreate_slot().
CREATE OR REPLACE FUNCTION pgpipe.ensure_slot() RETURNS pg_lsn
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
