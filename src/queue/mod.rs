//! The topic queue seam: `TopicQueue` (push, claim → lease, renew, ack,
//! release, cancel, depth).
//!
//! Owns: which topic ids wait, which are claimed by whom, and the fencing
//! epoch of each claim. A queue holds ids only; a topic's state lives in
//! the store (`TopicStore`), so a worker claims an id, loads the topic and
//! holds the lease while it runs steps.
//! The in-memory implementation (`memory.rs`) serves one process; a shared
//! implementation (Redis Streams: a consumer group, pending entries as
//! leases, `XAUTOCLAIM` of leases idle past a deadline) fits behind the same
//! trait. Must not: hold topic state, call a model, or decide workflow steps.

pub mod memory;
pub mod redis;

use std::time::Duration;

use crate::llm::BoxFuture;

/// A claim on one topic, held by the worker that runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub topic_id: String,
    /// Fencing epoch, bumped on every claim of this topic. A store that
    /// fences refuses journal appends carrying an older epoch, so a worker
    /// that lost its lease (paused, partitioned) cannot record a step.
    pub epoch: u64,
    /// Times this topic has been claimed, this claim included.
    pub deliveries: u32,
    /// The implementation's handle for the claim (a stream entry id for a
    /// Redis queue; opaque to callers).
    pub handle: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    /// The queue's backing service cannot be reached; callers wait and retry.
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    #[error("queue is closed")]
    Closed,
}

pub trait TopicQueue: Send + Sync + 'static {
    /// Adds a topic id. Called after the store committed the submission, so
    /// a claimed id always has a state to load.
    fn push(&self, topic_id: &str) -> BoxFuture<'static, Result<(), QueueError>>;
    /// Claims up to `max` waiting topics, oldest first, waiting at most
    /// `wait` for one to appear. Returns an empty list on timeout.
    fn claim(&self, max: usize, wait: Duration) -> BoxFuture<'_, Result<Vec<Lease>, QueueError>>;
    /// Extends a lease. `Ok(false)` when it was lost (another worker took
    /// the topic): the holder must stop working on it.
    fn renew(&self, lease: &Lease) -> BoxFuture<'static, Result<bool, QueueError>>;
    /// The topic is finished or parked for a human: forget it.
    fn ack(&self, lease: &Lease) -> BoxFuture<'static, Result<(), QueueError>>;
    /// Gives an unfinished topic back (shutdown): it can be claimed again at
    /// once, from its last journaled step.
    fn release(&self, lease: &Lease) -> BoxFuture<'static, Result<(), QueueError>>;
    /// Removes a waiting (unclaimed) topic. `true` when it was waiting.
    fn cancel(&self, topic_id: &str) -> BoxFuture<'static, Result<bool, QueueError>>;
    /// Topics waiting to be claimed.
    fn depth(&self) -> BoxFuture<'static, Result<usize, QueueError>>;
}
