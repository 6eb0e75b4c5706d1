//! Journey: the queue does not grow forever. Once every consumer has acknowledged a
//! range of transactions, `pgpipe.rotate()` empties and drops its partitions whole (no
//! row-by-row DELETE); a consumer that lags keeps its events in the queue.

use pgpipe_tests::test_db;
use tokio_postgres::Client;

async fn partitions(client: &Client) -> Vec<String> {
    client
        .query(
            "SELECT name FROM pgpipe.event_partitions ORDER BY lower_xid",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Reads everything the consumer has and acknowledges it, as any SQL client would.
async fn consume_all(client: &Client, consumer: &str) -> usize {
    let mut delivered = 0;
    loop {
        let rows = client
            .query(
                "SELECT position, id FROM pgpipe.read($1, NULL, 100)",
                &[&consumer],
            )
            .await
            .unwrap();
        let events = rows
            .iter()
            .filter(|r| r.get::<_, Option<uuid::Uuid>>(1).is_some())
            .count();
        let last: String = rows.last().unwrap().get(0);
        client
            .execute("SELECT pgpipe.ack($1, $2)", &[&consumer, &last])
            .await
            .unwrap();
        delivered += events;
        if events == 0 {
            return delivered;
        }
    }
}

async fn burn_xids(client: &Client, n: usize) {
    for _ in 0..n {
        client
            .batch_execute("SELECT pg_current_xact_id()")
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn acknowledged_partitions_are_dropped_and_a_lagging_consumer_keeps_its_events() {
    let db = test_db("retention").await;
    let client = db.client().await;
    client
        .batch_execute(
            "SET pgpipe.partition_xids = 1000;
             CREATE TABLE t (id int PRIMARY KEY); SELECT pgpipe.subscribe('t');
             SELECT pgpipe.register_consumer('fast', ARRAY['t']);
             SELECT pgpipe.register_consumer('slow', ARRAY['t']);
             SELECT count(*) FROM pgpipe.rotate();",
        )
        .await
        .unwrap();
    let first = partitions(&client).await;
    assert!(!first.is_empty(), "rotate creates partitions ahead");

    for i in 0..50 {
        client
            .execute("INSERT INTO t VALUES ($1)", &[&i])
            .await
            .unwrap();
    }
    burn_xids(&client, 1100).await;
    client
        .batch_execute("SELECT count(*) FROM pgpipe.rotate()")
        .await
        .unwrap();
    assert_eq!(consume_all(&client, "fast").await, 50);

    // 'slow' has read nothing: the horizon stays behind its position.
    client
        .batch_execute("SELECT count(*) FROM pgpipe.rotate()")
        .await
        .unwrap();
    let queued: i64 = client
        .query_one("SELECT count(*) FROM pgpipe.events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(queued, 50, "a lagging consumer keeps its events");
    assert_eq!(partitions(&client).await[0], first[0]);

    assert_eq!(consume_all(&client, "slow").await, 50);
    let done: Vec<(String, Option<String>)> = client
        .query("SELECT action, partition_name FROM pgpipe.rotate()", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        done.contains(&("dropped".into(), Some(first[0].clone()))),
        "{done:?}"
    );
    let queued: i64 = client
        .query_one("SELECT count(*) FROM pgpipe.events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(queued, 0, "delivered to every consumer, so gone");
    assert!(!partitions(&client).await.contains(&first[0]));

    // The queue keeps working after rotation.
    client
        .execute("INSERT INTO t VALUES (1000)", &[])
        .await
        .unwrap();
    assert_eq!(consume_all(&client, "fast").await, 1);
}
