-- pgpipe: dead letters.

--------------------------------------------------------------------------------
-- Dead letters: events a forwarder adapter gave up on (retries exhausted, or an
-- answer that retrying cannot change, such as HTTP 400 or a constraint violation).
-- The forwarder records the event here and only then acknowledges it, so nothing is
-- lost; `pgpipe dlq list | replay | purge` works on this table.
--------------------------------------------------------------------------------
CREATE TABLE pgpipe.dead_letters (
    id         bigserial   PRIMARY KEY,
    event_id   uuid        NOT NULL,
    channel    text        NOT NULL,
    event      jsonb       NOT NULL,
    adapter    text        NOT NULL,
    error      text        NOT NULL,
    attempts   integer     NOT NULL,
    failed_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pgpipe.dead_letters IS
    'pgpipe dead letters: events an adapter could not deliver; replay them with `pgpipe dlq replay`';
CREATE INDEX dead_letters_failed_at_idx ON pgpipe.dead_letters (failed_at);
CREATE INDEX dead_letters_event_id_idx ON pgpipe.dead_letters (event_id);

-- Records one dead letter (the event envelope as JSON) and returns its id. SECURITY
-- DEFINER, like pgpipe.ack: the forwarder's role needs no rights on the table itself.
-- Only for an event in the queue on a channel the calling role may read, and what
-- `dlq replay` will deliver is the queue's own channel, operation and payload, never
-- the caller's: a role cannot plant an event through the dead letters. (pgpipe_admin
-- may record any event, e.g. one of the listen_notify detector.)
CREATE FUNCTION pgpipe.dead_letter(event jsonb, adapter text, error text, attempts integer)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_id bigint;
    queued record;
    event_uuid uuid;
BEGIN
    IF event IS NULL OR jsonb_typeof(event) <> 'object' OR NOT (event ? 'id') THEN
        RAISE EXCEPTION 'pgpipe.dead_letter: event must be a JSON object with an "id"'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    BEGIN
        event_uuid := (event->>'id')::uuid;
    EXCEPTION WHEN invalid_text_representation THEN
        RAISE EXCEPTION 'pgpipe.dead_letter: event id % is not a UUID', quote_literal(event->>'id')
            USING ERRCODE = 'invalid_parameter_value';
    END;
    SELECT e.channel, e.operation, e.payload INTO queued FROM pgpipe.events e WHERE e.id = event_uuid;
    IF FOUND THEN
        PERFORM pgpipe.require_channels_readable(ARRAY[queued.channel], 'dead-letter an event of');
        event := event || jsonb_build_object('channel', queued.channel, 'operation', queued.operation,
                                             'payload', queued.payload);
    ELSIF NOT pgpipe.is_admin() THEN
        RAISE EXCEPTION 'pgpipe.dead_letter: event % is not in pgpipe.events', event_uuid
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'A forwarder''s role records dead letters only of queued events it may read.',
                  HINT = 'Events of the listen_notify and wal detectors are dead-lettered by a pgpipe_admin role.';
    END IF;
    INSERT INTO pgpipe.dead_letters (event_id, channel, event, adapter, error, attempts)
    VALUES (event_uuid, coalesce(event->>'channel', ''), event,
            dead_letter.adapter, dead_letter.error, dead_letter.attempts)
    RETURNING id INTO new_id;
    RETURN new_id;
END $$;

-- Listing, replaying and purging dead letters is an operator's job: pgpipe_admin has
-- SELECT and DELETE on pgpipe.dead_letters (sql/grants.sql).
REVOKE ALL ON pgpipe.dead_letters FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('pgpipe.dead_letters', '');
SELECT pg_catalog.pg_extension_config_dump('pgpipe.dead_letters_id_seq', '');
