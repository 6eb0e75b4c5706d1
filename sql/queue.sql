-- pgpipe: the queue and the validation helpers every other file uses.
-- Everything lives in schema pgpipe (the control file's schema). Identifiers reach dynamic
-- SQL only through regclass output or format('%I'/%L'); SECURITY DEFINER functions pin
-- search_path. The files run in the order pgpipe_ext/src/lib.rs gives them.

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
    -- The ordering key: the row's primary-key columns as an object (NULL for tables
    -- without one, TRUNCATE, and emits that give none). Last, so the read functions'
    -- SETOF pgpipe.events rows keep their order.
    key         jsonb,
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
