-- pgpipe: privileges. Runs last, after every object exists.

--------------------------------------------------------------------------------
-- Privileges: the queue is written only through the functions above.
--------------------------------------------------------------------------------
REVOKE ALL ON pgpipe.events, pgpipe.events_default, pgpipe.event_partitions, pgpipe.subscription, pgpipe.consumers FROM PUBLIC;
GRANT USAGE ON SCHEMA pgpipe TO PUBLIC;
GRANT SELECT ON pgpipe.subscriptions TO PUBLIC;

-- pg_dump keeps subscriptions and consumer positions.
SELECT pg_catalog.pg_extension_config_dump('pgpipe.subscription', '');
SELECT pg_catalog.pg_extension_config_dump('pgpipe.consumers', '');
