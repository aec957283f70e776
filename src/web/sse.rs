//! Live updates: the engine's event bus as a Server-Sent Events stream.
//!
//! Owns: one stream per open page, optionally filtered to one topic. Each
//! message says only which topic moved and to what status/step (ids and
//! fixed names, no topic or model text); the page then re-fetches itself.
//! Bounded: a stream lives at most `MAX_LIFETIME` (EventSource reconnects),
//! a client that stops reading is dropped after `WRITE_TIMEOUT`, and a
//! comment every `KEEPALIVE` notices closed connections. Must not: be
//! needed for anything but freshness (pages work without it).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Bytes, Frame};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, watch};

use crate::engine::Scriptorium;

pub const MAX_LIFETIME: Duration = Duration::from_secs(300);
pub const KEEPALIVE: Duration = Duration::from_secs(15);
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages buffered per stream before the writer waits for the client.
const BUFFER: usize = 32;

/// The response body: frames come from the producer task.
pub struct SseBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

#[derive(serde::Serialize)]
struct Message<'a> {
    topic_id: &'a str,
    status: &'a str,
    step: &'a str,
    outcome: &'a str,
}

pub fn stream(engine: Scriptorium, topic: Option<String>, mut stop: watch::Receiver<bool>) -> SseBody {
    let (tx, rx) = mpsc::channel::<Bytes>(BUFFER);
    let mut events = engine.events();
    drop(engine);
    tokio::spawn(async move {
        let send = |text: String| {
            let tx = tx.clone();
            async move { matches!(tokio::time::timeout(WRITE_TIMEOUT, tx.send(Bytes::from(text))).await, Ok(Ok(()))) }
        };
        // `retry`: reconnect after 2 s when the stream ends.
        if !send("retry: 2000\n: connected\n\n".into()).await {
            return;
        }
        let deadline = tokio::time::sleep(MAX_LIFETIME);
        tokio::pin!(deadline);
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.tick().await;
        loop {
            let text = tokio::select! {
                _ = &mut deadline => break,
                _ = super::stopped(&mut stop) => break,
                _ = tx.closed() => break,
                _ = keepalive.tick() => ": ping\n\n".to_string(),
                ev = events.recv() => match ev {
                    Ok(ev) => {
                        if topic.as_deref().is_some_and(|t| t != ev.topic_id) {
                            continue;
                        }
                        let msg = Message {
                            topic_id: &ev.topic_id,
                            status: ev.status.as_str(),
                            step: &ev.step,
                            outcome: &ev.outcome,
                        };
                        match serde_json::to_string(&msg) {
                            Ok(json) => format!("data: {json}\n\n"),
                            Err(_) => continue,
                        }
                    }
                    // Missed some: the page re-fetches anyway, so say so.
                    Err(RecvError::Lagged(n)) => format!("data: {{\"lagged\":{n}}}\n\n"),
                    Err(RecvError::Closed) => break,
                },
            };
            if !send(text).await {
                break;
            }
        }
    });
    SseBody { rx }
}
