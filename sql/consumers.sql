-- pgpipe: the consumer API (snapshot batches, positions, acks, lag).

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
    acked_at    timestamptz,
    -- The role that registered it: only that role (or pgpipe_admin) uses it.
    owner       oid         NOT NULL,
    -- The session holding the consumer's lease (pgpipe.try_claim_consumer): a backend's
    -- pid and start time, so a reused pid is not mistaken for the holder.
    holder_pid      integer,
    holder_started  timestamptz,
    claimed_at      timestamptz,
    -- Consumer groups (sql/groups.sql): the group this consumer is a member of, its
    -- acknowledged group position, how many events the group gave it, and when it last
    -- called (its liveness beside its lease).
    group_name      text,
    group_position  text,
    group_events    bigint      NOT NULL DEFAULT 0,
    seen_at         timestamptz
);
COMMENT ON COLUMN pgpipe.consumers.channels IS 'channels the consumer reads; NULL means all (pgpipe_admin only)';
COMMENT ON COLUMN pgpipe.consumers.owner IS 'the role that registered the consumer; only it (or pgpipe_admin) may use it';

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
CREATE FUNCTION pgpipe.drop_consumer(name text) RETURNS boolean
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
CREATE FUNCTION pgpipe.try_claim_consumer(name text) RETURNS boolean
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
CREATE FUNCTION pgpipe.consumer_position(name text) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c pgpipe.consumers := pgpipe.owned_consumer(name, 'read');
BEGIN
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

-- Records that everything up to `position` has been handled.
CREATE FUNCTION pgpipe.ack(consumer text, "position" text) RETURNS void
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
    -- A group member waiting for others acknowledges nothing new but is seen (seen_at).
    SELECT greatest(c.acked_at, c.seen_at, c.created_at) < now() - make_interval(secs => pgpipe.consumer_stale_after())
$$;

-- Each consumer's acknowledged position and how many committed events it has not yet
-- acked; a role sees its own consumers (pgpipe_admin: all). `holder` is the session
-- holding its lease; `stale` means no ack for pgpipe.consumer_stale_after, and
-- `holds_retention` that it is the one keeping the oldest events in the queue.
CREATE VIEW pgpipe.consumer_lag WITH (security_barrier) AS
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

CREATE FUNCTION pgpipe.lag(consumer text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT pending_events FROM pgpipe.consumer_lag WHERE name = consumer
$$;
