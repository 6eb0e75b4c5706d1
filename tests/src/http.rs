//! Minimal HTTP clients for the scenarios, over plain TCP so a test controls every byte:
//! [`http_get`] for one request, [`SseClient`] for a Server-Sent Events stream (which a
//! test can simply stop reading to play a stalled client), and [`http_addr`] to find the
//! address a forwarder started with `--sse-addr 127.0.0.1:0` listens on.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::Forwarder;

/// A response: status, headers (names lower-cased) and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// The body as text.
    pub body: String,
}

impl HttpResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The address the forwarder's HTTP server of `kind` (`http`: sse/ws/health/metrics at
/// `sse.addr`; `metrics`: the `metrics_addr` one) listens on, read from its log.
pub async fn http_addr(forwarder: &Forwarder, kind: &str) -> SocketAddr {
    let needle = format!("server=\"{kind}\"");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = forwarder.stderr_text();
        for line in text.lines() {
            if line.contains("HTTP server listening") && line.contains(&needle) {
                let addr = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                    .expect("addr= in the listening line");
                return addr.trim_matches('"').parse().expect("a socket address");
            }
        }
        assert!(
            Instant::now() < deadline,
            "the forwarder did not report its {kind} server address:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `method path` with `headers` and reads the whole response (`Connection: close`).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    let mut stream = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    // Read to the end of the body: Content-Length, the last chunk, or end of stream
    // (some servers keep the connection open despite `Connection: close`).
    let mut raw = Vec::new();
    let read = async {
        let mut buf = vec![0; 16384];
        loop {
            if response_complete(&raw) {
                return;
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no complete response in 10s"));
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

/// Whether `raw` holds a whole response (by Content-Length or a final chunk).
fn response_complete(raw: &[u8]) -> bool {
    let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let body = &raw[head_end + 4..];
    if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return body.len() >= len;
    }
    if head.contains("transfer-encoding: chunked") {
        return body.ends_with(b"0\r\n\r\n");
    }
    false
}

/// `GET path`.
pub async fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    http_request(addr, "GET", path, &[]).await
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// One SSE frame.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SseFrame {
    /// The `id:` field.
    pub id: Option<String>,
    /// The `event:` field.
    pub event: Option<String>,
    /// The `data:` lines joined by `\n`.
    pub data: String,
    /// Comment lines (`: ...`) of the frame.
    pub comments: Vec<String>,
}

impl SseFrame {
    /// The data parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {:?}", self.data))
    }
}

/// A Server-Sent Events stream read line by line.
#[derive(Debug)]
pub struct SseClient {
    /// Status code of the response.
    pub status: u16,
    /// Response headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    reader: BufReader<TcpStream>,
    chunked: bool,
    raw: Vec<u8>,
    pending: String,
}

impl SseClient {
    /// Opens `GET path` with `headers` and reads the response head.
    pub async fn connect(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> SseClient {
        let mut stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        let mut request =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send request");
        let mut reader = BufReader::new(stream);
        let mut status = 0;
        let mut response_headers = Vec::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
                .await
                .expect("response head within 10s")
                .expect("read response head");
            assert!(n > 0, "connection closed before the response head");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if status == 0 {
                status = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
            } else if let Some((n, v)) = line.split_once(':') {
                response_headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let chunked = response_headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
        SseClient {
            status,
            headers: response_headers,
            reader,
            chunked,
            raw: Vec::new(),
            pending: String::new(),
        }
    }

    /// The first header called `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Reads more of the body into `pending` (cancel-safe: bytes land in `raw` first);
    /// false at end of stream.
    async fn fill(&mut self) -> bool {
        let mut buf = vec![0; 8192];
        let n = match self.reader.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        self.raw.extend_from_slice(&buf[..n]);
        if !self.chunked {
            let bytes = std::mem::take(&mut self.raw);
            self.pending.push_str(&String::from_utf8_lossy(&bytes));
            return true;
        }
        loop {
            let Some(eol) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return true;
            };
            let size_text = String::from_utf8_lossy(&self.raw[..eol]).into_owned();
            let Ok(size) = usize::from_str_radix(size_text.trim(), 16) else {
                return false;
            };
            if size == 0 {
                return false;
            }
            if self.raw.len() < eol + 2 + size + 2 {
                return true;
            }
            let chunk: Vec<u8> = self.raw.drain(..eol + 2 + size + 2).collect();
            self.pending
                .push_str(&String::from_utf8_lossy(&chunk[eol + 2..eol + 2 + size]));
        }
    }

    /// The next frame (comment-only frames included), or None at end of stream or
    /// after `timeout`.
    pub async fn next_frame(&mut self, timeout: Duration) -> Option<SseFrame> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(end) = self.pending.find("\n\n") {
                let block = self.pending[..end + 2].to_owned();
                self.pending.replace_range(..end + 2, "");
                let mut frame = SseFrame::default();
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        frame.comments.push(c.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("id:") {
                        frame.id = Some(v.trim_start().to_owned());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        frame.event = Some(v.trim_start().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
                    }
                }
                frame.data = data.join("\n");
                return Some(frame);
            }
            match tokio::time::timeout_at(deadline, self.fill()).await {
                Ok(true) => {}
                Ok(false) | Err(_) => return None,
            }
        }
    }

    /// The next frame that carries an event (skips comments and heartbeats).
    pub async fn next_event(&mut self, timeout: Duration) -> Option<SseFrame> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = self.next_frame(left).await?;
            if frame.id.is_some() || !frame.data.is_empty() {
                return Some(frame);
            }
        }
    }

    /// Reads events until `n` have arrived; panics after `timeout` with what came.
    pub async fn events(&mut self, n: usize, timeout: Duration) -> Vec<SseFrame> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Some(f) => got.push(f),
                None => panic!(
                    "expected {n} SSE events within {timeout:?}, got {}: {got:#?}",
                    got.len()
                ),
            }
        }
        got
    }
}
