-- pgpipe: trigger capture and subscriptions.

--------------------------------------------------------------------------------
-- Trigger capture
--------------------------------------------------------------------------------

-- Row trigger: TG_ARGV[0] is the channel. Native (pgpipe_ext/src/capture/): it builds the
-- payload with to_jsonb and writes the queue row straight into the partition of
-- pgpipe.events, without SPI. It is deliberately NOT SECURITY DEFINER: casts and output
-- functions of the captured columns run as the role that wrote the row, and writers need
-- no privilege on pgpipe's tables. No NOTIFY here: NOTIFY takes a global lock at commit
-- and would serialize writers; the committed transaction wakes the background worker.
CREATE FUNCTION pgpipe.capture_row() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'pgpipe_capture_row';

-- Statement trigger for TRUNCATE (row triggers do not fire for it); the same path.
CREATE FUNCTION pgpipe.capture_truncate() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'pgpipe_capture_truncate';

--------------------------------------------------------------------------------
-- Subscriptions
--------------------------------------------------------------------------------

CREATE TABLE pgpipe.subscription (
    relid       oid         PRIMARY KEY,
    channel     text        NOT NULL,
    operations  text[]      NOT NULL,
    mode        text        NOT NULL CHECK (mode IN ('trigger', 'wal')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    -- The captured columns (attribute numbers, resolved at subscribe), NULL: every column.
    -- Numbers, not names, so a renamed column stays captured (or left out).
    column_attnums int2[]
);

-- `columns`: the captured columns by their current names (NULL: all of them).
CREATE VIEW pgpipe.subscriptions AS
SELECT s.relid::regclass AS "table", s.channel, s.operations, s.mode, s.created_at, s.updated_at,
       (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_catalog.pg_attribute a
        WHERE a.attrelid = s.relid AND a.attnum = ANY (s.column_attnums) AND NOT a.attisdropped) AS columns
FROM pgpipe.subscription s
JOIN pg_catalog.pg_class c ON c.oid = s.relid;

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
CREATE FUNCTION pgpipe.drop_capture_triggers(tbl regclass) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    trigger_name name;
BEGIN
    PERFORM pgpipe.require_table_owner(tbl, 'remove capture from');
    FOR trigger_name IN
        SELECT tgname FROM pg_trigger
        WHERE tgrelid = tbl AND tgname IN ('pgpipe_capture', 'pgpipe_capture_truncate')
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', trigger_name, tbl);
    END LOOP;
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
    snapshot   boolean DEFAULT false
) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel record;
    ops text[];
    row_ops text[];
    denial text;
    attnums int2[];
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
        -- The captured columns travel as the trigger's second argument ('2 3 5').
        EXECUTE format(
            'CREATE TRIGGER pgpipe_capture AFTER %s ON %s FOR EACH ROW EXECUTE FUNCTION pgpipe.capture_row(%L%s)',
            array_to_string(row_ops, ' OR '), "table", channel,
            CASE WHEN attnums IS NULL THEN '' ELSE format(', %L', array_to_string(attnums, ' ')) END);
    END IF;
    IF mode = 'trigger' AND 'TRUNCATE' = ANY (ops) THEN
        EXECUTE format(
            'CREATE TRIGGER pgpipe_capture_truncate AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION pgpipe.capture_truncate(%L)',
            "table", channel);
    END IF;

    INSERT INTO pgpipe.channel_sources (channel, relid) VALUES (channel, "table")
    ON CONFLICT DO NOTHING;
    INSERT INTO pgpipe.subscription AS s (relid, channel, operations, mode, column_attnums)
    VALUES ("table", channel, ops, mode, attnums)
    ON CONFLICT (relid) DO UPDATE
        SET channel = excluded.channel, operations = excluded.operations,
            mode = excluded.mode, column_attnums = excluded.column_attnums, updated_at = now();
    IF snapshot THEN
        -- The existing rows as READ events (sql/snapshot.sql), once capture is in place.
        PERFORM pgpipe.snapshot("table");
    END IF;
    RETURN channel;
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
    snapshot   boolean DEFAULT false
) RETURNS text
LANGUAGE sql AS $$
    SELECT pgpipe.subscribe(pgpipe.table_named($1), $2, $3, $4, $5, $6, $7, $8)
$$;

-- Removes capture from a table. Returns false when it was not subscribed.
CREATE FUNCTION pgpipe.unsubscribe("table" regclass) RETURNS boolean
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
