//! `MemoryQueue`: the in-process `TopicQueue`. A FIFO of waiting ids and the
//! set of claimed ones; leases never expire (one process holds them all, and
//! a crash loses the queue with the process — the store's unfinished topics
//! are pushed again at the next start).
//! Must not: block an async worker (one short mutex section per op).

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use super::{Lease, QueueError, TopicQueue};
use crate::llm::BoxFuture;

#[derive(Default)]
struct Inner {
    waiting: VecDeque<String>,
    /// Claimed ids and their claim (epoch, deliveries).
    claimed: HashMap<String, (u64, u32)>,
    /// Deliveries of ids released unfinished, carried to their next claim.
    released: HashMap<String, u32>,
    next_epoch: u64,
}

#[derive(Default)]
pub struct MemoryQueue {
    inner: Mutex<Inner>,
    pushed: Notify,
}

impl MemoryQueue {
    pub fn new() -> MemoryQueue {
        MemoryQueue::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn take(&self, max: usize) -> Vec<Lease> {
        let mut inner = self.lock();
        let mut leases = Vec::new();
        while leases.len() < max {
            let Some(id) = inner.waiting.pop_front() else { break };
            inner.next_epoch += 1;
            let epoch = inner.next_epoch;
            let deliveries = inner.released.remove(&id).unwrap_or(0) + 1;
            inner.claimed.insert(id.clone(), (epoch, deliveries));
            leases.push(Lease { topic_id: id, epoch, deliveries, handle: String::new() });
        }
        leases
    }

    async fn claim_inner(&self, max: usize, wait: Duration) -> Vec<Lease> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register for a wake-up before looking, so a push between the
            // look and the wait is not missed.
            let pushed = self.pushed.notified();
            tokio::pin!(pushed);
            pushed.as_mut().enable();
            let leases = self.take(max.max(1));
            if !leases.is_empty() {
                return leases;
            }
            if tokio::time::timeout_at(deadline, pushed).await.is_err() {
                return Vec::new();
            }
        }
    }
}

impl TopicQueue for MemoryQueue {
    fn push(&self, topic_id: &str) -> BoxFuture<'static, Result<(), QueueError>> {
        self.lock().waiting.push_back(topic_id.to_string());
        self.pushed.notify_one();
        Box::pin(async { Ok(()) })
    }

    fn claim(&self, max: usize, wait: Duration) -> BoxFuture<'_, Result<Vec<Lease>, QueueError>> {
        Box::pin(async move { Ok(self.claim_inner(max, wait).await) })
    }

    fn renew(&self, lease: &Lease) -> BoxFuture<'static, Result<bool, QueueError>> {
        let held = self.lock().claimed.get(&lease.topic_id).is_some_and(|(epoch, _)| *epoch == lease.epoch);
        Box::pin(async move { Ok(held) })
    }

    fn ack(&self, lease: &Lease) -> BoxFuture<'static, Result<(), QueueError>> {
        let mut inner = self.lock();
        if inner.claimed.get(&lease.topic_id).is_some_and(|(epoch, _)| *epoch == lease.epoch) {
            inner.claimed.remove(&lease.topic_id);
        }
        Box::pin(async { Ok(()) })
    }

    fn release(&self, lease: &Lease) -> BoxFuture<'static, Result<(), QueueError>> {
        let mut inner = self.lock();
        if let Some((epoch, deliveries)) = inner.claimed.get(&lease.topic_id).copied() {
            if epoch == lease.epoch {
                inner.claimed.remove(&lease.topic_id);
                inner.released.insert(lease.topic_id.clone(), deliveries);
                inner.waiting.push_front(lease.topic_id.clone());
                drop(inner);
                self.pushed.notify_one();
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn cancel(&self, topic_id: &str) -> BoxFuture<'static, Result<bool, QueueError>> {
        let mut inner = self.lock();
        let found = inner.waiting.iter().position(|id| id == topic_id).map(|i| inner.waiting.remove(i)).is_some();
        Box::pin(async move { Ok(found) })
    }

    fn depth(&self) -> BoxFuture<'static, Result<usize, QueueError>> {
        let n = self.lock().waiting.len();
        Box::pin(async move { Ok(n) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fifo_claims_with_rising_epochs_and_ack() {
        let q = MemoryQueue::new();
        for id in ["a", "b", "c"] {
            q.push(id).await.unwrap();
        }
        let first = q.claim(2, Duration::ZERO).await.unwrap();
        assert_eq!(first.iter().map(|l| l.topic_id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert!(first[0].epoch < first[1].epoch);
        assert_eq!(q.depth().await.unwrap(), 1);
        assert!(q.renew(&first[0]).await.unwrap());
        q.ack(&first[0]).await.unwrap();
        assert!(!q.renew(&first[0]).await.unwrap(), "an acked lease is gone");
        assert!(q.cancel("c").await.unwrap());
        assert!(!q.cancel("c").await.unwrap());
        assert!(q.claim(1, Duration::from_millis(10)).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn released_topics_come_back_first_with_their_delivery_count() {
        let q = MemoryQueue::new();
        q.push("a").await.unwrap();
        q.push("b").await.unwrap();
        let a = q.claim(1, Duration::ZERO).await.unwrap().remove(0);
        q.release(&a).await.unwrap();
        let again = q.claim(1, Duration::ZERO).await.unwrap().remove(0);
        assert_eq!((again.topic_id.as_str(), again.deliveries), ("a", 2));
        assert!(again.epoch > a.epoch, "a new claim fences the old one");
        assert!(!q.renew(&a).await.unwrap());
    }

    #[tokio::test]
    async fn a_waiting_claim_wakes_on_push() {
        let q = std::sync::Arc::new(MemoryQueue::new());
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.claim(1, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        q.push("late").await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), waiter).await.unwrap().unwrap().unwrap();
        assert_eq!(got[0].topic_id, "late");
    }
}
