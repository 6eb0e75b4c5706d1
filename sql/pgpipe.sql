-- pgpipe: the queue, trigger capture, and the consumer API.
-- Everything lives in schema pgpipe (the control file's schema). Identifiers reach dynamic
-- SQL only through regclass output or format('%I'/%L'); SECURITY DEFINER functions pin
-- search_path.

--------------------------------------------------------------------------------
-- The queue
--------------------------------------------------------------------------------

CREATE TABLE pgpipe.events (
    id          uuid        NOT NULL DEFAULT pgpipe.uuid_generate_v7(),
    channel     text        NOT NULL,
    operation   text        NOT NULL,
    payload     jsonb       NOT NULL,
    source      text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    xid         xid8        NOT NULL DEFAULT pg_current_xact_id(),
    lsn         pg_lsn,
    -- A key of a partitioned table must hold the partition key; id alone is unique anyway.
    PRIMARY KEY (id, xid)
) PARTITION BY RANGE (xid);
COMMENT ON TABLE pgpipe.events IS
    'pgpipe queue: one row per captured change or emitted event; read it through pgpipe.read()';
-- Batches select by transaction id range (see pgpipe.read).
CREATE INDEX events_xid_idx ON pgpipe.events (xid);
-- Rows whose xid no range partition covers yet (pgpipe.rotate() creates those ahead).
CREATE TABLE pgpipe.events_default PARTITION OF pgpipe.events DEFAULT;

--------------------------------------------------------------------------------
-- Validation helpers
--------------------------------------------------------------------------------

-- Channels travel in URLs (/events/{channel}), file names and NOTIFY channel names, so
-- they are kept to a portable alphabet.
CREATE FUNCTION pgpipe.check_channel(channel text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF channel IS NULL OR channel !~ '^[A-Za-z0-9_.:-]{1,63}$' THEN
        RAISE EXCEPTION 'invalid channel name %', coalesce(quote_literal(channel), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use 1 to 63 letters, digits, ''_'', ''.'', '':'' or ''-''.';
    END IF;
    RETURN channel;
END $$;

-- Upper-cases, checks and de-duplicates a list of operations.
CREATE FUNCTION pgpipe.check_operations(operations text[]) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    op text;
    result text[] := '{}';
BEGIN
    IF operations IS NULL OR cardinality(operations) = 0 THEN
        RAISE EXCEPTION 'no operations given'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass some of INSERT, UPDATE, DELETE, TRUNCATE.';
    END IF;
    FOREACH op IN ARRAY operations LOOP
        op := upper(btrim(coalesce(op, '')));
        IF op NOT IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE') THEN
            RAISE EXCEPTION 'unknown operation %', quote_literal(op)
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Operations are INSERT, UPDATE, DELETE and TRUNCATE.';
        END IF;
        IF NOT op = ANY (result) THEN
            result := result || op;
        END IF;
    END LOOP;
    RETURN result;
END $$;

--------------------------------------------------------------------------------
-- Trigger capture
--------------------------------------------------------------------------------

-- Row trigger: TG_ARGV[0] is the channel. No NOTIFY here: NOTIFY takes a global lock at
-- commit and would serialize writers; consumers are woken another way (see README).
-- Names are schema-qualified as well as search_path pinned: a writer's own operators
-- must never run as the definer.
CREATE FUNCTION pgpipe.capture_row() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_row jsonb;
    old_row jsonb;
    woken boolean;
BEGIN
    IF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
        new_row := pg_catalog.to_jsonb(OLD);
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
        new_row := pg_catalog.to_jsonb(NEW);
        old_row := pg_catalog.to_jsonb(OLD);
    ELSE
        new_row := pg_catalog.to_jsonb(NEW);
    END IF;
    INSERT INTO pgpipe.events (id, channel, operation, payload, source)
    VALUES (pgpipe.uuid_generate_v7(), TG_ARGV[0], TG_OP,
            pg_catalog.jsonb_build_object('op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
                                          'row', new_row, 'old', old_row),
            'trigger');
    woken := pgpipe.mark_wakeup();
    RETURN NULL;
END $$;

-- Statement trigger for TRUNCATE (row triggers do not fire for it).
CREATE FUNCTION pgpipe.capture_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    woken boolean;
BEGIN
    INSERT INTO pgpipe.events (id, channel, operation, payload, source)
    VALUES (pgpipe.uuid_generate_v7(), TG_ARGV[0], 'TRUNCATE',
            jsonb_build_object('op', 'TRUNCATE', 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
                               'row', NULL, 'old', NULL),
            'trigger');
    woken := pgpipe.mark_wakeup();
    RETURN NULL;
END $$;

--------------------------------------------------------------------------------
-- Subscriptions
--------------------------------------------------------------------------------

CREATE TABLE pgpipe.subscription (
    relid       oid         PRIMARY KEY,
    channel     text        NOT NULL,
    operations  text[]      NOT NULL,
    mode        text        NOT NULL CHECK (mode IN ('trigger', 'wal')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE VIEW pgpipe.subscriptions AS
SELECT s.relid::regclass AS "table", s.channel, s.operations, s.mode, s.created_at, s.updated_at
FROM pgpipe.subscription s
JOIN pg_catalog.pg_class c ON c.oid = s.relid;

-- Drops pgpipe's capture triggers from a table (if present).
CREATE FUNCTION pgpipe.drop_capture_triggers(tbl regclass) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    trigger_name name;
BEGIN
    FOR trigger_name IN
        SELECT tgname FROM pg_trigger
        WHERE tgrelid = tbl AND tgname IN ('pgpipe_capture', 'pgpipe_capture_truncate')
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', trigger_name, tbl);
    END LOOP;
END $$;

-- Installs capture on a table. Idempotent: subscribing again replaces the channel,
-- operations and mode of the existing subscription. Returns the channel.
-- mode => 'wal' captures through logical decoding in the background worker (see "WAL
-- capture" below); replica_identity_full => true lets a table without a primary key be
-- captured that way by setting REPLICA IDENTITY FULL on it.
-- Switching modes locks the table against writers for the switch, so every change is
-- captured exactly once: by the trigger before, by the WAL after (or the other way).
CREATE FUNCTION pgpipe.subscribe(
    "table"    regclass,
    channel    text   DEFAULT NULL,
    operations text[] DEFAULT ARRAY['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE'],
    mode       text   DEFAULT 'trigger',
    replica_identity_full boolean DEFAULT false
) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel record;
    ops text[];
    row_ops text[];
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
    IF NOT pg_has_role(session_user, (SELECT relowner FROM pg_class WHERE oid = "table"), 'USAGE') THEN
        RAISE EXCEPTION 'must be the owner of table % to subscribe it', "table"
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    mode := lower(coalesce(mode, ''));
    IF mode NOT IN ('trigger', 'wal') THEN
        RAISE EXCEPTION 'unknown mode %', quote_literal(mode)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'mode is ''trigger'' or ''wal''.';
    END IF;
    channel := pgpipe.check_channel(coalesce(channel,
        CASE WHEN rel.nspname = 'public' THEN rel.relname ELSE rel.nspname || '.' || rel.relname END));
    ops := pgpipe.check_operations(operations);
    IF mode = 'wal' THEN
        -- First, before this transaction writes: it may have to create the slot.
        PERFORM pgpipe.prepare_wal_capture("table", coalesce(replica_identity_full, false));
    END IF;

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
        PERFORM pgpipe.publish("table");
        row_ops := '{}';
    ELSE
        PERFORM pgpipe.unpublish("table");
        row_ops := ARRAY(SELECT o FROM unnest(ops) o WHERE o <> 'TRUNCATE');
    END IF;
    IF cardinality(row_ops) > 0 THEN
        EXECUTE format(
            'CREATE TRIGGER pgpipe_capture AFTER %s ON %s FOR EACH ROW EXECUTE FUNCTION pgpipe.capture_row(%L)',
            array_to_string(row_ops, ' OR '), "table", channel);
    END IF;
    IF mode = 'trigger' AND 'TRUNCATE' = ANY (ops) THEN
        EXECUTE format(
            'CREATE TRIGGER pgpipe_capture_truncate AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION pgpipe.capture_truncate(%L)',
            "table", channel);
    END IF;

    INSERT INTO pgpipe.subscription AS s (relid, channel, operations, mode)
    VALUES ("table", channel, ops, mode)
    ON CONFLICT (relid) DO UPDATE
        SET channel = excluded.channel, operations = excluded.operations,
            mode = excluded.mode, updated_at = now();
    RETURN channel;
END $$;

-- Removes capture from a table. Returns false when it was not subscribed.
CREATE FUNCTION pgpipe.unsubscribe("table" regclass) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT pg_has_role(session_user, (SELECT relowner FROM pg_class WHERE oid = "table"), 'USAGE') THEN
        RAISE EXCEPTION 'must be the owner of table % to unsubscribe it', "table"
            USING ERRCODE = 'insufficient_privilege';
    END IF;
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

-- A dropped table takes its subscription with it.
CREATE FUNCTION pgpipe.forget_dropped_tables() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM pgpipe.subscription s
    USING pg_event_trigger_dropped_objects() d
    WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0 AND s.relid = d.objid;
END $$;
CREATE EVENT TRIGGER pgpipe_forget_dropped_tables ON sql_drop
    EXECUTE FUNCTION pgpipe.forget_dropped_tables();

--------------------------------------------------------------------------------
-- Transactional outbox
--------------------------------------------------------------------------------

-- Queues an application event in the caller's transaction. Returns its id.
CREATE FUNCTION pgpipe.emit(channel text, payload jsonb, operation text DEFAULT 'EMIT')
RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_id uuid := pgpipe.uuid_generate_v7();
    woken boolean;
BEGIN
    IF operation IS NULL OR btrim(operation) = '' THEN
        RAISE EXCEPTION 'operation must be a non-empty string' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF coalesce(nullif(current_setting('pgpipe.emit_mode', true), ''), 'queue') <> 'queue' THEN
        -- Through the WAL, in commit order with WAL-mode captures (see "WAL capture").
        RETURN pgpipe.emit_wal(pgpipe.check_channel(channel), coalesce(payload, 'null'::jsonb), operation);
    END IF;
    INSERT INTO pgpipe.events (id, channel, operation, payload, source)
    VALUES (new_id, pgpipe.check_channel(channel), operation, coalesce(payload, 'null'::jsonb), 'emit');
    woken := pgpipe.mark_wakeup();
    RETURN new_id;
END $$;

--------------------------------------------------------------------------------
-- Consumer API
--
-- A consumer reads the queue in batches delimited by transaction snapshots (as PgQ
-- does): a batch holds the events whose transactions are visible in snapshot `cur` but
-- were not in `prev`, the snapshot that closed the previous batch. Commit order of
-- concurrent transactions therefore cannot make a reader skip an event, which
-- `WHERE id > last_id` alone would. Within a batch events come in id order; a large
-- batch is paged by the last id returned.
--
-- A position is text: '<prev>/<cur>/<last id>' while paging inside a batch, and
-- '<prev>//' once a batch is finished (the next read takes a new snapshot).
--------------------------------------------------------------------------------

CREATE TABLE pgpipe.consumers (
    name        text        PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.:,+-]{1,200}$'),
    channels    text[],
    prev        pg_snapshot NOT NULL,
    cur         pg_snapshot,
    last_id     uuid,
    created_at  timestamptz NOT NULL DEFAULT now(),
    acked_at    timestamptz
);
COMMENT ON COLUMN pgpipe.consumers.channels IS 'channels the consumer reads; NULL means all';

CREATE TYPE pgpipe.read_position AS (prev pg_snapshot, cur pg_snapshot, last_id uuid);

CREATE FUNCTION pgpipe.parse_position(pos text) RETURNS pgpipe.read_position
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    parts text[] := string_to_array(pos, '/');
    result pgpipe.read_position;
BEGIN
    IF pos IS NULL OR cardinality(parts) <> 3 OR parts[1] = '' OR (parts[2] = '' AND parts[3] <> '') THEN
        RAISE EXCEPTION 'invalid position %', coalesce(quote_literal(pos), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass a position returned by pgpipe.read().';
    END IF;
    BEGIN
        result.prev := parts[1]::pg_snapshot;
        result.cur := nullif(parts[2], '')::pg_snapshot;
        result.last_id := nullif(parts[3], '')::uuid;
    EXCEPTION WHEN data_exception THEN
        RAISE EXCEPTION 'invalid position %', quote_literal(pos)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass a position returned by pgpipe.read().';
    END;
    RETURN result;
END $$;

CREATE FUNCTION pgpipe.format_position(p pgpipe.read_position) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT p.prev::text || '/' || coalesce(p.cur::text, '') || '/' || coalesce(p.last_id::text, '')
$$;

-- Registers a consumer, or updates the channels of an existing one (its position is kept).
-- start => 'beginning' reads every event still in the queue; 'now' only later ones.
-- Returns the consumer's position.
CREATE FUNCTION pgpipe.register_consumer(name text, channels text[] DEFAULT NULL, start text DEFAULT 'beginning')
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
    SELECT * INTO existing FROM pgpipe.consumers WHERE consumers.name = register_consumer.name FOR UPDATE;
    IF FOUND THEN
        UPDATE pgpipe.consumers SET channels = register_consumer.channels
        WHERE consumers.name = register_consumer.name;
        RETURN pgpipe.format_position(ROW(existing.prev, existing.cur, existing.last_id));
    END IF;
    INSERT INTO pgpipe.consumers (name, channels, prev)
    VALUES (register_consumer.name, register_consumer.channels,
            CASE WHEN start = 'now' THEN pg_current_snapshot() ELSE '1:1:'::pg_snapshot END)
    RETURNING pgpipe.format_position(ROW(prev, cur, last_id)) INTO c;
    RETURN c;
END $$;

CREATE FUNCTION pgpipe.drop_consumer(name text) RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH d AS (DELETE FROM pgpipe.consumers c WHERE c.name = drop_consumer.name RETURNING 1)
    SELECT count(*) > 0 FROM d
$$;

-- Takes the consumer's lease for this session (a session advisory lock), so a second
-- forwarder for the same consumer waits as a hot standby. Returns false when another
-- session holds it.
CREATE FUNCTION pgpipe.try_claim_consumer(name text) RETURNS boolean
LANGUAGE sql AS $$
    SELECT pg_try_advisory_lock(hashtextextended('pgpipe.consumer:' || name, 0))
$$;

-- The consumer's acknowledged position.
CREATE FUNCTION pgpipe.consumer_position(name text) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c pgpipe.consumers;
BEGIN
    SELECT * INTO c FROM pgpipe.consumers WHERE consumers.name = consumer_position.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'consumer % does not exist', quote_literal(name)
            USING ERRCODE = 'undefined_object',
                  HINT = 'Create it with pgpipe.register_consumer().';
    END IF;
    RETURN pgpipe.format_position(ROW(c.prev, c.cur, c.last_id));
END $$;

-- The first page of a batch: the events of the batch's transactions, by xid range.
CREATE FUNCTION pgpipe.batch_first_page(prev pg_snapshot, cur pg_snapshot, chans text[], max_events integer)
RETURNS SETOF pgpipe.events
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT e.* FROM pgpipe.events e
    WHERE e.xid >= pg_snapshot_xmin(prev) AND e.xid < pg_snapshot_xmax(cur)
      AND pg_visible_in_snapshot(e.xid, cur) AND NOT pg_visible_in_snapshot(e.xid, prev)
      AND (chans IS NULL OR e.channel = ANY (chans))
    ORDER BY e.id
    LIMIT max_events
$$;

-- Later pages of a large batch walk the primary key from the last id. Left to itself the
-- planner, expecting few rows for freshly written transactions, re-scans and re-sorts the
-- whole batch for every page, which is quadratic in the batch (BENCHMARKS.md).
CREATE FUNCTION pgpipe.batch_page_after(prev pg_snapshot, cur pg_snapshot, last_id uuid, chans text[], max_events integer)
RETURNS SETOF pgpipe.events
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp SET enable_sort = off SET enable_bitmapscan = off
SET plan_cache_mode = force_custom_plan AS $$
    SELECT e.* FROM pgpipe.events e
    WHERE e.id > last_id
      AND e.xid >= pg_snapshot_xmin(prev) AND e.xid < pg_snapshot_xmax(cur)
      AND pg_visible_in_snapshot(e.xid, cur) AND NOT pg_visible_in_snapshot(e.xid, prev)
      AND (chans IS NULL OR e.channel = ANY (chans))
    ORDER BY e.id
    LIMIT max_events
$$;

-- Reads up to max_events events after a position (default: the consumer's acknowledged
-- one). Every row carries the position just after it; ack the last row's position once
-- its events are handled. When there is nothing to deliver, one row comes back with only
-- a position (id IS NULL): acking it lets the consumer move on.
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
    lsn         pg_lsn
)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    chans text[];
    pos pgpipe.read_position;
    rows_returned integer;
BEGIN
    IF max_events IS NULL OR max_events < 1 THEN
        RAISE EXCEPTION 'max_events must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT c.channels INTO chans FROM pgpipe.consumers c WHERE c.name = read.consumer;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'consumer % does not exist', quote_literal(consumer)
            USING ERRCODE = 'undefined_object',
                  HINT = 'Create it with pgpipe.register_consumer().';
    END IF;
    pos := pgpipe.parse_position(coalesce(after, pgpipe.consumer_position(consumer)));
    IF pos.cur IS NULL THEN
        -- Start a new batch: everything committed from here on is visible to the query
        -- below, which runs with a later statement snapshot.
        pos.cur := pg_current_snapshot();
        pos.last_id := NULL;
    END IF;

    RETURN QUERY
    WITH page AS (
        SELECT * FROM pgpipe.batch_first_page(pos.prev, pos.cur, chans, max_events)
        WHERE pos.last_id IS NULL
        UNION ALL
        SELECT * FROM pgpipe.batch_page_after(pos.prev, pos.cur, pos.last_id, chans, max_events)
        WHERE pos.last_id IS NOT NULL
    ), numbered AS (
        SELECT p.*, row_number() OVER (ORDER BY p.id) AS n, count(*) OVER () AS total
        FROM page p
    )
    SELECT CASE WHEN nb.n = nb.total AND nb.total < max_events
                THEN pos.cur::text || '//'
                ELSE pos.prev::text || '/' || pos.cur::text || '/' || nb.id::text END,
           nb.id, nb.channel, nb.operation, nb.payload, nb.source, nb.created_at, nb.xid, nb.lsn
    FROM numbered nb
    ORDER BY nb.id;
    GET DIAGNOSTICS rows_returned = ROW_COUNT;

    IF rows_returned = 0 THEN
        -- The batch is finished: the next one starts after `cur`.
        RETURN QUERY SELECT pos.cur::text || '//', NULL::uuid, NULL::text, NULL::text, NULL::jsonb,
                            NULL::text, NULL::timestamptz, NULL::xid8, NULL::pg_lsn;
    END IF;
END $$;

-- Records that everything up to `position` has been handled.
CREATE FUNCTION pgpipe.ack(consumer text, "position" text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    pos pgpipe.read_position := pgpipe.parse_position("position");
BEGIN
    UPDATE pgpipe.consumers c
    SET prev = pos.prev, cur = pos.cur, last_id = pos.last_id, acked_at = now()
    WHERE c.name = ack.consumer;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'consumer % does not exist', quote_literal(consumer)
            USING ERRCODE = 'undefined_object',
                  HINT = 'Create it with pgpipe.register_consumer().';
    END IF;
END $$;

-- Each consumer's acknowledged position and how many committed events it has not yet acked.
CREATE VIEW pgpipe.consumer_lag AS
SELECT c.name,
       c.channels,
       pgpipe.format_position(ROW(c.prev, c.cur, c.last_id)) AS "position",
       c.acked_at,
       pending.events AS pending_events,
       pending.oldest AS oldest_pending_at
FROM pgpipe.consumers c
CROSS JOIN LATERAL (
    SELECT count(*) AS events, min(e.created_at) AS oldest
    FROM pgpipe.events e
    WHERE e.xid >= pg_snapshot_xmin(c.prev)
      AND NOT pg_visible_in_snapshot(e.xid, c.prev)
      AND (c.cur IS NULL OR c.last_id IS NULL OR NOT pg_visible_in_snapshot(e.xid, c.cur) OR e.id > c.last_id)
      AND (c.channels IS NULL OR e.channel = ANY (c.channels))
) pending;

CREATE FUNCTION pgpipe.lag(consumer text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT pending_events FROM pgpipe.consumer_lag WHERE name = consumer
$$;

--------------------------------------------------------------------------------
-- Retention (PgQ-style rotation)
--
-- pgpipe.events is partitioned by transaction id range. An event whose xid is below the
-- xmin of every consumer's `prev` snapshot was delivered to all of them; a partition
-- whose whole range is below that horizon is emptied with TRUNCATE (a lock on that
-- partition only) and later dropped. Nothing is ever deleted row by row, so the queue
-- does not bloat under sustained load. pgpipe.rotate() also creates the partitions
-- ahead of the current xid; the forwarder and the background worker call it
-- periodically. Every lock it takes is bounded by a short lock_timeout: when writers or
-- readers hold the table it gives up and tries again next time.
--------------------------------------------------------------------------------

CREATE TABLE pgpipe.event_partitions (
    name       text PRIMARY KEY,
    lower_xid  xid8 NOT NULL,
    upper_xid  xid8 NOT NULL,
    truncated  boolean NOT NULL DEFAULT false
);

-- The oldest transaction id some consumer may still need; NULL without consumers
-- (then nothing is removed).
CREATE FUNCTION pgpipe.retention_horizon() RETURNS xid8
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT min(pg_snapshot_xmin(prev)) FROM pgpipe.consumers
$$;

-- Creates partitions ahead and removes the ones every consumer is past. Returns what it
-- did. `partition_xids` (setting pgpipe.partition_xids, default 1000000) is the number
-- of transaction ids a partition covers.
CREATE FUNCTION pgpipe.rotate() RETURNS TABLE (action text, partition_name text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    size bigint := coalesce(nullif(current_setting('pgpipe.partition_xids', true), '')::bigint, 1000000);
    next_xid bigint := pg_snapshot_xmax(pg_current_snapshot())::text::bigint;
    horizon xid8 := pgpipe.retention_horizon();
    lower_bound bigint;
    p pgpipe.event_partitions;
BEGIN
    IF size < 1000 THEN
        RAISE EXCEPTION 'pgpipe.partition_xids must be at least 1000' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- One rotation at a time.
    IF NOT pg_try_advisory_xact_lock(hashtextextended('pgpipe.rotate', 0)) THEN
        RETURN;
    END IF;
    PERFORM set_config('lock_timeout', '200ms', true);

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

--------------------------------------------------------------------------------
-- Privileges: the queue is written only through the functions above.
--------------------------------------------------------------------------------
REVOKE ALL ON pgpipe.events, pgpipe.events_default, pgpipe.event_partitions, pgpipe.subscription, pgpipe.consumers FROM PUBLIC;
GRANT USAGE ON SCHEMA pgpipe TO PUBLIC;
GRANT SELECT ON pgpipe.subscriptions TO PUBLIC;

-- pg_dump keeps subscriptions and consumer positions.
SELECT pg_catalog.pg_extension_config_dump('pgpipe.subscription', '');
SELECT pg_catalog.pg_extension_config_dump('pgpipe.consumers', '');

--------------------------------------------------------------------------------
-- Dead letters: events a forwarder adapter gave up on (retries exhausted, or an
-- answer that retrying cannot change, such as HTTP 400 or a constraint violation).
-- The forwarder records the event here and only then acknowledges it, so nothing is
-- lost; `pgpipe dlq list | replay | purge` works on this table.
--------------------------------------------------------------------------------
CREATE TABLE pgpipe.dead_letters (
    id         bigserial   PRIMARY KEY,
    event_id   uuid        NOT NULL,
    channel    text        NOT NULL,
    event      jsonb       NOT NULL,
    adapter    text        NOT NULL,
    error      text        NOT NULL,
    attempts   integer     NOT NULL,
    failed_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pgpipe.dead_letters IS
    'pgpipe dead letters: events an adapter could not deliver; replay them with `pgpipe dlq replay`';
CREATE INDEX dead_letters_failed_at_idx ON pgpipe.dead_letters (failed_at);
CREATE INDEX dead_letters_event_id_idx ON pgpipe.dead_letters (event_id);

-- Records one dead letter (the event envelope as JSON) and returns its id. SECURITY
-- DEFINER, like pgpipe.ack: the forwarder's role needs no rights on the table itself.
CREATE FUNCTION pgpipe.dead_letter(event jsonb, adapter text, error text, attempts integer)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_id bigint;
BEGIN
    IF event IS NULL OR jsonb_typeof(event) <> 'object' OR NOT (event ? 'id') THEN
        RAISE EXCEPTION 'pgpipe.dead_letter: event must be a JSON object with an "id"'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO pgpipe.dead_letters (event_id, channel, event, adapter, error, attempts)
    VALUES ((event->>'id')::uuid, coalesce(event->>'channel', ''), event,
            dead_letter.adapter, dead_letter.error, dead_letter.attempts)
    RETURNING id INTO new_id;
    RETURN new_id;
END $$;

-- Listing, replaying and purging dead letters is an operator's job: it needs SELECT and
-- DELETE on pgpipe.dead_letters (superusers and the extension owner have them).
REVOKE ALL ON pgpipe.dead_letters FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('pgpipe.dead_letters', '');
SELECT pg_catalog.pg_extension_config_dump('pgpipe.dead_letters_id_seq', '');

--------------------------------------------------------------------------------
-- Replay for live clients (Server-Sent Events Last-Event-ID)
--
-- A browser that reconnects to the forwarder's /events sends the id of the last event it
-- got. The forwarder answers from its in-memory history when it can (exact); after a
-- forwarder restart it asks the queue with pgpipe.events_after().
--
-- Ids are not commit order, so "id > last" alone can miss a transaction that started
-- before the last seen one and committed after it. events_after() returns, in id order,
-- the events of the channels that were created after the given event (id > its id) or
-- belong to a transaction that got its id after the given event's (xid > its xid): a
-- superset at the seam, where an overlapping transaction's event may be repeated (same
-- id; clients deduplicate) rather than skipped. An event of a transaction that both
-- started and wrote before the given event but committed after it is still not found;
-- the in-memory path has no such limit. Events are found while retention keeps them
-- (pgpipe.rotate()); an unknown id raises no_data_found.
--------------------------------------------------------------------------------

CREATE FUNCTION pgpipe.events_after(event_id uuid, channels text[] DEFAULT NULL, max_events integer DEFAULT 1000)
RETURNS TABLE (
    id          uuid,
    channel     text,
    operation   text,
    payload     jsonb,
    source      text,
    created_at  timestamptz,
    xid         xid8,
    lsn         pg_lsn
)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    last_xid xid8;
BEGIN
    IF max_events IS NULL OR max_events < 1 THEN
        RAISE EXCEPTION 'max_events must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT e.xid INTO last_xid FROM pgpipe.events e WHERE e.id = events_after.event_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'event % is not in the queue (retention removed it, or it never existed)',
            coalesce(event_id::text, 'NULL')
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN QUERY
    SELECT e.id, e.channel, e.operation, e.payload, e.source, e.created_at, e.xid, e.lsn
    FROM pgpipe.events e
    WHERE (e.id > events_after.event_id OR e.xid > last_xid)
      AND (events_after.channels IS NULL OR e.channel = ANY (events_after.channels))
    ORDER BY e.id
    LIMIT max_events;
END $$;

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
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = pgpipe.publication_name()) THEN
        EXECUTE pg_catalog.format('CREATE PUBLICATION %I WITH (publish_via_partition_root = true)',
                                  pgpipe.publication_name());
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

-- pgpipe.emit() under SET pgpipe.emit_mode = 'wal': the event travels as a transactional
-- logical decoding message (prefix 'pgpipe') and the worker queues it in commit order
-- with the WAL-mode changes of the same and other transactions. The worker mints its id
-- then (ids must follow commit order within the worker's batches), so emit returns NULL.
CREATE FUNCTION pgpipe.emit_wal(channel text, payload jsonb, operation text) RETURNS uuid
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
    PERFORM pg_logical_emit_message(true, 'pgpipe',
        jsonb_build_object('channel', channel, 'operation', operation, 'payload', payload)::text);
    RETURN NULL;
END $$;

-- Adds a table to pgpipe's publication (if not there yet).
CREATE FUNCTION pgpipe.publish(tbl regclass) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                   WHERE p.pubname = pgpipe.publication_name() AND pr.prrelid = tbl) THEN
        EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', pgpipe.publication_name(), tbl);
    END IF;
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
    pgpipe.prepare_wal_capture(regclass, boolean), pgpipe.publish(regclass), pgpipe.unpublish(regclass) FROM PUBLIC;

-- The background worker and the slot at a glance. One row.
--   worker_state: not_loaded (pgpipe not preloaded), not_running, starting,
--     waiting_for_extension, idle (no WAL subscription), streaming, slot_missing,
--     slot_invalidated, error (see last_error).
--   slot_status: none (no WAL subscription yet), missing (dropped), invalidated, or
--     pg_replication_slots.wal_status (reserved, extended, unreserved).
--   lag_bytes: WAL written since the slot's confirmed position.
--   lag_seconds: time since the worker last reached the end of the WAL.
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
    detail            text
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
           END
    FROM st
$$;
