//! Journey: forwarders started with the same `--group` share a channel. Each event is
//! delivered by one member, every key stays on one member while membership is stable, in
//! commit order; a member joins at run time, one is killed with -9 mid-stream and one
//! leaves with SIGTERM: every committed event is still delivered, no key's events ever
//! arrive out of order, the load is spread. Retention waits for every member; another
//! role can neither join nor sabotage the group.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use pgpipe_tests::{describe, test_db, wait_until, Forwarder, HttpReceiver, Reply, TestDb};
use serde_json::Value;
use tokio_postgres::Client;

const WAIT: Duration = Duration::from_secs(30);
const ACCOUNTS: i64 = 30;

/// One delivery the receiver got: the member (its webhook path), the account (the key)
/// and the account's counter after the change.
#[derive(Debug, Clone)]
struct Delivery {
    member: String,
    id: String,
    account: i64,
    n: i64,
}

fn deliveries(receiver: &HttpReceiver) -> Vec<Delivery> {
    receiver
        .requests()
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| {
            let event = r.json();
            let row = &event["payload"]["row"];
            Delivery {
                member: r.path.trim_start_matches('/').to_string(),
                id: event["id"].as_str().expect("id").to_string(),
                account: row["id"].as_i64().expect("account id"),
                n: row["n"].as_i64().expect("counter"),
            }
        })
        .collect()
}

fn member(db: &TestDb, receiver: &HttpReceiver, name: &str) -> Forwarder {
    Forwarder::listen(&db.url())
        .channel("accounts")
        .adapter("webhook")
        .flag("--url", receiver.url(&format!("/{name}")))
        .flag("--group", "billing")
        .flag("--group-member", name)
        .env("PGPIPE_DETECTOR_BACKOFF_BASE", "200ms")
        .env("PGPIPE_DETECTOR_BACKOFF_CAP", "1s")
        .spawn()
}

/// `count` transactions, each adding one to three accounts, `pause_ms` apart.
async fn write(db: &TestDb, from: i64, count: i64, pause_ms: i64) {
    db.execute(&format!(
        "DO $$ BEGIN
           FOR i IN {from} .. {} LOOP
             UPDATE accounts SET n = n + 1 WHERE id IN (i % {ACCOUNTS}, (i * 7 + 3) % {ACCOUNTS}, (i * 13 + 5) % {ACCOUNTS});
             COMMIT;
             PERFORM pg_sleep({pause_ms} / 1000.0);
           END LOOP;
         END $$",
        from + count - 1
    ))
    .await;
}

async fn queued_ids(db: &TestDb) -> HashSet<String> {
    db.query(
        "SELECT id::text FROM pgpipe.events WHERE channel = 'accounts'",
        &[],
    )
    .await
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Waits until every queued event was delivered at least once.
async fn all_delivered(db: &TestDb, receiver: &HttpReceiver) -> bool {
    wait_until(WAIT, async || {
        let got: HashSet<String> = deliveries(receiver).into_iter().map(|d| d.id).collect();
        queued_ids(db).await.is_subset(&got)
    })
    .await
}

/// No account's change arrives before all its earlier changes arrived (at least once):
/// per-key commit order, redeliveries allowed.
fn assert_key_order(all: &[Delivery]) {
    let mut highest: HashMap<i64, i64> = HashMap::new();
    for d in all {
        let h = highest.entry(d.account).or_insert(-1);
        assert!(
            d.n <= *h + 1,
            "account {} (key): change n={} arrived (via {}) before n={}",
            d.account,
            d.n,
            d.member,
            *h + 1
        );
        *h = (*h).max(d.n);
    }
}

async fn alive_members(db: &TestDb) -> Vec<String> {
    db.query(
        "SELECT member FROM pgpipe.group_members WHERE \"group\" = 'billing' AND alive ORDER BY 1",
        &[],
    )
    .await
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_share_by_key_and_survive_a_kill_9_and_a_leave() {
    let db = test_db("groups_kill9").await;
    db.execute(&format!(
        "CREATE TABLE accounts (id int PRIMARY KEY, n int NOT NULL);
         SELECT pgpipe.subscribe('accounts');
         INSERT INTO accounts SELECT g, 0 FROM generate_series(0, {}) g;",
        ACCOUNTS - 1
    ))
    .await;
    let receiver = HttpReceiver::start(|_, _| Reply::status(200)).await;

    // Two members, then a third joins at run time.
    let m1 = member(&db, &receiver, "m1");
    let m2 = member(&db, &receiver, "m2");
    assert!(all_delivered(&db, &receiver).await, "the inserts arrive");
    write(&db, 0, 50, 0).await;
    let m3 = member(&db, &receiver, "m3");
    assert!(
        wait_until(WAIT, async || alive_members(&db).await.len() == 3).await,
        "m3 joins: {:?}",
        alive_members(&db).await
    );
    assert!(
        all_delivered(&db, &receiver).await,
        "events before m3 joined arrive"
    );

    // Stable membership: a batch opened after m3 joined holds all three.
    let before_stable = deliveries(&receiver).len();
    write(&db, 1000, 300, 0).await;
    assert!(
        all_delivered(&db, &receiver).await,
        "the stable phase arrives"
    );
    let stable: Vec<Delivery> = deliveries(&receiver)[before_stable..].to_vec();
    let mut owner_of: HashMap<i64, HashSet<String>> = HashMap::new();
    let mut per_member: HashMap<String, usize> = HashMap::new();
    for d in &stable {
        owner_of
            .entry(d.account)
            .or_default()
            .insert(d.member.clone());
        *per_member.entry(d.member.clone()).or_default() += 1;
    }
    // Every batch holding these writes opened after m3 was alive.
    assert!(
        owner_of.values().all(|m| m.len() == 1),
        "each key on one member while membership is stable: {owner_of:?}"
    );
    for m in ["m1", "m2", "m3"] {
        let share = per_member.get(m).copied().unwrap_or(0);
        assert!(
            share * 10 >= stable.len(),
            "load spread: {m} delivered {share} of {}: {per_member:?}",
            stable.len()
        );
    }

    // `pgpipe status` and pgpipe.status() show the members and their share.
    let status = Forwarder::spawn(&["status", "--db", &db.admin_url(), "--json"], &[]);
    assert!(
        status.wait_exit(WAIT).await.success(),
        "{}",
        status.stderr_text()
    );
    let report: Value = serde_json::from_str(&status.stdout_lines().join("\n")).expect("JSON");
    let members = report["group_members"].as_array().expect("group_members");
    assert_eq!(members.len(), 3, "{report}");
    for m in members {
        assert_eq!(m["group"], "billing", "{m}");
        assert_eq!(m["alive"], true, "{m}");
        assert!(m["share"].as_f64().unwrap_or(0.0) > 0.0, "{m}");
    }
    let groups: Value = db
        .query_one("SELECT consumer_groups FROM pgpipe.status()", &[])
        .await
        .get(0);
    assert_eq!(groups.as_array().map(Vec::len), Some(3), "{groups}");

    // kill -9 of m2 while writes go on: its unfinished share goes to m1 and m3.
    let before_kill = deliveries(&receiver).len();
    let writer = {
        let db_url = db.admin_url();
        tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            client
                .batch_execute(&format!(
                    "DO $$ BEGIN
                       FOR i IN 2000 .. 2400 LOOP
                         UPDATE accounts SET n = n + 1 WHERE id IN (i % {ACCOUNTS}, (i * 7 + 3) % {ACCOUNTS}, (i * 13 + 5) % {ACCOUNTS});
                         COMMIT;
                         PERFORM pg_sleep(0.005);
                       END LOOP;
                     END $$"
                ))
                .await
                .expect("writes");
        })
    };
    assert!(
        wait_until(WAIT, async || {
            deliveries(&receiver)[before_kill..]
                .iter()
                .filter(|d| d.member == "m2")
                .count()
                >= 20
        })
        .await,
        "m2 delivers during the writes"
    );
    m2.kill9();
    writer.await.expect("writer");
    assert!(
        all_delivered(&db, &receiver).await,
        "after the kill every committed event is delivered"
    );
    let after_kill: Vec<Delivery> = deliveries(&receiver)[before_kill..].to_vec();
    let late_m2 = after_kill
        .iter()
        .rev()
        .take(50)
        .filter(|d| d.member == "m2")
        .count();
    assert_eq!(late_m2, 0, "the dead member delivers nothing more");
    assert!(
        wait_until(WAIT, async || alive_members(&db).await == ["m1", "m3"]).await,
        "m2 is not alive: {:?}",
        alive_members(&db).await
    );

    // m3 leaves with SIGTERM (exit 0): m1 carries on alone.
    m3.sigterm();
    assert!(m3.wait_exit(WAIT).await.success(), "{}", m3.stderr_text());
    let before_leave = deliveries(&receiver).len();
    write(&db, 3000, 60, 0).await;
    assert!(all_delivered(&db, &receiver).await, "after the leave");
    let alone = &deliveries(&receiver)[before_leave..];
    assert!(!alone.is_empty());
    assert!(
        alone.iter().all(|d| d.member == "m1"),
        "only m1 is left: {:?}",
        alone.iter().map(|d| &d.member).collect::<HashSet<_>>()
    );

    assert_key_order(&deliveries(&receiver));
    drop(m1);
}

// ---- SQL level: shares, a member dying inside a batch, retention, privileges --------

async fn ok(client: &Client, sql: &str) {
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}\n-> {}", describe(&e)));
}

/// Runs `sql` and expects SQLSTATE `code` with every one of `words` in the message, detail
/// or hint.
async fn refused(client: &Client, sql: &str, code: &str, words: &[&str]) {
    let error = match client.batch_execute(sql).await {
        Ok(()) => panic!("{sql}\n-> succeeded; it must be refused"),
        Err(e) => e,
    };
    let text = describe(&error);
    let db = error
        .as_db_error()
        .unwrap_or_else(|| panic!("{sql}\n-> not a server error: {text}"));
    assert_eq!(db.code().code(), code, "{sql}\n-> {text}");
    for word in words {
        assert!(
            text.contains(word),
            "{sql}\n-> {text}\nshould mention {word:?}"
        );
    }
}

/// Reads `member`'s whole share after `position` (acks nothing); returns its event ids
/// and the last position.
async fn read_share(client: &Client, member: &str, position: &str) -> (Vec<String>, String) {
    let mut ids = Vec::new();
    let mut position = position.to_string();
    loop {
        let rows = client
            .query(
                "SELECT position, id::text FROM pgpipe.read_group($1, $2, 5)",
                &[&member, &position],
            )
            .await
            .unwrap_or_else(|e| panic!("read_group {member}: {}", describe(&e)));
        let mut events = 0;
        for row in &rows {
            position = row.get(0);
            if let Some(id) = row.get::<_, Option<String>>(1) {
                ids.push(id);
                events += 1;
            }
        }
        if position.ends_with(":done") || events == 0 {
            return (ids, position);
        }
    }
}

/// Retention keeps these events: the horizon is at or below their oldest transaction.
async fn retention_keeps(db: &TestDb, ids: &[String]) -> bool {
    db.query_one(
        "SELECT pgpipe.retention_horizon() <= (SELECT min(xid) FROM pgpipe.events WHERE id::text = ANY($1))",
        &[&ids],
    )
    .await
    .get::<_, Option<bool>>(0)
    .unwrap_or(false)
}

/// Group g is past these events: its last finished batch holds them all.
async fn group_past(db: &TestDb, ids: &[String]) -> bool {
    db.query_one(
        "SELECT bool_and(pg_visible_in_snapshot(e.xid, g.prev))
         FROM pgpipe.events e, pgpipe.consumer_groups g
         WHERE g.name = 'g' AND e.id::text = ANY($1)",
        &[&ids],
    )
    .await
    .get::<_, Option<bool>>(0)
    .unwrap_or(false)
}

#[tokio::test]
async fn members_split_each_batch_a_dead_members_share_moves_and_retention_waits() {
    let db = test_db("groups_sql").await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');")
        .await;
    let role = pgpipe_tests::FORWARDER_ROLE;
    let a = db.client_as(role).await;
    let b = db.client_as(role).await;
    let join = "SELECT pgpipe.join_group('g', $1, ARRAY['t'])";
    let pa: String = a.query_one(join, &[&"g.a"]).await.expect("join a").get(0);
    let pb: String = b.query_one(join, &[&"g.b"]).await.expect("join b").get(0);

    // One transaction per row: keyless events are shared by transaction.
    for i in 0..40 {
        db.execute(&format!("INSERT INTO t VALUES ({i})")).await;
    }
    let all: HashSet<String> = db
        .query(
            "SELECT id::text FROM pgpipe.events WHERE channel = 't'",
            &[],
        )
        .await
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (ids_a, done_a) = read_share(&a, "g.a", &pa).await;
    let (ids_b, done_b) = read_share(&b, "g.b", &pb).await;
    let set_a: HashSet<String> = ids_a.iter().cloned().collect();
    let set_b: HashSet<String> = ids_b.iter().cloned().collect();
    assert!(set_a.is_disjoint(&set_b), "each event to one member");
    assert_eq!(&set_a | &set_b, all, "every event to some member");
    assert!(!set_a.is_empty() && !set_b.is_empty(), "both get a share");

    // The batch waits for both members, and so does retention.
    ok(&a, &format!("SELECT pgpipe.ack_group('g.a', '{done_a}')")).await;
    let all_ids: Vec<String> = all.iter().cloned().collect();
    assert!(!group_past(&db, &all_ids).await, "b has not acknowledged");
    assert!(
        retention_keeps(&db, &all_ids).await,
        "retention waits for b"
    );
    ok(&b, &format!("SELECT pgpipe.ack_group('g.b', '{done_b}')")).await;
    assert!(group_past(&db, &all_ids).await, "both acknowledged");

    // Next batch: b reads part of its share and dies; a gets b's share, in order.
    for i in 100..140 {
        db.execute(&format!("INSERT INTO t VALUES ({i})")).await;
    }
    let (ids_a2, done_a2) = read_share(&a, "g.a", &done_a).await;
    let rows = b
        .query(
            "SELECT position, id::text FROM pgpipe.read_group('g.b', $1, 3)",
            &[&done_b],
        )
        .await
        .expect("b reads");
    assert_eq!(rows.len(), 3, "b has a share");
    ok(&a, &format!("SELECT pgpipe.ack_group('g.a', '{done_a2}')")).await;
    drop(b);
    let batch_ids: Vec<String> = db
        .query(
            "SELECT id::text FROM pgpipe.events WHERE channel = 't' ORDER BY id",
            &[],
        )
        .await
        .iter()
        .map(|r| r.get(0))
        .filter(|id: &String| !all.contains(id))
        .collect();
    let mut taken_over = Vec::new();
    assert!(
        wait_until(WAIT, async || {
            let (ids, _) = read_share(&a, "g.a", &done_a2).await;
            taken_over = ids;
            !taken_over.is_empty()
        })
        .await,
        "a takes over b's share once b's session is gone"
    );
    let mut got: Vec<String> = ids_a2.clone();
    got.extend(taken_over.iter().cloned());
    let got: HashSet<String> = got.into_iter().collect();
    assert_eq!(
        got,
        batch_ids.iter().cloned().collect::<HashSet<_>>(),
        "nothing of b's share is lost"
    );
    let mut sorted = taken_over.clone();
    sorted.sort();
    assert_eq!(taken_over, sorted, "taken over in id order");
    assert!(
        !group_past(&db, &batch_ids).await,
        "a has not acknowledged the takeover"
    );
    assert!(retention_keeps(&db, &batch_ids).await);
}

#[tokio::test]
async fn another_role_can_neither_join_nor_sabotage_a_group() {
    let db = test_db("groups_privileges").await;
    let mallory = format!("mallory_{}", db.name());
    db.execute(&format!(
        "CREATE TABLE t (id int PRIMARY KEY);
         CREATE TABLE secrets (id int PRIMARY KEY);
         SELECT pgpipe.subscribe('t');
         SELECT pgpipe.subscribe('secrets');
         CREATE ROLE \"{mallory}\" LOGIN;
         CREATE SCHEMA mallory AUTHORIZATION \"{mallory}\";
         GRANT pgpipe_consumer TO \"{mallory}\";
         GRANT SELECT ON t TO \"{mallory}\";"
    ))
    .await;
    let owner = db.client_as(pgpipe_tests::FORWARDER_ROLE).await;
    ok(&owner, "SELECT pgpipe.join_group('g', 'g.m1', ARRAY['t'])").await;
    let evil = db.client_as(&mallory).await;
    let belongs = ["belongs to role", "pgpipe_forwarder"];
    refused(
        &evil,
        "SELECT pgpipe.join_group('g', 'g.evil', ARRAY['t'])",
        "42501",
        &["may not join consumer group", "belongs to role", "--group"],
    )
    .await;
    for sql in [
        "SELECT * FROM pgpipe.read_group('g.m1')",
        "SELECT pgpipe.ack_group('g.m1', 'g:1:0:done')",
        "SELECT pgpipe.group_heartbeat('g.m1')",
        "SELECT pgpipe.leave_group('g.m1')",
        "SELECT pgpipe.drop_consumer('g.m1')",
        "SELECT pgpipe.try_claim_consumer('g.m1')",
        "SELECT pgpipe.join_group('g', 'g.m1', ARRAY['t'])",
        "SELECT pgpipe.drop_group('g')",
    ] {
        refused(&evil, sql, "42501", &belongs).await;
    }
    let seen: i64 = evil
        .query_one("SELECT count(*) FROM pgpipe.group_members", &[])
        .await
        .expect("group_members")
        .get(0);
    assert_eq!(seen, 0, "another role's members are not shown");
    // Its own group may not read what it may not SELECT.
    refused(
        &evil,
        "SELECT pgpipe.join_group('mine', 'mine.1', ARRAY['secrets'])",
        "42501",
        &["secrets"],
    )
    .await;
    // Nor may it touch the tables behind the API.
    refused(
        &evil,
        "UPDATE pgpipe.consumer_groups SET batch = 0",
        "42501",
        &[],
    )
    .await;

    // The owner's own mistakes are named: other channels, a session not holding the member.
    refused(
        &owner,
        "SELECT pgpipe.join_group('g', 'g.m2', ARRAY['t', 'secrets'])",
        "22023",
        &["reads channels t", "same --channel"],
    )
    .await;
    let other = db.client_as(pgpipe_tests::FORWARDER_ROLE).await;
    refused(
        &other,
        "SELECT * FROM pgpipe.read_group('g.m1')",
        "55006",
        &["not held by this session", "join_group"],
    )
    .await;
    let standby: Option<String> = other
        .query_one("SELECT pgpipe.join_group('g', 'g.m1', ARRAY['t'])", &[])
        .await
        .expect("join as standby")
        .get(0);
    assert_eq!(
        standby, None,
        "a second session for the same member stands by"
    );
    // The group's events still flow to its member.
    db.execute("INSERT INTO t VALUES (1)").await;
    let (ids, _) = read_share(&owner, "g.m1", "g:0:0:").await;
    assert_eq!(ids.len(), 1);
}
