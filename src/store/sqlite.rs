//! The durable SQLite implementation of `TopicStore`.
//!
//! Owns: the database file, its schema (versioned with `PRAGMA user_version`)
//! and the single writer thread. All writes go through that thread, which
//! batches whatever is queued into one transaction (group commit) and replies
//! to every op only after COMMIT; reads use a separate connection on the
//! blocking pool (WAL lets them run while the writer commits).
//! Must not: hold topic logic (a topic is rebuilt with `TopicState::new` +
//! `TopicState::apply`, never patched here), block an async worker thread on
//! SQLite, or assume another process writes the same file (the per-topic
//! journal sequence is cached in the writer thread).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

use super::{Inserted, ListQuery, StoreError, TopicStore};
use crate::llm::BoxFuture;
use crate::state::{JournalRecord, Submission, TopicState, TopicStatus, TopicSummary};

/// Schema version written to `PRAGMA user_version`. Bump on any schema change
/// and add a migration; a file with a newer version is refused rather than
/// half-understood.
pub const SCHEMA_VERSION: i64 = 1;

/// Most ops committed in one transaction. Bounds the latency of the first op
/// in a batch and the size of the WAL growth per commit.
const MAX_BATCH: usize = 512;

/// How long a connection waits on a lock held by another connection (our
/// reader during a checkpoint, or another process) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS topics (
    id              TEXT PRIMARY KEY NOT NULL,
    seq             INTEGER NOT NULL UNIQUE,
    idempotency_key TEXT UNIQUE,
    status          TEXT NOT NULL,
    submission_json TEXT NOT NULL,
    summary_json    TEXT NOT NULL,
    submitted_ms    INTEGER NOT NULL,
    updated_ms      INTEGER NOT NULL
);
-- (status, seq) rather than (status): serves both the status filter and the
-- insertion-order sort of `list` and `unfinished` without a temp sort.
CREATE INDEX IF NOT EXISTS topics_status_seq ON topics (status, seq);
CREATE TABLE IF NOT EXISTS journal (
    topic_id    TEXT NOT NULL REFERENCES topics (id),
    seq         INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    at_ms       INTEGER NOT NULL,
    record_json TEXT NOT NULL,
    PRIMARY KEY (topic_id, seq)
);
";

/// Statuses `unfinished` returns: the ones a restarted daemon must resume.
const UNFINISHED: [TopicStatus; 3] = [TopicStatus::Queued, TopicStatus::Running, TopicStatus::AwaitingApproval];

/// SQLite-backed `TopicStore`. Dropping it closes the writer channel and
/// waits for the writer thread, which commits every op already sent first.
pub struct SqliteStore {
    path: PathBuf,
    /// `Option` only so `Drop` can close the channel before joining.
    writer: Option<mpsc::Sender<Op>>,
    writer_thread: Option<JoinHandle<()>>,
    /// One read connection: SQLite connections are not `Sync`, and reads are
    /// short indexed lookups, so a mutex is enough (a pool would be the next
    /// step if reads ever queue up behind each other).
    reader: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and starts the
    /// writer thread. Fails if the file's schema is newer than this build.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| StoreError::Io(format!("creating {}: {e}", parent.display())))?;
            }
        }
        let at = |e: rusqlite::Error| StoreError::Database(format!("{}: {e}", path.display()));

        let mut conn = Connection::open(path).map_err(at)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(at)?;
        // Checked before any pragma that changes the file, so a database from
        // a newer build is left exactly as it was.
        check_version(&conn, path)?;
        // WAL + synchronous=NORMAL: a commit is appended to the WAL with a
        // write() but not fsync'ed; the fsync happens at checkpoints. A
        // committed transaction therefore survives the process dying at any
        // point (kill -9, panic, OOM kill), which is the durability this
        // store promises. It may lose the last commits on a power loss or OS
        // crash; `synchronous=FULL` would cover that at the cost of an fsync
        // per commit (group commit keeps that affordable if ever needed).
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(at)?;
        if !mode.eq_ignore_ascii_case("wal") {
            // Without WAL the read connection and the writer would block
            // each other: refuse instead of silently degrading.
            return Err(StoreError::Database(format!(
                "{}: cannot enable WAL journal mode (got {mode:?}); is the file on a filesystem without shared-memory support?",
                path.display()
            )));
        }
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(at)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(at)?;
        create_schema(&mut conn, path)?;

        // Read-only: the reader can never take the write lock, so it cannot
        // contend with (or bypass) the writer thread.
        let reader = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(at)?;
        reader.busy_timeout(BUSY_TIMEOUT).map_err(at)?;

        let (tx, rx) = mpsc::channel();
        let writer = Writer { conn, next_seq: HashMap::new() };
        let thread = std::thread::Builder::new()
            .name("scriptorium-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Io(format!("starting store writer thread: {e}")))?;

        Ok(SqliteStore {
            path: path.to_path_buf(),
            writer: Some(tx),
            writer_thread: Some(thread),
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues `op` for the writer thread. The op is sent now, not when the
    /// returned future is first polled: ops from one caller reach the writer
    /// in call order, and an op whose future is dropped is still committed.
    /// If the writer is gone, `op` (and its reply sender) is dropped, so the
    /// caller's reply receiver reports `Closed`.
    fn send(&self, op: Op) {
        if let Some(writer) = &self.writer {
            let _ = writer.send(op);
        }
    }

    /// Runs `f` with the read connection on the blocking pool.
    fn read<T, F>(&self, f: F) -> BoxFuture<'static, Result<T, StoreError>>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let reader = Arc::clone(&self.reader);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                // A panic while holding the lock unwinds through rusqlite's
                // `Transaction`, which rolls back on drop, so the connection
                // is still usable: recover from poisoning.
                let mut conn = reader.lock().unwrap_or_else(|p| p.into_inner());
                f(&mut conn)
            })
            .await
            .map_err(|e| StoreError::Database(format!("store read task failed: {e}")))?
        })
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Closing the channel ends the writer loop only after it has received
        // (and committed) every op already queued.
        drop(self.writer.take());
        if let Some(thread) = self.writer_thread.take() {
            if thread.join().is_err() {
                tracing::error!(path = %self.path.display(), "store writer thread panicked");
            }
        }
    }
}

impl TopicStore for SqliteStore {
    fn insert(&self, state: &TopicState) -> BoxFuture<'static, Result<Inserted, StoreError>> {
        // Encoding happens here, on the caller's thread, so the writer thread
        // only runs SQL.
        let row = match TopicRow::encode(state) {
            Ok(row) => row,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let (reply, done) = oneshot::channel();
        self.send(Op::Insert { row, reply });
        Box::pin(async move { done.await.map_err(|_| StoreError::Closed)? })
    }

    fn append(&self, state: &TopicState, record: &JournalRecord) -> BoxFuture<'static, Result<(), StoreError>> {
        let row = match JournalRow::encode(state, record) {
            Ok(row) => row,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let (reply, done) = oneshot::channel();
        self.send(Op::Append { row, reply });
        Box::pin(async move { done.await.map_err(|_| StoreError::Closed)? })
    }

    fn load(&self, id: &str) -> BoxFuture<'static, Result<Option<TopicState>, StoreError>> {
        let id = id.to_string();
        self.read(move |conn| {
            // One read transaction: the submission and the journal come from
            // the same snapshot even while the writer commits.
            let tx = conn.transaction().db()?;
            let submission: Option<String> = tx
                .prepare_cached("SELECT submission_json FROM topics WHERE id = ?1")
                .db()?
                .query_row([&id], |r| r.get(0))
                .optional()
                .db()?;
            match submission {
                Some(json) => rebuild(&tx, &id, &json).map(Some),
                None => Ok(None),
            }
        })
    }

    fn list(&self, query: ListQuery) -> BoxFuture<'static, Result<Vec<TopicSummary>, StoreError>> {
        self.read(move |conn| {
            let tx = conn.transaction().db()?;
            list_in(&tx, &query)
        })
    }

    fn unfinished(&self) -> BoxFuture<'static, Result<Vec<TopicState>, StoreError>> {
        self.read(|conn| {
            let tx = conn.transaction().db()?;
            let topics: Vec<(String, String)> = {
                let mut stmt = tx
                    .prepare_cached("SELECT id, submission_json FROM topics WHERE status IN (?1, ?2, ?3) ORDER BY seq")
                    .db()?;
                let rows = stmt.query_map(UNFINISHED.map(|s| s.as_str()), |r| Ok((r.get(0)?, r.get(1)?))).db()?;
                rows.collect::<rusqlite::Result<_>>().db()?
            };
            topics.iter().map(|(id, json)| rebuild(&tx, id, json)).collect()
        })
    }

    fn unfinished_ids(&self) -> BoxFuture<'static, Result<Vec<(String, TopicStatus)>, StoreError>> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT id, status FROM topics WHERE status IN (?1, ?2, ?3) ORDER BY seq").db()?;
            let rows = stmt
                .query_map(UNFINISHED.map(|s| s.as_str()), |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .db()?;
            let mut out = Vec::new();
            for row in rows {
                let (id, status) = row.db()?;
                let status = TopicStatus::parse(&status)
                    .ok_or_else(|| StoreError::Corrupt(format!("topic `{id}` has unknown status `{status}`")))?;
                out.push((id, status));
            }
            Ok(out)
        })
    }

    fn counts(&self) -> BoxFuture<'static, Result<BTreeMap<String, u64>, StoreError>> {
        self.read(|conn| {
            // Every status is present, with 0 when empty, so a gauge fed from
            // this does not keep a stale value when a status empties out.
            let mut counts: BTreeMap<String, u64> =
                TopicStatus::ALL.iter().map(|s| (s.as_str().to_string(), 0)).collect();
            let mut stmt = conn.prepare_cached("SELECT status, COUNT(*) FROM topics GROUP BY status").db()?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))).db()?;
            for row in rows {
                let (status, n) = row.db()?;
                counts.insert(status, u64::try_from(n).unwrap_or(0));
            }
            Ok(counts)
        })
    }
}

// ---------------------------------------------------------------------------
// Opening

fn check_version(conn: &Connection, path: &Path) -> Result<i64, StoreError> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| StoreError::Database(format!("{}: {e}", path.display())))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Database(format!(
            "{} has schema version {version}, newer than version {SCHEMA_VERSION} that this build of scriptorium \
             understands; upgrade scriptorium or point it at another database file",
            path.display()
        )));
    }
    Ok(version)
}

fn create_schema(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let at = |e: rusqlite::Error| StoreError::Database(format!("{}: creating schema: {e}", path.display()));
    // IMMEDIATE takes the write lock up front, so two processes opening a new
    // file at once cannot both decide to create the schema.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(at)?;
    // Re-checked under the lock: the file may have changed since `open` looked.
    if check_version(&tx, path)? < SCHEMA_VERSION {
        tx.execute_batch(SCHEMA).map_err(at)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(at)?;
    }
    tx.commit().map_err(at)
}

// ---------------------------------------------------------------------------
// Writes: encoded on the caller's side, executed by the writer thread

/// A `topics` row, ready to insert.
struct TopicRow {
    id: String,
    idempotency_key: Option<String>,
    status: &'static str,
    submission_json: String,
    summary_json: String,
    submitted_ms: i64,
    updated_ms: i64,
}

impl TopicRow {
    fn encode(state: &TopicState) -> Result<TopicRow, StoreError> {
        Ok(TopicRow {
            id: state.id.clone(),
            idempotency_key: state.idempotency_key.clone(),
            status: state.status.as_str(),
            submission_json: encode(&state.submission(), "submission")?,
            summary_json: encode(&TopicSummary::from(state), "summary")?,
            submitted_ms: to_i64(state.submitted_at_ms, "submitted_at_ms")?,
            updated_ms: to_i64(state.updated_at_ms, "updated_at_ms")?,
        })
    }
}

/// A `journal` row plus the topic columns it updates.
struct JournalRow {
    topic_id: String,
    kind: &'static str,
    at_ms: i64,
    record_json: String,
    status: &'static str,
    summary_json: String,
    /// After a terminal record the writer drops the topic's cached next seq
    /// (reloaded from `MAX(seq)` should another append come), so the cache
    /// stays bounded by the number of live topics.
    terminal: bool,
    /// False when the record leaves the status as it was: the `UPDATE` then
    /// skips the status column, so SQLite leaves the status index alone.
    status_may_change: bool,
}

impl JournalRow {
    fn encode(state: &TopicState, record: &JournalRecord) -> Result<JournalRow, StoreError> {
        Ok(JournalRow {
            topic_id: state.id.clone(),
            kind: record.name(),
            at_ms: to_i64(state.updated_at_ms, "updated_at_ms")?,
            record_json: encode(record, "journal record")?,
            status: state.status.as_str(),
            summary_json: encode(&TopicSummary::from(state), "summary")?,
            terminal: state.status.is_terminal(),
            status_may_change: record.may_change_status(),
        })
    }
}

enum Op {
    Insert { row: TopicRow, reply: oneshot::Sender<Result<Inserted, StoreError>> },
    Append { row: JournalRow, reply: oneshot::Sender<Result<(), StoreError>> },
}

/// An op's outcome, held until the batch's COMMIT settles.
enum Reply {
    Insert(oneshot::Sender<Result<Inserted, StoreError>>, Result<Inserted, StoreError>),
    Append(oneshot::Sender<Result<(), StoreError>>, Result<(), StoreError>),
}

impl Reply {
    /// The batch was not committed: ops that succeeded inside it did not
    /// happen after all. Ops that failed on their own keep their own error.
    fn uncommitted(self, why: &str) -> Reply {
        match self {
            Reply::Insert(tx, Ok(_)) => Reply::Insert(tx, Err(uncommitted(why))),
            Reply::Append(tx, Ok(())) => Reply::Append(tx, Err(uncommitted(why))),
            failed => failed,
        }
    }

    fn send(self) {
        // A dropped receiver means the caller stopped waiting; the op's
        // outcome stands either way.
        match self {
            Reply::Insert(tx, result) => {
                let _ = tx.send(result);
            }
            Reply::Append(tx, result) => {
                let _ = tx.send(result);
            }
        }
    }
}

/// The writer thread's state: the only read-write connection.
struct Writer {
    conn: Connection,
    /// Next journal seq per topic, loaded from `MAX(seq)` on first use so an
    /// append does not need that query. Only valid because this thread is
    /// the sole writer; cleared whenever a batch is rolled back.
    next_seq: HashMap<String, i64>,
}

impl Writer {
    fn run(mut self, ops: mpsc::Receiver<Op>) {
        // `recv` fails only once every sender is gone *and* the queue is
        // empty, so ops sent before the store was dropped are committed.
        while let Ok(first) = ops.recv() {
            // Group commit: whatever queued up while the previous batch was
            // committing shares one transaction and one WAL append.
            let mut batch = Vec::with_capacity(16);
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match ops.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.commit_batch(batch);
        }
    }

    fn commit_batch(&mut self, batch: Vec<Op>) {
        let Writer { conn, next_seq } = self;
        let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => {
                let why = format!("cannot begin transaction: {e}");
                tracing::error!(error = %why, ops = batch.len(), "store write batch failed");
                for op in batch {
                    op.into_reply_err(&why).send();
                }
                return;
            }
        };

        let mut replies = Vec::with_capacity(batch.len());
        // Set when the transaction itself is broken (not just one op).
        let mut fatal: Option<String> = None;
        for op in batch {
            if let Some(why) = &fatal {
                replies.push(op.into_reply_err(why));
                continue;
            }
            let reply = match op {
                Op::Insert { row, reply } => match savepoint(&tx, |c| insert_topic(c, &row)) {
                    Ok(result) => Reply::Insert(reply, result),
                    Err(e) => {
                        let why = format!("transaction broken: {e}");
                        let reply = Reply::Insert(reply, Err(uncommitted(&why)));
                        fatal = Some(why);
                        reply
                    }
                },
                // No savepoint (two statements fewer per step): an append
                // either fails before writing anything (unknown topic) or
                // fails the whole batch.
                Op::Append { row, reply } => match append_record(&tx, next_seq, &row) {
                    Ok(result) => Reply::Append(reply, result),
                    Err(e) => {
                        let why = format!("append failed after a partial write: {e}");
                        let reply = Reply::Append(reply, Err(uncommitted(&why)));
                        fatal = Some(why);
                        reply
                    }
                },
            };
            replies.push(reply);
        }

        let failure = match fatal {
            // Dropping `tx` rolls it back.
            Some(why) => Some(why),
            None => tx.commit().err().map(|e| format!("commit failed: {e}")),
        };
        match failure {
            None => replies.into_iter().for_each(Reply::send),
            Some(why) => {
                // Seqs handed out in this batch were rolled back with it.
                next_seq.clear();
                tracing::error!(error = %why, ops = replies.len(), "store write batch rolled back");
                for reply in replies {
                    reply.uncommitted(&why).send();
                }
            }
        }
    }
}

impl Op {
    fn into_reply_err(self, why: &str) -> Reply {
        let err = uncommitted(why);
        match self {
            Op::Insert { reply, .. } => Reply::Insert(reply, Err(err)),
            Op::Append { reply, .. } => Reply::Append(reply, Err(err)),
        }
    }
}

fn uncommitted(why: &str) -> StoreError {
    StoreError::Database(format!("write batch not committed: {why}"))
}

/// Runs one op inside a SAVEPOINT so its failure (say, a constraint) undoes
/// only its own statements and the rest of the batch still commits.
/// Outer `Err`: the batch transaction itself is unusable (e.g. SQLite rolled
/// it back after an I/O error); inner `Err`: this op failed and was undone.
fn savepoint<T>(
    conn: &Connection,
    op: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> rusqlite::Result<Result<T, StoreError>> {
    conn.prepare_cached("SAVEPOINT op")?.execute([])?;
    match op(conn) {
        Ok(value) => {
            conn.prepare_cached("RELEASE op")?.execute([])?;
            Ok(Ok(value))
        }
        Err(e) => {
            conn.prepare_cached("ROLLBACK TO op")?.execute([])?;
            conn.prepare_cached("RELEASE op")?.execute([])?;
            Ok(Err(e))
        }
    }
}

fn insert_topic(conn: &Connection, row: &TopicRow) -> Result<Inserted, StoreError> {
    let at = |e: rusqlite::Error| StoreError::Database(format!("inserting topic {}: {e}", row.id));
    if let Some(key) = &row.idempotency_key {
        // Sees rows inserted earlier in the same batch too, so two submits
        // with one key in one batch still yield one topic.
        let existing: Option<String> = conn
            .prepare_cached("SELECT id FROM topics WHERE idempotency_key = ?1")
            .map_err(at)?
            .query_row([key], |r| r.get(0))
            .optional()
            .map_err(at)?;
        if let Some(id) = existing {
            return Ok(Inserted::Existing(id));
        }
    }
    conn.prepare_cached(
        "INSERT INTO topics (id, seq, idempotency_key, status, submission_json, summary_json, submitted_ms, updated_ms)
         VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM topics), ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .map_err(at)?
    .execute(params![
        row.id,
        row.idempotency_key,
        row.status,
        row.submission_json,
        row.summary_json,
        row.submitted_ms,
        row.updated_ms,
    ])
    .map_err(at)?;
    Ok(Inserted::New)
}

/// Outer `Err`: a statement failed after the op may have written something,
/// so the batch must roll back. Inner `Err`: the op was refused before it
/// wrote anything (unknown topic); the rest of the batch stands.
fn append_record(
    conn: &Connection,
    next_seq: &mut HashMap<String, i64>,
    row: &JournalRow,
) -> rusqlite::Result<Result<(), StoreError>> {
    // A failed UPDATE statement is undone by SQLite as a whole; zero rows
    // means nothing was written.
    let updated =
        if row.status_may_change {
            conn.prepare_cached("UPDATE topics SET status = ?2, summary_json = ?3, updated_ms = ?4 WHERE id = ?1")?
                .execute(params![row.topic_id, row.status, row.summary_json, row.at_ms])?
        } else {
            conn.prepare_cached("UPDATE topics SET summary_json = ?2, updated_ms = ?3 WHERE id = ?1")?
                .execute(params![row.topic_id, row.summary_json, row.at_ms])?
        };
    if updated == 0 {
        return Ok(Err(StoreError::Database(format!("cannot append to unknown topic {}", row.topic_id))));
    }
    let seq = match next_seq.get(&row.topic_id) {
        Some(&seq) => seq,
        None => conn
            .prepare_cached("SELECT COALESCE(MAX(seq), 0) + 1 FROM journal WHERE topic_id = ?1")?
            .query_row([&row.topic_id], |r| r.get(0))?,
    };
    conn.prepare_cached("INSERT INTO journal (topic_id, seq, kind, at_ms, record_json) VALUES (?1, ?2, ?3, ?4, ?5)")?
        .execute(params![row.topic_id, seq, row.kind, row.at_ms, row.record_json])?;
    // Advanced only once the op's SQL succeeded; if RELEASE or COMMIT then
    // fails, the whole cache is cleared.
    if row.terminal {
        next_seq.remove(&row.topic_id);
    } else if let Some(next) = next_seq.get_mut(&row.topic_id) {
        *next = seq + 1;
    } else {
        next_seq.insert(row.topic_id.clone(), seq + 1);
    }
    Ok(Ok(()))
}

// ---------------------------------------------------------------------------
// Reads (on the read connection, inside a read transaction)

/// `TopicState::new(submission)` + the topic's journal replayed in order.
fn rebuild(conn: &Connection, id: &str, submission_json: &str) -> Result<TopicState, StoreError> {
    let submission: Submission = decode(submission_json, || format!("topic {id}: submission"))?;
    if submission.id != id {
        return Err(StoreError::Corrupt(format!("topic {id}: submission has id {}", submission.id)));
    }
    let mut state = TopicState::new(&submission);
    let mut stmt =
        conn.prepare_cached("SELECT seq, at_ms, record_json FROM journal WHERE topic_id = ?1 ORDER BY seq").db()?;
    let mut rows = stmt.query([id]).db()?;
    while let Some(row) = rows.next().db()? {
        let seq: i64 = row.get(0).db()?;
        let at_ms: i64 = row.get(1).db()?;
        let json: String = row.get(2).db()?;
        let at_ms = u64::try_from(at_ms)
            .map_err(|_| StoreError::Corrupt(format!("topic {id}: journal seq {seq} has at_ms {at_ms}")))?;
        let record: JournalRecord = decode(&json, || format!("topic {id}: journal seq {seq}"))?;
        state.apply(&record, at_ms);
    }
    Ok(state)
}

fn list_in(conn: &Connection, query: &ListQuery) -> Result<Vec<TopicSummary>, StoreError> {
    let mut conditions: Vec<&str> = Vec::new();
    let mut args: Vec<Value> = Vec::new();
    if let Some(status) = query.status {
        conditions.push("status = ?");
        args.push(Value::Text(status.as_str().to_string()));
    }
    if let Some(after) = &query.after {
        let cursor: Option<i64> = conn
            .prepare_cached("SELECT seq FROM topics WHERE id = ?1")
            .db()?
            .query_row([after], |r| r.get(0))
            .optional()
            .db()?;
        match cursor {
            Some(seq) => {
                conditions.push("seq > ?");
                args.push(Value::Integer(seq));
            }
            // Unknown cursor id: fall back to comparing ids, which sort by
            // submit time, rather than restarting from the first page (a
            // client paging with it would loop forever).
            None => {
                conditions.push("id > ?");
                args.push(Value::Text(after.clone()));
            }
        }
    }
    let filter = if conditions.is_empty() { String::new() } else { format!("WHERE {}", conditions.join(" AND ")) };
    // A limit of 0 (the `Default`) means no limit; SQLite spells that -1.
    let limit = if query.limit == 0 { -1 } else { i64::try_from(query.limit).unwrap_or(i64::MAX) };
    args.push(Value::Integer(limit));

    let sql = format!("SELECT summary_json FROM topics {filter} ORDER BY seq LIMIT ?");
    let mut stmt = conn.prepare_cached(&sql).db()?;
    let mut rows = stmt.query(rusqlite::params_from_iter(args)).db()?;
    let mut summaries = Vec::new();
    while let Some(row) = rows.next().db()? {
        let json: String = row.get(0).db()?;
        summaries.push(decode(&json, || "topic summary".to_string())?);
    }
    Ok(summaries)
}

// ---------------------------------------------------------------------------
// Helpers

fn encode<T: serde::Serialize>(value: &T, what: &str) -> Result<String, StoreError> {
    // Cannot fail for our types (no maps with non-string keys); reported as
    // corrupt data rather than unwrapped all the same.
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(format!("cannot encode {what}: {e}")))
}

fn decode<T: DeserializeOwned>(json: &str, what: impl FnOnce() -> String) -> Result<T, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("{}: invalid JSON: {e}", what())))
}

fn to_i64(value: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Corrupt(format!("{what} {value} does not fit an SQLite integer")))
}

/// Maps rusqlite errors: a value of the wrong type in a column is corrupt
/// data; anything else is a database error.
trait DbResult<T> {
    fn db(self) -> Result<T, StoreError>;
}

impl<T> DbResult<T> for rusqlite::Result<T> {
    fn db(self) -> Result<T, StoreError> {
        self.map_err(|e| match e {
            rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..) => StoreError::Corrupt(e.to_string()),
            other => StoreError::Database(other.to_string()),
        })
    }
}
