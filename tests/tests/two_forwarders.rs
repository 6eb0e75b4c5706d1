//! Journey: the production forwarder sends `orders` to a webhook; someone starts a
//! debugging `pgpipe listen -c orders` (stdout) beside it. Each gets every event, because
//! the default consumer is derived from the channels and the adapters (`orders+webhook`,
//! `orders+stdout`). A third forwarder identical to the first stands by, with a warning
//! that names the holder and `--consumer`. `--start now` makes a new consumer skip what is
//! already queued; a consumer left from before 0.2 (named after the channels alone) is
//! named at start instead of silently holding retention. Never silence: a channel no
//! subscription carries (a typo, the original's `pgpipe:orders`) and `listen_notify` on a
//! channel the extension captures are warned about at start, with the fix.

use std::time::Duration;

use pgpipe_tests::{test_db, wait_until, Forwarder, HttpReceiver, Reply, FORWARDER_ROLE};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debugging_forwarder_does_not_take_the_webhooks_events() {
    let db = test_db("two_forwarders").await;
    db.execute("CREATE TABLE orders (id int PRIMARY KEY); SELECT pgpipe.subscribe('orders');")
        .await;
    // A consumer as pgpipe 0.1 named it by default (the channels alone), made by the
    // forwarder's own role as that forwarder would have.
    db.client_as(FORWARDER_ROLE)
        .await
        .batch_execute("SELECT pgpipe.register_consumer('orders', ARRAY['orders'])")
        .await
        .unwrap();
    db.execute("INSERT INTO orders VALUES (1)").await;
    let receiver = HttpReceiver::start(|_, _| Reply::status(204)).await;
    let url = db.url();
    let hook = receiver.url("/hook");
    let production = Forwarder::listen(&url)
        .channel("orders")
        .adapter("webhook")
        .flag("-u", &hook)
        .spawn();
    let warned = production
        .wait_for_stderr("pgpipe.drop_consumer('orders')", WAIT)
        .await;
    assert!(warned.contains("--consumer orders"), "{warned}");
    let debugging = Forwarder::listen(&url).channel("orders").spawn();
    let _ = debugging
        .wait_for_stderr("created the consumer", WAIT)
        .await;
    db.execute("INSERT INTO orders VALUES (2), (3)").await;

    let both = wait_until(WAIT, async || {
        receiver.requests().len() >= 3 && debugging.stdout_json().len() >= 3
    })
    .await;
    assert!(
        both,
        "each forwarder gets every event\n{}\n{}",
        production.stderr_text(),
        debugging.stderr_text()
    );
    let ids = |events: Vec<serde_json::Value>| -> Vec<i64> {
        events
            .iter()
            .map(|e| e["payload"]["row"]["id"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(ids(debugging.stdout_json()), [1, 2, 3]);
    // The webhook delivers different keys in parallel: every event, in any order.
    let mut hooked = ids(receiver.requests().iter().map(|r| r.json()).collect());
    hooked.sort_unstable();
    assert_eq!(hooked, [1, 2, 3]);

    // The same adapters again: the same consumer, so this one stands by, loudly.
    let standby = Forwarder::listen(&url)
        .channel("orders")
        .adapter("webhook")
        .flag("-u", &hook)
        .spawn();
    let warning = standby
        .wait_for_stderr("stands by and delivers nothing", WAIT)
        .await;
    assert!(
        warning.contains("orders+webhook")
            && warning.contains("--consumer NAME")
            && warning.contains("pid "),
        "the warning names the consumer, its holder and the fix: {warning}"
    );
    assert!(warning.contains("WARN"), "{warning}");

    // A new consumer with --start now skips what is queued already.
    let late = Forwarder::listen(&url)
        .channel("orders")
        .flag("--consumer", "late")
        .flag("--start", "now")
        .spawn();
    let _ = late.wait_for_stderr("created the consumer", WAIT).await;
    db.execute("INSERT INTO orders VALUES (4)").await;
    let got = late.wait_for_events(1, WAIT).await;
    assert_eq!(ids(got), [4], "{}", late.stderr_text());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ids(late.stdout_json()), [4]);
    for f in [&production, &debugging, &standby, &late] {
        f.sigterm();
    }
    for f in [&production, &debugging, &standby, &late] {
        assert!(f.wait_exit(WAIT).await.success(), "{}", f.stderr_text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_nothing_produces_are_named_at_start() {
    let db = test_db("unproduced_channels").await;
    db.execute("CREATE TABLE orders (id int PRIMARY KEY); SELECT pgpipe.subscribe('orders');")
        .await;
    let url = db.url();
    // The original pgpipe's channel name, and a typo: nothing produces either.
    let fwd = Forwarder::listen(&url)
        .channel("pgpipe:orders")
        .channel("ordrs")
        .spawn();
    let log = fwd
        .wait_for_stderr("only pgpipe.emit('ordrs', ...) produces events", WAIT)
        .await;
    assert!(
        log.contains("original pgpipe's NOTIFY channel name") && log.contains("--channel orders"),
        "{log}"
    );
    // listen_notify on a channel the extension captures delivers nothing: said so.
    let notify = Forwarder::listen(&url)
        .channel("orders")
        .detector("listen_notify")
        .spawn();
    let log = notify
        .wait_for_stderr("listen_notify will deliver nothing", WAIT)
        .await;
    assert!(log.contains("--detector queue"), "{log}");
    for f in [&fwd, &notify] {
        f.sigterm();
        assert!(f.wait_exit(WAIT).await.success(), "{}", f.stderr_text());
    }
}
