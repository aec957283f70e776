//! `Scriptorium`: the embeddable engine handle. `scriptorium run`, the
//! daemon's socket server and library users all go through it: `submit`,
//! `get`, `wait`, `events`, `approve`, `reject`, `cancel`, `list`,
//! `health`, `shutdown`.
//!
//! Owns: validation of submissions, idempotency, wiring (provider, limiter,
//! stage pools, admission, dispatcher, store, queue), resume on start. Must not: speak any
//! wire protocol (that is `server/`), or run workflow steps (actors do).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorRef};
use serde::Serialize;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::actors::admission::{Admission, AdmissionArgs, AdmissionMsg};
use crate::actors::pool::StagePools;
use crate::actors::runner::{LiveTopic, RunnerParts, TopicRunner};
use crate::actors::Services;
use crate::config::Config;
use crate::events::{EventBus, TopicEvent};
use crate::llm::limiter::{GovernorLimiter, LimiterSnapshot, RateLimit};
use crate::llm::retry::{CallerParts, RetryBudget, RetryPolicy, StepCaller};
use crate::llm::{build_provider, LlmProvider};
use crate::queue::memory::MemoryQueue;
use crate::queue::TopicQueue;
use crate::state::{now_ms, JournalRecord, Submission, TopicState, TopicStatus, TopicSummary};
use crate::store::files::FileMirror;
use crate::store::{Inserted, ListQuery, StoreError, TopicStore};

/// Errors callers branch on; `code()` is the stable wire code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("no topic with id `{0}`")]
    NotFound(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    InvalidState(String),
    #[error("timed out waiting for topic `{0}`")]
    Timeout(String),
    /// The store refuses writes (a full disk, a lost database): nothing was
    /// changed; try again once `health` shows the store ok.
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),
    /// `limits.max_cost_usd_per_day` is spent: no new topics today (UTC).
    #[error("{0}")]
    Budget(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    pub fn code(&self) -> &'static str {
        match self {
            EngineError::BadRequest(_) => "bad_request",
            EngineError::TooLarge(_) => "too_large",
            EngineError::NotFound(_) => "not_found",
            EngineError::Busy(_) => "busy",
            EngineError::InvalidState(_) => "invalid_state",
            EngineError::Timeout(_) => "timeout",
            EngineError::StoreUnavailable(_) => "store_unavailable",
            EngineError::Budget(_) => "budget",
            EngineError::Internal(_) => "internal",
        }
    }
}

fn internal(e: impl std::fmt::Display) -> EngineError {
    EngineError::Internal(e.to_string())
}

fn store_error(e: StoreError) -> EngineError {
    match e {
        StoreError::Io(_) | StoreError::Database(_) | StoreError::Closed => {
            EngineError::StoreUnavailable(e.to_string())
        }
        StoreError::Corrupt(_) | StoreError::Fenced(_) => internal(e),
        // A shared store refused a decision the topic's status no longer
        // allows (another daemon decided first).
        StoreError::Conflict { .. } => EngineError::InvalidState(e.to_string()),
    }
}

#[derive(Debug, Clone, Default)]
pub struct SubmitRequest {
    pub topic: String,
    pub kind: Option<String>,
    pub variants: Option<u32>,
    pub require_approval: Option<bool>,
    pub idempotency_key: Option<String>,
    /// Overrides `workflow.max_tokens` for this topic.
    pub max_tokens: Option<u64>,
    /// Overrides `workflow.max_cost_usd` for this topic.
    pub max_cost_usd: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitReceipt {
    pub id: String,
    /// True when the idempotency key matched an earlier submit.
    pub existing: bool,
}

/// How to build the engine beyond the config.
#[derive(Default)]
pub struct EngineOptions {
    pub store: Option<Arc<dyn TopicStore>>,
    pub files: Option<FileMirror>,
    /// Overrides the provider chosen by `llm.provider` (tests, benches).
    pub provider: Option<Arc<dyn LlmProvider>>,
    /// The topic queue; the in-memory one when `None`.
    pub queue: Option<Arc<dyn TopicQueue>>,
    /// How often a claimed topic's lease is renewed, for a queue whose
    /// leases expire; `None` for the in-memory queue.
    pub lease_renew_every: Option<Duration>,
    /// The rate limiter (a shared one for several daemons); the in-process
    /// `GovernorLimiter` from `[limits]` when `None`.
    pub limiter: Option<Arc<dyn RateLimit>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub version: &'static str,
    pub uptime_s: u64,
    pub provider: &'static str,
    pub model: String,
    pub counts: BTreeMap<String, u64>,
    pub in_flight: usize,
    pub queued: usize,
    pub limiter: LimiterSnapshot,
    pub escalated: Option<String>,
    /// `ok`, or `degraded: <error>` while the store refuses writes (topics
    /// wait and retry; submits answer `store_unavailable`).
    pub store: String,
}

struct Inner {
    config: Arc<Config>,
    runner: Arc<TopicRunner>,
    admission: ActorRef<AdmissionMsg>,
    /// Stops the dispatcher from claiming more topics (drain).
    dispatch_stop: CancellationToken,
    limiter: Arc<dyn RateLimit>,
    provider: Arc<dyn LlmProvider>,
    provider_notice: Option<String>,
    events: EventBus,
    escalation: watch::Receiver<Option<String>>,
    /// Idempotency keys seen by this process when there is no store (a
    /// store settles keys with its unique index, across restarts).
    keys: Mutex<HashMap<String, String>>,
    started: Instant,
    id_counter: AtomicU64,
    call_timeout: Duration,
    /// Today's spend and when it was summed (`check_daily_spend`).
    day_spend: Mutex<Option<(Instant, f64)>>,
}

/// The engine handle. Cheap to clone.
#[derive(Clone)]
pub struct Scriptorium {
    inner: Arc<Inner>,
}

/// How often `wait` re-reads a topic this process does not hold (another
/// worker runs it, or it is queued behind a restart).
const WAIT_POLL: Duration = Duration::from_millis(500);

impl Scriptorium {
    /// Starts the stage pools, the admission actor and the dispatcher,
    /// pushes unfinished topics from the store to the queue, and returns
    /// the handle.
    pub async fn start(config: Config, options: EngineOptions) -> Result<Scriptorium, EngineError> {
        let config = Arc::new(config);
        let (provider, provider_notice) = match options.provider {
            Some(p) => (p, None),
            None => build_provider(&config).map_err(internal)?,
        };
        let largest = config.llm.max_output_tokens.saturating_add(16_000);
        let limiter: Arc<dyn RateLimit> =
            options.limiter.unwrap_or_else(|| Arc::new(GovernorLimiter::new(&config.limits, largest)));
        metrics::gauge!("scriptorium_rate_limit_requests_per_minute").set(f64::from(config.limits.requests_per_minute));
        metrics::gauge!("scriptorium_rate_limit_tokens_per_minute").set(f64::from(config.limits.tokens_per_minute));
        let caller = StepCaller::new(CallerParts {
            provider: Arc::clone(&provider),
            limiter: Arc::clone(&limiter),
            policy: RetryPolicy::from_config(&config.retry),
            budget: Arc::new(RetryBudget::new(&config.retry)),
            request_timeout: Duration::from_secs_f64(config.llm.request_timeout_s),
            max_retry_after: Duration::from_secs_f64(config.retry.max_retry_after_s),
        });
        let events = EventBus::default();
        let services = Arc::new(Services::new(Arc::clone(&config), caller, events.clone()));
        let pools = Arc::new(StagePools::start(&services).await.map_err(internal)?);
        let escalation = pools.supervision.subscribe();
        let queue = options.queue.unwrap_or_else(|| Arc::new(MemoryQueue::new()));
        let runner = Arc::new(TopicRunner::new(RunnerParts {
            services,
            pools,
            store: options.store,
            files: options.files,
            queue,
            renew_every: options.lease_renew_every,
        }));
        let (admission, _) = Actor::spawn(
            None,
            Admission,
            AdmissionArgs {
                max_in_flight: config.limits.max_in_flight_topics,
                max_queued: config.limits.max_queued_topics,
            },
        )
        .await
        .map_err(internal)?;
        let dispatch_stop = CancellationToken::new();
        tokio::spawn(Arc::clone(&runner).dispatch(
            admission.clone(),
            config.limits.max_in_flight_topics,
            dispatch_stop.clone(),
        ));
        metrics::gauge!("scriptorium_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        let engine = Scriptorium {
            inner: Arc::new(Inner {
                config,
                runner,
                admission,
                dispatch_stop,
                limiter,
                provider,
                provider_notice,
                events,
                escalation,
                keys: Mutex::new(HashMap::new()),
                started: Instant::now(),
                id_counter: AtomicU64::new(rand::random::<u32>() as u64),
                call_timeout: Duration::from_secs(30),
                day_spend: Mutex::new(None),
            }),
        };
        engine.resume().await?;
        Ok(engine)
    }

    /// Pushes every unfinished topic's id to the queue (each is loaded from
    /// the store when claimed); topics awaiting approval stay in the store
    /// until a human decides.
    async fn resume(&self) -> Result<(), EngineError> {
        let Some(store) = &self.inner.runner.store else { return Ok(()) };
        let topics = store.unfinished_ids().await.map_err(store_error)?;
        let (mut resumed, mut awaiting) = (0, 0);
        for (id, status) in topics {
            if status == TopicStatus::AwaitingApproval {
                awaiting += 1;
                continue;
            }
            self.inner.runner.queue.push(&id).await.map_err(internal)?;
            resumed += 1;
        }
        self.inner.runner.adjust_awaiting(awaiting);
        self.admission_cast(AdmissionMsg::Requeued(resumed))?;
        if resumed > 0 {
            tracing::info!(resumed, "resuming unfinished topics from the store");
        }
        Ok(())
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        match self.inner.keys.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn admission_cast(&self, msg: AdmissionMsg) -> Result<(), EngineError> {
        self.inner.admission.cast(msg).map_err(|_| internal("admission actor stopped"))
    }

    async fn admission_call<T: Send + 'static>(
        &self,
        msg: impl FnOnce(ractor::RpcReplyPort<T>) -> AdmissionMsg,
    ) -> Result<T, EngineError> {
        match self.inner.admission.call(msg, Some(self.inner.call_timeout)).await {
            Ok(ractor::rpc::CallResult::Success(v)) => Ok(v),
            Ok(_) => Err(internal("admission actor did not answer")),
            Err(e) => Err(internal(format!("admission actor unavailable: {e}"))),
        }
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// "provider: simulated (offline) — …" when `auto` fell back.
    pub fn provider_notice(&self) -> Option<&str> {
        self.inner.provider_notice.as_deref()
    }

    pub fn provider_name(&self) -> &'static str {
        self.inner.provider.name()
    }

    pub fn events(&self) -> broadcast::Receiver<Arc<TopicEvent>> {
        self.inner.events.subscribe()
    }

    /// Changes to `Some(reason)` when supervision gave up.
    pub fn escalation(&self) -> watch::Receiver<Option<String>> {
        self.inner.escalation.clone()
    }

    fn next_id(&self) -> String {
        let n = self.inner.id_counter.fetch_add(1, Ordering::Relaxed);
        format!("t{:011x}{:06x}", now_ms(), n & 0xff_ffff)
    }

    fn validate(&self, req: &SubmitRequest) -> Result<Submission, EngineError> {
        let config = &self.inner.config;
        // The topic is kept exactly as sent; control characters (newline,
        // tab, NUL, ...) are refused rather than silently rewritten.
        let topic = req.topic.clone();
        if let Some((at, c)) = topic.chars().enumerate().find(|(_, c)| c.is_control()) {
            return Err(EngineError::BadRequest(format!(
                "topic must not contain control characters (U+{:04X} at character {})",
                u32::from(c),
                at + 1
            )));
        }
        if topic.trim().is_empty() {
            return Err(EngineError::BadRequest("topic must not be empty".into()));
        }
        if req.topic.chars().count() > config.limits.max_topic_chars {
            return Err(EngineError::TooLarge(format!(
                "topic is longer than limits.max_topic_chars ({} characters)",
                config.limits.max_topic_chars
            )));
        }
        if let Some(kind) = &req.kind {
            if !config.kinds.contains_key(kind) {
                return Err(EngineError::BadRequest(format!(
                    "unknown kind `{kind}` (configured: {})",
                    config.kind_names().join(", ")
                )));
            }
        }
        let variants = req.variants.unwrap_or(config.workflow.variants);
        if !(1..=16).contains(&variants) {
            return Err(EngineError::BadRequest("variants must be between 1 and 16".into()));
        }
        if let Some(key) = &req.idempotency_key {
            if key.is_empty() || key.len() > 200 {
                return Err(EngineError::BadRequest("idempotency_key must be 1 to 200 bytes".into()));
            }
        }
        let budget = crate::workflow::budget::topic_budget(config, req.max_tokens, req.max_cost_usd)
            .map_err(EngineError::BadRequest)?;
        Ok(Submission {
            id: self.next_id(),
            topic,
            kind: req.kind.clone(),
            variants,
            require_approval: req.require_approval.unwrap_or(false),
            idempotency_key: req.idempotency_key.clone(),
            submitted_ms: now_ms(),
            budget,
        })
    }

    /// Validates, stores durably (when a store is configured), then queues.
    /// Answers `Busy` when the queue is full: never a silent drop.
    pub async fn submit(&self, req: SubmitRequest) -> Result<SubmitReceipt, EngineError> {
        if let Some(reason) = self.inner.escalation.borrow().clone() {
            return Err(EngineError::Internal(format!("engine stopped: {reason}")));
        }
        let submission = self.validate(&req)?;
        let has_store = self.inner.runner.store.is_some();
        if let (Some(key), false) = (&submission.idempotency_key, has_store) {
            if let Some(id) = self.keys().get(key) {
                return Ok(SubmitReceipt { id: id.clone(), existing: true });
            }
        }
        self.check_daily_spend().await?;
        if !self.admission_call(AdmissionMsg::Reserve).await? {
            return Err(EngineError::Busy(format!(
                "queue full ({} topics waiting, limits.max_queued_topics); try again later",
                self.inner.config.limits.max_queued_topics
            )));
        }
        let state = TopicState::new(&submission);
        if let Some(store) = &self.inner.runner.store {
            match store.insert(&state).await {
                Ok(Inserted::New) => {}
                Ok(Inserted::Existing(id)) => {
                    self.admission_cast(AdmissionMsg::Release)?;
                    return Ok(SubmitReceipt { id, existing: true });
                }
                Err(e) => {
                    self.admission_cast(AdmissionMsg::Release)?;
                    return Err(store_error(e));
                }
            }
        } else if let Some(key) = &submission.idempotency_key {
            // Two concurrent submits with one key and no store: the first
            // to get here wins.
            let mut keys = self.keys();
            if let Some(id) = keys.get(key) {
                let id = id.clone();
                drop(keys);
                self.admission_cast(AdmissionMsg::Release)?;
                return Ok(SubmitReceipt { id, existing: true });
            }
            keys.insert(key.clone(), submission.id.clone());
        }
        metrics::counter!("scriptorium_topics_submitted_total").increment(1);
        // With a shared queue another daemon may run it: the claimer loads
        // it from the store, and a copy kept here would go stale.
        if !self.inner.runner.shares_queue() {
            self.inner.runner.add_live(state);
        }
        if let Err(e) = self.inner.runner.queue.push(&submission.id).await {
            // Stored but not queued: the next start pushes it (it is
            // unfinished in the store); say so rather than pretend.
            self.admission_cast(AdmissionMsg::Release)?;
            return Err(internal(format!("stored but not queued ({e}); it resumes on the next start")));
        }
        self.admission_cast(AdmissionMsg::Queued)?;
        Ok(SubmitReceipt { id: submission.id, existing: false })
    }

    /// The topic's full state, from memory or the store.
    pub async fn get(&self, id: &str) -> Result<TopicState, EngineError> {
        if let Some(live) = self.inner.runner.get_live(id) {
            return Ok(live.snapshot());
        }
        match &self.inner.runner.store {
            Some(store) => {
                store.load(id).await.map_err(store_error)?.ok_or_else(|| EngineError::NotFound(id.to_string()))
            }
            None => Err(EngineError::NotFound(id.to_string())),
        }
    }

    /// Waits until the topic is finished or awaiting approval.
    pub async fn wait(&self, id: &str, timeout: Option<Duration>) -> Result<TopicState, EngineError> {
        let settled = self.wait_settled(id);
        match timeout {
            Some(t) => tokio::time::timeout(t, settled).await.map_err(|_| EngineError::Timeout(id.to_string()))?,
            None => settled.await,
        }
    }

    async fn wait_settled(&self, id: &str) -> Result<TopicState, EngineError> {
        loop {
            if let Some(live) = self.inner.runner.get_live(id) {
                let mut rx = live.watch_status();
                // An error means the topic left memory: it is finished.
                // With a shared queue this process may stop holding the
                // topic (lease lost) while we wait: look again in a while.
                if self.inner.runner.shares_queue() {
                    let _ = tokio::time::timeout(WAIT_POLL, rx.wait_for(|s| s.is_settled())).await;
                } else {
                    let _ = rx.wait_for(|s| s.is_settled()).await;
                }
                if live.lock().status.is_settled() {
                    // The live topic is the journal replayed, final once
                    // settled: no need to read it back from the store.
                    return Ok(live.snapshot());
                }
            }
            // Not held here (queued behind a restart, or run elsewhere):
            // read it, and look again on its events or after a pause.
            let mut events = self.inner.events.subscribe();
            let state = self.get(id).await?;
            if state.status.is_settled() {
                return Ok(state);
            }
            let deadline = tokio::time::sleep(WAIT_POLL);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut deadline => break,
                    event = events.recv() => match event {
                        Ok(e) if e.topic_id == id => break,
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                }
            }
        }
    }

    pub async fn approve(&self, id: &str, note: Option<String>) -> Result<(), EngineError> {
        let live = self.awaiting(id).await?;
        self.decide(id, &live, JournalRecord::Approved { note, at_ms: now_ms() }).await
    }

    /// Journals a human decision if the topic is still awaiting approval,
    /// atomically with that check.
    async fn decide(&self, id: &str, live: &LiveTopic, record: JournalRecord) -> Result<(), EngineError> {
        let awaiting = |st: &TopicState| st.status == TopicStatus::AwaitingApproval;
        match self.inner.runner.journal_as(live, None, &record, awaiting).await.map_err(store_error)? {
            Some(_) => Ok(()),
            None => Err(EngineError::InvalidState(format!(
                "topic `{id}` is {}, not awaiting_approval",
                live.lock().status.as_str()
            ))),
        }
    }

    /// Sends the chosen draft back to the reviser with the note as the top
    /// instruction; the topic returns to `awaiting_approval` afterwards.
    pub async fn reject(&self, id: &str, note: String) -> Result<(), EngineError> {
        if note.trim().is_empty() {
            return Err(EngineError::BadRequest("reject needs a non-empty note".into()));
        }
        let live = self.awaiting(id).await?;
        self.decide(id, &live, JournalRecord::Rejected { note, at_ms: now_ms() }).await?;
        // A shared queue may hand the topic to another daemon: do not keep a
        // copy here that would go stale (reads then come from the store).
        if self.inner.runner.shares_queue() {
            self.inner.runner.live_map().remove(id);
        }
        self.inner.runner.queue.push(id).await.map_err(internal)?;
        self.admission_cast(AdmissionMsg::Requeued(1))
    }

    async fn awaiting(&self, id: &str) -> Result<Arc<LiveTopic>, EngineError> {
        let live = self.inner.runner.live_or_load(id).await.map_err(store_error)?;
        match live {
            Some(live) if live.lock().status == TopicStatus::AwaitingApproval => Ok(live),
            Some(live) => Err(EngineError::InvalidState(format!(
                "topic `{id}` is {}, not awaiting_approval",
                live.lock().status.as_str()
            ))),
            None => Err(EngineError::NotFound(id.to_string())),
        }
    }

    /// Cancels a topic: journals `Cancelled` (so nothing more is recorded
    /// for it), then drops its in-flight calls; no further call is made.
    pub async fn cancel(&self, id: &str) -> Result<(), EngineError> {
        let Some(live) = self.inner.runner.live_or_load(id).await.map_err(store_error)? else {
            return Err(EngineError::NotFound(id.to_string()));
        };
        let not_finished = |st: &TopicState| !st.status.is_terminal();
        let journaled = self
            .inner
            .runner
            .journal_as(&live, None, &JournalRecord::Cancelled, not_finished)
            .await
            .map_err(store_error)?;
        if journaled.is_none() {
            let status = live.lock().status;
            return Err(EngineError::InvalidState(format!("topic `{id}` is already {}", status.as_str())));
        }
        let running = self.admission_call(|r| AdmissionMsg::Cancel(id.to_string(), r)).await?;
        // Not running here: take it out of the queue if it waits there (a
        // topic claimed meanwhile sees `cancelled` and does nothing).
        if !running {
            live.cancel.cancel();
            if self.inner.runner.queue.cancel(id).await.map_err(internal)? {
                self.admission_cast(AdmissionMsg::Dequeued)?;
            }
        }
        Ok(())
    }

    /// Refuses a new topic with `budget` once the topics submitted today
    /// (UTC) cost `limits.max_cost_usd_per_day`. The sum comes from the
    /// store's summaries, so it survives a restart; it is recomputed at
    /// most once a second (a burst of submits shares one sum, and may
    /// overshoot the limit by what that second's topics spend).
    async fn check_daily_spend(&self) -> Result<(), EngineError> {
        let Some(limit) = self.inner.config.limits.max_cost_usd_per_day else { return Ok(()) };
        let cached = *self.inner.day_spend.lock().unwrap_or_else(|p| p.into_inner());
        let spent = match cached {
            Some((at, spent)) if at.elapsed() < Duration::from_secs(1) => spent,
            _ => {
                let since = crate::workflow::budget::utc_day_start_ms(now_ms());
                let spent: f64 = self
                    .list(ListQuery::default())
                    .await?
                    .iter()
                    .filter(|s| s.submitted_at_ms >= since)
                    .filter_map(|s| s.cost_usd)
                    .sum();
                *self.inner.day_spend.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), spent));
                spent
            }
        };
        match crate::workflow::budget::daily_refusal(limit, spent) {
            Some(reason) => Err(EngineError::Budget(reason)),
            None => Ok(()),
        }
    }

    pub async fn list(&self, query: ListQuery) -> Result<Vec<TopicSummary>, EngineError> {
        if let Some(store) = &self.inner.runner.store {
            return store.list(query).await.map_err(store_error);
        }
        let mut all: Vec<TopicSummary> = self
            .inner
            .runner
            .live_map()
            .values()
            .map(|l| TopicSummary::from(&*l.lock()))
            .filter(|s| query.status.is_none_or(|st| s.status == st))
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        let limit = if query.limit == 0 { usize::MAX } else { query.limit };
        Ok(all.into_iter().filter(|s| query.after.as_ref().is_none_or(|a| s.id > *a)).take(limit).collect())
    }

    pub async fn health(&self) -> Result<Health, EngineError> {
        let counts = match &self.inner.runner.store {
            Some(store) => store.counts().await.map_err(store_error)?,
            None => {
                let mut c = BTreeMap::new();
                for l in self.inner.runner.live_map().values() {
                    *c.entry(l.lock().status.as_str().to_string()).or_insert(0) += 1;
                }
                c
            }
        };
        let (in_flight, queued) = self.admission_call(AdmissionMsg::Counts).await?;
        Ok(Health {
            version: env!("CARGO_PKG_VERSION"),
            uptime_s: self.inner.started.elapsed().as_secs(),
            provider: self.inner.provider.name(),
            model: self.inner.provider.model().to_string(),
            counts,
            in_flight,
            queued,
            limiter: self.inner.limiter.snapshot(),
            escalated: self.inner.escalation.borrow().clone(),
            store: match self.inner.runner.store_problem() {
                None => "ok".to_string(),
                Some(e) => format!("degraded: {e}"),
            },
        })
    }

    /// Stops claiming new topics, lets running ones finish for up to
    /// `grace`, then cancels the rest: their in-flight calls are dropped and
    /// they resume on the next start from their last journaled step.
    /// Returns how many were cut off.
    pub async fn shutdown(&self, grace: Duration) -> usize {
        let _ = self.admission_call(AdmissionMsg::Drain).await;
        self.inner.dispatch_stop.cancel();
        let deadline = Instant::now() + grace;
        let mut running = usize::MAX;
        while Instant::now() < deadline {
            match self.admission_call(AdmissionMsg::Counts).await {
                Ok((0, _)) | Err(_) => {
                    running = 0;
                    break;
                }
                Ok((n, _)) => {
                    running = n;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        let cut = if running == 0 { 0 } else { self.admission_call(AdmissionMsg::Counts).await.map_or(0, |(n, _)| n) };
        self.inner.runner.shutdown.cancel();
        // Cut-off runners give their leases back; give them a moment.
        let settle = Instant::now() + Duration::from_millis(500);
        while Instant::now() < settle {
            match self.admission_call(AdmissionMsg::Counts).await {
                Ok((0, _)) | Err(_) => break,
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        self.inner.admission.stop(None);
        self.inner.runner.pools.stop();
        cut
    }
}
