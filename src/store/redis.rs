//! The shared Redis implementation of `TopicStore`, the Redis key layout
//! every Redis-backed part uses (`keys`), and the connection helper.
//!
//! Owns: the Redis records of submissions, journals, summaries, the status
//! index and idempotency keys, and the Lua scripts that write them. Every
//! write is one script (atomic on the server), so a topic's journal, summary
//! and status index never disagree, and a journal append first checks the
//! writer's fencing epoch: a daemon that lost a topic's lease cannot record
//! a step. Decisions made without a lease (approve, reject, cancel) check
//! the status precondition in the same script and bump the epoch, so a
//! worker still running the topic elsewhere is fenced off.
//! Must not: hold topic logic (state is `TopicState::new` + journal replayed
//! with `TopicState::apply`), hand out leases (that is `queue::redis`), or
//! log the Redis URL (it may carry a password: see `redacted`).
//!
//! Deployment: one Redis primary (standalone; replicas optional). Redis
//! Cluster is not supported: the append script updates the topic's keys and
//! the global status index in one step.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use serde::{Deserialize, Serialize};

use super::{Inserted, ListQuery, StoreError, TopicStore};
use crate::llm::BoxFuture;
use crate::queue::Lease;
use crate::state::{JournalRecord, Submission, TopicState, TopicStatus, TopicSummary};

/// Version of the Redis records (`scriptorium:{idx}:schema`). Bump when a
/// record changes meaning; a database with a newer version is refused.
pub const SCHEMA_VERSION: u32 = 1;

/// How long one command may take before it fails (and the caller retries
/// or reports `unavailable`). Scripts here are O(log n) plus the record.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The key layout. Per-topic keys share the hash tag `{t:<id>}`; global
/// index keys share `{idx}`, the queue `{q}`, the limiter `{lim}`.
pub mod keys {
    use crate::state::TopicStatus;

    pub const GROUP: &str = "workers";
    pub const SCHEMA: &str = "scriptorium:{idx}:schema";
    /// INCR counter: insertion order of topics.
    pub const SEQ: &str = "scriptorium:{idx}:seq";
    /// Sorted set of every topic id, scored by insertion seq.
    pub const ALL: &str = "scriptorium:{idx}:all";
    /// Hash: topic id → summary JSON (what `list` shows).
    pub const SUMMARY: &str = "scriptorium:{idx}:summary";
    /// The work stream (entries `topic <id>`), its consumer group `workers`.
    pub const STREAM: &str = "scriptorium:{q}:stream";
    /// Hash: topic id → its entry id in the stream while queued or claimed.
    pub const ENTRY: &str = "scriptorium:{q}:entry";
    /// Stream of dead-lettered topics (`topic`, `deliveries`), for operators.
    pub const DEAD: &str = "scriptorium:{q}:dead";
    /// GCRA theoretical arrival times (µs, Redis server clock) and the
    /// shared 429 pause.
    pub const LIMIT_REQUESTS: &str = "scriptorium:{lim}:requests";
    pub const LIMIT_TOKENS: &str = "scriptorium:{lim}:tokens";
    pub const LIMIT_PAUSE: &str = "scriptorium:{lim}:pause";

    /// Sorted set per status, scored by insertion seq.
    pub fn status(s: TopicStatus) -> String {
        format!("scriptorium:{{idx}}:status:{}", s.as_str())
    }
    /// String: the idempotency key's topic id (`SET NX`).
    pub fn idempotency(key: &str) -> String {
        format!("scriptorium:{{idx}}:idem:{key}")
    }
    /// String: the submission record.
    pub fn submission(id: &str) -> String {
        format!("scriptorium:{{t:{id}}}:sub")
    }
    /// Hash: `status`, `seq`.
    pub fn meta(id: &str) -> String {
        format!("scriptorium:{{t:{id}}}:meta")
    }
    /// List of journal records, in order.
    pub fn journal(id: &str) -> String {
        format!("scriptorium:{{t:{id}}}:journal")
    }
    /// INCR counter: the fencing epoch, bumped on every claim and on every
    /// decision made without a lease.
    pub fn epoch(id: &str) -> String {
        format!("scriptorium:{{t:{id}}}:epoch")
    }
}

/// The URL without its password, for logs and errors.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://***@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// Opens a reconnecting connection (`ConnectionManager`). `response_timeout`
/// bounds every command; a blocking read needs its own connection with a
/// timeout longer than its BLOCK.
pub async fn connect(url: &str, response_timeout: Duration) -> Result<ConnectionManager, redis::RedisError> {
    let client = redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(response_timeout))
        .set_number_of_retries(3)
        .set_max_delay(Duration::from_secs(2));
    ConnectionManager::new_with_config(client, config).await
}

fn io(e: redis::RedisError) -> StoreError {
    StoreError::Io(format!("redis: {e}"))
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("redis {what}: {e}"))
}

/// A stored submission (wire type, versioned).
#[derive(Serialize, Deserialize)]
struct SubmissionRecord {
    v: u32,
    #[serde(flatten)]
    submission: Submission,
}

/// One stored journal record (wire type, versioned).
#[derive(Serialize, Deserialize)]
struct JournalEntry {
    v: u32,
    at_ms: u64,
    record: JournalRecord,
}

const INSERT: &str = r"
-- KEYS: submission, meta, seq, all, status index, summary hash, [idempotency]
-- ARGV: id, submission json, status, summary json, has idempotency key
if ARGV[5] == '1' then
  local existing = redis.call('GET', KEYS[7])
  if existing then return {'existing', existing} end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'existing', ARGV[1]} end
local seq = redis.call('INCR', KEYS[3])
redis.call('SET', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], 'status', ARGV[3], 'seq', seq)
redis.call('ZADD', KEYS[4], seq, ARGV[1])
redis.call('ZADD', KEYS[5], seq, ARGV[1])
redis.call('HSET', KEYS[6], ARGV[1], ARGV[4])
if ARGV[5] == '1' then redis.call('SET', KEYS[7], ARGV[1]) end
return {'new', ARGV[1]}
";

/// The append script; `@TERMINAL@` is replaced by the terminal statuses.
const APPEND: &str = r"
-- KEYS: epoch, meta, journal, summary hash, then one status index per status
-- ARGV: id, lease epoch ('' = no lease), rule ('any' | 'awaiting'),
--       bump epoch ('1'), entry json, summary json, new status,
--       then the status names in KEYS order (from KEYS[5])
local current = redis.call('GET', KEYS[1]) or '0'
if ARGV[2] ~= '' and ARGV[2] ~= current then return {'fenced', current} end
local status = redis.call('HGET', KEYS[2], 'status')
if not status then return {'missing', ''} end
local terminal = {@TERMINAL@}
if terminal[status] then return {'conflict', status} end
if ARGV[3] == 'awaiting' and status ~= 'awaiting_approval' then return {'conflict', status} end
if ARGV[4] == '1' then redis.call('INCR', KEYS[1]) end
redis.call('RPUSH', KEYS[3], ARGV[5])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[6])
if ARGV[7] ~= status then
  local seq = redis.call('HGET', KEYS[2], 'seq')
  for i = 8, #ARGV do
    if ARGV[i] == status then redis.call('ZREM', KEYS[i - 3], ARGV[1]) end
    if ARGV[i] == ARGV[7] then redis.call('ZADD', KEYS[i - 3], seq, ARGV[1]) end
  end
  redis.call('HSET', KEYS[2], 'status', ARGV[7])
end
return {'ok', ''}
";

const LIST: &str = r"
-- KEYS: all, index (all or one status), summary hash
-- ARGV: after id ('' = from the start), limit (0 = all)
local min = '-inf'
if ARGV[1] ~= '' then
  local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
  if s then min = '(' .. s end
end
local ids
if tonumber(ARGV[2]) > 0 then
  ids = redis.call('ZRANGEBYSCORE', KEYS[2], min, '+inf', 'LIMIT', 0, ARGV[2])
else
  ids = redis.call('ZRANGEBYSCORE', KEYS[2], min, '+inf')
end
if #ids == 0 then return {} end
return redis.call('HMGET', KEYS[3], unpack(ids))
";

/// How a record is checked against the topic's status by the script.
fn rule(record: &JournalRecord, lease: Option<&Lease>) -> (&'static str, bool) {
    use JournalRecord as J;
    match (record, lease) {
        // A human decision: only on a topic awaiting one, and it fences off
        // anyone who still thinks they hold the topic.
        (J::Approved { .. } | J::Rejected { .. }, None) => ("awaiting", true),
        (J::Cancelled | J::DeadLettered { .. }, None) => ("any", true),
        _ => ("any", false),
    }
}

struct Inner {
    conn: ConnectionManager,
    insert: Script,
    append: Script,
    list: Script,
}

/// Redis-backed `TopicStore`. Cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects, checks the schema version and warns when Redis is not set
    /// up for durability (`appendonly yes`).
    pub async fn connect(url: &str) -> Result<RedisStore, StoreError> {
        let mut conn = connect(url, RESPONSE_TIMEOUT)
            .await
            .map_err(|e| StoreError::Io(format!("redis at {}: {e}", redacted(url))))?;
        let _: bool = redis::cmd("SET")
            .arg(keys::SCHEMA)
            .arg(SCHEMA_VERSION)
            .arg("NX")
            .query_async(&mut conn)
            .await
            .map_err(io)?;
        let version: Option<u32> = redis::cmd("GET").arg(keys::SCHEMA).query_async(&mut conn).await.map_err(io)?;
        if let Some(v) = version.filter(|v| *v > SCHEMA_VERSION) {
            return Err(StoreError::Database(format!(
                "redis at {} holds schema version {v}, newer than version {SCHEMA_VERSION} that this build understands",
                redacted(url)
            )));
        }
        warn_unless_durable(&mut conn, url).await;
        let terminal: Vec<String> =
            TopicStatus::ALL.iter().filter(|s| s.is_terminal()).map(|s| format!("{}=true", s.as_str())).collect();
        Ok(RedisStore {
            inner: Arc::new(Inner {
                conn,
                insert: Script::new(INSERT),
                append: Script::new(&APPEND.replace("@TERMINAL@", &terminal.join(", "))),
                list: Script::new(LIST),
            }),
        })
    }

    /// The connection, for parts that share it (the queue's dead letters).
    pub fn connection(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }
}

/// `CONFIG GET` may be disabled (managed Redis); then nothing is said.
async fn warn_unless_durable(conn: &mut ConnectionManager, url: &str) {
    let got: Result<Vec<String>, _> = redis::cmd("CONFIG").arg("GET").arg("append*").query_async(conn).await;
    let Ok(pairs) = got else { return };
    let get = |k: &str| pairs.chunks(2).find(|p| p[0] == k).and_then(|p| p.get(1)).cloned().unwrap_or_default();
    let (aof, fsync) = (get("appendonly"), get("appendfsync"));
    if aof != "yes" {
        tracing::warn!(
            redis = %redacted(url),
            "redis has appendonly {aof}: acknowledged submits and steps are lost if it restarts; set appendonly yes"
        );
    } else if fsync != "always" {
        tracing::info!(redis = %redacted(url), appendfsync = %fsync, "redis may lose up to a second of writes on a crash");
    }
}

fn reply_pair(v: Value) -> Result<(String, String), StoreError> {
    let parts: Vec<String> = redis::from_redis_value(v).map_err(|e| corrupt("script reply", e))?;
    match parts.as_slice() {
        [a, b] => Ok((a.clone(), b.clone())),
        _ => Err(corrupt("script reply", format!("{parts:?}"))),
    }
}

fn encode<T: Serialize>(value: &T, what: &str) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| corrupt(what, e))
}

/// Rebuilds one topic from its submission JSON and journal entries.
fn rebuild(id: &str, submission: &str, journal: &[String]) -> Result<TopicState, StoreError> {
    let sub: SubmissionRecord =
        serde_json::from_str(submission).map_err(|e| corrupt(&format!("submission {id}"), e))?;
    if sub.v > SCHEMA_VERSION {
        return Err(corrupt(&format!("submission {id}"), format!("record version {} is newer than this build", sub.v)));
    }
    let mut state = TopicState::new(&sub.submission);
    for raw in journal {
        let entry: JournalEntry = serde_json::from_str(raw).map_err(|e| corrupt(&format!("journal of {id}"), e))?;
        if entry.v > SCHEMA_VERSION {
            return Err(corrupt(&format!("journal of {id}"), "record version is newer than this build"));
        }
        state.apply(&entry.record, entry.at_ms);
    }
    Ok(state)
}

/// Loads topics by id in one transaction (MULTI: one consistent snapshot).
async fn load_many(conn: &mut ConnectionManager, ids: &[String]) -> Result<Vec<Option<TopicState>>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    pipe.atomic();
    for id in ids {
        pipe.cmd("GET").arg(keys::submission(id)).cmd("LRANGE").arg(keys::journal(id)).arg(0).arg(-1);
    }
    let replies: Vec<(Option<String>, Vec<String>)> = {
        let flat: Vec<Value> = pipe.query_async(conn).await.map_err(io)?;
        let mut out = Vec::with_capacity(ids.len());
        let mut it = flat.into_iter();
        while let (Some(a), Some(b)) = (it.next(), it.next()) {
            let sub: Option<String> = redis::from_redis_value(a).map_err(|e| corrupt("submission", e))?;
            let journal: Vec<String> = redis::from_redis_value(b).map_err(|e| corrupt("journal", e))?;
            out.push((sub, journal));
        }
        out
    };
    ids.iter().zip(replies).map(|(id, (sub, journal))| sub.map(|s| rebuild(id, &s, &journal)).transpose()).collect()
}

/// Topics loaded per `unfinished` transaction, so one huge backlog does not
/// become one huge reply.
const LOAD_CHUNK: usize = 256;

impl TopicStore for RedisStore {
    fn insert(&self, state: &TopicState) -> BoxFuture<'static, Result<Inserted, StoreError>> {
        let inner = Arc::clone(&self.inner);
        let encoded = (|| {
            let sub = encode(&SubmissionRecord { v: SCHEMA_VERSION, submission: state.submission() }, "submission")?;
            let summary = encode(&TopicSummary::from(state), "summary")?;
            Ok::<_, StoreError>((sub, summary))
        })();
        let id = state.id.clone();
        let status = state.status;
        let key = state.idempotency_key.clone();
        Box::pin(async move {
            let (sub, summary) = encoded?;
            let mut conn = inner.conn.clone();
            let mut call = inner.insert.prepare_invoke();
            call.key(keys::submission(&id))
                .key(keys::meta(&id))
                .key(keys::SEQ)
                .key(keys::ALL)
                .key(keys::status(status))
                .key(keys::SUMMARY);
            if let Some(k) = &key {
                call.key(keys::idempotency(k));
            }
            call.arg(&id).arg(sub).arg(status.as_str()).arg(summary).arg(if key.is_some() { "1" } else { "0" });
            let (what, existing) = reply_pair(call.invoke_async(&mut conn).await.map_err(io)?)?;
            Ok(if what == "new" { Inserted::New } else { Inserted::Existing(existing) })
        })
    }

    fn append(&self, state: &TopicState, record: &JournalRecord) -> BoxFuture<'static, Result<(), StoreError>> {
        self.append_fenced(state, record, None)
    }

    fn append_fenced(
        &self,
        state: &TopicState,
        record: &JournalRecord,
        lease: Option<&Lease>,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let inner = Arc::clone(&self.inner);
        let entry =
            encode(&JournalEntry { v: SCHEMA_VERSION, at_ms: state.updated_at_ms, record: record.clone() }, "journal");
        let summary = encode(&TopicSummary::from(state), "summary");
        let id = state.id.clone();
        let status = state.status;
        let name = record.name();
        let (rule, bump) = rule(record, lease);
        let epoch = lease.map(|l| l.epoch.to_string()).unwrap_or_default();
        Box::pin(async move {
            let (entry, summary) = (entry?, summary?);
            let mut conn = inner.conn.clone();
            let mut call = inner.append.prepare_invoke();
            call.key(keys::epoch(&id)).key(keys::meta(&id)).key(keys::journal(&id)).key(keys::SUMMARY);
            for s in TopicStatus::ALL {
                call.key(keys::status(s));
            }
            call.arg(&id).arg(epoch).arg(rule).arg(if bump { "1" } else { "0" }).arg(entry).arg(summary);
            call.arg(status.as_str());
            for s in TopicStatus::ALL {
                call.arg(s.as_str());
            }
            let (what, detail) = reply_pair(call.invoke_async(&mut conn).await.map_err(io)?)?;
            match what.as_str() {
                "ok" => Ok(()),
                "fenced" => {
                    metrics::counter!("scriptorium_journal_fenced_total").increment(1);
                    Err(StoreError::Fenced(id))
                }
                "conflict" => Err(StoreError::Conflict { id, status: detail, record: name }),
                "missing" => Err(StoreError::Corrupt(format!("append to unknown topic `{id}`"))),
                other => Err(corrupt("append reply", other)),
            }
        })
    }

    fn load(&self, id: &str) -> BoxFuture<'static, Result<Option<TopicState>, StoreError>> {
        let inner = Arc::clone(&self.inner);
        let id = id.to_string();
        Box::pin(async move {
            let mut conn = inner.conn.clone();
            Ok(load_many(&mut conn, std::slice::from_ref(&id)).await?.pop().flatten())
        })
    }

    fn list(&self, query: ListQuery) -> BoxFuture<'static, Result<Vec<TopicSummary>, StoreError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let mut conn = inner.conn.clone();
            let index = query.status.map(keys::status).unwrap_or_else(|| keys::ALL.to_string());
            let raw: Vec<Option<String>> = inner
                .list
                .key(keys::ALL)
                .key(index)
                .key(keys::SUMMARY)
                .arg(query.after.unwrap_or_default())
                .arg(query.limit)
                .invoke_async(&mut conn)
                .await
                .map_err(io)?;
            raw.into_iter()
                .flatten()
                .map(|json| serde_json::from_str(&json).map_err(|e| corrupt("summary", e)))
                .collect()
        })
    }

    fn unfinished(&self) -> BoxFuture<'static, Result<Vec<TopicState>, StoreError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let mut conn = inner.conn.clone();
            let open = [TopicStatus::Queued, TopicStatus::Running, TopicStatus::AwaitingApproval];
            let mut cmd = redis::cmd("ZUNION");
            cmd.arg(open.len());
            for s in open {
                cmd.arg(keys::status(s));
            }
            // ZUNION orders by score: the insertion seq, oldest first.
            let ids: Vec<String> = cmd.query_async(&mut conn).await.map_err(io)?;
            let mut out = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(LOAD_CHUNK) {
                out.extend(load_many(&mut conn, chunk).await?.into_iter().flatten());
            }
            Ok(out)
        })
    }

    fn counts(&self) -> BoxFuture<'static, Result<BTreeMap<String, u64>, StoreError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let mut conn = inner.conn.clone();
            let mut pipe = redis::pipe();
            for s in TopicStatus::ALL {
                pipe.cmd("ZCARD").arg(keys::status(s));
            }
            let n: Vec<u64> = pipe.query_async(&mut conn).await.map_err(io)?;
            Ok(TopicStatus::ALL.iter().zip(n).map(|(s, n)| (s.as_str().to_string(), n)).collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redacted("redis://:s3cret@10.0.0.1:6379/0"), "redis://***@10.0.0.1:6379/0");
        assert_eq!(redacted("redis://user:pw@host/1"), "redis://***@host/1");
        assert_eq!(redacted("unix:///run/redis.sock"), "unix:///run/redis.sock");
    }

    #[test]
    fn one_topics_keys_share_a_hash_tag() {
        let id = "t0123";
        for k in [keys::submission(id), keys::meta(id), keys::journal(id), keys::epoch(id)] {
            assert!(k.contains("{t:t0123}"), "{k}");
        }
        // A brace in an idempotency key cannot move the key out of `{idx}`.
        assert!(keys::idempotency("a{b}").starts_with("scriptorium:{idx}:"));
    }

    #[test]
    fn decisions_without_a_lease_check_status_and_fence() {
        let approve = JournalRecord::Approved { note: None, at_ms: 1 };
        assert_eq!(rule(&approve, None), ("awaiting", true));
        assert_eq!(rule(&JournalRecord::Cancelled, None), ("any", true));
        assert_eq!(rule(&JournalRecord::Completed, None), ("any", false));
    }
}
