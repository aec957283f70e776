//! Durable topic storage behind a small trait (`TopicStore`), and the
//! per-topic JSON file mirror.
//!
//! Owns: the on-disk format of submissions and journals. The SQLite
//! implementation lives in `sqlite.rs`; a shared store for several daemons
//! would be another implementation of the same trait.
//! Invariant: a future returned by `insert` or `append` resolves only after
//! the data is durable (committed); callers await it before acknowledging a
//! submit or starting the next step. A write is sent when `insert`/`append`
//! is called, not when its future is first polled, so one caller's writes
//! land in call order and dropping the future does not cancel the write. Must not: call a model or hold topic
//! logic (replaying a journal is `TopicState::apply`).

pub mod files;
pub mod redis;
pub mod sqlite;

use std::collections::BTreeMap;

use crate::llm::BoxFuture;
use crate::queue::Lease;
use crate::state::{JournalRecord, TopicState, TopicStatus, TopicSummary};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O error: {0}")]
    Io(String),
    #[error("store database error: {0}")]
    Database(String),
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    #[error("store is closed")]
    Closed,
    /// The writer no longer holds the topic's lease (its fencing epoch is
    /// not the current one): another worker owns the topic now.
    #[error("lease lost: topic `{0}` is owned by another worker")]
    Fenced(String),
    /// The topic's current status does not allow the record (a decision on
    /// a topic no longer awaiting approval, any record on a finished topic),
    /// checked atomically with the append by a shared store.
    #[error("topic `{id}` is {status}: record `{record}` refused")]
    Conflict { id: String, status: String, record: &'static str },
}

/// Result of `insert`: a new topic, or the existing one with the same
/// idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    New,
    Existing(String),
}

#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub status: Option<TopicStatus>,
    /// Return topics stored after this one (insertion order).
    pub after: Option<String>,
    /// 0 means no limit.
    pub limit: usize,
}

pub trait TopicStore: Send + Sync + 'static {
    /// Durably stores a new topic (its `Submission` fields and status).
    fn insert(&self, state: &TopicState) -> BoxFuture<'static, Result<Inserted, StoreError>>;
    /// Durably appends one journal record; `state` is the state after
    /// applying it (for status columns and summaries).
    fn append(&self, state: &TopicState, record: &JournalRecord) -> BoxFuture<'static, Result<(), StoreError>>;
    /// `append` by the holder of `lease`: a store shared by several workers
    /// refuses it with `StoreError::Fenced` when the lease's epoch is not the
    /// topic's current one. A single-process store has nothing to fence.
    fn append_fenced(
        &self,
        state: &TopicState,
        record: &JournalRecord,
        lease: Option<&Lease>,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let _ = lease;
        self.append(state, record)
    }
    /// Rebuilds a topic from its submission and journal.
    fn load(&self, id: &str) -> BoxFuture<'static, Result<Option<TopicState>, StoreError>>;
    fn list(&self, query: ListQuery) -> BoxFuture<'static, Result<Vec<TopicSummary>, StoreError>>;
    /// Every topic that is queued, running or awaiting approval, oldest first.
    fn unfinished(&self) -> BoxFuture<'static, Result<Vec<TopicState>, StoreError>>;
    /// The ids and statuses of every unfinished topic, oldest first: what a
    /// starting engine pushes to its queue (it loads each topic only when
    /// it claims it).
    fn unfinished_ids(&self) -> BoxFuture<'static, Result<Vec<(String, TopicStatus)>, StoreError>> {
        let all = self.unfinished();
        Box::pin(async move { Ok(all.await?.into_iter().map(|s| (s.id, s.status)).collect()) })
    }
    /// Topic counts by status name.
    fn counts(&self) -> BoxFuture<'static, Result<BTreeMap<String, u64>, StoreError>>;
}
