//! `Scriptorium`: the embeddable engine handle. `scriptorium run`, the
//! daemon's socket server and library users all go through it: `submit`,
//! `get`, `wait`, `events`, `approve`, `reject`, `cancel`, `list`,
//! `health`, `shutdown`.
//!
//! Owns: validation of submissions, idempotency, wiring (provider, limiter,
//! supervisor, coordinator, store), resume on start. Must not: speak any
//! wire protocol (that is `server/`), or run workflow steps (actors do).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorRef};
use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::actors::coordinator::{CancelOutcome, Coordinator, CoordinatorArgs, CoordinatorMsg, LiveTopic, TopicRunner};
use crate::actors::supervisor::{StageSupervisor, SupervisorArgs, SupervisorMsg};
use crate::actors::{Services, StageDirectory};
use crate::config::Config;
use crate::events::{EventBus, TopicEvent};
use crate::llm::limiter::{GovernorLimiter, LimiterSnapshot, RateLimit};
use crate::llm::retry::{CallerParts, RetryBudget, RetryPolicy, StepCaller};
use crate::llm::{build_provider, LlmProvider};
use crate::state::{now_ms, JournalRecord, Submission, TopicState, TopicStatus, TopicSummary};
use crate::store::files::FileMirror;
use crate::store::{Inserted, ListQuery, TopicStore};
use crate::workflow::prompts::normalize_topic;

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
            EngineError::Budget(_) => "budget",
            EngineError::Internal(_) => "internal",
        }
    }
}

fn internal(e: impl std::fmt::Display) -> EngineError {
    EngineError::Internal(e.to_string())
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
}

struct Inner {
    config: Arc<Config>,
    runner: Arc<TopicRunner>,
    coordinator: ActorRef<CoordinatorMsg>,
    supervisor: ActorRef<SupervisorMsg>,
    limiter: Arc<dyn RateLimit>,
    provider: Arc<dyn LlmProvider>,
    provider_notice: Option<String>,
    events: EventBus,
    escalation: watch::Receiver<Option<String>>,
    /// Idempotency keys seen by this process (the store keeps them across
    /// restarts).
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

impl Scriptorium {
    /// Starts the actor system, resumes unfinished topics from the store,
    /// and returns the handle.
    pub async fn start(config: Config, options: EngineOptions) -> Result<Scriptorium, EngineError> {
        let config = Arc::new(config);
        let (provider, provider_notice) = match options.provider {
            Some(p) => (p, None),
            None => build_provider(&config).map_err(internal)?,
        };
        let largest = config.llm.max_output_tokens.saturating_add(16_000);
        let limiter: Arc<dyn RateLimit> = Arc::new(GovernorLimiter::new(&config.limits, largest));
        metrics::gauge!("scriptorium_rate_limit_requests_per_minute").set(f64::from(config.limits.requests_per_minute));
        metrics::gauge!("scriptorium_rate_limit_tokens_per_minute").set(f64::from(config.limits.tokens_per_minute));
        let caller = StepCaller::new(CallerParts {
            provider: Arc::clone(&provider),
            limiter: Arc::clone(&limiter),
            policy: RetryPolicy::from_config(&config.retry),
            budget: Arc::new(RetryBudget::new(&config.retry)),
            request_timeout: std::time::Duration::from_secs_f64(config.llm.request_timeout_s),
        });
        let events = EventBus::default();
        let services = Arc::new(Services::new(Arc::clone(&config), caller, events.clone()));
        let directory = Arc::new(StageDirectory::default());
        let (escalation_tx, escalation) = watch::channel(None);
        let (supervisor, _) = Actor::spawn(
            None,
            StageSupervisor,
            SupervisorArgs {
                services: Arc::clone(&services),
                directory: Arc::clone(&directory),
                max_restarts: config.supervision.max_restarts,
                window: Duration::from_secs_f64(config.supervision.window_s),
                escalation: escalation_tx,
            },
        )
        .await
        .map_err(internal)?;
        let runner = Arc::new(TopicRunner::new(services, directory, options.store.clone(), options.files));
        let (coordinator, _) = Actor::spawn(
            None,
            Coordinator,
            CoordinatorArgs {
                runner: Arc::clone(&runner),
                max_in_flight: config.limits.max_in_flight_topics,
                max_queued: config.limits.max_queued_topics,
            },
        )
        .await
        .map_err(internal)?;
        metrics::gauge!("scriptorium_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        let engine = Scriptorium {
            inner: Arc::new(Inner {
                config,
                runner,
                coordinator,
                supervisor,
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

    /// Re-queues every unfinished topic from the store; parks the ones
    /// awaiting approval in memory.
    async fn resume(&self) -> Result<(), EngineError> {
        let Some(store) = &self.inner.runner.store else { return Ok(()) };
        let topics = store.unfinished().await.map_err(internal)?;
        let mut resumed = 0;
        for state in topics {
            if let Some(key) = &state.idempotency_key {
                self.keys().insert(key.clone(), state.id.clone());
            }
            let status = state.status;
            let live = LiveTopic::new(state);
            self.inner.runner.add_live(Arc::clone(&live));
            if status != TopicStatus::AwaitingApproval {
                resumed += 1;
                self.coordinator_cast(CoordinatorMsg::Enqueue { live, reserved: false })?;
            }
        }
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

    fn coordinator_cast(&self, msg: CoordinatorMsg) -> Result<(), EngineError> {
        self.inner.coordinator.cast(msg).map_err(|_| internal("coordinator stopped"))
    }

    async fn coordinator_call<T: Send + 'static>(
        &self,
        msg: impl FnOnce(ractor::RpcReplyPort<T>) -> CoordinatorMsg,
    ) -> Result<T, EngineError> {
        match self.inner.coordinator.call(msg, Some(self.inner.call_timeout)).await {
            Ok(ractor::rpc::CallResult::Success(v)) => Ok(v),
            Ok(_) => Err(internal("coordinator did not answer")),
            Err(e) => Err(internal(format!("coordinator unavailable: {e}"))),
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
        let topic = normalize_topic(&req.topic);
        if topic.is_empty() {
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
        if let Some(key) = &submission.idempotency_key {
            if let Some(id) = self.keys().get(key) {
                return Ok(SubmitReceipt { id: id.clone(), existing: true });
            }
        }
        self.check_daily_spend().await?;
        if !self.coordinator_call(CoordinatorMsg::Reserve).await? {
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
                    self.coordinator_cast(CoordinatorMsg::Release)?;
                    return Ok(SubmitReceipt { id, existing: true });
                }
                Err(e) => {
                    self.coordinator_cast(CoordinatorMsg::Release)?;
                    return Err(internal(e));
                }
            }
        }
        if let Some(key) = &submission.idempotency_key {
            // Two concurrent submits with one key: the store's unique index
            // settles it; without a store the first to get here wins.
            let mut keys = self.keys();
            if let Some(id) = keys.get(key) {
                let id = id.clone();
                drop(keys);
                self.coordinator_cast(CoordinatorMsg::Release)?;
                return Ok(SubmitReceipt { id, existing: true });
            }
            keys.insert(key.clone(), submission.id.clone());
        }
        metrics::counter!("scriptorium_topics_submitted_total").increment(1);
        let live = LiveTopic::new(state);
        self.inner.runner.add_live(Arc::clone(&live));
        self.coordinator_cast(CoordinatorMsg::Enqueue { live, reserved: true })?;
        Ok(SubmitReceipt { id: submission.id, existing: false })
    }

    /// The topic's full state, from memory or the store.
    pub async fn get(&self, id: &str) -> Result<TopicState, EngineError> {
        if let Some(live) = self.inner.runner.get_live(id) {
            return Ok(live.snapshot());
        }
        match &self.inner.runner.store {
            Some(store) => store.load(id).await.map_err(internal)?.ok_or_else(|| EngineError::NotFound(id.to_string())),
            None => Err(EngineError::NotFound(id.to_string())),
        }
    }

    /// Waits until the topic is finished or awaiting approval.
    pub async fn wait(&self, id: &str, timeout: Option<Duration>) -> Result<TopicState, EngineError> {
        let Some(live) = self.inner.runner.get_live(id) else { return self.get(id).await };
        let mut rx = live.watch_status();
        let settled = async {
            // An error means the topic left memory: it is finished.
            let _ = rx.wait_for(|s| s.is_settled()).await;
        };
        match timeout {
            Some(t) => tokio::time::timeout(t, settled).await.map_err(|_| EngineError::Timeout(id.to_string()))?,
            None => settled.await,
        }
        // The live topic we hold is the journal replayed, final once settled:
        // no need to read it back from the store.
        Ok(live.snapshot())
    }

    pub async fn approve(&self, id: &str, note: Option<String>) -> Result<(), EngineError> {
        let live = self.awaiting(id).await?;
        self.decide(id, &live, JournalRecord::Approved { note, at_ms: now_ms() }).await
    }

    /// Journals a human decision if the topic is still awaiting approval,
    /// atomically with that check.
    async fn decide(&self, id: &str, live: &LiveTopic, record: JournalRecord) -> Result<(), EngineError> {
        let awaiting = |st: &TopicState| st.status == TopicStatus::AwaitingApproval;
        match self.inner.runner.journal_if(live, record, awaiting).await.map_err(internal)? {
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
        self.coordinator_cast(CoordinatorMsg::Enqueue { live, reserved: false })
    }

    async fn awaiting(&self, id: &str) -> Result<Arc<LiveTopic>, EngineError> {
        match self.inner.runner.get_live(id) {
            Some(live) if live.lock().status == TopicStatus::AwaitingApproval => Ok(live),
            Some(live) => Err(EngineError::InvalidState(format!(
                "topic `{id}` is {}, not awaiting_approval",
                live.lock().status.as_str()
            ))),
            None => {
                let state = self.get(id).await?;
                Err(EngineError::InvalidState(format!(
                    "topic `{id}` is {}, not awaiting_approval",
                    state.status.as_str()
                )))
            }
        }
    }

    pub async fn cancel(&self, id: &str) -> Result<(), EngineError> {
        let outcome = self.coordinator_call(|r| CoordinatorMsg::Cancel(id.to_string(), r)).await?;
        let live = match (outcome, self.inner.runner.get_live(id)) {
            (_, Some(live)) => live,
            (CancelOutcome::Stopped, None) => return Ok(()),
            (CancelOutcome::NotHeld, None) => {
                let state = self.get(id).await?;
                return Err(EngineError::InvalidState(format!("topic `{id}` is already {}", state.status.as_str())));
            }
        };
        let status = live.lock().status;
        if status.is_terminal() {
            return Err(EngineError::InvalidState(format!("topic `{id}` is already {}", status.as_str())));
        }
        self.inner.runner.journal(&live, JournalRecord::Cancelled).await.map_err(internal)?;
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
            return store.list(query).await.map_err(internal);
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
            Some(store) => store.counts().await.map_err(internal)?,
            None => {
                let mut c = BTreeMap::new();
                for l in self.inner.runner.live_map().values() {
                    *c.entry(l.lock().status.as_str().to_string()).or_insert(0) += 1;
                }
                c
            }
        };
        let (in_flight, queued) = self.coordinator_call(CoordinatorMsg::Counts).await?;
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
        })
    }

    /// Stops starting new topics, lets running ones finish for up to
    /// `grace`, then aborts the rest (they resume on the next start, from
    /// their last journaled step). Returns how many were cut off.
    pub async fn shutdown(&self, grace: Duration) -> usize {
        let _ = self.coordinator_call(CoordinatorMsg::Drain).await;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            match self.coordinator_call(CoordinatorMsg::Counts).await {
                Ok((0, _)) | Err(_) => break,
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let cut = self.coordinator_call(CoordinatorMsg::AbortAll).await.unwrap_or(0);
        self.inner.coordinator.stop(None);
        self.inner.supervisor.stop(None);
        cut
    }
}
