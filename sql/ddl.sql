-- pgpipe: schema-change events (operation 'DDL', source 'ddl').
--
-- An event trigger queues one event per command that changes a subscribed table (ALTER
-- TABLE: columns added, dropped, renamed or retyped, the table renamed, ...; DROP TABLE)
-- on the table's channel, with the command tag and the table's column list after it.
-- Order with the table's data changes: in trigger mode the event is written in the
-- command's transaction (ALTER TABLE and DROP TABLE hold an ACCESS EXCLUSIVE lock, so no
-- write of the table is concurrent with it); in WAL mode it travels through the WAL as
-- one of pgpipe's logical decoding messages, so the worker queues it in commit order
-- with the table's changes. The statement's text is not included: current_query() holds
-- the whole string the client sent, which may carry other statements (and secrets).

-- The columns of a table as the DDL event lists them.
CREATE FUNCTION pgpipe.table_columns(tbl oid) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'name', a.attname, 'type', format_type(a.atttypid, a.atttypmod),
               'not_null', a.attnotnull, 'position', a.attnum) ORDER BY a.attnum), '[]'::jsonb)
    FROM pg_attribute a
    WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped
$$;

-- Queues a DDL event of a subscribed table: into the queue (trigger mode), or through
-- the WAL (WAL mode, see pgpipe.emit_wal) so that it keeps its place among the changes.
CREATE FUNCTION pgpipe.queue_ddl_event(s pgpipe.subscription, payload jsonb) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    woken boolean;
BEGIN
    IF s.mode = 'wal' THEN
        PERFORM pg_logical_emit_message(true, 'pgpipe:' || (SELECT k.key FROM pgpipe.wal_message_key k LIMIT 1),
            jsonb_build_object('channel', s.channel, 'operation', 'DDL', 'payload', payload,
                               'source', 'ddl')::text);
    ELSE
        INSERT INTO pgpipe.events (channel, operation, payload, source)
        VALUES (s.channel, 'DDL', payload, 'ddl');
        woken := pgpipe.mark_wakeup();
    END IF;
END $$;

-- ddl_command_end: a DDL event for every subscribed table the command changed.
CREATE FUNCTION pgpipe.capture_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cmd record;
    s pgpipe.subscription;
    rel record;
BEGIN
    FOR cmd IN
        SELECT DISTINCT d.objid, d.command_tag
        FROM pg_event_trigger_ddl_commands() d
        WHERE d.classid = 'pg_class'::regclass
    LOOP
        SELECT * INTO s FROM pgpipe.subscription sub WHERE sub.relid = cmd.objid;
        CONTINUE WHEN NOT FOUND;
        SELECT c.relname, n.nspname INTO rel
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = cmd.objid;
        PERFORM pgpipe.queue_ddl_event(s, jsonb_build_object(
            'op', 'DDL', 'schema', rel.nspname, 'table', rel.relname,
            'command', cmd.command_tag, 'columns', pgpipe.table_columns(cmd.objid),
            'primary_key', to_jsonb(pgpipe.key_columns(cmd.objid))));
    END LOOP;
END $$;
CREATE EVENT TRIGGER pgpipe_capture_ddl ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE')
    EXECUTE FUNCTION pgpipe.capture_ddl();

-- sql_drop: a subscribed table that is dropped gets a last DDL event ('DROP TABLE',
-- columns null) and a NOTICE saying its capture is gone. (The subscription row itself is
-- removed by pgpipe_forget_dropped_tables, which fires after this trigger: event
-- triggers of one event fire in name order.)
CREATE FUNCTION pgpipe.capture_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    d record;
    s pgpipe.subscription;
BEGIN
    FOR d IN
        SELECT o.objid, o.schema_name, o.object_name
        FROM pg_event_trigger_dropped_objects() o
        WHERE o.classid = 'pg_class'::regclass AND o.objsubid = 0 AND o.object_type = 'table'
    LOOP
        SELECT * INTO s FROM pgpipe.subscription sub WHERE sub.relid = d.objid;
        CONTINUE WHEN NOT FOUND;
        PERFORM pgpipe.queue_ddl_event(s, jsonb_build_object(
            'op', 'DDL', 'schema', d.schema_name, 'table', d.object_name,
            'command', 'DROP TABLE', 'columns', NULL, 'primary_key', NULL));
        UPDATE pgpipe.snapshot_jobs j SET state = 'cancelled', finished_at = now(), error = 'the table was dropped'
        WHERE j.relid = d.objid AND j.state = 'running';
        RAISE NOTICE 'pgpipe: table %.% was subscribed on channel %; its capture is removed',
            quote_ident(d.schema_name), quote_ident(d.object_name), quote_literal(s.channel)
            USING DETAIL = 'A last event with operation DDL and command DROP TABLE is queued on the channel.';
    END LOOP;
END $$;
CREATE EVENT TRIGGER pgpipe_capture_drop ON sql_drop
    WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA', 'DROP OWNED')
    EXECUTE FUNCTION pgpipe.capture_drop();

-- ddl_command_start of a DROP: when WAL-mode tables are subscribed, let the worker queue
-- the WAL changes committed so far first, while their tables (and owners) still exist:
-- a change decoded after its table is gone can only carry its values as text (no owner
-- is left to run the conversion as). Not when the transaction has written already: its
-- own changes come after the position it would wait for.
CREATE FUNCTION pgpipe.before_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    caught_up boolean;
BEGIN
    IF pg_current_xact_id_if_assigned() IS NULL
       AND EXISTS (SELECT 1 FROM pgpipe.subscription s WHERE s.mode = 'wal') THEN
        caught_up := pgpipe.wait_for_wal_capture('5s');
    END IF;
END $$;
CREATE EVENT TRIGGER pgpipe_before_drop ON ddl_command_start
    WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA', 'DROP OWNED')
    EXECUTE FUNCTION pgpipe.before_drop();
