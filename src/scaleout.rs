//! Builds the Redis-backed parts from `[store]`: one call for whoever wires
//! the engine with `store.backend = "redis"` (the store, the queue and the
//! shared limiter, on one Redis), and the daemon's default consumer name.
//!
//! Owns: nothing at run time; only construction. Must not: start work or
//! hold state of its own (the parts it returns do).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::llm::limiter::RateLimit;
use crate::llm::limiter_redis::RedisLimiter;
use crate::queue::redis::{RedisQueue, RedisQueueOptions};
use crate::queue::TopicQueue;
use crate::store::redis::{redacted, RedisStore};
use crate::store::TopicStore;

/// The three shared parts, ready to hand to the engine.
pub struct RedisBackend {
    pub store: Arc<dyn TopicStore>,
    pub queue: Arc<dyn TopicQueue>,
    pub limiter: Arc<dyn RateLimit>,
    pub consumer: String,
}

#[derive(Debug, thiserror::Error)]
#[error("redis backend at {url}: {message}")]
pub struct BackendError {
    url: String,
    message: String,
}

/// Connects the store, the queue (dead letters recorded in that store) and
/// the limiter. `largest_request_tokens` as for `GovernorLimiter::new`.
pub async fn connect(
    config: &Config,
    consumer: String,
    largest_request_tokens: u32,
) -> Result<RedisBackend, BackendError> {
    let url = &config.store.url;
    let fail = |message: String| BackendError { url: redacted(url), message };
    let store = RedisStore::connect(url).await.map_err(|e| fail(e.to_string()))?;
    let store: Arc<dyn TopicStore> = Arc::new(store);
    let opts = RedisQueueOptions {
        consumer: consumer.clone(),
        lease: Duration::from_secs_f64(config.store.lease_s),
        max_deliveries: config.store.max_deliveries,
    };
    let queue = RedisQueue::connect(url, opts, Some(Arc::clone(&store))).await.map_err(|e| fail(e.to_string()))?;
    let limiter = RedisLimiter::connect(url, &config.limits, largest_request_tokens)
        .await
        .map_err(|e| fail(format!("rate limiter: {e}")))?;
    Ok(RedisBackend { store, queue: Arc::new(queue), limiter: Arc::new(limiter), consumer })
}

/// `<host>-<hash of the data dir>`: stable across restarts of one daemon
/// (so it gets its own leases back at once) and distinct for two daemons on
/// one host (they cannot share a data dir: its socket is theirs).
pub fn default_consumer(data_dir: &Path) -> String {
    let dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    // FNV-1a, not `DefaultHasher`: the name must not change with the Rust
    // version the daemon was built with.
    let hash = dir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193));
    format!("{}-{hash:08x}", hostname())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most
    // that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = if rc == 0 { String::from_utf8_lossy(&buf[..end]).into_owned() } else { String::new() };
    let clean: String = name.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.').collect();
    if clean.is_empty() {
        "host".into()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_names_are_stable_per_data_dir_and_differ_between_them() {
        let a = default_consumer(Path::new("/tmp/a"));
        assert_eq!(a, default_consumer(Path::new("/tmp/a")));
        assert_ne!(a, default_consumer(Path::new("/tmp/b")));
        assert!(!a.contains(' ') && a.contains('-'), "{a}");
    }
}
