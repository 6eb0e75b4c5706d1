-- pgpipe: retention of the queue (PgQ-style rotation).

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
-- (then nothing is removed). A consumer group waits for every member: its `prev` moves
-- only when all of them finished a batch, and it counts even while no member runs.
CREATE FUNCTION pgpipe.retention_horizon() RETURNS xid8
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT min(x) FROM (
        SELECT pg_snapshot_xmin(prev) AS x FROM pgpipe.consumers
        UNION ALL
        SELECT pg_snapshot_xmin(prev) FROM pgpipe.consumer_groups
    ) horizons
$$;

-- Creates partitions ahead and removes the ones every consumer is past. Returns what it
-- did. `partition_xids` (setting pgpipe.partition_xids, default 1000000) is the number
-- of transaction ids a partition covers. pgpipe_admin only (sql/grants.sql).
CREATE FUNCTION pgpipe.rotate() RETURNS TABLE (action text, partition_name text)
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
