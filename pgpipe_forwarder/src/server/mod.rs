//! The HTTP server (axum on hyper): the sse and ws adapters' endpoints, `/healthz`,
//! `/readyz`, `/metrics` and the live page at `/`.
//!
//! It runs at `sse.addr` when the sse or ws adapter is on, and a second one with only
//! `/healthz`, `/readyz` and `/metrics` at `metrics_addr` when that is set.
//!
//! - CORS: requests with an `Origin` in `sse.cors_origins` (`*`: any) get
//!   `Access-Control-Allow-Origin`; preflights (`OPTIONS`) answer 204 allowing `GET`,
//!   `OPTIONS` and the `Last-Event-ID` and `Authorization` headers.
//! - Auth: with `sse.auth_token` set, `/events*` and `/ws*` need `Authorization: Bearer
//!   <token>` or `?token=<token>` (EventSource cannot set headers); 401 otherwise.
//! - Timeouts: a request's headers must arrive within `sse.read_timeout`; a connection
//!   with no traffic either way for `sse.idle_timeout` is closed (streams stay alive through
//!   their heartbeats and pings).

pub mod sse;
pub mod ws;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::adapter::live::Hub;
use crate::config::{parse_listen_addr, Config, DetectorKind};
use crate::error::Error;
use crate::health::Health;

/// The live page served at `GET /`.
const LIVE_PAGE: &str = include_str!("../../web/live.html");

/// What the handlers need from the configuration.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Interval of SSE heartbeat comments.
    pub heartbeat_interval: Duration,
    /// Interval of WebSocket pings.
    pub ping_interval: Duration,
    /// Silence after which a WebSocket client is dropped.
    pub pong_timeout: Duration,
    /// Time allowed for request headers (and for a replay query).
    pub read_timeout: Duration,
    /// Connections without traffic for this long are closed.
    pub idle_timeout: Duration,
    /// Allowed CORS origins (`*`: any).
    pub cors_origins: Vec<String>,
    /// Bearer token required by sse and ws; empty: none.
    pub auth_token: crate::config::Secret,
    /// Database to replay missed SSE events from and measure queue lag in.
    pub database_url: String,
    /// Channels the forwarder reads (the replay filter of `/events`).
    pub channels: Vec<String>,
    /// Most events one queue replay sends.
    pub replay_max: usize,
    /// The queue consumer whose lag `/metrics` reports; empty: none.
    pub consumer: String,
}

impl HttpSettings {
    /// The settings `config` gives.
    pub fn new(config: &Config) -> HttpSettings {
        let queue = matches!(
            config.detector.kind,
            DetectorKind::Auto | DetectorKind::Queue
        );
        HttpSettings {
            heartbeat_interval: config.sse.heartbeat_interval,
            ping_interval: config.websocket.ping_interval,
            pong_timeout: config.websocket.pong_timeout,
            read_timeout: config.sse.read_timeout,
            idle_timeout: config.sse.idle_timeout,
            cors_origins: config.sse.cors_origins.clone(),
            auth_token: config.sse.auth_token.clone(),
            database_url: config.database_url.clone(),
            channels: config.channels.clone(),
            replay_max: config.sse.replay_max,
            consumer: if queue {
                crate::detector::queue::consumer_of(config)
            } else {
                String::new()
            },
        }
    }
}

/// Shared state of the HTTP handlers.
#[derive(Debug)]
pub struct HttpState {
    /// Component health.
    pub health: Health,
    /// The sse adapter's clients, when it is on.
    pub sse: Option<Arc<Hub>>,
    /// The ws adapter's clients, when it is on.
    pub ws: Option<Arc<Hub>>,
    /// Settings from the configuration.
    pub settings: HttpSettings,
    /// Fires on shutdown: streams end, the server stops accepting.
    pub cancel: CancellationToken,
    /// Connection used to measure queue lag, kept between scrapes.
    lag_client: Mutex<Option<tokio_postgres::Client>>,
    /// The few connections SSE replays share (never one per resuming client).
    pub replay: crate::server::sse::ReplayPool,
}

impl HttpState {
    /// State for the handlers.
    pub fn new(
        health: Health,
        sse: Option<Arc<Hub>>,
        ws: Option<Arc<Hub>>,
        settings: HttpSettings,
        cancel: CancellationToken,
    ) -> Arc<HttpState> {
        Arc::new(HttpState {
            health,
            sse,
            ws,
            settings,
            cancel,
            lag_client: Mutex::new(None),
            replay: crate::server::sse::ReplayPool::new(crate::server::sse::REPLAY_CONNECTIONS),
        })
    }

    /// Whether `/events/{channel}` and `/ws/{channel}` may serve `channel`: only the
    /// channels this forwarder reads (any, when it reads every channel).
    pub fn serves_channel(&self, channel: &str) -> bool {
        self.settings.channels.is_empty() || self.settings.channels.iter().any(|c| c == channel)
    }
}

/// The 404 for a channel this forwarder does not read.
pub fn unknown_channel(channel: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!(
            "this forwarder does not read channel {:?} (it reads the channels given with --channel)\n",
            channel.escape_debug().to_string()
        ),
    )
        .into_response()
}

/// All routes: streams, health, metrics and the live page.
pub fn router(state: Arc<HttpState>) -> Router {
    let streams = Router::new()
        .route("/events", get(sse::all_channels))
        .route("/events/{channel}", get(sse::one_channel))
        .route("/ws", get(ws::all_channels))
        .route("/ws/{channel}", get(ws::one_channel))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/", get(live_page))
        .merge(streams)
        .merge(ops_routes())
        .layer(middleware::from_fn_with_state(state.clone(), cors))
        .with_state(state)
}

/// `/healthz`, `/readyz` and `/metrics` only (the `metrics_addr` server).
pub fn ops_router(state: Arc<HttpState>) -> Router {
    ops_routes()
        .layer(middleware::from_fn_with_state(state.clone(), cors))
        .with_state(state)
}

fn ops_routes() -> Router<Arc<HttpState>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

async fn live_page() -> Html<&'static str> {
    Html(LIVE_PAGE)
}

async fn healthz(State(state): State<Arc<HttpState>>, request: Request) -> Response {
    let status = if state.health.healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut report = state.health.report();
    // With a token set, an unauthenticated caller learns up/down only: error texts can
    // name hosts, tables and roles.
    if !state.settings.auth_token.is_empty() && !authorized(&state, &request) {
        strip_reasons(&mut report);
    }
    (status, axum::Json(report)).into_response()
}

/// Removes the error texts (`errors`, `standby`) from a health report, keeping the
/// states.
fn strip_reasons(report: &mut serde_json::Value) {
    if let Some(map) = report.as_object_mut() {
        map.remove("errors");
        map.remove("standby");
    }
}

async fn readyz(State(state): State<Arc<HttpState>>) -> Response {
    if state.health.ready() {
        (
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ready"})),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"status": "not ready"})),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<Arc<HttpState>>) -> Response {
    measure_queue_lag(&state).await;
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::render(),
    )
        .into_response()
}

/// Updates `pgpipe_queue_lag_events` from `pgpipe.consumer_lag`, within `sse.read_timeout`;
/// a failure leaves the last value (health reports the database's state).
async fn measure_queue_lag(state: &HttpState) {
    let s = &state.settings;
    if s.consumer.is_empty() || s.database_url.is_empty() {
        return;
    }
    let mut slot = state.lag_client.lock().await;
    let work = async {
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            *slot = Some(crate::db::connect(&s.database_url).await?.0);
        }
        let client = slot.as_ref().expect("connected above");
        let queue = crate::db::QueueClient::new(client);
        let lag = queue.consumer_lag(&s.consumer).await?;
        Ok::<_, Error>((lag, queue.stale_consumers().await?))
    };
    match tokio::time::timeout(s.read_timeout, work).await {
        Ok(Ok((lag, stale))) => {
            crate::metrics::queue_lag(lag);
            crate::metrics::stale_consumers(stale.len());
        }
        Ok(Err(e)) => {
            tracing::debug!(component = "server", error = %e, "queue lag not measured");
            *slot = None;
        }
        Err(_) => *slot = None,
    }
}

/// Bearer-token check for the stream endpoints.
async fn auth(State(state): State<Arc<HttpState>>, request: Request, next: Next) -> Response {
    if authorized(&state, &request) {
        next.run(request).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "missing or wrong token: send Authorization: Bearer <token> or ?token=<token>\n",
        )
            .into_response()
    }
}

/// Whether `request` carries the token (always, when none is set).
fn authorized(state: &HttpState, request: &Request) -> bool {
    let expected = state.settings.auth_token.expose().as_bytes();
    if expected.is_empty() {
        return true;
    }
    let from_header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().as_bytes().to_vec());
    let from_query = request.uri().query().and_then(|q| {
        q.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == "token").then(|| percent_decode(v))
        })
    });
    [from_header, from_query]
        .into_iter()
        .flatten()
        .any(|given| constant_time_eq(&given, expected))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = s
            .get(i + 1..i + 3)
            .filter(|_| bytes[i] == b'%')
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (_, Some(b)) => {
                out.push(b);
                i += 3;
                continue;
            }
            (b'+', None) => out.push(b' '),
            (b, None) => out.push(b),
        }
        i += 1;
    }
    out
}

/// CORS for browsers on other origins.
async fn cors(State(state): State<Arc<HttpState>>, request: Request, next: Next) -> Response {
    let origins = &state.settings.cors_origins;
    let allowed = request.headers().get(header::ORIGIN).and_then(|origin| {
        if origins.iter().any(|o| o == "*") {
            Some(HeaderValue::from_static("*"))
        } else {
            let text = origin.to_str().ok()?;
            origins.iter().any(|o| o == text).then(|| origin.clone())
        }
    });
    let preflight = request.method() == Method::OPTIONS;
    let mut response = if preflight {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Last-Event-ID, Authorization, Cache-Control, Content-Type"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("86400"),
        );
        r
    } else {
        next.run(request).await
    };
    if let Some(allowed) = allowed {
        let h = response.headers_mut();
        if allowed != "*" {
            h.append(header::VARY, HeaderValue::from_static("Origin"));
        }
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
    }
    response
}

/// Binds `addr` and serves `app` until `cancel` fires (`kind` names the server in the
/// log line that reports the bound address); returns the bound address and the
/// server task (which ends once every connection is closed).
pub async fn serve(
    kind: &'static str,
    addr: &str,
    app: Router,
    settings: &HttpSettings,
    cancel: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<()>), Error> {
    let socket = parse_listen_addr(addr).map_err(Error::Config)?;
    // Name the setting, so "address already in use" says what to change.
    let setting = match kind {
        "http" => "--sse-addr / sse.addr",
        _ => "--metrics-addr / metrics_addr",
    };
    let listener = TcpListener::bind(socket).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            format!(": another process listens there; give {setting} a free port")
        } else {
            format!(" ({setting})")
        };
        Error::io(format!("listen on {addr}{hint}"))(e)
    })?;
    let local = listener
        .local_addr()
        .map_err(Error::io(format!("listen on {addr}")))?;
    tracing::info!(component = "server", server = kind, addr = %local, "HTTP server listening");
    if kind == "http" && settings.auth_token.is_empty() && !local.ip().is_loopback() {
        tracing::warn!(component = "server", server = kind, addr = %local,
            "the event streams (/events, /ws) are open to anyone who reaches this address: \
             set sse.auth_token (--auth-token), or listen on 127.0.0.1");
    }
    let read_timeout = settings.read_timeout;
    let idle_timeout = settings.idle_timeout;
    let task = tokio::spawn(async move {
        let connections = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait a little instead of spinning.
                    tracing::warn!(component = "server", error = %e, "accept failed");
                    tokio::time::sleep(read_timeout.min(Duration::from_secs(1))).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let service = TowerToHyperService::new(app.clone());
            let cancel = cancel.clone();
            connections.spawn(async move {
                // HTTP/1.1 only (SSE and the WebSocket upgrade need nothing else).
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(read_timeout);
                let io = TokioIo::new(IdleIo::new(stream, idle_timeout));
                let conn = builder.serve_connection(io, service).with_upgrades();
                tokio::pin!(conn);
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(component = "server", error = %e, "connection ended");
                        }
                    }
                    _ = cancel.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            });
        }
        connections.close();
        connections.wait().await;
    });
    Ok((local, task))
}

/// A TCP stream that fails with `TimedOut` after `idle` without reads or writes.
struct IdleIo {
    inner: TcpStream,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl IdleIo {
    fn new(inner: TcpStream, idle: Duration) -> IdleIo {
        IdleIo {
            inner,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }

    fn touch(&mut self) {
        let at = tokio::time::Instant::now() + self.idle;
        self.deadline.as_mut().reset(at);
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }
}

fn idle_error() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connection idle")
}

impl AsyncRead for IdleIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                self.touch();
                Poll::Ready(r)
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(idle_error())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for IdleIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                self.touch();
                Poll::Ready(r)
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(idle_error())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                self.touch();
                Poll::Ready(r)
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(idle_error())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Starts the servers `config` asks for: at `sse.addr` when the sse or ws adapter is on,
/// at `metrics_addr` when set. Returns their tasks (and bound addresses).
pub async fn start(
    config: &Config,
    state: &Arc<HttpState>,
    cancel: CancellationToken,
) -> Result<Vec<(SocketAddr, JoinHandle<()>)>, Error> {
    let mut servers = Vec::new();
    if config.has_adapter("sse") || config.has_adapter("ws") {
        servers.push(
            serve(
                "http",
                &config.sse.addr,
                router(state.clone()),
                &state.settings,
                cancel.clone(),
            )
            .await?,
        );
    }
    if !config.metrics_addr.is_empty() {
        servers.push(
            serve(
                "metrics",
                &config.metrics_addr,
                ops_router(state.clone()),
                &state.settings,
                cancel,
            )
            .await?,
        );
    }
    Ok(servers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_reasons_are_stripped_for_strangers() {
        let mut report = serde_json::json!({
            "status": "down",
            "components": {"detector": "down"},
            "errors": {"detector": "connect to db.internal:5432 as admin"}
        });
        strip_reasons(&mut report);
        assert_eq!(
            report,
            serde_json::json!({"status": "down", "components": {"detector": "down"}})
        );
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert_eq!(percent_decode("a%2Fb+c%zz"), b"a/b c%zz");
    }

    #[test]
    fn the_token_is_never_in_debug_output() {
        let mut config = Config::default();
        config.sse.auth_token = "hunter2-token".into();
        assert!(!format!("{config:?}").contains("hunter2"));
        assert!(!format!("{:?}", config.redacted()).contains("hunter2"));
        assert_eq!(config.redacted().sse.auth_token.expose(), "***");
    }
}
