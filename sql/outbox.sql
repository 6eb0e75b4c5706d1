-- pgpipe: the transactional outbox (pgpipe.emit).

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
