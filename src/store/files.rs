//! The per-topic JSON file mirror: `<dir>/<id>.json`, rewritten atomically
//! (unique temp file + rename) after every step, for people who just want
//! files. Not a source of truth: the store is, and `reconcile` makes the
//! files converge on it at start.
//!
//! Owns: the directory (mode 0700) and its files (mode 0600, whatever the
//! umask), the order of writes, and the startup repair. Must not: decide
//! anything from a file's content (the store decides), or let an older
//! snapshot of a topic replace a newer one.
//!
//! Ordering: a write is a `Snapshot`, numbered from one process-wide counter
//! when `FileMirror::snapshot` is called. The caller takes the snapshot
//! under the same lock that applies the topic's records, so snapshot
//! numbers follow the order of the topic's states. Each write goes to its
//! own temp file (`.<id>.<n>.tmp`), and the rename into place happens under
//! a per-topic lock only if no higher-numbered snapshot of that topic is
//! already in place: the last state wins even when writes finish out of
//! order. The per-topic bookkeeping lives only while a write of the topic
//! is pending, so it stays as small as the set of busy topics.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::state::{TopicState, TopicSummary};
use crate::store::{ListQuery, StoreError, TopicStore};

/// Creates `dir` (and missing parents) with mode 0700. An existing
/// directory keeps its mode; one readable by others gets a warning, since
/// changing the mode of a directory we did not create could break its
/// owner's setup.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(dir) {
        if m.is_dir() && m.permissions().mode() & 0o077 != 0 {
            tracing::warn!(dir = %dir.display(), mode = format!("{:o}", m.permissions().mode() & 0o777),
                "data directory is accessible to other users; chmod 700 it");
        }
        if m.is_dir() {
            return Ok(());
        }
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

#[derive(Debug, Default)]
struct Slot {
    /// Snapshots taken and not yet written or dropped.
    pending: u32,
    /// Highest snapshot number renamed into place.
    written: u64,
}

#[derive(Debug, Default)]
struct Order {
    next: AtomicU64,
    topics: Mutex<HashMap<String, Arc<Mutex<Slot>>>>,
}

impl Order {
    fn slot(&self, id: &str) -> Option<Arc<Mutex<Slot>>> {
        self.topics.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    /// One pending snapshot of `id` is done; forget the topic when it was
    /// the last one (a later snapshot has a higher number anyway).
    fn finish(&self, id: &str) {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        let remove = match topics.get(id) {
            Some(slot) => {
                let mut s = slot.lock().unwrap_or_else(|p| p.into_inner());
                s.pending = s.pending.saturating_sub(1);
                s.pending == 0
            }
            None => false,
        };
        if remove {
            topics.remove(id);
        }
    }
}

#[derive(Debug, Clone)]
pub struct FileMirror {
    dir: PathBuf,
    order: Arc<Order>,
}

/// A numbered copy of a topic's state, waiting to be written. Dropping it
/// unwritten (say, the store refused the record) is fine.
#[derive(Debug)]
pub struct Snapshot {
    seq: u64,
    state: TopicState,
    order: Arc<Order>,
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        self.order.finish(&self.state.id);
    }
}

/// What `reconcile` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Topics in the store that were looked at.
    pub checked: u64,
    /// Files (re)written because they were missing, unreadable or stale.
    pub rewritten: u64,
    /// Leftover temp files of writes cut short by a crash, removed.
    pub temp_removed: u64,
}

/// Result of one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The file now holds this snapshot.
    Current,
    /// A newer snapshot was already in place; this one was discarded.
    Superseded,
}

impl FileMirror {
    /// Opens the mirror at `dir`, creating it mode 0700.
    pub fn new(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        create_private_dir(&dir)?;
        Ok(Self { dir, order: Arc::default() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path_for(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Numbers a copy of `state` for writing. Call it under the lock that
    /// applies the topic's records, so numbers follow the states' order.
    pub fn snapshot(&self, state: &TopicState) -> Snapshot {
        let seq = self.order.next.fetch_add(1, Ordering::Relaxed) + 1;
        {
            let mut topics = self.order.topics.lock().unwrap_or_else(|p| p.into_inner());
            let slot = topics.entry(state.id.clone()).or_default();
            slot.lock().unwrap_or_else(|p| p.into_inner()).pending += 1;
        }
        Snapshot { seq, state: state.clone(), order: Arc::clone(&self.order) }
    }

    /// Writes the snapshot on the blocking pool (serialising it there too);
    /// errors are returned, not swallowed, so the caller can log them.
    pub async fn write(&self, snapshot: Snapshot) -> std::io::Result<Written> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.write_blocking(&snapshot)).await.map_err(std::io::Error::other)?
    }

    /// Numbers and writes `state` in one go: for callers that write each
    /// topic from one task only (`scriptorium run --out`, tests).
    pub async fn write_state(&self, state: &TopicState) -> std::io::Result<Written> {
        let snapshot = self.snapshot(state);
        self.write(snapshot).await
    }

    fn write_blocking(&self, snapshot: &Snapshot) -> std::io::Result<Written> {
        let id = &snapshot.state.id;
        let slot = self.order.slot(id).ok_or_else(|| std::io::Error::other("snapshot of an unknown topic"))?;
        // Cheap early exit: a newer snapshot is already in place.
        if slot.lock().unwrap_or_else(|p| p.into_inner()).written > snapshot.seq {
            return Ok(Written::Superseded);
        }
        let json = serde_json::to_vec_pretty(&snapshot.state).map_err(std::io::Error::other)?;
        let tmp = self.dir.join(format!(".{id}.{}.tmp", snapshot.seq));
        let result = write_private(&tmp, &json).and_then(|()| {
            let mut s = slot.lock().unwrap_or_else(|p| p.into_inner());
            if s.written > snapshot.seq {
                return Ok(Written::Superseded);
            }
            // Renamed under the topic's lock: two writes of one topic
            // cannot swap their renames.
            std::fs::rename(&tmp, self.path_for(id))?;
            s.written = snapshot.seq;
            Ok(Written::Current)
        });
        if !matches!(result, Ok(Written::Current)) {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Makes the files converge on the store: every topic whose file is
    /// missing, unreadable or differs from the store's state is rewritten
    /// from the store, and temp files left by a crash are removed. Call it
    /// at start, before the engine runs topics (a write racing it could
    /// otherwise be overwritten by the older state read here).
    ///
    /// Unfinished topics are compared in full (their states are loaded
    /// anyway to resume them); finished ones by their summary (status, step,
    /// scores, revisions, error, last update), because a finished topic's
    /// file that shows the final status was written after its last record.
    /// Files of topics the store does not know are left alone.
    pub async fn reconcile(&self, store: &dyn TopicStore) -> Result<Reconciled, StoreError> {
        let mut report = Reconciled { temp_removed: self.remove_temp_files(), ..Reconciled::default() };
        let io = |e: std::io::Error| StoreError::Io(format!("topic files in {}: {e}", self.dir.display()));
        let unfinished = store.unfinished().await?;
        let mut seen = std::collections::HashSet::new();
        for state in unfinished {
            report.checked += 1;
            seen.insert(state.id.clone());
            let want = serde_json::to_vec_pretty(&state).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if std::fs::read(self.path_for(&state.id)).ok().as_deref() != Some(&want[..]) {
                self.write_state(&state).await.map_err(io)?;
                report.rewritten += 1;
            }
        }
        let mut after = None;
        loop {
            let page = store.list(ListQuery { status: None, after: after.clone(), limit: 500 }).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            for summary in page {
                if seen.contains(&summary.id) || !summary.status.is_terminal() {
                    continue;
                }
                report.checked += 1;
                if self.file_summary(&summary.id).as_ref() == Some(&summary) {
                    continue;
                }
                if let Some(state) = store.load(&summary.id).await? {
                    self.write_state(&state).await.map_err(io)?;
                    report.rewritten += 1;
                }
            }
        }
        Ok(report)
    }

    fn file_summary(&self, id: &str) -> Option<TopicSummary> {
        let bytes = std::fs::read(self.path_for(id)).ok()?;
        let state: TopicState = serde_json::from_slice(&bytes).ok()?;
        Some(TopicSummary::from(&state))
    }

    fn remove_temp_files(&self) -> u64 {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return 0 };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

/// Writes a new file with mode 0600 (the umask can only narrow it).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(bytes)
}
