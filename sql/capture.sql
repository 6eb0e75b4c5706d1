-- pgpipe: trigger capture and subscriptions.

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
