//! Journey: someone opens the live page (`GET /`) in a browser and watches a change
//! written to Postgres appear. The browser is Debian's chromium, headless, driven over
//! the DevTools protocol (scripts/setup.sh installs it).

use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pgpipe_tests::http::{http_addr, http_get};
use pgpipe_tests::{test_db, Forwarder};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(30);

/// A headless chromium showing `url`, and a DevTools connection to its page.
struct Browser {
    _process: tokio::process::Child,
    _profile: tempfile::TempDir,
    page: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Browser {
    async fn open(url: &str) -> Browser {
        let binary = ["chromium", "/usr/bin/chromium", "chromium-browser"]
            .into_iter()
            .find(|b| {
                std::process::Command::new(b)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok()
            })
            .expect("chromium is not installed: run scripts/setup.sh (apt-get install chromium)");
        let profile = tempfile::tempdir().expect("profile dir");
        let mut process = tokio::process::Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromium");
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/<id>"
        let mut lines = BufReader::new(process.stderr.take().unwrap()).lines();
        let port: u16 = tokio::time::timeout(WAIT, async {
            while let Some(line) = lines.next_line().await.expect("chromium stderr") {
                if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
                    return rest.split('/').next().unwrap().parse().unwrap();
                }
            }
            panic!("chromium exited before opening DevTools");
        })
        .await
        .expect("chromium's DevTools address in time");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        // The page target's own DevTools socket.
        let devtools: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let mut ws_url = None;
        for _ in 0..100 {
            let list: Value = serde_json::from_str(&http_get(devtools, "/json/list").await.body)
                .unwrap_or(Value::Null);
            ws_url = list.as_array().into_iter().flatten().find_map(|t| {
                (t["type"] == "page")
                    .then(|| t["webSocketDebuggerUrl"].as_str().map(str::to_owned))
                    .flatten()
            });
            if ws_url.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (page, _) = tokio_tungstenite::connect_async(ws_url.expect("a page target"))
            .await
            .expect("connect to the page's DevTools");
        Browser {
            _process: process,
            _profile: profile,
            page,
            next_id: 0,
        }
    }

    /// Evaluates `expression` in the page and returns its value.
    async fn eval(&mut self, expression: &str) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let call = json!({"id": id, "method": "Runtime.evaluate",
            "params": {"expression": expression, "returnByValue": true}});
        self.page
            .send(Message::Text(call.to_string().into()))
            .await
            .expect("send to DevTools");
        loop {
            let msg = tokio::time::timeout(WAIT, self.page.next())
                .await
                .expect("DevTools answers")
                .expect("DevTools open")
                .expect("DevTools frame");
            let Message::Text(text) = msg else { continue };
            let reply: Value = serde_json::from_str(&text).unwrap();
            if reply["id"] == id {
                return reply["result"]["result"]["value"].clone();
            }
        }
    }

    /// Polls `expression` until it is true.
    async fn wait_for(&mut self, expression: &str) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::time::Instant::now() < deadline {
            if self.eval(expression).await == Value::Bool(true) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}

#[tokio::test]
async fn the_live_page_shows_a_change_written_after_it_loaded() {
    let db = test_db("live_page").await;
    db.execute(
        "CREATE TABLE orders (id int PRIMARY KEY, status text); SELECT pgpipe.subscribe('orders'); \
         SELECT pgpipe.rotate();",
    )
    .await;
    let url = db.url();
    let fwd = Forwarder::listen(&url)
        .channel("orders")
        .adapter("sse")
        .flag("--sse-addr", "127.0.0.1:0")
        .spawn();
    let addr = http_addr(&fwd, "http").await;
    let page = http_get(addr, "/").await;
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));

    let mut browser = Browser::open(&format!("http://{addr}/")).await;
    assert!(
        browser
            .wait_for("document.getElementById('status').textContent === 'connected'")
            .await,
        "the page connects to /events; status: {}",
        browser
            .eval("document.getElementById('status').textContent")
            .await
    );

    db.execute("INSERT INTO orders VALUES (42, 'paid')").await;
    let id: String = db
        .query_one(
            "SELECT id::text FROM pgpipe.events WHERE channel = 'orders'",
            &[],
        )
        .await
        .get(0);
    let shown = format!(
        "Array.from(document.querySelectorAll('#events li')).some(li => li.dataset.id === '{id}' \
         && li.textContent.includes('orders') && li.textContent.includes('paid'))"
    );
    assert!(
        browser.wait_for(&shown).await,
        "the event shows on the page: {}",
        browser.eval("document.body.innerText").await
    );
    // The channel table counts it and the filter offers the channel.
    assert_eq!(
        browser
            .eval("document.querySelector('#rates td.ch').textContent")
            .await,
        "orders"
    );
    assert_eq!(
        browser
            .eval("document.querySelector('#rates td.n').textContent")
            .await,
        "1"
    );
    assert_eq!(
        browser
            .eval("Array.from(document.querySelectorAll('#filter option')).map(o => o.value).join(',')")
            .await,
        ",orders"
    );
    // Filtering by another channel hides it.
    browser
        .eval("(() => { const f = document.getElementById('filter'); const o = document.createElement('option'); o.value = 'x'; f.appendChild(o); f.value = 'x'; f.dispatchEvent(new Event('change')); })()")
        .await;
    assert_eq!(
        browser
            .eval("document.querySelector('#events li').hidden")
            .await,
        Value::Bool(true)
    );
}
