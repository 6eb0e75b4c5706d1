//! The benchmark's peers of the forwarder, in one Rust process each so that they are not
//! the bottleneck they measure (`bench/delivery.py` runs them):
//!
//! - `receiver PORT OUT [DELAY_MS]`: an HTTP/1.1 webhook receiver (keep-alive, any number
//!   of connections) answering 200 after DELAY_MS; each body becomes one line of OUT.
//! - `sse URL CLIENTS EXPECT SECS` / `ws URL CLIENTS EXPECT SECS`: CLIENTS connections to
//!   the forwarder's `/events` or `/ws`, each counting the events it receives and checking
//!   that the row ids (`"row":{"id":N`) increase. Ends when every client has EXPECT events
//!   or after SECS; prints one JSON line: connected, complete clients, min/median/max
//!   events, order violations, time to connect.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = match args.first().map(String::as_str) {
        Some("receiver") if args.len() >= 3 => {
            let delay = args.get(3).and_then(|d| d.parse().ok()).unwrap_or(0);
            runtime.block_on(receiver(&args[1], &args[2], Duration::from_millis(delay)))
        }
        Some(kind @ ("sse" | "ws")) if args.len() == 5 => runtime.block_on(clients(
            kind == "ws",
            &args[1],
            args[2].parse().unwrap_or(1),
            args[3].parse().unwrap_or(0),
            Duration::from_secs(args[4].parse().unwrap_or(10)),
        )),
        _ => Err("usage: pgpipe-bench-peer receiver PORT OUT [DELAY_MS] | sse|ws URL CLIENTS EXPECT SECS".into()),
    };
    if let Err(e) = result {
        let _ = writeln!(std::io::stderr(), "pgpipe-bench-peer: {e}");
        std::process::exit(1);
    }
}

type Res = Result<(), String>;

async fn receiver(port: &str, out: &str, delay: Duration) -> Res {
    let listener = TcpListener::bind(format!("127.0.0.1:{port}"))
        .await
        .map_err(|e| format!("bind 127.0.0.1:{port}: {e}"))?;
    let file = std::fs::File::create(out).map_err(|e| format!("create {out}: {e}"))?;
    let sink = Arc::new(Mutex::new(std::io::BufWriter::with_capacity(1 << 20, file)));
    // Flushed often enough for the bench's watcher to see progress.
    let flusher = sink.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = flusher.lock().map(|mut w| w.flush());
        }
    });
    loop {
        let (stream, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve(stream, sink.clone(), delay));
    }
}

/// One keep-alive connection: requests in, `200` out, bodies to the sink.
async fn serve(
    mut stream: TcpStream,
    sink: Arc<Mutex<std::io::BufWriter<std::fs::File>>>,
    delay: Duration,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        // Headers.
        let end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        while buf.len() < end + len {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        {
            let Ok(mut w) = sink.lock() else { return };
            let _ = w.write_all(&buf[end..end + len]);
            let _ = w.write_all(b"\n");
        }
        buf.drain(..end + len);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// What one client saw.
#[derive(Default, Clone, Copy)]
struct Seen {
    events: usize,
    out_of_order: usize,
    last: i64,
}

impl Seen {
    /// Counts the event whose JSON starts at `text` (up to its end of line).
    fn event(&mut self, text: &[u8]) {
        self.events += 1;
        const ROW: &[u8] = b"\"row\":{\"id\":";
        if let Some(at) = find(text, ROW) {
            let digits: Vec<u8> = text[at + ROW.len()..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .copied()
                .collect();
            if let Ok(n) = std::str::from_utf8(&digits).unwrap_or("").parse::<i64>() {
                if n <= self.last {
                    self.out_of_order += 1;
                }
                self.last = n;
            }
        }
    }
}

async fn clients(ws: bool, url: &str, n: usize, expect: usize, secs: Duration) -> Res {
    let started = Instant::now();
    let connected = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let results: Arc<Mutex<Vec<Seen>>> = Arc::new(Mutex::new(vec![Seen::default(); n]));
    let deadline = tokio::time::Instant::now() + secs;
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (url, connected, done, results) = (
            url.to_string(),
            connected.clone(),
            done.clone(),
            results.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let run = async {
                if ws {
                    ws_client(&url, i, expect, &connected, &results).await
                } else {
                    sse_client(&url, i, expect, &connected, &results).await
                }
            };
            let _ = tokio::time::timeout_at(deadline, run).await;
            done.fetch_add(1, Ordering::SeqCst);
        }));
    }
    // Report once every client connected, for the bench to start writing.
    let wait_connected = async {
        while connected.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let _ = tokio::time::timeout(secs, wait_connected).await;
    eprintln!(
        "connected {} in {:.2}s",
        connected.load(Ordering::SeqCst),
        started.elapsed().as_secs_f64()
    );
    let connect_s = started.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    let seen = results.lock().map_err(|_| "lock")?.clone();
    let mut counts: Vec<usize> = seen.iter().map(|s| s.events).collect();
    counts.sort_unstable();
    let complete = counts.iter().filter(|c| **c >= expect).count();
    // The result is this program's output (a JSON line on stdout), not a log.
    let line = format!(
        "{{\"clients\": {n}, \"connected\": {}, \"connect_s\": {connect_s:.2}, \"expect\": {expect}, \"complete\": {complete}, \"min\": {}, \"median\": {}, \"max\": {}, \"out_of_order\": {}, \"elapsed_s\": {:.2}}}",
        connected.load(Ordering::SeqCst),
        counts.first().copied().unwrap_or(0),
        counts.get(n / 2).copied().unwrap_or(0),
        counts.last().copied().unwrap_or(0),
        seen.iter().map(|s| s.out_of_order).sum::<usize>(),
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(std::io::stdout(), "{line}");
    Ok(())
}

fn record(results: &Mutex<Vec<Seen>>, i: usize, seen: Seen) {
    if let Ok(mut r) = results.lock() {
        r[i] = seen;
    }
}

async fn sse_client(
    url: &str,
    i: usize,
    expect: usize,
    connected: &AtomicUsize,
    results: &Mutex<Vec<Seen>>,
) -> Res {
    let rest = url
        .strip_prefix("http://")
        .ok_or("sse URL must be http://")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = TcpStream::connect(host).await.map_err(|e| e.to_string())?;
    let request =
        format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut seen = Seen::default();
    let mut buf: Vec<u8> = Vec::with_capacity(256 * 1024);
    let mut chunk = vec![0u8; 256 * 1024];
    let mut counted = false;
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        if !counted && find(&buf, b"connected").is_some() {
            counted = true;
            connected.fetch_add(1, Ordering::SeqCst);
        }
        // Whole lines only; `data: ` lines are events (chunked framing adds other lines).
        let Some(last_nl) = buf.iter().rposition(|b| *b == b'\n') else {
            continue;
        };
        for line in buf[..last_nl].split(|b| *b == b'\n') {
            if let Some(data) = line.strip_prefix(b"data: ") {
                seen.event(data);
            }
        }
        buf.drain(..=last_nl);
        record(results, i, seen);
        if seen.events >= expect {
            break;
        }
    }
    record(results, i, seen);
    Ok(())
}

async fn ws_client(
    url: &str,
    i: usize,
    expect: usize,
    connected: &AtomicUsize,
    results: &Mutex<Vec<Seen>>,
) -> Res {
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| e.to_string())?;
    connected.fetch_add(1, Ordering::SeqCst);
    let mut seen = Seen::default();
    while let Some(message) = socket.next().await {
        match message {
            Ok(tokio_tungstenite::tungstenite::Message::Text(text)) => {
                seen.event(text.as_bytes());
                if seen.events % 64 == 0 {
                    record(results, i, seen);
                }
                if seen.events >= expect {
                    break;
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    record(results, i, seen);
    Ok(())
}
