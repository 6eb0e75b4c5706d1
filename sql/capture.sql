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
    column_attnums int2[],
    -- The row filter (subscribe's "where" =>), NULL: every row. SQL text as Postgres
    -- printed the filter it parsed and checked (pgpipe.check_row_filter), names
    -- qualified where pg_catalog does not find them. Text, not a tree: this table's rows
    -- are dumped (pg_extension_config_dump) and a pg_node_tree can be neither restored
    -- nor read by another major version. What captures is the tree Postgres keeps with
    -- the triggers or the publication (current after a column rename, dumped and
    -- upgraded with them): see pgpipe.subscription_row_filter.
    row_filter  text
);

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

-- Drops pgpipe's capture triggers from a table (if present): every trigger named
-- pgpipe_capture... that runs pgpipe's capture functions (see pgpipe.create_row_triggers).
CREATE FUNCTION pgpipe.drop_capture_triggers(tbl regclass) RETURNS void
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
-- "where" => 'total > 100' captures only the rows that match (pgpipe.check_row_filter,
-- pgpipe.create_row_triggers; README "Row filters").
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

-- unsubscribe() with the table's name as text (see subscribe(text, ...)).
CREATE FUNCTION pgpipe.unsubscribe("table" text) RETURNS boolean
LANGUAGE sql AS $$
    SELECT pgpipe.unsubscribe(pgpipe.table_named($1))
$$;

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
