//! ws: WebSocket at `GET /ws` and `GET /ws/{channel}`: one text frame (the event's JSON)
//! per event.
//!
//! The server pings every `websocket.ping_interval`; a client that answers nothing (no
//! pong, no message) for `websocket.pong_timeout`, or whose socket does not take a frame
//! within that time, is disconnected. A client that reads slowly loses events (counted in
//! `pgpipe_events_dropped_total{adapter="ws"}`) instead of slowing anyone down.

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::SinkExt;
use tokio::time::{Instant, MissedTickBehavior};

use super::HttpState;
use crate::adapter::live::{Hub, LiveEvent};
use crate::metrics::{ClientGuard, ClientKind};

/// WebSocket close code "going away" (server shutting down).
const GOING_AWAY: u16 = 1001;

/// Most buffered events written to a client before one flush.
const COALESCE_FRAMES: usize = 64;

/// Writes one text frame per event (the JSON serialised once for every client, see
/// [`LiveEvent`]), then flushes once.
async fn send_all(socket: &mut WebSocket, events: &[Arc<LiveEvent>]) -> Result<(), axum::Error> {
    for event in events {
        let text = Utf8Bytes::try_from(event.json().clone())
            .unwrap_or_else(|_| Utf8Bytes::from(event.event.to_json_line()));
        socket.feed(Message::Text(text)).await?;
    }
    socket.flush().await
}

/// `GET /ws`: every channel.
pub async fn all_channels(State(state): State<Arc<HttpState>>, ws: WebSocketUpgrade) -> Response {
    upgrade(state, None, ws)
}

/// `GET /ws/{channel}`: one channel (exact match).
pub async fn one_channel(
    State(state): State<Arc<HttpState>>,
    Path(channel): Path<String>,
    ws: WebSocketUpgrade,
) -> Response {
    if !state.serves_channel(&channel) {
        return crate::server::unknown_channel(&channel);
    }
    upgrade(state, Some(channel), ws)
}

fn upgrade(state: Arc<HttpState>, channel: Option<String>, ws: WebSocketUpgrade) -> Response {
    let Some(hub) = state.ws.clone() else {
        return (
            StatusCode::NOT_FOUND,
            "the ws adapter is not enabled (--adapter ws)\n",
        )
            .into_response();
    };
    ws.on_upgrade(move |socket| serve(socket, hub, channel, state))
}

async fn serve(
    mut socket: WebSocket,
    hub: Arc<Hub>,
    channel: Option<String>,
    state: Arc<HttpState>,
) {
    let _guard = ClientGuard::new(ClientKind::Ws);
    let mut sub = hub.subscribe(channel.clone(), None);
    let ping_interval = state.settings.ping_interval;
    let pong_timeout = state.settings.pong_timeout;
    let mut ping = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    tracing::debug!(component = "adapter", adapter = "ws", channel = ?channel, "client connected");
    let reason = loop {
        tokio::select! {
            _ = state.cancel.cancelled() => {
                let close = Message::Close(Some(CloseFrame { code: GOING_AWAY, reason: "shutting down".into() }));
                let _ = tokio::time::timeout(pong_timeout, socket.send(close)).await;
                break "shutdown";
            }
            event = sub.events.recv() => {
                let Some(event) = event else {
                    let close = Message::Close(Some(CloseFrame { code: GOING_AWAY, reason: "adapter stopped".into() }));
                    let _ = tokio::time::timeout(pong_timeout, socket.send(close)).await;
                    break "adapter stopped";
                };
                // Frames already buffered go out with one flush.
                let mut batch = vec![event];
                while batch.len() < COALESCE_FRAMES {
                    let Some(next) = sub.events.try_recv() else { break };
                    batch.push(next);
                }
                match tokio::time::timeout(pong_timeout, send_all(&mut socket, &batch)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break "send failed",
                    Err(_) => break "send timed out",
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > pong_timeout {
                    break "no pong";
                }
                match tokio::time::timeout(pong_timeout, socket.send(Message::Ping(Vec::new().into()))).await {
                    Ok(Ok(())) => {}
                    _ => break "ping failed",
                }
            }
            message = socket.recv() => match message {
                // Pongs, and anything else the client says, prove it is alive.
                Some(Ok(Message::Close(_))) | None => break "client closed",
                Some(Ok(_)) => last_heard = Instant::now(),
                Some(Err(_)) => break "receive failed",
            },
        }
    };
    tracing::debug!(
        component = "adapter",
        adapter = "ws",
        reason,
        "client disconnected"
    );
}
