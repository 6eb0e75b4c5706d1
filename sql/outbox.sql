-- pgpipe: the transactional outbox (pgpipe.emit).

--------------------------------------------------------------------------------
-- Transactional outbox
--------------------------------------------------------------------------------

-- Queues an application event in the caller's transaction. Returns its id. Needs the
-- pgpipe_producer role (sql/roles.sql). `key` is the event's ordering key (a JSON object,
-- e.g. '{"order_id": 7}'; NULL: none): adapters keep one key's events in order.
CREATE FUNCTION pgpipe.emit(channel text, payload jsonb, operation text DEFAULT 'EMIT', key jsonb DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_id uuid := pgpipe.uuid_generate_v7();
    woken boolean;
    denial text;
BEGIN
    IF operation IS NULL OR btrim(operation) = '' THEN
        RAISE EXCEPTION 'operation must be a non-empty string' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF key IS NOT NULL AND jsonb_typeof(key) <> 'object' THEN
        RAISE EXCEPTION 'key must be a JSON object or NULL, not a JSON %', jsonb_typeof(key)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass key => ''{"order_id": 7}''::jsonb, the columns that identify what the event is about.';
    END IF;
    channel := pgpipe.check_channel(channel);
    -- A channel that carries a table's changes takes write rights on that table: no
    -- role forges another table's changes.
    denial := pgpipe.channel_write_denial(channel);
    IF denial IS NOT NULL THEN
        RAISE EXCEPTION 'role % may not emit on channel %: %', quote_ident(session_user), quote_literal(channel), denial
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Emit on a channel of your own, or have the table''s owner GRANT INSERT ON it to the role.';
    END IF;
    IF coalesce(nullif(current_setting('pgpipe.emit_mode', true), ''), 'queue') <> 'queue' THEN
        -- Through the WAL, in commit order with WAL-mode captures (see "WAL capture").
        RETURN pgpipe.emit_wal(channel, coalesce(payload, 'null'::jsonb), operation, key);
    END IF;
    INSERT INTO pgpipe.events (id, channel, operation, payload, source, key)
    VALUES (new_id, channel, operation, coalesce(payload, 'null'::jsonb), 'emit', key);
    woken := pgpipe.mark_wakeup();
    RETURN new_id;
END $$;
