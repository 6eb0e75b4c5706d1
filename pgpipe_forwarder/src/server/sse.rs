//! sse: Server-Sent Events at `GET /events` and `GET /events/{channel}`.
//!
//! Each event is one frame: `id: <event id>`, `event: <channel>`, `data: <event JSON>`.
//! Idle streams get a heartbeat comment every `sse.heartbeat_interval`. Responses carry
//! `X-Accel-Buffering: no` so nginx-style proxies do not hold frames back.
//!
//! Resuming: a client that reconnects with `Last-Event-ID` (the header browsers send, or
//! `?lastEventId=` / `?last_event_id=`) first gets the events it missed, then the live
//! stream, with no gap and no duplicate at the seam:
//! 1. the client is registered with the hub first, so live events from then on are
//!    buffered for it;
//! 2. the missed events come from the hub's in-memory history when the id is still in it
//!    (exact: the history is the delivery order and is copied under the same lock that
//!    registers the client);
//! 3. otherwise (the forwarder restarted, or the id is older than `sse.replay_buffer`
//!    events) from the queue through `pgpipe.events_after()`, and buffered live events
//!    whose id was already replayed are skipped.
//!
//! The queue keeps events until retention drops them; a `Last-Event-ID` older than that
//! (or unknown) gets a `: replay unavailable` comment and the live stream only.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, StreamExt};
use serde::Deserialize;
use uuid::Uuid;

use super::HttpState;
use crate::adapter::live::{LiveEvent, Missed};
use crate::db::QueueClient;
use crate::error::Error;
use crate::event::Event;
use crate::metrics::{ClientGuard, ClientKind};

/// Query parameters of `/events`.
#[derive(Debug, Default, Deserialize)]
pub struct EventsQuery {
    /// Resume after this event id (for clients that cannot set `Last-Event-ID`).
    #[serde(rename = "lastEventId", alias = "last_event_id")]
    last_event_id: Option<String>,
    /// `0`/`false` omits the `event:` line, so an `EventSource`'s `onmessage` sees every
    /// channel (the live page uses it).
    event_names: Option<String>,
}

/// `GET /events`: every channel.
pub async fn all_channels(
    State(state): State<Arc<HttpState>>,
    Query(query): Query<EventsQuery>,
    headers: HeaderMap,
) -> Response {
    stream_events(state, None, query, &headers).await
}

/// `GET /events/{channel}`: one channel (exact match).
pub async fn one_channel(
    State(state): State<Arc<HttpState>>,
    Path(channel): Path<String>,
    Query(query): Query<EventsQuery>,
    headers: HeaderMap,
) -> Response {
    if !state.serves_channel(&channel) {
        return crate::server::unknown_channel(&channel);
    }
    stream_events(state, Some(channel), query, &headers).await
}

async fn stream_events(
    state: Arc<HttpState>,
    channel: Option<String>,
    query: EventsQuery,
    headers: &HeaderMap,
) -> Response {
    let Some(hub) = state.sse.clone() else {
        return (
            StatusCode::NOT_FOUND,
            "the sse adapter is not enabled (--adapter sse)\n",
        )
            .into_response();
    };
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(query.last_event_id)
        .filter(|s| !s.trim().is_empty());
    let last_id = match last_id.as_deref().map(|s| Uuid::parse_str(s.trim())) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => {
            return (
                StatusCode::BAD_REQUEST,
                "Last-Event-ID is not an event id (a UUID)\n",
            )
                .into_response()
        }
    };
    let named = !matches!(
        query.event_names.as_deref(),
        Some("0" | "false" | "no" | "off")
    );

    let guard = ClientGuard::new(ClientKind::Sse);
    let subscription = hub.subscribe(channel.clone(), last_id);
    let mut notes = vec!["connected".to_owned()];
    // After a queue replay, live events up to the client's last one are repeats (a
    // restarted forwarder delivers its unacknowledged events again): skip them.
    let mut floor = None;
    let replayed = match (subscription.missed, last_id) {
        (Missed::Events(events), _) => events,
        (Missed::Unknown, Some(id)) => {
            match replay_from_queue(&state, id, channel.as_deref()).await {
                Ok(events) => {
                    floor = Some(id);
                    events.into_iter().map(LiveEvent::new).collect()
                }
                Err(e) => {
                    tracing::info!(component = "adapter", adapter = "sse", last_event_id = %id,
                    error = %e, "no replay for a resuming client");
                    // The client learns that, not why: error texts name hosts and roles.
                    notes.push("replay unavailable".to_owned());
                    Vec::new()
                }
            }
        }
        _ => Vec::new(),
    };
    tracing::debug!(component = "adapter", adapter = "sse", channel = ?channel,
        replayed = replayed.len(), "client connected");
    if !replayed.is_empty() {
        crate::metrics::delivered("sse", replayed.len() as u64);
    }
    let seen: HashSet<Uuid> = replayed.iter().map(|e| e.event.id).collect();

    let mut head = BytesMut::new();
    for note in notes {
        head.extend_from_slice(format!(": {note}\n\n").as_bytes());
    }
    for e in &replayed {
        head.extend_from_slice(&frame(e, named));
    }
    let heartbeat_every = state.settings.heartbeat_interval;
    let head = stream::once(async move { head.freeze() });
    let live = stream::unfold(
        (subscription.events, seen, guard),
        move |(mut events, mut seen, guard)| async move {
            let mut out = BytesMut::new();
            let wanted = |e: &LiveEvent, seen: &mut HashSet<Uuid>| {
                // Already sent from the queue replay (the seam): skip it once.
                let repeat = !seen.is_empty() && seen.remove(&e.event.id);
                !repeat && floor.is_none_or(|last| e.event.id > last)
            };
            loop {
                let next = tokio::time::timeout(heartbeat_every, events.recv()).await;
                let event = match next {
                    Err(_) => return Some((Bytes::from_static(HEARTBEAT), (events, seen, guard))),
                    Ok(None) => return None,
                    Ok(Some(event)) => event,
                };
                if wanted(&event, &mut seen) {
                    out.extend_from_slice(&frame(&event, named));
                }
                // What is already buffered goes out in the same write.
                while out.len() < COALESCE_BYTES {
                    let Some(event) = events.try_recv() else {
                        break;
                    };
                    if wanted(&event, &mut seen) {
                        out.extend_from_slice(&frame(&event, named));
                    }
                }
                if !out.is_empty() {
                    return Some((out.freeze(), (events, seen, guard)));
                }
            }
        },
    );
    let cancel = state.cancel.clone();
    let body = head
        .chain(live)
        .take_until(cancel.cancelled_owned())
        .map(Ok::<Bytes, Infallible>);
    let mut response = Body::from_stream(body).into_response();
    let h = response.headers_mut();
    h.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    h.insert(
        axum::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    response
}

/// The keep-alive comment sent when a stream had nothing for `sse.heartbeat_interval`.
const HEARTBEAT: &[u8] = b": heartbeat\n\n";

/// Most bytes of buffered frames written to a client at once.
const COALESCE_BYTES: usize = 64 * 1024;

/// Frame kinds cached per event (see [`LiveEvent::frame`]).
const NAMED: usize = 0;
const UNNAMED: usize = 1;

/// The event's SSE frame, built once per event and kind for every client.
fn frame(event: &LiveEvent, named: bool) -> Bytes {
    // An SSE field ends at a line break: a channel that has one (listen_notify and wal
    // channels are not checked by the extension) goes unnamed rather than break the
    // stream; it is still in the data. The JSON line itself has none (serde escapes them).
    let named = named && !event.event.channel.contains(['\r', '\n']);
    event.frame(if named { NAMED } else { UNNAMED }, |e| {
        let mut f = BytesMut::with_capacity(e.json().len() + 96);
        f.extend_from_slice(b"id: ");
        f.extend_from_slice(e.event.id.to_string().as_bytes());
        f.extend_from_slice(b"\n");
        if named {
            f.extend_from_slice(b"event: ");
            f.extend_from_slice(e.event.channel.as_bytes());
            f.extend_from_slice(b"\n");
        }
        f.extend_from_slice(b"data: ");
        f.extend_from_slice(e.json());
        f.extend_from_slice(b"\n\n");
        f.freeze()
    })
}

/// How many connections SSE replays share, at most.
pub const REPLAY_CONNECTIONS: usize = 2;

/// The connections SSE replays run on: at most `size` at once, kept open between
/// replays. A resuming client waits (within `sse.read_timeout`) for one rather than
/// opening its own, so a crowd of reconnecting clients cannot exhaust Postgres's
/// connections.
#[derive(Debug)]
pub struct ReplayPool {
    permits: tokio::sync::Semaphore,
    idle: std::sync::Mutex<Vec<tokio_postgres::Client>>,
}

impl ReplayPool {
    /// A pool of at most `size` connections.
    pub fn new(size: usize) -> ReplayPool {
        ReplayPool {
            permits: tokio::sync::Semaphore::new(size.max(1)),
            idle: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Runs `work` on a pooled connection to `url`.
    async fn with_client<T>(
        &self,
        url: &str,
        work: impl AsyncFnOnce(&tokio_postgres::Client) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let _permit = self.permits.acquire().await.expect("never closed");
        let pooled = self
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .filter(|c| !c.is_closed());
        let client = match pooled {
            Some(client) => client,
            None => crate::db::connect(url).await?.0,
        };
        let result = work(&client).await;
        if result.is_ok() && !client.is_closed() {
            self.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(client);
        }
        result
    }
}

/// The events committed after `after` (see `pgpipe.events_after` in sql/replay.sql).
async fn replay_from_queue(
    state: &HttpState,
    after: Uuid,
    channel: Option<&str>,
) -> Result<Vec<Arc<Event>>, Error> {
    let settings = &state.settings;
    if settings.database_url.is_empty() {
        return Err(Error::Config("no database to replay from".into()));
    }
    let channels: Option<Vec<String>> = match channel {
        Some(c) => Some(vec![c.to_owned()]),
        None if settings.channels.is_empty() => None,
        None => Some(settings.channels.clone()),
    };
    let work = async {
        let max = i32::try_from(settings.replay_max).unwrap_or(i32::MAX);
        let events = state
            .replay
            .with_client(&settings.database_url, async |client| {
                QueueClient::new(client)
                    .events_after(after, channels.as_deref(), max)
                    .await
            })
            .await?;
        if events.len() >= settings.replay_max {
            tracing::warn!(
                component = "adapter",
                adapter = "sse",
                max = settings.replay_max,
                "replay truncated at sse.replay_max events"
            );
        }
        Ok(events.into_iter().map(Arc::new).collect())
    };
    match tokio::time::timeout(settings.read_timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(Error::Timeout {
            context: "replay events from the queue".into(),
            after: settings.read_timeout,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_with_a_line_break_cannot_break_the_stream() {
        let event = Event {
            id: Uuid::nil(),
            channel: "evil\r\nevent: forged".into(),
            operation: "NOTIFY".into(),
            payload: serde_json::json!("x").into(),
            key: None,
            source: "listen_notify".into(),
            created_at: chrono::Utc::now(),
            transaction: None,
        };
        // A line break in the channel would end the field; the frame goes unnamed instead.
        let live = LiveEvent::new(Arc::new(event));
        let named = frame(&live, true);
        assert_eq!(named, frame(&live, false));
        let text = std::str::from_utf8(&named).unwrap();
        assert!(!text.contains("\nevent:"), "{text}");
        assert_eq!(text.matches('\n').count(), 3, "id, data, end: {text}");
    }
}
