//! The shared rate limiter in front of every model call.
//!
//! `RateLimit` is the seam: `GovernorLimiter` is the in-process
//! implementation (GCRA buckets from governor for requests and tokens per
//! minute); a limiter shared by several daemons (e.g. in Redis) would be a
//! second implementation of the same trait.
//!
//! Acquisition is FIFO through an async mutex: waiters queue in order instead
//! of all waking and re-checking the buckets together, which keeps fairness
//! and CPU flat with thousands of topics waiting. A 429 with `retry-after`
//! pauses the whole limiter, so every caller backs off, not just the one
//! that was told to.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Serialize;

use super::BoxFuture;
use crate::config::LimitsConfig;

/// What `health` shows about the limiter.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LimiterSnapshot {
    pub requests_per_minute: u32,
    pub tokens_per_minute: u32,
    pub paused_ms: u64,
    pub waiting: usize,
}

pub trait RateLimit: Send + Sync + 'static {
    /// Waits until one request costing `tokens` may go; returns the wait.
    fn acquire(&self, tokens: u32) -> BoxFuture<'_, Duration>;
    /// Holds every caller back for `for_how_long` (a 429's retry-after).
    fn pause_for(&self, for_how_long: Duration);
    fn snapshot(&self) -> LimiterSnapshot;
    /// Called after each billed call with the tokens reserved in `acquire`
    /// and the tokens the server billed. The in-process GCRA buckets cannot
    /// hand tokens back, so the default does nothing; a limiter that can
    /// (a shared counter) refunds the difference here.
    fn settle(&self, reserved_tokens: u32, used_tokens: u32) {
        let _ = (reserved_tokens, used_tokens);
    }
}

/// Share of a one-second burst the client allows itself. At the same rate,
/// a client whose bucket is full at 0.9 s where the server's is full at 1 s
/// keeps a 100 ms cushion at the server for ever: a request may reach the
/// server up to 100 ms sooner relative to the ones before it (a warm
/// connection after a cold one, a scheduling delay) without being refused.
/// With equal buckets both sit at the edge once the burst is spent, and the
/// first such reordering was a 429 (measured against `fake_openai`:
/// one 429 per run at 6,000 requests/min and at 15 M tokens/min).
const BURST_SHARE: f64 = 0.9;

pub(crate) fn reserved_burst(one_second: u32) -> u32 {
    (f64::from(one_second) * BURST_SHARE).floor() as u32
}

pub struct GovernorLimiter {
    requests: Option<DefaultDirectRateLimiter>,
    tokens: Option<(DefaultDirectRateLimiter, u32)>,
    rpm: u32,
    tpm: u32,
    epoch: Instant,
    /// Nanoseconds since `epoch` until which calls are paused.
    paused_until: Arc<AtomicU64>,
    queue: tokio::sync::Mutex<()>,
    waiting: AtomicUsize,
}

impl GovernorLimiter {
    /// `largest_request_tokens` sizes the token bucket's burst so one maximal
    /// request always fits.
    pub fn new(limits: &LimitsConfig, largest_request_tokens: u32) -> Self {
        let requests = NonZeroU32::new(limits.requests_per_minute).map(|rpm| {
            // Most of one second's worth of burst: enough to start promptly,
            // small enough that a server enforcing the same per-minute rate
            // with a one-second bucket does not answer 429 (see
            // `BURST_SHARE`).
            let burst = NonZeroU32::new(reserved_burst(rpm.get() / 60).max(1)).unwrap_or(NonZeroU32::MIN);
            RateLimiter::direct(Quota::per_minute(rpm).allow_burst(burst))
        });
        let tokens = NonZeroU32::new(limits.tokens_per_minute).map(|tpm| {
            let burst = reserved_burst(tpm.get() / 60).max(largest_request_tokens).clamp(1, tpm.get());
            let burst_nz = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
            (RateLimiter::direct(Quota::per_minute(tpm).allow_burst(burst_nz)), burst)
        });
        Self {
            requests,
            tokens,
            rpm: limits.requests_per_minute,
            tpm: limits.tokens_per_minute,
            epoch: Instant::now(),
            paused_until: Arc::new(AtomicU64::new(0)),
            queue: tokio::sync::Mutex::new(()),
            waiting: AtomicUsize::new(0),
        }
    }

    fn now_nanos(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn pause_remaining(&self) -> Duration {
        let until = self.paused_until.load(Ordering::Acquire);
        Duration::from_nanos(until.saturating_sub(self.now_nanos()))
    }

    /// True when no limit is configured: the fast path skips the queue.
    fn unlimited(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none()
    }
}

impl RateLimit for GovernorLimiter {
    fn acquire(&self, tokens: u32) -> BoxFuture<'_, Duration> {
        Box::pin(async move {
            if self.unlimited() && self.paused_until.load(Ordering::Relaxed) == 0 {
                return Duration::ZERO;
            }
            let started = Instant::now();
            self.waiting.fetch_add(1, Ordering::Relaxed);
            {
                let _turn = self.queue.lock().await;
                loop {
                    let pause = self.pause_remaining();
                    if pause.is_zero() {
                        break;
                    }
                    tokio::time::sleep(pause).await;
                }
                if let Some(r) = &self.requests {
                    r.until_ready().await;
                }
                if let Some((t, burst)) = &self.tokens {
                    let n = NonZeroU32::new(tokens.clamp(1, *burst)).unwrap_or(NonZeroU32::MIN);
                    // Cannot fail: n is clamped to the bucket's burst.
                    let _ = t.until_n_ready(n).await;
                }
            }
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            let waited = started.elapsed();
            metrics::histogram!("scriptorium_rate_limiter_wait_seconds").record(waited.as_secs_f64());
            waited
        })
    }

    fn pause_for(&self, for_how_long: Duration) {
        let until = self.now_nanos() + for_how_long.as_nanos() as u64;
        let previous = self.paused_until.fetch_max(until, Ordering::AcqRel);
        if until <= previous {
            return;
        }
        metrics::gauge!("scriptorium_rate_limiter_paused").set(1.0);
        tracing::warn!(pause_ms = for_how_long.as_millis() as u64, "rate limited: pausing all model calls");
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let paused_until = Arc::clone(&self.paused_until);
            handle.spawn(async move {
                tokio::time::sleep(for_how_long).await;
                // Only the last pause to end clears the gauge.
                if paused_until.load(Ordering::Acquire) == until {
                    metrics::gauge!("scriptorium_rate_limiter_paused").set(0.0);
                }
            });
        }
    }

    fn snapshot(&self) -> LimiterSnapshot {
        LimiterSnapshot {
            requests_per_minute: self.rpm,
            tokens_per_minute: self.tpm,
            paused_ms: self.pause_remaining().as_millis() as u64,
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rpm: u32, tpm: u32) -> LimitsConfig {
        LimitsConfig { requests_per_minute: rpm, tokens_per_minute: tpm, ..LimitsConfig::default() }
    }

    // governor keeps its own clock, so these run in real time.
    #[tokio::test]
    async fn request_rate_is_enforced_after_the_burst() {
        // 1200/min = 20/s, burst 18: 40 acquisitions need about 1.1 s.
        let l = GovernorLimiter::new(&limits(1200, 0), 1);
        let start = Instant::now();
        for _ in 0..40 {
            l.acquire(1).await;
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(900), "{took:?}");
    }

    #[tokio::test]
    async fn token_rate_is_enforced() {
        // 60,000 tokens/min = 1,000/s; burst 900; 3,000 tokens need ~2.1 s.
        let l = GovernorLimiter::new(&limits(0, 60_000), 500);
        let start = Instant::now();
        for _ in 0..6 {
            l.acquire(500).await;
        }
        assert!(start.elapsed() >= Duration::from_millis(1900), "{:?}", start.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn pause_holds_every_caller() {
        let l = GovernorLimiter::new(&limits(6000, 0), 1);
        l.pause_for(Duration::from_secs(3));
        assert!(l.snapshot().paused_ms > 2000);
        let start = tokio::time::Instant::now();
        l.acquire(1).await;
        assert!(start.elapsed() >= Duration::from_secs(3));
    }

    #[tokio::test]
    async fn unlimited_is_free() {
        let l = GovernorLimiter::new(&limits(0, 0), 1);
        assert_eq!(l.acquire(100).await, Duration::ZERO);
    }
}
