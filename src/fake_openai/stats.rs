//! What the fake OpenAI server counts: requests by answer (status, `hang`,
//! `reset`), by workflow step and per (topic, step); injected faults by
//! kind; requests refused by its own rate limits; and a log of admitted
//! requests (arrival time, token cost) for windowed throughput.
//!
//! Must not: block for long (one short mutex per request), or grow without
//! bound: the admission log stops at `MAX_ADMISSIONS` entries and says so.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Admission log cap (~16 MiB); later admissions are counted but not logged.
pub const MAX_ADMISSIONS: usize = 1_000_000;
/// Refusal times kept for diagnosis.
pub const MAX_REFUSAL_TIMES: usize = 100;

#[derive(Default)]
struct Inner {
    by_status: BTreeMap<String, u64>,
    by_step: BTreeMap<String, u64>,
    by_topic_step: HashMap<(String, String), u64>,
    faults: BTreeMap<String, u64>,
    faults_by_topic_step: HashMap<(String, String), Vec<&'static str>>,
    rate_limited: u64,
    rate_limited_at: Vec<f64>,
    requests: u64,
    admissions: Vec<(Duration, u32)>,
    admissions_dropped: u64,
    tokens_admitted: u64,
    tokens_billed: u64,
    reasoning_tokens: u64,
    truncated: u64,
    billed_by_topic: HashMap<String, u64>,
    headers_seen: BTreeMap<String, String>,
    last_request: Option<Instant>,
    mark: Option<Instant>,
    first_since_mark: Option<Instant>,
}

/// Shared counters; see the module docs.
pub struct FakeStats {
    started: Instant,
    inner: Mutex<Inner>,
}

/// A copy of the counters, for printing and JSON.
#[derive(Debug, Clone, Serialize, Default)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub by_status: BTreeMap<String, u64>,
    pub by_step: BTreeMap<String, u64>,
    pub faults: BTreeMap<String, u64>,
    /// Faults injected, all kinds (not counting `rate_limited`).
    pub faults_total: u64,
    /// 429s from the server's own limits (not injected).
    pub rate_limited: u64,
    /// When the first of them happened, in seconds since the server started
    /// (at most `MAX_REFUSAL_TIMES`).
    pub rate_limited_at_s: Vec<f64>,
    pub tokens_admitted: u64,
    /// Tokens reported as usage (input + output, reasoning included) in
    /// 200 answers, truncated ones included: what a real server bills.
    pub tokens_billed: u64,
    pub reasoning_tokens: u64,
    /// Answers cut off at the request's output cap.
    pub truncated: u64,
}

impl FakeStats {
    pub(crate) fn new() -> FakeStats {
        FakeStats { started: Instant::now(), inner: Mutex::new(Inner::default()) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// When the server started (the limits' epoch).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// A request arrived for `(topic, step)`.
    pub(crate) fn arrived(&self, topic: &str, step: &str, at: Instant) {
        let mut s = self.lock();
        s.requests += 1;
        *s.by_step.entry(step.to_string()).or_default() += 1;
        *s.by_topic_step.entry((topic.to_string(), step.to_string())).or_default() += 1;
        s.last_request = Some(at);
        if s.mark.is_some() && s.first_since_mark.is_none() {
            s.first_since_mark = Some(at);
        }
    }

    pub(crate) fn admitted(&self, at: Instant, tokens: u32) {
        let mut s = self.lock();
        s.tokens_admitted += u64::from(tokens);
        if s.admissions.len() < MAX_ADMISSIONS {
            let offset = at.saturating_duration_since(self.started);
            s.admissions.push((offset, tokens));
        } else {
            s.admissions_dropped += 1;
        }
    }

    pub(crate) fn rate_limited(&self) {
        let at = self.started.elapsed().as_secs_f64();
        let mut s = self.lock();
        s.rate_limited += 1;
        if s.rate_limited_at.len() < MAX_REFUSAL_TIMES {
            s.rate_limited_at.push(at);
        }
    }

    pub(crate) fn fault(&self, kind: &'static str, topic: &str, step: &str) {
        let mut s = self.lock();
        *s.faults.entry(kind.to_string()).or_default() += 1;
        s.faults_by_topic_step.entry((topic.to_string(), step.to_string())).or_default().push(kind);
    }

    /// How a request was answered: `"200"`, `"429"`, …, `"hang"`, `"reset"`.
    pub(crate) fn answered(&self, status: &str) {
        *self.lock().by_status.entry(status.to_string()).or_default() += 1;
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let s = self.lock();
        StatsSnapshot {
            requests: s.requests,
            by_status: s.by_status.clone(),
            by_step: s.by_step.clone(),
            faults_total: s.faults.values().sum(),
            faults: s.faults.clone(),
            rate_limited: s.rate_limited,
            rate_limited_at_s: s.rate_limited_at.clone(),
            tokens_admitted: s.tokens_admitted,
            tokens_billed: s.tokens_billed,
            reasoning_tokens: s.reasoning_tokens,
            truncated: s.truncated,
        }
    }

    /// A 200 answer billed `tokens` (input + output) to `topic`.
    pub(crate) fn billed(&self, topic: &str, tokens: u64, reasoning: u64, truncated: bool) {
        let mut s = self.lock();
        s.tokens_billed += tokens;
        s.reasoning_tokens += reasoning;
        s.truncated += u64::from(truncated);
        *s.billed_by_topic.entry(topic.to_string()).or_default() += tokens;
    }

    /// Tokens billed per topic (the topic read from the prompt).
    pub fn billed_by_topic(&self) -> HashMap<String, u64> {
        self.lock().billed_by_topic.clone()
    }

    /// The last value of a header the fake records (`user-agent`,
    /// `openai-organization`, `openai-project`; never `authorization`).
    pub(crate) fn saw_header(&self, name: &str, value: &str) {
        let mut s = self.lock();
        s.headers_seen.insert(name.to_string(), value.chars().take(200).collect());
    }

    pub fn header_seen(&self, name: &str) -> Option<String> {
        self.lock().headers_seen.get(name).cloned()
    }

    /// Requests received per (topic, step) so far.
    pub fn per_topic_step(&self) -> HashMap<(String, String), u64> {
        self.lock().by_topic_step.clone()
    }

    /// Faults injected per (topic, step) so far, by kind, in order.
    pub fn faults_per_topic_step(&self) -> HashMap<(String, String), Vec<&'static str>> {
        self.lock().faults_by_topic_step.clone()
    }

    /// Requests admitted (past the limits) with arrival in `(from, to]`, and
    /// their token cost. `None` when the log overflowed.
    pub fn admitted_between(&self, from: Instant, to: Instant) -> Option<(u64, u64)> {
        let s = self.lock();
        if s.admissions_dropped > 0 {
            return None;
        }
        let (lo, hi) = (from.saturating_duration_since(self.started), to.saturating_duration_since(self.started));
        let mut n = 0;
        let mut tokens = 0;
        for (at, t) in &s.admissions {
            if *at > lo && *at <= hi {
                n += 1;
                tokens += u64::from(*t);
            }
        }
        Some((n, tokens))
    }

    /// Arrival time of the latest request.
    pub fn last_request(&self) -> Option<Instant> {
        self.lock().last_request
    }

    /// Starts watching for the next request (see `first_since_mark`).
    pub fn mark(&self) {
        let mut s = self.lock();
        s.mark = Some(Instant::now());
        s.first_since_mark = None;
    }

    /// Arrival time of the first request after the last `mark`.
    pub fn first_since_mark(&self) -> Option<Instant> {
        self.lock().first_since_mark
    }
}
