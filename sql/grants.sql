-- pgpipe: privileges. Runs last, after every object exists (the roles are in
-- sql/roles.sql). Nothing in schema pgpipe is usable by PUBLIC: every function's EXECUTE
-- is revoked below and granted back to the role whose capability it is. The definer
-- functions check the finer rules themselves (a consumer's owner, the tables behind a
-- channel, a table's owner).

REVOKE ALL ON SCHEMA pgpipe FROM PUBLIC;
GRANT USAGE ON SCHEMA pgpipe TO pgpipe_consumer, pgpipe_producer, pgpipe_admin;

-- Tables: written only through the functions; nobody but the owner reads them directly.
REVOKE ALL ON ALL TABLES IN SCHEMA pgpipe FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgpipe FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgpipe FROM PUBLIC;

-- Everyone with a capability: the subscriptions, and the UUIDv7 generator.
GRANT SELECT ON pgpipe.subscriptions TO pgpipe_consumer, pgpipe_producer;
-- (Its "where" column: a view's functions run as the role reading it.)
GRANT EXECUTE ON FUNCTION pgpipe.subscription_row_filter(oid, text) TO pgpipe_consumer, pgpipe_producer;
GRANT EXECUTE ON FUNCTION pgpipe.uuid_generate_v7() TO pgpipe_consumer, pgpipe_producer;

-- Consumers: their own consumers (each function checks the owner) and the channels
-- whose tables they may read. consumer_lag shows a role its own consumers.
GRANT EXECUTE ON FUNCTION
    pgpipe.register_consumer(text, text[], text),
    pgpipe.read(text, text, integer),
    pgpipe.ack(text, text),
    pgpipe.try_claim_consumer(text),
    pgpipe.consumer_position(text),
    pgpipe.drop_consumer(text),
    pgpipe.lag(text),
    pgpipe.consumer_stale_after(),
    pgpipe.is_stale(pgpipe.consumers),
    pgpipe.events_after(uuid, text[], integer),
    pgpipe.dead_letter(jsonb, text, text, integer),
    pgpipe.status()
TO pgpipe_consumer;
GRANT SELECT ON pgpipe.consumer_lag TO pgpipe_consumer;
-- Consumer groups: a member is a consumer of the joining role; the group is its maker's.
GRANT EXECUTE ON FUNCTION
    pgpipe.join_group(text, text, text[], text, interval),
    pgpipe.read_group(text, text, integer),
    pgpipe.ack_group(text, text),
    pgpipe.group_heartbeat(text),
    pgpipe.leave_group(text),
    pgpipe.drop_group(text),
    -- used by the group_members view, which runs them as its reader
    pgpipe.group_member_alive(pgpipe.consumers, interval),
    pgpipe.group_current_slots(pgpipe.consumer_groups),
    pgpipe.group_version_slots(pgpipe.consumer_groups, integer)
TO pgpipe_consumer;
GRANT SELECT ON pgpipe.group_members TO pgpipe_consumer;

-- Producers: emit, and capture of the tables they own (subscribe checks the owner).
GRANT EXECUTE ON FUNCTION
    pgpipe.emit(text, jsonb, text, jsonb),
    pgpipe.subscribe(regclass, text, text[], text, boolean, text[], text[], boolean, text),
    pgpipe.subscribe(text, text, text[], text, boolean, text[], text[], boolean, text),
    pgpipe.table_named(text),
    pgpipe.unsubscribe(regclass),
    pgpipe.unsubscribe(text),
    pgpipe.snapshot(regclass),
    pgpipe.snapshot(text),
    pgpipe.cancel_snapshot(regclass),
    pgpipe.cancel_snapshot(text)
TO pgpipe_producer;
GRANT SELECT ON pgpipe.snapshots TO pgpipe_consumer, pgpipe_producer;

-- Admins: retention, the replication slot, dead letters (pgpipe dlq list | replay |
-- purge), and all of the above through membership.
GRANT EXECUTE ON FUNCTION
    pgpipe.rotate(),
    pgpipe.partition_xids(),
    pgpipe.recreate_slot(boolean),
    pgpipe.ensure_slot(),
    pgpipe.wait_for_wal_capture(interval)
TO pgpipe_admin;
GRANT SELECT, DELETE ON pgpipe.dead_letters TO pgpipe_admin;

-- pg_dump keeps subscriptions, their channels' tables and consumer positions.
SELECT pg_catalog.pg_extension_config_dump('pgpipe.subscription', '');
SELECT pg_catalog.pg_extension_config_dump('pgpipe.channel_sources', '');
SELECT pg_catalog.pg_extension_config_dump('pgpipe.consumers', '');
SELECT pg_catalog.pg_extension_config_dump('pgpipe.consumer_groups', '');
