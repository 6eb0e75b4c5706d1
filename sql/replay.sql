-- pgpipe: replay for live clients (SSE Last-Event-ID).

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
-- (pgpipe.rotate()); an unknown id (or one of another channel) raises no_data_found.
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
