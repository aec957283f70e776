//! `RedisLimiter`: the `RateLimit` shared by every daemon pointed at one
//! Redis, so N daemons together keep the account's limits instead of N
//! times them.
//!
//! Owns: one GCRA for requests and one for tokens per minute, evaluated by
//! one Lua script on the Redis server's clock (`TIME`: no skew between
//! machines) that admits a call against both limits or neither and returns
//! the exact wait when refused; the shared 429 pause key; `settle`, which
//! gives back the unused part of a token reservation.
//! In front of Redis sits the same local FIFO as `GovernorLimiter` (an async
//! mutex), so this daemon's waiting calls keep their order and only the
//! head of the line talks to Redis: one round trip per admitted call.
//! Redis unreachable ⇒ calls wait and retry (logged once, the
//! `scriptorium_rate_limiter_redis_unavailable` gauge, an alert); they never
//! go out unlimited. Must not: know about topics or providers.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::Script;

use super::limiter::{reserved_burst, LimiterSnapshot, RateLimit};
use super::BoxFuture;
use crate::config::LimitsConfig;
use crate::store::redis::{connect, keys, redacted};

/// The GCRA. Times are microseconds on the Redis clock. A limit admits a
/// call when its new TAT (`max(TAT, now) + interval × cost`) is at most
/// `capacity` ahead of now; capacity = burst × interval, so a full bucket
/// lets `burst` calls through at once.
const ACQUIRE: &str = r"
-- KEYS: requests TAT, tokens TAT, pause
-- ARGV: request interval, request capacity, token interval, token capacity, tokens
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local paused = redis.call('PTTL', KEYS[3])
if paused > 0 then return {0, paused * 1000} end
local wait = 0
local function check(key, interval, capacity, cost)
  if interval <= 0 then return nil end
  local tat = tonumber(redis.call('GET', key) or '0') or 0
  if tat < now then tat = now end
  local new = tat + interval * cost
  local over = new - now - capacity
  if over > wait then wait = over end
  return new
end
local r = check(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), 1)
local k = check(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]))
if wait > 0 then return {0, math.ceil(wait)} end
if r then redis.call('SET', KEYS[1], string.format('%.3f', r), 'PX', math.ceil((r - now) / 1000) + 1000) end
if k then redis.call('SET', KEYS[2], string.format('%.3f', k), 'PX', math.ceil((k - now) / 1000) + 1000) end
return {1, 0}
";

/// Moves the token TAT back by the unused tokens, never below now.
const SETTLE: &str = r"
-- KEYS: tokens TAT. ARGV: token interval, unused tokens
local tat = tonumber(redis.call('GET', KEYS[1]) or '')
if not tat then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local new = tat - tonumber(ARGV[1]) * tonumber(ARGV[2])
if new < now then new = now end
redis.call('SET', KEYS[1], string.format('%.3f', new), 'PX', math.ceil((new - now) / 1000) + 1000)
return 1
";

/// Extends the shared pause, never shortens it.
const PAUSE: &str = r"
-- KEYS: pause. ARGV: milliseconds
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return 1
";

/// One limit's parameters, in microseconds.
#[derive(Debug, Clone, Copy)]
struct Gcra {
    interval_us: f64,
    capacity_us: f64,
}

impl Gcra {
    fn per_minute(rate: u32, burst: u32) -> Option<Gcra> {
        (rate > 0).then(|| {
            let interval_us = 60e6 / f64::from(rate);
            Gcra { interval_us, capacity_us: interval_us * f64::from(burst.max(1)) }
        })
    }
}

/// First and longest wait between retries while Redis is unreachable.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Bounds one round trip; past it the call counts as Redis unreachable.
const LIMITER_TIMEOUT: Duration = Duration::from_secs(2);

struct Inner {
    conn: ConnectionManager,
    acquire: Script,
    settle: Script,
    pause: Script,
    requests: Option<Gcra>,
    tokens: Option<Gcra>,
    token_burst: u32,
    rpm: u32,
    tpm: u32,
    epoch: Instant,
    /// Local copy of the pause (ns since `epoch`): honoured even while
    /// Redis is unreachable, and shown by `snapshot`.
    paused_until: AtomicU64,
    queue: tokio::sync::Mutex<()>,
    waiting: AtomicUsize,
    /// Set while Redis is failing, so the outage is logged once.
    down: AtomicBool,
}

/// Redis-backed `RateLimit`. Cheap to clone.
#[derive(Clone)]
pub struct RedisLimiter {
    inner: Arc<Inner>,
}

impl RedisLimiter {
    /// `largest_request_tokens` sizes the token burst so one maximal request
    /// always fits (as in `GovernorLimiter`). Every daemon should be given
    /// the account's full limits: they are shared, not split.
    pub async fn connect(
        url: &str,
        limits: &LimitsConfig,
        largest_request_tokens: u32,
    ) -> Result<RedisLimiter, redis::RedisError> {
        let conn = connect(url, LIMITER_TIMEOUT).await.map_err(|e| {
            tracing::error!(redis = %redacted(url), "rate limiter cannot reach redis: {e}");
            e
        })?;
        Ok(Self::with_connection(conn, limits, largest_request_tokens))
    }

    pub fn with_connection(conn: ConnectionManager, limits: &LimitsConfig, largest_request_tokens: u32) -> Self {
        let rpm = limits.requests_per_minute;
        let tpm = limits.tokens_per_minute;
        let token_burst = reserved_burst(tpm / 60).max(largest_request_tokens).clamp(1, tpm.max(1));
        RedisLimiter {
            inner: Arc::new(Inner {
                conn,
                acquire: Script::new(ACQUIRE),
                settle: Script::new(SETTLE),
                pause: Script::new(PAUSE),
                requests: Gcra::per_minute(rpm, reserved_burst(rpm / 60).max(1)),
                tokens: Gcra::per_minute(tpm, token_burst),
                token_burst,
                rpm,
                tpm,
                epoch: Instant::now(),
                paused_until: AtomicU64::new(0),
                queue: tokio::sync::Mutex::new(()),
                waiting: AtomicUsize::new(0),
                down: AtomicBool::new(false),
            }),
        }
    }
}

impl Inner {
    fn now_nanos(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn local_pause(&self) -> Duration {
        Duration::from_nanos(self.paused_until.load(Ordering::Acquire).saturating_sub(self.now_nanos()))
    }

    /// One script call: `Ok(None)` admitted, `Ok(Some(wait))` refused.
    async fn try_once(&self, tokens: u32) -> Result<Option<Duration>, redis::RedisError> {
        let (req, tok) = (self.requests, self.tokens);
        let cost = tokens.clamp(1, self.token_burst);
        let mut conn = self.conn.clone();
        let (admitted, wait_us): (i64, i64) = self
            .acquire
            .key(keys::LIMIT_REQUESTS)
            .key(keys::LIMIT_TOKENS)
            .key(keys::LIMIT_PAUSE)
            .arg(req.map_or(0.0, |g| g.interval_us))
            .arg(req.map_or(0.0, |g| g.capacity_us))
            .arg(tok.map_or(0.0, |g| g.interval_us))
            .arg(tok.map_or(0.0, |g| g.capacity_us))
            .arg(cost)
            .invoke_async(&mut conn)
            .await?;
        Ok((admitted != 1).then(|| Duration::from_micros(wait_us.max(1) as u64)))
    }

    fn went_down(&self, e: &redis::RedisError) {
        metrics::counter!("scriptorium_redis_errors_total", "component" => "limiter").increment(1);
        if !self.down.swap(true, Ordering::AcqRel) {
            metrics::gauge!("scriptorium_rate_limiter_redis_unavailable").set(1.0);
            tracing::error!("rate limiter cannot reach redis; model calls wait until it answers: {e}");
        }
    }

    fn came_back(&self) {
        if self.down.swap(false, Ordering::AcqRel) {
            metrics::gauge!("scriptorium_rate_limiter_redis_unavailable").set(0.0);
            tracing::info!("rate limiter reaches redis again");
        }
    }
}

impl RateLimit for RedisLimiter {
    fn acquire(&self, tokens: u32) -> BoxFuture<'_, Duration> {
        Box::pin(async move {
            let inner = &self.inner;
            let started = Instant::now();
            if inner.requests.is_none() && inner.tokens.is_none() {
                // No limit configured: only a 429's pause holds calls back.
                tokio::time::sleep(inner.local_pause()).await;
                return started.elapsed();
            }
            inner.waiting.fetch_add(1, Ordering::Relaxed);
            {
                let _turn = inner.queue.lock().await;
                let mut backoff = RETRY_FIRST;
                loop {
                    let pause = inner.local_pause();
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                    match inner.try_once(tokens).await {
                        Ok(None) => {
                            inner.came_back();
                            break;
                        }
                        Ok(Some(wait)) => {
                            inner.came_back();
                            backoff = RETRY_FIRST;
                            tokio::time::sleep(wait).await;
                        }
                        Err(e) => {
                            inner.went_down(&e);
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(RETRY_MAX);
                        }
                    }
                }
            }
            inner.waiting.fetch_sub(1, Ordering::Relaxed);
            let waited = started.elapsed();
            metrics::histogram!("scriptorium_rate_limiter_wait_seconds").record(waited.as_secs_f64());
            waited
        })
    }

    fn pause_for(&self, for_how_long: Duration) {
        let inner = &self.inner;
        let until = inner.now_nanos() + for_how_long.as_nanos() as u64;
        if until <= inner.paused_until.fetch_max(until, Ordering::AcqRel) {
            return;
        }
        metrics::gauge!("scriptorium_rate_limiter_paused").set(1.0);
        tracing::warn!(pause_ms = for_how_long.as_millis() as u64, "rate limited: pausing model calls on every daemon");
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        let inner = Arc::clone(&self.inner);
        handle.spawn(async move {
            let mut conn = inner.conn.clone();
            let ms = for_how_long.as_millis().max(1) as u64;
            let set: Result<i64, _> = inner.pause.key(keys::LIMIT_PAUSE).arg(ms).invoke_async(&mut conn).await;
            if let Err(e) = set {
                // The local pause still holds this daemon back.
                inner.went_down(&e);
            }
            tokio::time::sleep(for_how_long).await;
            if inner.paused_until.load(Ordering::Acquire) == until {
                metrics::gauge!("scriptorium_rate_limiter_paused").set(0.0);
            }
        });
    }

    fn settle(&self, reserved_tokens: u32, used_tokens: u32) {
        let Some(tokens) = self.inner.tokens else { return };
        let reserved = reserved_tokens.clamp(1, self.inner.token_burst);
        let unused = reserved.saturating_sub(used_tokens);
        if unused == 0 {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        let inner = Arc::clone(&self.inner);
        handle.spawn(async move {
            let mut conn = inner.conn.clone();
            let done: Result<i64, _> =
                inner.settle.key(keys::LIMIT_TOKENS).arg(tokens.interval_us).arg(unused).invoke_async(&mut conn).await;
            // Losing a settle only makes the limiter stricter than needed.
            if let Err(e) = done {
                inner.went_down(&e);
            }
        });
    }

    fn snapshot(&self) -> LimiterSnapshot {
        LimiterSnapshot {
            requests_per_minute: self.inner.rpm,
            tokens_per_minute: self.inner.tpm,
            paused_ms: self.inner.local_pause().as_millis() as u64,
            waiting: self.inner.waiting.load(Ordering::Relaxed),
        }
    }
}
