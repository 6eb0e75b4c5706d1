-- pgpipe: consumer groups (forwarders that share channels, each event delivered by one).

--------------------------------------------------------------------------------
-- Consumer groups
--
-- A group reads the queue in the same snapshot batches as a consumer (sql/consumers.sql),
-- one batch at a time. When a batch opens, its members are the group's live members,
-- sorted; an event belongs to slot hash(key) mod N (N = that member count; keyless events
-- hash their transaction id, so a transaction's keyless events stay together) and slot i
-- to the i-th member. Every member reads the whole batch and keeps its slots' events. The
-- next batch opens only when every member of this one has acknowledged its share, so the
-- events of one key are delivered in commit order by one member while membership is
-- stable, and a membership change (a join, a leave, a death) takes effect at a batch
-- boundary, where nothing of the key is in flight.
--
-- A member that dies inside a batch (its session ended, or it was not seen for the
-- group's member_timeout) hands its unfinished slots to the live members: the batch's
-- assignment gets a new version, a row of `slots`. A member's position names the batch,
-- the version it read under and the last event id it got; reading again under a newer
-- version returns, in id order, the events of its new slots from the batch's start plus
-- the rest of its old slots. Slots only ever move away from departed members, so nothing
-- of a key reaches the new owner before the key's earlier events of the batch: they all
-- go through the new owner again (at least once, never reordered).
--
-- Each member is a consumer (pgpipe.consumers, group_name set) of the role that joined:
-- its own lease (holder_pid/holder_started), owner checks, is_stale. Retention keeps
-- everything after the group's `prev` (pgpipe.retention_horizon).
--
-- A member's position is text 'g:<batch>:<version>:<last>', <last> being empty (nothing
-- read yet), the last event id read, or 'done' (its share of the batch is complete).
--------------------------------------------------------------------------------

CREATE TABLE pgpipe.consumer_groups (
    name            text        PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.:,+-]{1,200}$'),
    -- NULL means all channels (pgpipe_admin only), as for consumers.
    channels        text[],
    -- The role that made the group: only it (or pgpipe_admin) joins it.
    owner           oid         NOT NULL,
    -- The snapshot that closed the last finished batch.
    prev            pg_snapshot NOT NULL,
    -- The open batch's snapshot; NULL while no batch is open.
    cur             pg_snapshot,
    -- Number of the open (or last) batch.
    batch           bigint      NOT NULL DEFAULT 0,
    -- The open batch's assignment: slots[v + 1][i] is the member delivering slot i at
    -- version v (a two-dimensional array; one row per version).
    slots           text[],
    -- A member not seen for this long is dead even if its session lingers.
    member_timeout  interval    NOT NULL DEFAULT '30 seconds',
    -- When `prev` last moved (an idle group moves it only now and then).
    prev_at         timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pgpipe.consumer_groups IS
    'pgpipe consumer groups: members share the events of their channels by key; see pgpipe.group_members';
CREATE INDEX consumers_group_name_idx ON pgpipe.consumers (group_name) WHERE group_name IS NOT NULL;

-- The slot (1..slots) of an event: by its key, or by its transaction when it has none
-- (jsonb's text form is canonical, so equal keys hash alike).
CREATE FUNCTION pgpipe.group_slot(e pgpipe.events, slots integer) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT 1 + ((hashtextextended(coalesce(nullif(e.key, 'null'::jsonb)::text, 'xid:' || e.xid::text), 0)
                 & 9223372036854775807) % slots)::integer
$$;

-- Whether a member is alive: its session holds its lease and it called within the
-- group's member_timeout.
CREATE FUNCTION pgpipe.group_member_alive(c pgpipe.consumers, member_timeout interval) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(c.seen_at > now() - member_timeout, false)
       AND EXISTS (SELECT 1 FROM pg_stat_activity a
                   WHERE a.pid = c.holder_pid AND a.backend_start = c.holder_started)
$$;

-- The assignment row of version v of a group's open batch.
CREATE FUNCTION pgpipe.group_version_slots(g pgpipe.consumer_groups, v integer) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN g.slots IS NOT NULL THEN ARRAY(SELECT unnest(g.slots[v + 1 : v + 1])) END
$$;

-- The current assignment row (slot i -> member) of a group's open batch; NULL without one.
CREATE FUNCTION pgpipe.group_current_slots(g pgpipe.consumer_groups) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT pgpipe.group_version_slots(g, array_length(g.slots, 1) - 1)
$$;

CREATE TYPE pgpipe.group_position AS (batch bigint, version integer, last text);

CREATE FUNCTION pgpipe.parse_group_position(pos text) RETURNS pgpipe.group_position
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    parts text[] := string_to_array(pos, ':');
    result pgpipe.group_position;
BEGIN
    IF pos IS NULL OR cardinality(parts) <> 4 OR parts[1] <> 'g'
       OR parts[2] !~ '^[0-9]{1,18}$' OR parts[3] !~ '^[0-9]{1,9}$'
       OR NOT (parts[4] IN ('', 'done') OR parts[4] ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$') THEN
        RAISE EXCEPTION 'invalid group position %', coalesce(quote_literal(pos), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass a position returned by pgpipe.read_group().';
    END IF;
    result.batch := parts[2]::bigint;
    result.version := parts[3]::integer;
    result.last := parts[4];
    RETURN result;
END $$;

-- The member `member` for `what`: the caller owns it (or is pgpipe_admin), it belongs to
-- a group, and this session holds its lease. Marks it seen (at most every tenth of the
-- group's member_timeout, so an idle member does not write on every poll).
CREATE FUNCTION pgpipe.group_member(member text, what text) RETURNS pgpipe.consumers
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c pgpipe.consumers := pgpipe.owned_consumer(member, what);
    lease_timeout interval;
BEGIN
    IF c.group_name IS NULL THEN
        RAISE EXCEPTION 'consumer % is not a member of a consumer group', quote_literal(member)
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Read it with pgpipe.read(), or join a group with pgpipe.join_group().';
    END IF;
    IF c.holder_pid IS DISTINCT FROM pg_backend_pid() OR c.holder_started IS DISTINCT FROM
       (SELECT a.backend_start FROM pg_stat_activity a WHERE a.pid = pg_backend_pid()) THEN
        RAISE EXCEPTION 'member % of consumer group % is not held by this session', quote_literal(member), quote_literal(c.group_name)
            USING ERRCODE = 'object_in_use',
                  HINT = 'Take it with pgpipe.join_group() first; another session may hold it.';
    END IF;
    SELECT g.member_timeout INTO lease_timeout FROM pgpipe.consumer_groups g WHERE g.name = c.group_name;
    IF c.seen_at IS NULL OR c.seen_at < now() - lease_timeout / 10 THEN
        UPDATE pgpipe.consumers SET seen_at = now() WHERE consumers.name = member;
        c.seen_at := now();
    END IF;
    RETURN c;
END $$;

-- Moves group `group_name` on: hands the unfinished slots of departed members to live
-- ones, closes the open batch once every member of it is done, and (with may_open) opens
-- the next batch when events are waiting. Returns the group's row as it then is.
-- Decides without a lock and takes the group's row lock only to change something.
CREATE FUNCTION pgpipe.group_advance(group_name text, may_open boolean) RETURNS pgpipe.consumer_groups
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    g pgpipe.consumer_groups;
    locked boolean := false;
    live text[];
    current_slots text[];
    version integer;
    gone text[];
    next_slots text[];
    i integer;
    k integer := 0;
    snap pg_snapshot;
BEGIN
    LOOP
        IF locked THEN
            SELECT * INTO g FROM pgpipe.consumer_groups cg WHERE cg.name = group_name FOR UPDATE;
        ELSE
            SELECT * INTO g FROM pgpipe.consumer_groups cg WHERE cg.name = group_name;
        END IF;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'consumer group % does not exist', quote_literal(group_name)
                USING ERRCODE = 'undefined_object', HINT = 'Join it with pgpipe.join_group().';
        END IF;
        live := ARRAY(SELECT c.name FROM pgpipe.consumers c
                      WHERE c.group_name = g.name AND pgpipe.group_member_alive(c, g.member_timeout)
                      ORDER BY c.name);

        IF g.cur IS NOT NULL THEN
            version := array_length(g.slots, 1) - 1;
            current_slots := pgpipe.group_current_slots(g);
            -- Members of the batch that are gone before finishing their share.
            gone := ARRAY(
                SELECT DISTINCT s FROM unnest(current_slots) s
                WHERE NOT s = ANY (live)
                  AND NOT EXISTS (SELECT 1 FROM pgpipe.consumers c
                                  WHERE c.name = s AND c.group_name = g.name
                                    AND c.group_position = format('g:%s:%s:done', g.batch, version)));
            IF cardinality(gone) > 0 AND cardinality(live) > 0 THEN
                IF NOT locked THEN
                    locked := true;
                    CONTINUE;
                END IF;
                -- Their slots go round the live members, one new version.
                next_slots := current_slots;
                FOR i IN 1 .. cardinality(next_slots) LOOP
                    IF next_slots[i] = ANY (gone) THEN
                        next_slots[i] := live[1 + k % cardinality(live)];
                        k := k + 1;
                    END IF;
                END LOOP;
                UPDATE pgpipe.consumer_groups cg SET slots = cg.slots || next_slots
                WHERE cg.name = g.name RETURNING * INTO g;
                version := version + 1;
                current_slots := next_slots;
                -- Members that were done read again under the new version.
                PERFORM pg_notify('pgpipe_group', g.name);
                RAISE LOG 'pgpipe: consumer group % batch %: members % are gone, their slots go to %',
                    g.name, g.batch, gone, live;
            END IF;
            -- Closed when every member holding a slot has acknowledged its share.
            IF NOT EXISTS (
                SELECT 1 FROM unnest(current_slots) s
                WHERE NOT EXISTS (SELECT 1 FROM pgpipe.consumers c
                                  WHERE c.name = s AND c.group_name = g.name
                                    AND c.group_position = format('g:%s:%s:done', g.batch, version))) THEN
                IF NOT locked THEN
                    locked := true;
                    CONTINUE;
                END IF;
                UPDATE pgpipe.consumer_groups cg SET prev = cg.cur, cur = NULL, slots = NULL, prev_at = now()
                WHERE cg.name = g.name RETURNING * INTO g;
                UPDATE pgpipe.consumers c SET prev = g.prev WHERE c.group_name = g.name;
                -- Members waiting for the next batch read at once.
                PERFORM pg_notify('pgpipe_group', g.name);
            ELSE
                RETURN g;
            END IF;
        END IF;

        -- No batch open.
        IF NOT may_open OR cardinality(live) = 0 THEN
            RETURN g;
        END IF;
        snap := pg_current_snapshot();
        IF NOT EXISTS (
            SELECT 1 FROM pgpipe.events e
            WHERE e.xid >= pg_snapshot_xmin(g.prev) AND e.xid < pg_snapshot_xmax(snap)
              AND pg_visible_in_snapshot(e.xid, snap) AND NOT pg_visible_in_snapshot(e.xid, g.prev)
              AND (g.channels IS NULL OR e.channel = ANY (g.channels))) THEN
            -- Nothing to share. Move an idle group's snapshot on now and then (retention,
            -- shorter scans), not on every poll (each move is a write).
            IF g.prev_at < now() - g.member_timeout / 10 THEN
                UPDATE pgpipe.consumer_groups cg SET prev = snap, prev_at = now()
                WHERE cg.name = g.name AND cg.cur IS NULL AND cg.prev::text = g.prev::text
                RETURNING * INTO g;
                IF FOUND THEN
                    UPDATE pgpipe.consumers c SET prev = g.prev WHERE c.group_name = g.name;
                END IF;
            END IF;
            RETURN g;
        END IF;
        IF NOT locked THEN
            locked := true;
            CONTINUE;
        END IF;
        -- Every committed transaction of `snap` is visible to the members' later reads.
        UPDATE pgpipe.consumer_groups cg
        SET cur = pg_current_snapshot(), batch = cg.batch + 1, slots = ARRAY[live]
        WHERE cg.name = g.name RETURNING * INTO g;
        -- Members that are gone for good leave no row behind (a live one that was only
        -- slow joins again).
        DELETE FROM pgpipe.consumers c WHERE c.group_name = g.name AND NOT c.name = ANY (live);
        RETURN g;
    END LOOP;
END $$;

-- Joins consumer group `group_name` as `member` (a consumer of the calling role), making
-- the group on first use with `channels`, `start` ('beginning' or 'now', as for
-- register_consumer) and `member_timeout`. Takes the member's lease for this session.
-- Returns the member's position, or NULL while another session holds this member.
CREATE FUNCTION pgpipe.join_group(group_name text, member text, channels text[],
                                  start text DEFAULT 'beginning',
                                  member_timeout interval DEFAULT '30 seconds')
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    g pgpipe.consumer_groups;
    c pgpipe.consumers;
    me oid := (SELECT r.oid FROM pg_roles r WHERE r.rolname = session_user);
    wanted text[] := ARRAY(SELECT DISTINCT x FROM unnest(channels) x ORDER BY 1);
    chan text;
BEGIN
    IF group_name IS NULL OR group_name !~ '^[A-Za-z0-9_.:,+-]{1,200}$' THEN
        RAISE EXCEPTION 'invalid consumer group name %', coalesce(quote_literal(group_name), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use 1 to 200 letters, digits, ''_'', ''.'', '':'', '','', ''+'' or ''-''.';
    END IF;
    IF member_timeout IS NULL OR member_timeout < interval '1 second' THEN
        RAISE EXCEPTION 'member_timeout must be at least 1 second' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF start IS NULL OR start NOT IN ('beginning', 'now') THEN
        RAISE EXCEPTION 'invalid start %', coalesce(quote_literal(start), 'NULL')
            USING ERRCODE = 'invalid_parameter_value', HINT = 'start is ''beginning'' or ''now''.';
    END IF;
    IF channels IS NOT NULL THEN
        FOREACH chan IN ARRAY channels LOOP
            PERFORM pgpipe.check_channel(chan);
        END LOOP;
    ELSE
        wanted := NULL;
    END IF;
    PERFORM pgpipe.require_channels_readable(wanted, 'read');

    INSERT INTO pgpipe.consumer_groups (name, channels, owner, prev, member_timeout)
    VALUES (group_name, wanted, me,
            CASE WHEN start = 'now' THEN pg_current_snapshot() ELSE '1:1:'::pg_snapshot END,
            join_group.member_timeout)
    ON CONFLICT ON CONSTRAINT consumer_groups_pkey DO NOTHING;
    SELECT * INTO g FROM pgpipe.consumer_groups cg WHERE cg.name = group_name;
    IF NOT pg_has_role(session_user, g.owner, 'USAGE') AND NOT pgpipe.is_admin() THEN
        RAISE EXCEPTION 'role % may not join consumer group %: it belongs to role %',
            quote_ident(session_user), quote_literal(group_name), coalesce(quote_ident(g.owner::regrole::text), g.owner::text)
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Start your forwarders with a group of your own (pgpipe listen --group NAME).';
    END IF;
    IF g.channels IS DISTINCT FROM wanted THEN
        RAISE EXCEPTION 'consumer group % reads channels %, not %', quote_literal(group_name),
            coalesce(array_to_string(g.channels, ','), 'all'), coalesce(array_to_string(wanted, ','), 'all')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Start every member with the same --channel list, or use another --group.';
    END IF;

    SELECT * INTO c FROM pgpipe.consumers WHERE consumers.name = member;
    IF FOUND THEN
        c := pgpipe.owned_consumer(member, 'join', true);
        IF c.group_name IS DISTINCT FROM join_group.group_name THEN
            RAISE EXCEPTION 'consumer % exists and is not a member of consumer group %', quote_literal(member), quote_literal(group_name)
                USING ERRCODE = 'duplicate_object',
                      HINT = 'Give the member another name (pgpipe listen --group-member NAME).';
        END IF;
    ELSE
        IF member IS NULL OR member !~ '^[A-Za-z0-9_.:,+-]{1,200}$' THEN
            RAISE EXCEPTION 'invalid member name %', coalesce(quote_literal(member), 'NULL')
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Use 1 to 200 letters, digits, ''_'', ''.'', '':'', '','', ''+'' or ''-''.';
        END IF;
        INSERT INTO pgpipe.consumers (name, channels, prev, owner, group_name, group_position)
        VALUES (member, wanted, g.prev, me, group_name, 'g:0:0:')
        ON CONFLICT ON CONSTRAINT consumers_pkey DO NOTHING;
        IF NOT FOUND THEN
            -- Made by another session a moment ago.
            RETURN pgpipe.join_group(group_name, member, channels, start, member_timeout);
        END IF;
    END IF;
    IF NOT pgpipe.try_claim_consumer(member) THEN
        RETURN NULL;
    END IF;
    UPDATE pgpipe.consumers SET seen_at = now() WHERE consumers.name = member
    RETURNING group_position INTO c.group_position;
    RETURN c.group_position;
END $$;

-- This member's share of the open batch: the events of the slots it holds, in id order,
-- pages of at most max_events after a position (default: its acknowledged one). Every row
-- carries the position just after it; ack the last one (pgpipe.ack_group) once its events
-- are handled. With nothing (more) to deliver one row comes back with only a position.
CREATE FUNCTION pgpipe.read_group(member text, after text DEFAULT NULL, max_events integer DEFAULT 1000)
RETURNS TABLE (
    "position"  text,
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
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c pgpipe.consumers;
    g pgpipe.consumer_groups;
    pos pgpipe.group_position;
    version integer;
    now_slots text[];
    then_slots text[];
    then_finished boolean := false;
    last_id uuid;
    prefix text;
    rows_returned integer;
BEGIN
    IF max_events IS NULL OR max_events < 1 THEN
        RAISE EXCEPTION 'max_events must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    c := pgpipe.group_member(member, 'read');
    PERFORM pgpipe.require_channels_readable(c.channels, 'read');
    pos := pgpipe.parse_group_position(coalesce(after, c.group_position));
    g := pgpipe.group_advance(c.group_name, true);
    version := coalesce(array_length(g.slots, 1) - 1, 0);
    now_slots := pgpipe.group_current_slots(g);
    prefix := format('g:%s:%s:', g.batch, version);
    IF g.cur IS NULL OR NOT member = ANY (now_slots) THEN
        -- No batch, or one opened before this member joined: wait for the next.
        RETURN QUERY SELECT prefix || 'done', NULL::uuid, NULL::text, NULL::text, NULL::jsonb,
                            NULL::text, NULL::timestamptz, NULL::xid8, NULL::pg_lsn, NULL::jsonb;
        RETURN;
    END IF;
    IF pos.batch > g.batch OR (pos.batch = g.batch AND pos.version > version) THEN
        RAISE EXCEPTION 'invalid group position %: consumer group % is at batch % version %',
            quote_literal(coalesce(after, c.group_position)), quote_literal(c.group_name), g.batch, version
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass a position returned by pgpipe.read_group().';
    END IF;
    IF pos.batch < g.batch THEN
        -- A new batch: the whole share under the current assignment.
        then_slots := now_slots;
    ELSE
        then_slots := pgpipe.group_version_slots(g, pos.version);
        then_finished := pos.last = 'done';
        last_id := nullif(nullif(pos.last, ''), 'done')::uuid;
        IF then_finished AND pos.version = version THEN
            RETURN QUERY SELECT prefix || 'done', NULL::uuid, NULL::text, NULL::text, NULL::jsonb,
                                NULL::text, NULL::timestamptz, NULL::xid8, NULL::pg_lsn, NULL::jsonb;
            RETURN;
        END IF;
    END IF;

    RETURN QUERY
    WITH page AS (
        SELECT * FROM pgpipe.group_page(g.prev, g.cur, g.channels, member, now_slots, then_slots,
                                        then_finished, last_id, max_events)
        WHERE NOT (then_slots = now_slots AND last_id IS NOT NULL)
        UNION ALL
        SELECT * FROM pgpipe.group_page_after(g.prev, g.cur, g.channels, member, now_slots,
                                              last_id, max_events)
        WHERE then_slots = now_slots AND last_id IS NOT NULL
    ), numbered AS (
        SELECT p.*, row_number() OVER (ORDER BY p.id) AS n, count(*) OVER () AS total
        FROM page p
    )
    SELECT prefix || CASE WHEN nb.n = nb.total AND nb.total < max_events THEN 'done' ELSE nb.id::text END,
           nb.id, nb.channel, nb.operation, nb.payload, nb.source, nb.created_at, nb.xid, nb.lsn, nb.key
    FROM numbered nb
    ORDER BY nb.id;
    GET DIAGNOSTICS rows_returned = ROW_COUNT;

    IF rows_returned = 0 THEN
        RETURN QUERY SELECT prefix || 'done', NULL::uuid, NULL::text, NULL::text, NULL::jsonb,
                            NULL::text, NULL::timestamptz, NULL::xid8, NULL::pg_lsn, NULL::jsonb;
    ELSE
        UPDATE pgpipe.consumers SET group_events = group_events + rows_returned
        WHERE consumers.name = member;
    END IF;
END $$;

-- A page of a member's share from the batch's start: the events of its slots under
-- `now_slots` that it did not already get under `then_slots` (an older assignment of the
-- same batch, read up to `then_last`, or completely when `then_finished`).
CREATE FUNCTION pgpipe.group_page(prev pg_snapshot, cur pg_snapshot, chans text[], member text,
                                  now_slots text[], then_slots text[], then_finished boolean,
                                  then_last uuid, max_events integer)
RETURNS SETOF pgpipe.events
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT e.* FROM pgpipe.events e
    CROSS JOIN LATERAL (SELECT pgpipe.group_slot(e, cardinality(now_slots)) AS slot) s
    WHERE e.xid >= pg_snapshot_xmin(prev) AND e.xid < pg_snapshot_xmax(cur)
      AND pg_visible_in_snapshot(e.xid, cur) AND NOT pg_visible_in_snapshot(e.xid, prev)
      AND (chans IS NULL OR e.channel = ANY (chans))
      AND now_slots[s.slot] = member
      AND (then_slots[s.slot] <> member OR (NOT then_finished AND (then_last IS NULL OR e.id > then_last)))
    ORDER BY e.id
    LIMIT max_events
$$;

-- Later pages walk the primary key from the last id, as pgpipe.batch_page_after does.
CREATE FUNCTION pgpipe.group_page_after(prev pg_snapshot, cur pg_snapshot, chans text[], member text,
                                        now_slots text[], last_id uuid, max_events integer)
RETURNS SETOF pgpipe.events
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp SET enable_sort = off SET enable_bitmapscan = off
SET plan_cache_mode = force_custom_plan AS $$
    SELECT e.* FROM pgpipe.events e
    WHERE e.id > last_id
      AND e.xid >= pg_snapshot_xmin(prev) AND e.xid < pg_snapshot_xmax(cur)
      AND pg_visible_in_snapshot(e.xid, cur) AND NOT pg_visible_in_snapshot(e.xid, prev)
      AND (chans IS NULL OR e.channel = ANY (chans))
      AND now_slots[pgpipe.group_slot(e, cardinality(now_slots))] = member
    ORDER BY e.id
    LIMIT max_events
$$;

-- Records that this member handled everything up to `position`; a share completed
-- ('...:done') may close the batch.
CREATE FUNCTION pgpipe.ack_group(member text, "position" text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c pgpipe.consumers := pgpipe.group_member(member, 'acknowledge');
    pos pgpipe.group_position := pgpipe.parse_group_position("position");
BEGIN
    UPDATE pgpipe.consumers
    SET group_position = ack_group."position", acked_at = now(), seen_at = now()
    WHERE consumers.name = member;
    IF pos.last = 'done' THEN
        PERFORM pgpipe.group_advance(c.group_name, false);
    END IF;
END $$;

-- Tells the group this member is alive while it reads nothing (its adapters are busy).
CREATE FUNCTION pgpipe.group_heartbeat(member text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pgpipe.group_member(member, 'keep alive');
END $$;

-- Leaves the group: the member's row goes, and slots it had not finished go to the others
-- at once. Returns false when there was no such member.
CREATE FUNCTION pgpipe.leave_group(member text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c pgpipe.consumers;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgpipe.consumers WHERE consumers.name = member) THEN
        RETURN false;
    END IF;
    c := pgpipe.owned_consumer(member, 'leave with', true);
    IF c.group_name IS NULL THEN
        RAISE EXCEPTION 'consumer % is not a member of a consumer group', quote_literal(member)
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Drop it with pgpipe.drop_consumer().';
    END IF;
    DELETE FROM pgpipe.consumers WHERE consumers.name = member;
    PERFORM pgpipe.group_advance(c.group_name, false);
    RETURN true;
END $$;

-- Removes a group and its members (its owner or pgpipe_admin). Returns false when there
-- was none.
CREATE FUNCTION pgpipe.drop_group(group_name text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    g pgpipe.consumer_groups;
BEGIN
    SELECT * INTO g FROM pgpipe.consumer_groups cg WHERE cg.name = group_name FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF NOT pg_has_role(session_user, g.owner, 'USAGE') AND NOT pgpipe.is_admin() THEN
        RAISE EXCEPTION 'role % may not drop consumer group %: it belongs to role %',
            quote_ident(session_user), quote_literal(group_name), coalesce(quote_ident(g.owner::regrole::text), g.owner::text)
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    DELETE FROM pgpipe.consumers c WHERE c.group_name = g.name;
    DELETE FROM pgpipe.consumer_groups cg WHERE cg.name = g.name;
    RETURN true;
END $$;

-- Each group's members: whether they are alive, the slots they hold in the open batch,
-- the events the group gave them and their share of those. A role sees its own groups
-- (pgpipe_admin: all).
CREATE VIEW pgpipe.group_members WITH (security_barrier) AS
SELECT g.name AS "group",
       c.name AS member,
       c.owner::regrole AS owner,
       holder.description AS holder,
       pgpipe.group_member_alive(c, g.member_timeout) AS alive,
       g.batch,
       (SELECT count(*) FROM unnest(pgpipe.group_current_slots(g)) s WHERE s = c.name) AS slots,
       c.group_position AS "position",
       c.group_events AS events,
       round(c.group_events::numeric / nullif(sum(c.group_events) OVER (PARTITION BY g.name), 0), 3) AS share,
       c.seen_at
FROM pgpipe.consumer_groups g
JOIN pgpipe.consumers c ON c.group_name = g.name
LEFT JOIN LATERAL (
    SELECT format('pid %s (%s%s)', a.pid, coalesce(nullif(a.application_name, ''), 'no application_name'),
                  coalesce(' from ' || host(a.client_addr), '')) AS description
    FROM pg_stat_activity a
    WHERE a.pid = c.holder_pid AND a.backend_start = c.holder_started
) holder ON true
WHERE pg_has_role(session_user, g.owner, 'USAGE') OR pg_has_role(session_user, 'pgpipe_admin', 'USAGE');
