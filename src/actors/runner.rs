//! `TopicRunner`: the live topics of this process, the journal (durable
//! before visible), the dispatcher that claims topics from the queue, and
//! the per-topic loop: `decide` → run the step on its stage pool → journal
//! → decide again.
//!
//! The loop is resumable by construction: `decide` reads only the topic's
//! state (its journal replayed), so a topic claimed after a restart goes on
//! from its last journaled step. Every step's record is journaled (awaited
//! to durability) before the next decision. Must not: call providers (stage
//! workers do), decide workflow steps itself (`workflow::decide` does), or
//! hold a lock across an await (the per-topic journal lock is async).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::future::try_join_all;
use ractor::ActorRef;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::admission::AdmissionMsg;
use super::pool::{StagePool, StagePools};
use super::stage::{JobPosition, PlanJob, ReviewJob, ReviseJob, RouteJob, Stage, TopicCtx, WriteJob};
use super::Services;
use crate::events::{EventBus, TopicEvent};
use crate::llm::retry::{AttemptReport, StepFailure, StepSuccess};
use crate::llm::{BoxFuture, LlmError, Usage};
use crate::queue::{Lease, TopicQueue};
use crate::state::{now_ms, JournalRecord, StepCost, StepError, StepTiming, TopicState, TopicStatus};
use crate::store::files::FileMirror;
use crate::store::{StoreError, TopicStore};
use crate::workflow::decide::{decide, decide_variant, Next, Policy, VariantStep};
use crate::workflow::plan::DraftPlan;
use crate::workflow::{Draft, Outline, Review, Step};

pub type StageResult<T> = Result<StepSuccess<T>, StepFailure>;

/// A topic this process holds in memory: queued or running here, awaiting
/// approval, or (without a store) finished.
pub struct LiveTopic {
    pub ctx: Arc<TopicCtx>,
    /// The durable state: a record is applied here only after the store
    /// committed it.
    state: Mutex<TopicState>,
    status: watch::Sender<TopicStatus>,
    /// Orders this topic's journal writes (the runner's steps, a human's
    /// decision, a cancel): check, commit and publish happen under it.
    journal_lock: tokio::sync::Mutex<()>,
    /// Cancels the topic's in-flight work; a child of the engine's
    /// shutdown token.
    pub cancel: CancellationToken,
}

impl LiveTopic {
    pub fn new(state: TopicState, parent: &CancellationToken) -> Arc<LiveTopic> {
        let (status, _) = watch::channel(state.status);
        Arc::new(LiveTopic {
            ctx: TopicCtx::new(&state.id, &state.topic),
            state: Mutex::new(state),
            status,
            journal_lock: tokio::sync::Mutex::new(()),
            cancel: parent.child_token(),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, TopicState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub fn snapshot(&self) -> TopicState {
        self.lock().clone()
    }

    pub fn watch_status(&self) -> watch::Receiver<TopicStatus> {
        self.status.subscribe()
    }
}

/// Histogram handles recorded on every step, registered once (a recorder
/// lookup per step was measurable). Install the recorder before the engine.
struct DriverMetrics {
    /// `scriptorium_step_duration_seconds`, indexed like `Step::ALL`.
    step_duration: [metrics::Histogram; 5],
    review_score: metrics::Histogram,
    store_degraded: metrics::Gauge,
}

impl DriverMetrics {
    fn register() -> DriverMetrics {
        DriverMetrics {
            step_duration: Step::ALL
                .map(|step| metrics::histogram!("scriptorium_step_duration_seconds", "step" => step.as_str())),
            review_score: metrics::histogram!("scriptorium_review_score"),
            store_degraded: metrics::gauge!("scriptorium_store_degraded"),
        }
    }

    fn step_duration(&self, step: Step) -> &metrics::Histogram {
        let index = Step::ALL.iter().position(|s| *s == step).unwrap_or(0);
        &self.step_duration[index]
    }
}

/// Why a topic's loop stopped before the topic settled.
#[derive(Debug)]
enum Halt {
    /// Cancelled (by a user, or the engine is shutting down), or the topic
    /// finished while this loop ran: nothing more to record.
    Stopped,
    /// Another worker owns the topic now (the store refused our epoch).
    LeaseLost,
}

/// How a topic's run ended, for its lease.
enum RunEnd {
    /// Finished or parked for a human: the queue can forget it.
    Settled,
    Stopped,
    LeaseLost,
}

/// What a failed step means for the topic.
#[derive(Clone, Copy)]
enum OnFailure {
    /// The topic fails.
    Topic,
    /// Variant `n` is dropped, unless the error is fatal (then the topic
    /// fails: a fatal error would fail every other call too).
    Variant(u32),
}

/// How long the dispatcher waits on an empty queue before looking again
/// (also how quickly it notices a drain).
const CLAIM_WAIT: Duration = Duration::from_secs(1);
/// Store failures (a full disk) are retried with backoff up to this.
const MAX_STORE_BACKOFF: Duration = Duration::from_secs(5);

/// Everything the topic loops share.
pub struct TopicRunner {
    pub services: Arc<Services>,
    pub pools: Arc<StagePools>,
    pub store: Option<Arc<dyn TopicStore>>,
    pub files: Option<FileMirror>,
    pub queue: Arc<dyn TopicQueue>,
    pub events: EventBus,
    live: Mutex<HashMap<String, Arc<LiveTopic>>>,
    policy: Policy,
    awaiting: AtomicI64,
    store_degraded: AtomicBool,
    store_error: Mutex<Option<String>>,
    /// Parent of every topic's cancellation token: cancelled at the end of
    /// a shutdown's grace period.
    pub shutdown: CancellationToken,
    /// Lease renewal interval for a queue whose leases expire; `None` for
    /// the in-memory queue.
    renew_every: Option<Duration>,
    metrics: DriverMetrics,
}

pub struct RunnerParts {
    pub services: Arc<Services>,
    pub pools: Arc<StagePools>,
    pub store: Option<Arc<dyn TopicStore>>,
    pub files: Option<FileMirror>,
    pub queue: Arc<dyn TopicQueue>,
    pub renew_every: Option<Duration>,
}

fn cost_of<T>(r: &StageResult<T>) -> StepCost {
    match r {
        Ok(s) => StepCost { calls: s.calls, attempts: s.attempts, usage: s.usage },
        Err(f) => StepCost { calls: f.calls, attempts: f.attempts, usage: f.usage },
    }
}

fn step_error(step: Step, f: &StepFailure) -> StepError {
    StepError { step, kind: f.error.reason(), message: f.error.to_string() }
}

impl TopicRunner {
    pub fn new(parts: RunnerParts) -> TopicRunner {
        let policy = crate::workflow::plan::policy(&parts.services.config);
        TopicRunner {
            events: parts.services.events.clone(),
            services: parts.services,
            pools: parts.pools,
            store: parts.store,
            files: parts.files,
            queue: parts.queue,
            live: Mutex::new(HashMap::new()),
            policy,
            awaiting: AtomicI64::new(0),
            store_degraded: AtomicBool::new(false),
            store_error: Mutex::new(None),
            shutdown: CancellationToken::new(),
            renew_every: parts.renew_every,
            metrics: DriverMetrics::register(),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn live_map(&self) -> MutexGuard<'_, HashMap<String, Arc<LiveTopic>>> {
        match self.live.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub fn get_live(&self, id: &str) -> Option<Arc<LiveTopic>> {
        self.live_map().get(id).cloned()
    }

    /// Holds a topic in memory (a new submission).
    pub fn add_live(&self, state: TopicState) -> Arc<LiveTopic> {
        let live = LiveTopic::new(state, &self.shutdown);
        self.live_map().insert(live.ctx.id.clone(), Arc::clone(&live));
        live
    }

    /// The live topic, else the stored one loaded into memory.
    pub async fn live_or_load(&self, id: &str) -> Result<Option<Arc<LiveTopic>>, StoreError> {
        if let Some(live) = self.get_live(id) {
            return Ok(Some(live));
        }
        let Some(store) = &self.store else { return Ok(None) };
        let Some(state) = store.load(id).await? else { return Ok(None) };
        let live = LiveTopic::new(state, &self.shutdown);
        let mut map = self.live_map();
        Ok(Some(Arc::clone(map.entry(id.to_string()).or_insert(live))))
    }

    /// Sets the awaiting-approval gauge's starting point (resume).
    pub fn adjust_awaiting(&self, delta: i64) {
        let n = self.awaiting.fetch_add(delta, Ordering::Relaxed) + delta;
        metrics::gauge!("scriptorium_topics_awaiting_approval").set(n as f64);
    }

    /// `None` when the store takes writes; else the last error.
    pub fn store_problem(&self) -> Option<String> {
        if !self.store_degraded.load(Ordering::Relaxed) {
            return None;
        }
        match self.store_error.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn store_failing(&self, error: &StoreError) {
        let message = error.to_string();
        match self.store_error.lock() {
            Ok(mut g) => *g = Some(message.clone()),
            Err(p) => *p.into_inner() = Some(message.clone()),
        }
        if !self.store_degraded.swap(true, Ordering::Relaxed) {
            self.metrics.store_degraded.set(1.0);
            tracing::error!(error = %message, "the store refuses writes; topics wait and retry");
        }
    }

    fn store_ok(&self) {
        if self.store_degraded.swap(false, Ordering::Relaxed) {
            self.metrics.store_degraded.set(0.0);
            tracing::warn!("the store takes writes again; topics go on");
        }
    }

    /// Journals `record` if `precondition` holds, checked under the topic's
    /// journal lock (so decisions cannot interleave). The record becomes
    /// visible (state, status, files, events) only after the store
    /// committed it; a failed commit changes nothing. `Ok(None)` when the
    /// precondition failed.
    pub async fn journal_as(
        &self,
        live: &LiveTopic,
        lease: Option<&Lease>,
        record: &JournalRecord,
        precondition: impl FnOnce(&TopicState) -> bool,
    ) -> Result<Option<TopicStatus>, StoreError> {
        let _order = live.journal_lock.lock().await;
        let at = now_ms();
        let (before, after, submitted, mirror) = match &self.store {
            // Without a store nothing can fail: apply in place.
            None => {
                let mut st = live.lock();
                if !precondition(&st) {
                    return Ok(None);
                }
                let before = st.status;
                st.apply(record, at);
                let mirror = self.files.as_ref().map(|f| f.snapshot(&st));
                (before, st.status, st.submitted_at_ms, mirror)
            }
            Some(store) => {
                let (next, before) = {
                    let st = live.lock();
                    if !precondition(&st) {
                        return Ok(None);
                    }
                    let mut next = st.clone();
                    next.apply(record, at);
                    (next, st.status)
                };
                store.append_fenced(&next, record, lease).await?;
                let (after, submitted) = (next.status, next.submitted_at_ms);
                let mirror = self.files.as_ref().map(|f| f.snapshot(&next));
                *live.lock() = next;
                (before, after, submitted, mirror)
            }
        };
        if let (Some(files), Some(snapshot)) = (&self.files, mirror) {
            if let Err(e) = files.write(snapshot).await {
                tracing::warn!(topic_id = %live.ctx.id, error = %e, "could not write the topic's JSON file");
            }
        }
        if before != after {
            self.on_status_change(live, before, after, submitted, at);
        }
        Ok(Some(after))
    }

    /// Journals a step's record for the holder of `lease`. A store that
    /// refuses the write (a full disk, a lost database) is retried with
    /// backoff while the topic waits, visibly (`health`, a metric); the
    /// topic goes on from this record once the store takes it.
    async fn journal_step(
        &self,
        live: &LiveTopic,
        lease: &Lease,
        record: &JournalRecord,
        token: &CancellationToken,
    ) -> Result<TopicStatus, Halt> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.journal_as(live, Some(lease), record, |st| !st.status.is_terminal()).await {
                Ok(Some(status)) => {
                    self.store_ok();
                    return Ok(status);
                }
                Ok(None) => return Err(Halt::Stopped),
                Err(StoreError::Fenced(_)) => return Err(Halt::LeaseLost),
                Err(e) => {
                    self.store_failing(&e);
                    tokio::select! {
                        biased;
                        _ = token.cancelled() => return Err(Halt::Stopped),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_STORE_BACKOFF);
                }
            }
        }
    }

    fn on_status_change(&self, live: &LiveTopic, before: TopicStatus, after: TopicStatus, submitted: u64, at: u64) {
        if before == TopicStatus::AwaitingApproval {
            self.adjust_awaiting(-1);
        }
        if after == TopicStatus::AwaitingApproval {
            self.adjust_awaiting(1);
        }
        if after.is_terminal() {
            let outcome = match after {
                TopicStatus::Completed => {
                    if live.lock().final_draft.as_ref().is_some_and(|f| f.review.approved) {
                        "approved"
                    } else {
                        "not_approved"
                    }
                }
                TopicStatus::Failed => "failed",
                _ => "cancelled",
            };
            metrics::counter!("scriptorium_topics_finished_total", "outcome" => outcome).increment(1);
            metrics::histogram!("scriptorium_topic_duration_seconds")
                .record(at.saturating_sub(submitted) as f64 / 1000.0);
            tracing::info!(topic_id = %live.ctx.id, outcome, "topic finished");
        }
        live.status.send_replace(after);
        if after != TopicStatus::Running {
            // `started`/`resumed` events announce running.
            self.emit(live, "topic", JobPosition::default(), after.as_str(), None);
        }
        // With a store, finished topics are served from it; keep memory
        // bounded for a long-running daemon.
        if after.is_terminal() && self.store.is_some() {
            self.live_map().remove(&live.ctx.id);
        }
    }

    fn emit(&self, live: &LiveTopic, step: &str, pos: JobPosition, outcome: &str, elapsed: Option<Duration>) {
        self.events.emit(|| TopicEvent {
            topic_id: live.ctx.id.clone(),
            step: step.to_string(),
            variant: pos.variant,
            revision: pos.revision,
            attempt: None,
            outcome: outcome.to_string(),
            reason: None,
            elapsed_ms: elapsed.map(|d| d.as_millis() as u64),
            waited_ms: None,
            status: *live.status.borrow(),
            at_ms: now_ms(),
        });
    }

    // ---- the dispatcher ---------------------------------------------------

    /// Claims topics from the queue while fewer than `max_in_flight` run
    /// here, and runs each one. Returns when `stop` is cancelled.
    pub async fn dispatch(
        self: Arc<Self>,
        admission: ActorRef<AdmissionMsg>,
        max_in_flight: usize,
        stop: CancellationToken,
    ) {
        let permits = Arc::new(Semaphore::new(max_in_flight.max(1)));
        let mut queue_down = false;
        loop {
            let permit = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                p = Arc::clone(&permits).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let claimed = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                c = self.queue.claim(1, CLAIM_WAIT) => c,
            };
            let lease = match claimed {
                Ok(leases) => {
                    if std::mem::take(&mut queue_down) {
                        tracing::warn!("the topic queue answers again");
                    }
                    match leases.into_iter().next() {
                        Some(lease) => lease,
                        None => continue,
                    }
                }
                Err(e) => {
                    if !std::mem::replace(&mut queue_down, true) {
                        tracing::error!(error = %e, "cannot claim from the topic queue; retrying");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(CLAIM_WAIT) => continue,
                    }
                }
            };
            let (runner, admission) = (Arc::clone(&self), admission.clone());
            tokio::spawn(async move {
                runner.run_claimed(lease, &admission).await;
                drop(permit);
            });
        }
    }

    /// True for a queue shared with other processes (its leases expire):
    /// a topic is then kept in memory only while this process runs it.
    pub fn shares_queue(&self) -> bool {
        self.renew_every.is_some()
    }

    async fn run_claimed(&self, lease: Lease, admission: &ActorRef<AdmissionMsg>) {
        if self.shares_queue() {
            // Another process may have advanced the topic since this one
            // last held it: start from the store, not from a stale copy.
            self.live_map().remove(&lease.topic_id);
        }
        let live = match self.live_or_load(&lease.topic_id).await {
            Ok(Some(live)) => live,
            Ok(None) => {
                tracing::warn!(topic_id = %lease.topic_id, "claimed a topic the store does not know; dropped");
                let _ = self.queue.ack(&lease).await;
                let _ = admission.cast(AdmissionMsg::Dequeued);
                return;
            }
            Err(e) => {
                tracing::error!(topic_id = %lease.topic_id, error = %e, "cannot load a claimed topic; giving it back");
                let _ = self.queue.release(&lease).await;
                let _ = admission.cast(AdmissionMsg::Dequeued);
                return;
            }
        };
        let id = live.ctx.id.clone();
        let _ = admission.cast(AdmissionMsg::Started { id: id.clone(), cancel: live.cancel.clone() });
        let run = live.cancel.child_token();
        let span = tracing::info_span!("topic", topic_id = %id);
        let end = match self.renew_every {
            None => self.drive(&live, &lease, &run).instrument(span).await,
            Some(every) => {
                let drive = self.drive(&live, &lease, &run).instrument(span);
                tokio::select! {
                    end = drive => end,
                    _ = self.keep_lease(&lease, every, &run) => RunEnd::LeaseLost,
                }
            }
        };
        let settle = match end {
            RunEnd::Settled => self.queue.ack(&lease).await,
            // Cut off by shutdown: another worker (or the next start) may
            // take it at once. Cancelled by a user: it is finished.
            RunEnd::Stopped if self.shutdown.is_cancelled() => self.queue.release(&lease).await,
            RunEnd::Stopped => self.queue.ack(&lease).await,
            RunEnd::LeaseLost => {
                tracing::warn!(topic_id = %id, "lease lost; another worker owns the topic now");
                Ok(())
            }
        };
        if let Err(e) = settle {
            tracing::warn!(topic_id = %id, error = %e, "cannot settle the topic's lease");
        }
        if self.shares_queue() {
            self.live_map().remove(&id);
        }
        let _ = admission.cast(AdmissionMsg::Finished(id));
    }

    /// Renews the lease until it is lost; then cancels the run.
    async fn keep_lease(&self, lease: &Lease, every: Duration, run: &CancellationToken) {
        loop {
            tokio::time::sleep(every).await;
            match self.queue.renew(lease).await {
                Ok(true) => {}
                Ok(false) => {
                    run.cancel();
                    return;
                }
                Err(e) => tracing::warn!(topic_id = %lease.topic_id, error = %e, "cannot renew the lease; retrying"),
            }
        }
    }

    // ---- one topic --------------------------------------------------------

    /// Drives a topic from wherever its journal says it is to completion,
    /// failure, or the approval gate.
    async fn drive(&self, live: &Arc<LiveTopic>, lease: &Lease, token: &CancellationToken) -> RunEnd {
        let first = decide(&live.lock(), &self.policy);
        if matches!(first, Next::Done | Next::Wait) {
            return RunEnd::Settled;
        }
        let resumed = live.lock().status != TopicStatus::Queued;
        if let Err(halt) = self.journal_step(live, lease, &JournalRecord::Started, token).await {
            return halt.into();
        }
        self.emit(live, "topic", JobPosition::default(), if resumed { "resumed" } else { "started" }, None);
        match Box::pin(self.drive_steps(live, lease, token)).await {
            Ok(()) => RunEnd::Settled,
            Err(halt) => halt.into(),
        }
    }

    async fn drive_steps(&self, live: &Arc<LiveTopic>, lease: &Lease, token: &CancellationToken) -> Result<(), Halt> {
        let mut plan: Option<Arc<DraftPlan>> = None;
        loop {
            if token.is_cancelled() {
                return Err(Halt::Stopped);
            }
            let next = decide(&live.lock(), &self.policy);
            let record = match next {
                Next::Done | Next::Wait => return Ok(()),
                Next::AssignKind(kind) => JournalRecord::Routed { kind, cost: StepCost::default(), timing: None },
                Next::Route => {
                    let job = RouteJob { topic: Arc::clone(&live.ctx) };
                    self.step(&self.pools.router, job, token, OnFailure::Topic, |kind, cost, timing| {
                        JournalRecord::Routed { kind, cost, timing: Some(timing) }
                    })
                    .await?
                }
                Next::Plan => {
                    let kind = live.lock().route.clone().unwrap_or_else(|| self.policy.default_kind.clone());
                    let job = PlanJob { topic: Arc::clone(&live.ctx), kind };
                    self.step(&self.pools.planner, job, token, OnFailure::Topic, |outline, cost, timing| {
                        JournalRecord::Planned { outline, cost, timing }
                    })
                    .await?
                }
                Next::Variants(steps) => {
                    let plan = self.draft_plan(live, &mut plan);
                    metrics::histogram!("scriptorium_variants_per_topic").record(live.lock().variants_requested as f64);
                    let flows = steps.into_iter().map(|s| self.variant_flow(live, lease, token, &plan, s));
                    try_join_all(flows).await?;
                    continue;
                }
                Next::Choose { variant, reason } => JournalRecord::Chosen { variant, reason },
                Next::FailAllVariants(error) => {
                    JournalRecord::Failed { error, cost: StepCost::default(), timing: None }
                }
                Next::Revise { number, human_note } => {
                    let plan = self.draft_plan(live, &mut plan);
                    let Some((draft, review)) = current_draft(&live.lock()) else {
                        return Ok(());
                    };
                    let job = ReviseJob {
                        topic: Arc::clone(&live.ctx),
                        plan,
                        draft,
                        review,
                        human_note: human_note.clone(),
                        number,
                    };
                    self.step(&self.pools.reviser, job, token, OnFailure::Topic, |draft, cost, timing| {
                        metrics::counter!("scriptorium_revisions_total").increment(1);
                        JournalRecord::Revised { number, draft, human_note, cost, timing }
                    })
                    .await?
                }
                Next::ReviewRevision { number } => {
                    let plan = self.draft_plan(live, &mut plan);
                    let Some(draft) = live.lock().revisions.last().map(|r| Arc::new(r.draft.clone())) else {
                        return Ok(());
                    };
                    let position = JobPosition { variant: None, revision: Some(number) };
                    let job = ReviewJob { topic: Arc::clone(&live.ctx), plan, draft, position };
                    self.step(&self.pools.reviewer, job, token, OnFailure::Topic, |review, cost, timing| {
                        self.metrics.review_score.record(f64::from(review.score));
                        JournalRecord::RevisionReviewed { number, review, cost, timing }
                    })
                    .await?
                }
                Next::AwaitApproval => JournalRecord::AwaitingApproval,
                Next::Complete => JournalRecord::Completed,
            };
            self.journal_step(live, lease, &record, token).await?;
        }
    }

    /// The topic's draft plan, built once per run from its kind and outline.
    fn draft_plan(&self, live: &LiveTopic, cached: &mut Option<Arc<DraftPlan>>) -> Arc<DraftPlan> {
        if let Some(plan) = cached {
            return Arc::clone(plan);
        }
        let (kind, outline) = {
            let st = live.lock();
            (
                st.route.clone().unwrap_or_else(|| self.policy.default_kind.clone()),
                // `decide` asks for draft steps only once the outline is in.
                st.outline.clone().unwrap_or(Outline { title: String::new(), sections: Vec::new() }),
            )
        };
        let plan = DraftPlan::new(&kind, Arc::clone(self.services.formats.kind(&kind)), outline);
        *cached = Some(Arc::clone(&plan));
        plan
    }

    /// One variant, from where it stands to reviewed or failed.
    async fn variant_flow(
        &self,
        live: &LiveTopic,
        lease: &Lease,
        token: &CancellationToken,
        plan: &Arc<DraftPlan>,
        first: VariantStep,
    ) -> Result<(), Halt> {
        let mut next = Some(first);
        while let Some(step) = next {
            let record = match step {
                VariantStep::Write(variant) => {
                    let job = WriteJob { topic: Arc::clone(&live.ctx), plan: Arc::clone(plan), variant };
                    let fail = OnFailure::Variant(variant);
                    Box::pin(self.step(&self.pools.writer, job, token, fail, |draft, cost, timing| {
                        JournalRecord::Drafted { variant, draft, cost, timing }
                    }))
                    .await?
                }
                VariantStep::Review(variant) => {
                    let draft = live.lock().variants.get(variant as usize).and_then(|v| v.draft.clone());
                    let Some(draft) = draft else { return Ok(()) };
                    let position = JobPosition { variant: Some(variant), revision: None };
                    let job = ReviewJob {
                        topic: Arc::clone(&live.ctx),
                        plan: Arc::clone(plan),
                        draft: Arc::new(draft),
                        position,
                    };
                    let fail = OnFailure::Variant(variant);
                    Box::pin(self.step(&self.pools.reviewer, job, token, fail, |review, cost, timing| {
                        self.metrics.review_score.record(f64::from(review.score));
                        JournalRecord::Reviewed { variant, review, cost, timing }
                    }))
                    .await?
                }
            };
            let status = self.journal_step(live, lease, &record, token).await?;
            if status.is_terminal() {
                // A fatal variant failure failed the topic: stop the others.
                return Err(Halt::Stopped);
            }
            next = decide_variant(&live.lock(), step.variant());
        }
        Ok(())
    }

    /// Runs one step on its pool and turns the result into the record to
    /// journal: `on_ok`'s for a success, a failure record otherwise. The one
    /// place where "run a step, cost it, journal it or fail" is written.
    /// A cancelled topic gets no record (`Halt::Stopped`).
    async fn step<S: Stage>(
        &self,
        pool: &StagePool<S>,
        job: S::Job,
        token: &CancellationToken,
        on_failure: OnFailure,
        on_ok: impl FnOnce(S::Output, StepCost, StepTiming) -> JournalRecord,
    ) -> Result<JournalRecord, Halt> {
        let topic_id = S::topic(&job).id.clone();
        let (result, timing) = self.run_step(pool, job, token).await;
        if token.is_cancelled() {
            // Cancelled or cut off: nothing of this step is recorded.
            return Err(Halt::Stopped);
        }
        let cost = cost_of(&result);
        Ok(match result {
            Ok(s) => on_ok(s.value, cost, timing),
            Err(f) => {
                let error = step_error(S::STEP, &f);
                match on_failure {
                    OnFailure::Variant(variant) if f.error.is_retryable() => {
                        tracing::warn!(%topic_id, step = %S::STEP, variant, error = %f.error, "variant failed; continuing with the others");
                        JournalRecord::VariantFailed { variant, error, cost, timing: Some(timing) }
                    }
                    _ => {
                        tracing::warn!(%topic_id, step = %S::STEP, reason = f.error.reason().as_str(), error = %f.error, "topic failed");
                        JournalRecord::Failed { error, cost, timing: Some(timing) }
                    }
                }
            }
        })
    }

    /// Runs one step (its attempts, each on the stage's pool) with timing
    /// and metrics. Boxed: a step's future then lives on the heap only while
    /// the step runs, instead of inflating every topic task that awaits one.
    fn run_step<'a, S: Stage>(
        &'a self,
        pool: &'a StagePool<S>,
        job: S::Job,
        token: &'a CancellationToken,
    ) -> BoxFuture<'a, (StageResult<S::Output>, StepTiming)> {
        Box::pin(async move {
            let ctx = Arc::clone(S::topic(&job));
            let pos = S::position(&job);
            let started_ms = now_ms();
            let t0 = Instant::now();
            // Dropped with this future (a sibling variant failed the topic):
            // the step's in-flight request is dropped with it.
            let step_token = token.child_token();
            let _drop_guard = step_token.clone().drop_guard();
            let observe = |r: &AttemptReport| {
                if let Some((reason, message)) = &r.failure {
                    tracing::warn!(topic_id = %ctx.id, step = %r.step, attempt = r.attempt, reason = reason.as_str(), error = %message, "step attempt failed");
                }
                self.events.emit(|| TopicEvent {
                    topic_id: ctx.id.clone(),
                    step: r.step.as_str().to_string(),
                    variant: pos.variant,
                    revision: pos.revision,
                    attempt: Some(r.attempt),
                    outcome: if r.failure.is_some() { "attempt_failed".into() } else { "attempt_ok".into() },
                    reason: r.failure.as_ref().map(|(reason, _)| reason.as_str().to_string()),
                    elapsed_ms: Some(r.elapsed.as_millis() as u64),
                    waited_ms: Some(r.waited.as_millis() as u64),
                    status: TopicStatus::Running,
                    at_ms: now_ms(),
                });
            };
            let pools = &*self.pools;
            let step_token_ref = &step_token;
            let call = self.services.caller.call(
                S::STEP,
                |attempt| pools.attempt(pool, job.clone(), attempt, step_token_ref),
                &observe,
            );
            let span = tracing::info_span!("step", topic_id = %ctx.id, step = S::STEP.as_str(), variant = pos.variant, revision = pos.revision);
            let result = tokio::select! {
                biased;
                _ = step_token.cancelled() => Err(StepFailure { error: LlmError::Cancelled, attempts: 0, calls: 0, usage: Usage::default() }),
                r = call.instrument(span) => r,
            };
            let elapsed = t0.elapsed();
            self.metrics.step_duration(S::STEP).record(elapsed.as_secs_f64());
            let attempts = match &result {
                Ok(s) => s.attempts,
                Err(f) => f.attempts,
            };
            let timing = StepTiming {
                step: S::STEP,
                variant: pos.variant,
                revision: pos.revision,
                attempts,
                started_ms,
                finished_ms: now_ms(),
            };
            (result, timing)
        })
    }
}

impl From<Halt> for RunEnd {
    fn from(h: Halt) -> RunEnd {
        match h {
            Halt::Stopped => RunEnd::Stopped,
            Halt::LeaseLost => RunEnd::LeaseLost,
        }
    }
}

/// The draft and review the workflow stands on, shared for a revise job.
fn current_draft(state: &TopicState) -> Option<(Arc<Draft>, Arc<Review>)> {
    let (draft, review, _) = state.current()?;
    Some((Arc::new(draft.clone()), Arc::new(review?.clone())))
}
