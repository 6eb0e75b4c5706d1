-- pgpipe: who may do what. Runs first; sql/grants.sql, which runs last, grants each
-- function to the roles below. Nothing in schema pgpipe is usable by PUBLIC.
--
-- The extension is installed by a superuser into databases whose other roles are not
-- trusted. Three capabilities, as NOLOGIN roles in the manner of pg_monitor (created
-- when absent; roles are cluster-wide, so every database with pgpipe shares them, and
-- DROP EXTENSION leaves them):
--   pgpipe_consumer  registers consumers and reads, acks, claims and drops its OWN
--                    consumers; reads only channels whose tables it may SELECT; writes
--                    dead letters of events it may read. A forwarder's role needs this.
--   pgpipe_producer  emits events (pgpipe.emit) and subscribes or unsubscribes the
--                    tables it owns.
--   pgpipe_admin     both, plus any consumer, every channel ("all channels" consumers),
--                    retention (pgpipe.rotate), dead letters (list, replay, purge) and
--                    the replication slot. Superusers are admins.
--
-- The calling role is session_user: the definer functions below run as the extension's
-- owner, so current_user would be that owner. A session that SET ROLE's to a member role
-- is still judged as the role it logged in as.

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['pgpipe_consumer', 'pgpipe_producer', 'pgpipe_admin'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created a moment ago by CREATE EXTENSION in another database
            END;
        END IF;
    END LOOP;
    FOREACH r IN ARRAY ARRAY['pgpipe_consumer', 'pgpipe_producer'] LOOP
        IF NOT pg_catalog.pg_has_role('pgpipe_admin', r, 'MEMBER') THEN
            BEGIN
                EXECUTE pg_catalog.format('GRANT %I TO pgpipe_admin', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
END $$;

-- The calling role has pgpipe_admin's rights (superusers always do).
CREATE FUNCTION pgpipe.is_admin() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_has_role(session_user, 'pgpipe_admin', 'USAGE')
$$;
