//! Step events: what the topic runner tells the world as a topic moves.
//!
//! One broadcast bus; the socket's `watch`, the CLI progress display and
//! tests subscribe. Events are built only when someone listens, so an idle
//! bus costs one atomic load per step. Must not: be the source of truth
//! (the journal is); a slow subscriber may miss events (it is told how many).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::state::TopicStatus;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopicEvent {
    pub topic_id: String,
    /// `route`, `plan`, `write`, `review`, `revise`, `approval` or `topic`.
    pub step: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub variant: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub revision: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub attempt: Option<u32>,
    /// `ok`, `retry`, `failed`, `started`, `resumed`, `completed`,
    /// `awaiting_approval`, `cancelled`.
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub elapsed_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub waited_ms: Option<u64>,
    pub status: TopicStatus,
    pub at_ms: u64,
}

#[derive(Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<TopicEvent>>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new(8192)
    }
}

impl EventBus {
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(16));
        Self { tx }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<TopicEvent>> {
        self.tx.subscribe()
    }

    pub fn has_listeners(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// Builds and sends the event only when someone listens.
    pub fn emit(&self, build: impl FnOnce() -> TopicEvent) {
        if self.has_listeners() {
            let _ = self.tx.send(Arc::new(build()));
        }
    }
}
