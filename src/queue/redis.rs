//! `RedisQueue`: the `TopicQueue` shared by several daemons, on one Redis
//! Stream (`scriptorium:{q}:stream`) with one consumer group (`workers`);
//! each daemon is one named consumer.
//!
//! Owns: the work stream, the group's pending entries (PEL) as leases, the
//! topic → entry map that makes `push` idempotent, the dead-letter stream,
//! and the fencing epoch bump on every claim.
//! - claim: first this consumer's own PEL (what it held before a restart),
//!   then `XAUTOCLAIM` of entries idle past the lease (a dead daemon's
//!   topics), then `XREADGROUP >` (new entries, blocking on a connection of
//!   its own). Each claimed topic's epoch is `INCR`ed in the same round trip
//!   that reads its delivery count.
//! - renew: `XCLAIM … JUSTID` (resets idle, keeps the delivery count) by a
//!   script that first checks this consumer still owns the entry; `false`
//!   also when the epoch moved (the topic was cancelled or re-claimed).
//! - ack: `XACK` + `XDEL`: the stream is never trimmed by length, which
//!   could delete pending entries.
//! - release: the entry is acked and added anew, so any daemon's `>` read
//!   takes it at once (a clean shutdown is not a failed delivery).
//! - a topic claimed more than `max_deliveries` times goes to the dead
//!   letter stream and, when a store is attached, to `TopicStatus::DeadLetter`.
//!
//! Must not: hold topic state or decide workflow steps. A claim and its
//! epoch bump are two commands: a claimer that stalls between them for a
//! whole lease may get a higher epoch than the daemon that took the entry
//! over; both are then refused (one by `renew`, one by the fenced append)
//! and the topic is taken again after one more lease. Safety (one writer)
//! holds either way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::{Script, Value};

use super::{Lease, QueueError, TopicQueue};
use crate::llm::BoxFuture;
use crate::state::{now_ms, JournalRecord};
use crate::store::redis::{connect, keys, redacted, RESPONSE_TIMEOUT};
use crate::store::TopicStore;

#[derive(Debug, Clone)]
pub struct RedisQueueOptions {
    /// This daemon's consumer name: unique among live daemons, stable across
    /// its restarts (so a restarted daemon resumes its own leases at once).
    pub consumer: String,
    /// A lease not renewed for this long may be taken by another consumer.
    pub lease: Duration,
    /// Claims after which a topic is dead-lettered instead of handed out.
    pub max_deliveries: u32,
}

const PUSH: &str = r"
-- KEYS: stream, entry map. ARGV: topic id. Idempotent: a queued or claimed
-- topic is not added twice.
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
local id = redis.call('XADD', KEYS[1], '*', 'topic', ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], id)
return 1
";

const RENEW: &str = r"
-- KEYS: stream. ARGV: group, consumer, entry id.
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
";

const ACK: &str = r"
-- KEYS: stream, entry map. ARGV: group, entry id, topic id.
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if redis.call('HGET', KEYS[2], ARGV[3]) == ARGV[2] then redis.call('HDEL', KEYS[2], ARGV[3]) end
return 1
";

const RELEASE: &str = r"
-- KEYS: stream, entry map. ARGV: group, consumer, entry id, topic id.
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
local id = redis.call('XADD', KEYS[1], '*', 'topic', ARGV[4])
redis.call('HSET', KEYS[2], ARGV[4], id)
return 1
";

const CANCEL: &str = r"
-- KEYS: stream, entry map. ARGV: group, topic id. Only a waiting entry.
local id = redis.call('HGET', KEYS[2], ARGV[2])
if not id then return 0 end
local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
if #p > 0 then return 0 end
redis.call('XDEL', KEYS[1], id)
redis.call('HDEL', KEYS[2], ARGV[2])
return 1
";

const DEPTH: &str = r"
-- KEYS: stream. ARGV: group. Entries not delivered to anyone yet.
local n = redis.call('XLEN', KEYS[1])
local p = redis.call('XPENDING', KEYS[1], ARGV[1])
return n - p[1]
";

const DEAD_LETTER: &str = r"
-- KEYS: stream, entry map, dead stream. ARGV: group, entry id, topic id, deliveries.
redis.call('XADD', KEYS[3], '*', 'topic', ARGV[3], 'deliveries', ARGV[4])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if redis.call('HGET', KEYS[2], ARGV[3]) == ARGV[2] then redis.call('HDEL', KEYS[2], ARGV[3]) end
return 1
";

/// Where the claim loop stands (one claim runs at a time).
struct ClaimState {
    /// Own pending entries re-read after a (re)start, up to this id; `None`
    /// once the PEL was read to its end.
    own_pel_after: Option<String>,
    /// `XAUTOCLAIM` cursor; `0-0` starts a new scan.
    autoclaim_cursor: String,
    next_autoclaim: Instant,
}

struct Inner {
    conn: ConnectionManager,
    /// Only for `XREADGROUP … BLOCK`, so a blocked read never delays the
    /// other commands (redis-rs warns against blocking on a shared
    /// multiplexed connection).
    blocking: tokio::sync::Mutex<ConnectionManager>,
    claim_state: tokio::sync::Mutex<ClaimState>,
    opts: RedisQueueOptions,
    autoclaim_every: Duration,
    dead_letter_store: Option<Arc<dyn TopicStore>>,
    push: Script,
    renew: Script,
    ack: Script,
    release: Script,
    cancel: Script,
    depth: Script,
    dead_letter: Script,
}

/// Redis Streams `TopicQueue`. Cheap to clone.
#[derive(Clone)]
pub struct RedisQueue {
    inner: Arc<Inner>,
}

/// Longest single `XREADGROUP BLOCK`: bounds how late an autoclaim pass
/// (a dead daemon's topics) can come while this daemon waits for new work.
const MAX_BLOCK: Duration = Duration::from_secs(1);

fn unavailable(e: redis::RedisError) -> QueueError {
    metrics::counter!("scriptorium_redis_errors_total", "component" => "queue").increment(1);
    QueueError::Unavailable(format!("redis: {e}"))
}

fn bad_reply(what: &str, v: &Value) -> QueueError {
    QueueError::Unavailable(format!("redis: unexpected {what} reply: {v:?}"))
}

/// One stream entry: its id and the topic it names (`None`: the entry's
/// data was deleted while it was pending).
type Entry = (String, Option<String>);

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => &[],
    }
}

/// `[id, [field, value, …]]` or `[id, nil]`.
fn parse_entry(v: &Value) -> Option<Entry> {
    let parts = items(v);
    let id = text(parts.first()?)?;
    let fields = parts.get(1).map(items).unwrap_or(&[]);
    let topic =
        fields.chunks(2).find(|kv| text(&kv[0]).as_deref() == Some("topic")).and_then(|kv| kv.get(1)).and_then(text);
    Some((id, topic))
}

/// `XREADGROUP` reply: `[[stream, [entry, …]]]` (RESP2) or a map (RESP3).
fn parse_read(v: &Value) -> Vec<Entry> {
    let streams: Vec<&Value> = match v {
        Value::Map(m) => m.iter().map(|(_, entries)| entries).collect(),
        Value::Array(a) => a.iter().filter_map(|s| items(s).get(1)).collect(),
        _ => Vec::new(),
    };
    streams.into_iter().flat_map(|entries| items(entries).iter().filter_map(parse_entry)).collect()
}

impl RedisQueue {
    /// Connects (two connections: commands and blocking reads) and creates
    /// the consumer group if it does not exist.
    pub async fn connect(
        url: &str,
        opts: RedisQueueOptions,
        dead_letter_store: Option<Arc<dyn TopicStore>>,
    ) -> Result<RedisQueue, QueueError> {
        let at = |e: redis::RedisError| QueueError::Unavailable(format!("redis at {}: {e}", redacted(url)));
        let mut conn = connect(url, RESPONSE_TIMEOUT).await.map_err(at)?;
        let blocking = connect(url, MAX_BLOCK + RESPONSE_TIMEOUT).await.map_err(at)?;
        let created: Result<(), _> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(keys::STREAM)
            .arg(keys::GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        if let Err(e) = created {
            if e.code() != Some("BUSYGROUP") {
                return Err(at(e));
            }
        }
        // A tenth of the lease: takeover comes at most that late after the
        // lease ran out, and an idle daemon scans the PEL ten times a lease.
        let autoclaim_every = (opts.lease / 10).clamp(Duration::from_millis(100), MAX_BLOCK);
        Ok(RedisQueue {
            inner: Arc::new(Inner {
                conn,
                blocking: tokio::sync::Mutex::new(blocking),
                claim_state: tokio::sync::Mutex::new(ClaimState {
                    own_pel_after: Some("0".into()),
                    autoclaim_cursor: "0-0".into(),
                    next_autoclaim: Instant::now(),
                }),
                opts,
                autoclaim_every,
                dead_letter_store,
                push: Script::new(PUSH),
                renew: Script::new(RENEW),
                ack: Script::new(ACK),
                release: Script::new(RELEASE),
                cancel: Script::new(CANCEL),
                depth: Script::new(DEPTH),
                dead_letter: Script::new(DEAD_LETTER),
            }),
        })
    }

    pub fn consumer(&self) -> &str {
        &self.inner.opts.consumer
    }
}

impl Inner {
    fn lease_ms(&self) -> u64 {
        self.opts.lease.as_millis() as u64
    }

    /// One pass: own PEL, due autoclaim, then new entries (blocking up to
    /// `block` when nothing was found so far).
    async fn claim_pass(&self, st: &mut ClaimState, max: usize, block: Duration) -> Result<Vec<Entry>, QueueError> {
        let mut conn = self.conn.clone();
        let mut found: Vec<Entry> = Vec::new();
        if let Some(after) = st.own_pel_after.clone() {
            let reply: Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(keys::GROUP)
                .arg(&self.opts.consumer)
                .arg("COUNT")
                .arg(max)
                .arg("STREAMS")
                .arg(keys::STREAM)
                .arg(after)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let entries = parse_read(&reply);
            st.own_pel_after = if entries.len() < max { None } else { entries.last().map(|e| e.0.clone()) };
            found.extend(entries);
        }
        if found.len() < max && Instant::now() >= st.next_autoclaim {
            let reply: Value = redis::cmd("XAUTOCLAIM")
                .arg(keys::STREAM)
                .arg(keys::GROUP)
                .arg(&self.opts.consumer)
                .arg(self.lease_ms())
                .arg(&st.autoclaim_cursor)
                .arg("COUNT")
                .arg(max - found.len())
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let parts = items(&reply);
            let cursor = parts.first().and_then(text).ok_or_else(|| bad_reply("XAUTOCLAIM", &reply))?;
            let claimed: Vec<Entry> = parts.get(1).map(items).unwrap_or(&[]).iter().filter_map(parse_entry).collect();
            if !claimed.is_empty() {
                tracing::info!(consumer = %self.opts.consumer, topics = claimed.len(), "took over topics whose lease ran out");
                metrics::counter!("scriptorium_queue_takeovers_total").increment(claimed.len() as u64);
            }
            found.extend(claimed);
            // A finished scan waits; a partial one continues next pass.
            if cursor == "0-0" {
                st.next_autoclaim = Instant::now() + self.autoclaim_every;
            }
            st.autoclaim_cursor = cursor;
        }
        if found.len() < max {
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP").arg(keys::GROUP).arg(&self.opts.consumer).arg("COUNT").arg(max - found.len());
            // BLOCK 0 would block for ever: only block with at least 1 ms,
            // and only when there is nothing to hand out yet.
            let block_ms = block.as_millis() as u64;
            if found.is_empty() && block_ms > 0 {
                cmd.arg("BLOCK").arg(block_ms);
            }
            cmd.arg("STREAMS").arg(keys::STREAM).arg(">");
            let mut blocking = self.blocking.lock().await;
            let reply: Value = cmd.query_async(&mut *blocking).await.map_err(unavailable)?;
            found.extend(parse_read(&reply));
        }
        Ok(found)
    }

    /// Bumps each claimed topic's epoch and reads its delivery count, in
    /// one round trip.
    async fn to_leases(&self, entries: Vec<(String, String)>) -> Result<Vec<Lease>, QueueError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (entry, topic) in &entries {
            pipe.cmd("INCR").arg(keys::epoch(topic));
            pipe.cmd("XPENDING").arg(keys::STREAM).arg(keys::GROUP).arg(entry).arg(entry).arg(1);
        }
        let mut conn = self.conn.clone();
        let replies: Vec<Value> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        let mut leases = Vec::with_capacity(entries.len());
        for ((entry, topic), pair) in entries.into_iter().zip(replies.chunks(2)) {
            let epoch = match pair.first() {
                Some(Value::Int(n)) => *n as u64,
                other => return Err(bad_reply("INCR", other.unwrap_or(&Value::Nil))),
            };
            let info = pair.get(1).map(items).and_then(|p| p.first()).map(items).unwrap_or(&[]);
            // Gone from the PEL between the read and now: someone acked it.
            let Some(deliveries) = info.get(3).and_then(|v| match v {
                Value::Int(n) => Some(*n as u32),
                _ => None,
            }) else {
                continue;
            };
            if text(info.get(1).unwrap_or(&Value::Nil)).as_deref() != Some(self.opts.consumer.as_str()) {
                continue; // taken over already
            }
            leases.push(Lease { topic_id: topic, epoch, deliveries, handle: entry });
        }
        Ok(leases)
    }

    /// Moves a topic claimed too often out of the queue; records the dead
    /// letter in the store first (so a failure there leaves it pending, to
    /// be tried again on the next claim).
    async fn bury(&self, lease: &Lease) -> Result<(), QueueError> {
        if let Some(store) = &self.dead_letter_store {
            let loaded = store.load(&lease.topic_id).await.map_err(|e| QueueError::Unavailable(e.to_string()))?;
            if let Some(mut state) = loaded.filter(|s| !s.status.is_terminal()) {
                let record = JournalRecord::DeadLettered { deliveries: lease.deliveries };
                state.apply(&record, now_ms());
                match store.append_fenced(&state, &record, None).await {
                    Ok(()) | Err(crate::store::StoreError::Conflict { .. }) => {}
                    Err(e) => return Err(QueueError::Unavailable(e.to_string())),
                }
            }
        }
        let mut conn = self.conn.clone();
        let _: i64 = self
            .dead_letter
            .key(keys::STREAM)
            .key(keys::ENTRY)
            .key(keys::DEAD)
            .arg(keys::GROUP)
            .arg(&lease.handle)
            .arg(&lease.topic_id)
            .arg(lease.deliveries)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        metrics::counter!("scriptorium_topics_dead_lettered_total").increment(1);
        tracing::error!(
            topic = %lease.topic_id,
            deliveries = lease.deliveries,
            "topic claimed too many times without finishing: moved to dead_letter"
        );
        Ok(())
    }

    async fn claim(&self, max: usize, wait: Duration) -> Result<Vec<Lease>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + wait;
        let mut st = self.claim_state.lock().await;
        loop {
            let block = deadline.saturating_duration_since(Instant::now()).min(self.autoclaim_every);
            let found = self.claim_pass(&mut st, max, block).await?;
            let mut conn = self.conn.clone();
            let mut named = Vec::with_capacity(found.len());
            for (entry, topic) in found {
                match topic {
                    Some(t) => named.push((entry, t)),
                    None => {
                        // Its data is gone (deleted while pending): nothing to run.
                        let _: Value = redis::cmd("XACK")
                            .arg(keys::STREAM)
                            .arg(keys::GROUP)
                            .arg(&entry)
                            .query_async(&mut conn)
                            .await
                            .map_err(unavailable)?;
                    }
                }
            }
            let mut leases = Vec::new();
            for lease in self.to_leases(named).await? {
                if lease.deliveries > self.opts.max_deliveries {
                    self.bury(&lease).await?;
                } else {
                    leases.push(lease);
                }
            }
            if !leases.is_empty() || Instant::now() >= deadline {
                return Ok(leases);
            }
        }
    }
}

impl TopicQueue for RedisQueue {
    fn push(&self, topic_id: &str) -> BoxFuture<'static, Result<(), QueueError>> {
        let inner = Arc::clone(&self.inner);
        let topic = topic_id.to_string();
        Box::pin(async move {
            let mut conn = inner.conn.clone();
            let _: i64 = inner
                .push
                .key(keys::STREAM)
                .key(keys::ENTRY)
                .arg(&topic)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn claim(&self, max: usize, wait: Duration) -> BoxFuture<'static, Result<Vec<Lease>, QueueError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.claim(max, wait).await })
    }

    fn renew(&self, lease: &Lease) -> BoxFuture<'static, Result<bool, QueueError>> {
        let inner = Arc::clone(&self.inner);
        let lease = lease.clone();
        Box::pin(async move {
            let mut conn = inner.conn.clone();
            // The epoch moved: cancelled, decided or re-claimed elsewhere.
            let epoch: Option<u64> = redis::cmd("GET")
                .arg(keys::epoch(&lease.topic_id))
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if epoch != Some(lease.epoch) {
                return Ok(false);
            }
            let owned: i64 = inner
                .renew
                .key(keys::STREAM)
                .arg(keys::GROUP)
                .arg(&inner.opts.consumer)
                .arg(&lease.handle)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            Ok(owned == 1)
        })
    }

    fn ack(&self, lease: &Lease) -> BoxFuture<'static, Result<(), QueueError>> {
        let inner = Arc::clone(&self.inner);
        let lease = lease.clone();
        Box::pin(async move {
            let mut conn = inner.conn.clone();
            let _: i64 = inner
                .ack
                .key(keys::STREAM)
                .key(keys::ENTRY)
                .arg(keys::GROUP)
                .arg(&lease.handle)
                .arg(&lease.topic_id)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn release(&self, lease: &Lease) -> BoxFuture<'static, Result<(), QueueError>> {
        let inner = Arc::clone(&self.inner);
        let lease = lease.clone();
        Box::pin(async move {
            let mut conn = inner.conn.clone();
            let _: i64 = inner
                .release
                .key(keys::STREAM)
                .key(keys::ENTRY)
                .arg(keys::GROUP)
                .arg(&inner.opts.consumer)
                .arg(&lease.handle)
                .arg(&lease.topic_id)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn cancel(&self, topic_id: &str) -> BoxFuture<'static, Result<bool, QueueError>> {
        let inner = Arc::clone(&self.inner);
        let topic = topic_id.to_string();
        Box::pin(async move {
            let mut conn = inner.conn.clone();
            let n: i64 = inner
                .cancel
                .key(keys::STREAM)
                .key(keys::ENTRY)
                .arg(keys::GROUP)
                .arg(&topic)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            Ok(n == 1)
        })
    }

    fn depth(&self) -> BoxFuture<'static, Result<usize, QueueError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let mut conn = inner.conn.clone();
            let n: i64 =
                inner.depth.key(keys::STREAM).arg(keys::GROUP).invoke_async(&mut conn).await.map_err(unavailable)?;
            Ok(n.max(0) as usize)
        })
    }
}
