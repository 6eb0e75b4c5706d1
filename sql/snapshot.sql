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
-- last event applied is the newest state. With a row filter only matching rows are read;
-- a row that comes to match later arrives as an INSERT (an UPDATE into the filter), one
-- that stops matching as a DELETE, so the same holds for the filtered table.
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

-- snapshot() and cancel_snapshot() with the table's name as text (see subscribe(text, ...)).
CREATE FUNCTION pgpipe.snapshot("table" text) RETURNS bigint
LANGUAGE sql AS $$
    SELECT pgpipe.snapshot(pgpipe.table_named($1))
$$;
CREATE FUNCTION pgpipe.cancel_snapshot("table" text) RETURNS boolean
LANGUAGE sql AS $$
    SELECT pgpipe.cancel_snapshot(pgpipe.table_named($1))
$$;

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
