//! The `Coordinator` actor (admission: queue, in-flight bound, cancel) and
//! `TopicRunner::drive`, which takes one topic through
//! route → plan → N variants (write → review) → choose → revise/re-review →
//! approval → final.
//!
//! The driver is resumable by construction: before each step it looks at
//! the topic's state (the journal replayed) and skips what is done. Every
//! step's record is journaled (awaited to durability) before the next step
//! starts. Must not: call providers directly (stages do), or hold a lock
//! across an await.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tracing::Instrument;

use super::stage::{
    DraftPlan, JobPosition, PlanJob, ReviewJob, ReviseJob, RouteJob, Stage, StageResult, TopicCtx, WriteJob,
};
use super::{Services, Slot, StageDirectory};
use crate::events::{EventBus, TopicEvent};
use crate::llm::retry::StepFailure;
use crate::llm::BoxFuture;
use crate::llm::FailureReason;
use crate::state::{now_ms, JournalRecord, StepCost, StepError, StepTiming, TopicState, TopicStatus};
use crate::store::files::FileMirror;
use crate::store::{StoreError, TopicStore};
use crate::workflow::{Draft, Outline, Review, Step};

/// A topic the engine holds in memory: running, queued or awaiting approval
/// (and, without a store, finished ones too).
pub struct LiveTopic {
    pub ctx: Arc<TopicCtx>,
    state: Mutex<TopicState>,
    status: watch::Sender<TopicStatus>,
}

impl LiveTopic {
    pub fn new(state: TopicState) -> Arc<LiveTopic> {
        let (status, _) = watch::channel(state.status);
        Arc::new(LiveTopic { ctx: TopicCtx::new(&state.id, &state.topic), state: Mutex::new(state), status })
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

/// Everything a topic driver needs; shared by all topics.
pub struct TopicRunner {
    pub services: Arc<Services>,
    pub directory: Arc<StageDirectory>,
    pub store: Option<Arc<dyn TopicStore>>,
    pub files: Option<FileMirror>,
    pub events: EventBus,
    pub live: Mutex<HashMap<String, Arc<LiveTopic>>>,
    awaiting: AtomicI64,
    step_timeout: Duration,
    metrics: DriverMetrics,
}

/// Histogram handles recorded on every step, registered once (a recorder
/// lookup per step was measurable). Install the recorder before the engine.
struct DriverMetrics {
    /// `scriptorium_step_duration_seconds`, indexed like `Step::ALL`.
    step_duration: [metrics::Histogram; 5],
    review_score: metrics::Histogram,
}

impl DriverMetrics {
    fn register() -> DriverMetrics {
        DriverMetrics {
            step_duration: Step::ALL
                .map(|step| metrics::histogram!("scriptorium_step_duration_seconds", "step" => step.as_str())),
            review_score: metrics::histogram!("scriptorium_review_score"),
        }
    }

    fn step_duration(&self, step: Step) -> &metrics::Histogram {
        let index = Step::ALL.iter().position(|s| *s == step).unwrap_or(0);
        &self.step_duration[index]
    }
}

/// Why a driver stopped early (the topic stays resumable).
#[derive(Debug)]
enum Halt {
    /// The topic failed or was cancelled; already journaled.
    Finished,
    /// Journaling failed: the store is broken. The topic resumes on restart.
    Store(StoreError),
}

impl From<StoreError> for Halt {
    fn from(e: StoreError) -> Self {
        Halt::Store(e)
    }
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
    pub fn new(
        services: Arc<Services>,
        directory: Arc<StageDirectory>,
        store: Option<Arc<dyn TopicStore>>,
        files: Option<FileMirror>,
    ) -> TopicRunner {
        let step_timeout = Duration::from_secs_f64(services.config.supervision.step_timeout_s);
        TopicRunner {
            events: services.events.clone(),
            services,
            directory,
            store,
            files,
            live: Mutex::new(HashMap::new()),
            awaiting: AtomicI64::new(0),
            step_timeout,
            metrics: DriverMetrics::register(),
        }
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

    pub fn add_live(&self, live: Arc<LiveTopic>) {
        if live.lock().status == TopicStatus::AwaitingApproval {
            self.adjust_awaiting(1);
        }
        self.live_map().insert(live.ctx.id.clone(), live);
    }

    fn adjust_awaiting(&self, delta: i64) {
        let n = self.awaiting.fetch_add(delta, Ordering::Relaxed) + delta;
        metrics::gauge!("scriptorium_topics_awaiting_approval").set(n as f64);
    }

    /// Applies a record, makes it durable, mirrors it, tells listeners.
    /// Returns the status after the record.
    /// Boxed, like `run_step`: the future holds a record and, with the file
    /// mirror on, a state copy across the store's commit; inline it would
    /// size every task that journals.
    pub fn journal<'a>(
        &'a self,
        live: &'a LiveTopic,
        record: JournalRecord,
    ) -> BoxFuture<'a, Result<TopicStatus, StoreError>> {
        Box::pin(async move {
            // A cancelled topic takes no further records (a step that was
            // mid-flight when cancel arrived finishes into the void).
            let accepted = self.journal_if(live, record, |st| st.status != TopicStatus::Cancelled).await?;
            Ok(accepted.unwrap_or(TopicStatus::Cancelled))
        })
    }

    /// Journals `record` only if `precondition` holds, checked under the
    /// same lock that applies the record (so decisions cannot interleave).
    /// `Ok(None)` when the precondition failed.
    pub async fn journal_if(
        &self,
        live: &LiveTopic,
        record: JournalRecord,
        precondition: impl FnOnce(&TopicState) -> bool,
    ) -> Result<Option<TopicStatus>, StoreError> {
        let at = now_ms();
        let (durable, mirror, before, after, submitted) = {
            let mut st = live.lock();
            if !precondition(&st) {
                return Ok(None);
            }
            let before = st.status;
            st.apply(&record, at);
            let durable = self.store.as_ref().map(|s| s.append(&st, &record));
            // Numbered under the topic's lock: the file mirror keeps the newest.
            let mirror = self.files.as_ref().map(|f| f.snapshot(&st));
            (durable, mirror, before, st.status, st.submitted_at_ms)
        };
        if let Some(f) = durable {
            f.await?;
        }
        if let (Some(files), Some(state)) = (&self.files, mirror) {
            if let Err(e) = files.write(state).await {
                tracing::warn!(topic_id = %live.ctx.id, error = %e, "could not write the topic's JSON file");
            }
        }
        if before != after {
            self.on_status_change(live, before, after, submitted, at);
        }
        Ok(Some(after))
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
            status: live.status.borrow().to_owned(),
            at_ms: now_ms(),
        });
    }

    /// Runs one stage call with timing and metrics. Boxed: a step's future
    /// (actor call, reply port, timeout) then lives on the heap only while
    /// the step runs, instead of inflating every driver and variant task
    /// that awaits one (those tasks were ~40 % of the memory of an
    /// in-flight topic).
    fn run_step<'a, S: Stage>(
        &'a self,
        slot: &'a Slot<S>,
        job: S::Job,
        pos: JobPosition,
    ) -> BoxFuture<'a, (StageResult<S::Output>, StepTiming)> {
        Box::pin(self.run_step_unboxed(slot, job, pos))
    }

    async fn run_step_unboxed<S: Stage>(
        &self,
        slot: &Slot<S>,
        job: S::Job,
        pos: JobPosition,
    ) -> (StageResult<S::Output>, StepTiming) {
        let started_ms = now_ms();
        let t0 = Instant::now();
        let result = self.directory.ask(slot, job, self.step_timeout).await;
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
    }

    async fn fail(
        &self,
        live: &LiveTopic,
        step: Step,
        failure: &StepFailure,
        cost: StepCost,
        timing: StepTiming,
    ) -> Result<Halt, StoreError> {
        tracing::warn!(topic_id = %live.ctx.id, %step, reason = failure.error.reason().as_str(), error = %failure.error, "topic failed");
        let record = JournalRecord::Failed { error: step_error(step, failure), cost, timing: Some(timing) };
        self.journal(live, record).await?;
        Ok(Halt::Finished)
    }

    /// Drives a topic from wherever its journal says it is to completion,
    /// failure, or the approval gate.
    pub async fn drive(self: Arc<Self>, live: Arc<LiveTopic>) {
        let span = tracing::info_span!("topic", topic_id = %live.ctx.id);
        self.drive_inner(live).instrument(span).await
    }

    async fn drive_inner(self: Arc<Self>, live: Arc<LiveTopic>) {
        let resumed = live.lock().status != TopicStatus::Queued;
        if let Err(e) = self.journal(&live, JournalRecord::Started).await {
            tracing::error!(topic_id = %live.ctx.id, error = %e, "cannot journal; topic left for the next start");
            return;
        }
        self.emit(&live, "topic", JobPosition::default(), if resumed { "resumed" } else { "started" }, None);
        match self.drive_steps(&live).await {
            Ok(()) | Err(Halt::Finished) => {}
            Err(Halt::Store(e)) => {
                tracing::error!(topic_id = %live.ctx.id, error = %e, "cannot journal; topic left for the next start");
            }
        }
    }

    async fn drive_steps(self: &Arc<Self>, live: &Arc<LiveTopic>) -> Result<(), Halt> {
        // Each phase boxed: the driver task then holds only the phase that
        // is running, not the largest of them inline for its whole life.
        let kind = Box::pin(self.ensure_route(live)).await?;
        let outline = Box::pin(self.ensure_outline(live, &kind)).await?;
        let plan = DraftPlan::new(&self.services.config, &kind, self.services.kind(&kind), outline);
        Box::pin(self.ensure_variants(live, &plan)).await?;
        Box::pin(self.ensure_choice(live)).await?;
        Box::pin(self.revision_loop(live, &plan)).await?;
        let (require_approval, approved_by_human) = {
            let st = live.lock();
            (st.require_approval || self.services.kind(&kind).require_approval, st.approved_by_human())
        };
        if require_approval && !approved_by_human {
            self.journal(live, JournalRecord::AwaitingApproval).await?;
            return Ok(());
        }
        self.journal(live, JournalRecord::Completed).await?;
        Ok(())
    }

    async fn ensure_route(&self, live: &LiveTopic) -> Result<String, Halt> {
        let (route, requested) = {
            let st = live.lock();
            (st.route.clone(), st.requested_kind.clone())
        };
        if let Some(kind) = route {
            return Ok(kind);
        }
        let config = &self.services.config;
        let kind = match requested {
            Some(kind) => kind,
            None if !config.workflow.route || config.kinds.len() == 1 => config.workflow.default_kind.clone(),
            None => {
                let job = RouteJob { topic: Arc::clone(&live.ctx) };
                let (result, timing) = self.run_step(&self.directory.router, job, JobPosition::default()).await;
                let cost = cost_of(&result);
                match result {
                    Ok(s) => {
                        self.journal(live, JournalRecord::Routed { kind: s.value.clone(), cost, timing: Some(timing) })
                            .await?;
                        return Ok(s.value);
                    }
                    Err(f) => return Err(self.fail(live, Step::Route, &f, cost, timing).await?),
                }
            }
        };
        self.journal(live, JournalRecord::Routed { kind: kind.clone(), cost: StepCost::default(), timing: None })
            .await?;
        Ok(kind)
    }

    async fn ensure_outline(&self, live: &LiveTopic, kind: &str) -> Result<Outline, Halt> {
        if let Some(o) = live.lock().outline.clone() {
            return Ok(o);
        }
        let job = PlanJob { topic: Arc::clone(&live.ctx), kind: kind.to_string() };
        let (result, timing) = self.run_step(&self.directory.planner, job, JobPosition::default()).await;
        let cost = cost_of(&result);
        match result {
            Ok(s) => {
                let outline = s.value.clone();
                self.journal(live, JournalRecord::Planned { outline: s.value, cost, timing }).await?;
                Ok(outline)
            }
            Err(f) => Err(self.fail(live, Step::Plan, &f, cost, timing).await?),
        }
    }

    /// Fans out the variants that are not finished; each writes then
    /// reviews. A variant that fails is recorded and tolerated; a fatal
    /// error fails the topic.
    async fn ensure_variants(self: &Arc<Self>, live: &Arc<LiveTopic>, plan: &Arc<DraftPlan>) -> Result<(), Halt> {
        let pending: Vec<(u32, Option<Draft>)> = {
            let st = live.lock();
            (0..st.variants_requested)
                .filter_map(|i| match st.variants.get(i as usize) {
                    Some(v) if v.error.is_some() || v.review.is_some() => None,
                    Some(v) => Some((i, v.draft.clone())),
                    None => Some((i, None)),
                })
                .collect()
        };
        let mut set = JoinSet::new();
        for (variant, draft) in pending {
            let (runner, live, plan) = (Arc::clone(self), Arc::clone(live), Arc::clone(plan));
            set.spawn(async move { runner.variant_flow(&live, &plan, variant, draft).await });
        }
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(halt)) => return Err(halt),
                Err(join_error) => {
                    // Only a bug can get here (a panic in our own code).
                    tracing::error!(topic_id = %live.ctx.id, error = %join_error, "variant task panicked");
                }
            }
        }
        Ok(())
    }

    async fn variant_flow(
        &self,
        live: &LiveTopic,
        plan: &Arc<DraftPlan>,
        variant: u32,
        draft: Option<Draft>,
    ) -> Result<(), Halt> {
        let pos = JobPosition { variant: Some(variant), revision: None };
        let draft = match draft {
            Some(d) => Arc::new(d),
            None => {
                let job = WriteJob { topic: Arc::clone(&live.ctx), plan: Arc::clone(plan), variant };
                let (result, timing) = self.run_step(&self.directory.writer, job, pos).await;
                let cost = cost_of(&result);
                match result {
                    Ok(s) => {
                        let draft = Arc::new(s.value.clone());
                        self.journal(live, JournalRecord::Drafted { variant, draft: s.value, cost, timing }).await?;
                        draft
                    }
                    Err(f) => return self.variant_failed(live, Step::Write, variant, f, cost, timing).await,
                }
            }
        };
        let job = ReviewJob { topic: Arc::clone(&live.ctx), plan: Arc::clone(plan), draft, position: pos };
        let (result, timing) = self.run_step(&self.directory.reviewer, job, pos).await;
        let cost = cost_of(&result);
        match result {
            Ok(s) => {
                self.metrics.review_score.record(s.value.score as f64);
                self.journal(live, JournalRecord::Reviewed { variant, review: s.value, cost, timing }).await?;
                Ok(())
            }
            Err(f) => self.variant_failed(live, Step::Review, variant, f, cost, timing).await,
        }
    }

    async fn variant_failed(
        &self,
        live: &LiveTopic,
        step: Step,
        variant: u32,
        f: StepFailure,
        cost: StepCost,
        timing: StepTiming,
    ) -> Result<(), Halt> {
        if !f.error.is_retryable() {
            return Err(self.fail(live, step, &f, cost, timing).await?);
        }
        tracing::warn!(topic_id = %live.ctx.id, %step, variant, error = %f.error, "variant failed; continuing with the others");
        let error = step_error(step, &f);
        self.journal(live, JournalRecord::VariantFailed { variant, error, cost, timing: Some(timing) }).await?;
        Ok(())
    }

    async fn ensure_choice(&self, live: &LiveTopic) -> Result<(), Halt> {
        let choice = {
            let st = live.lock();
            if st.chosen_variant.is_some() {
                return Ok(());
            }
            metrics::histogram!("scriptorium_variants_per_topic").record(st.variants_requested as f64);
            choose_best(&st)
        };
        match choice {
            Some((variant, reason)) => {
                self.journal(live, JournalRecord::Chosen { variant, reason }).await?;
                Ok(())
            }
            None => {
                let error = {
                    let st = live.lock();
                    let errors: Vec<&StepError> = st.variants.iter().filter_map(|v| v.error.as_ref()).collect();
                    let listed: Vec<String> = st
                        .variants
                        .iter()
                        .filter_map(|v| v.error.as_ref().map(|e| format!("variant {}: {}", v.index, e.message)))
                        .collect();
                    // Classified by the variants' own failures: the first
                    // variant's step and reason (they usually agree).
                    let (step, kind) =
                        errors.first().map(|e| (e.step, e.kind)).unwrap_or((Step::Write, FailureReason::InvalidOutput));
                    let message = format!("all {} variants failed ({})", st.variants_requested, listed.join("; "));
                    StepError { step, kind, message }
                };
                self.journal(live, JournalRecord::Failed { error, cost: StepCost::default(), timing: None }).await?;
                Err(Halt::Finished)
            }
        }
    }

    async fn revision_loop(&self, live: &LiveTopic, plan: &Arc<DraftPlan>) -> Result<(), Halt> {
        let max_revisions = self.services.config.workflow.max_revisions;
        loop {
            let (draft, review, next_number, pending_note, automatic) = {
                let st = live.lock();
                let Some((draft, review, _)) = st.current() else { return Ok(()) };
                (
                    draft.clone(),
                    review.cloned(),
                    st.revisions.len() as u32 + 1,
                    st.pending_human_note.clone(),
                    st.automatic_revisions(),
                )
            };
            let draft = Arc::new(draft);
            let Some(review) = review else {
                // A revision journaled before a crash, not yet reviewed.
                self.review_revision(live, plan, draft, next_number - 1).await?;
                continue;
            };
            let answered_human = live.lock().revisions.last().is_some_and(|r| r.human_note.is_some());
            let human_note = match pending_note {
                Some(note) => Some(note),
                // A human's rejection was answered and re-reviewed: back to
                // the human, not into the automatic loop.
                None if answered_human => return Ok(()),
                None if !review.approved && automatic < max_revisions => None,
                None => return Ok(()),
            };
            let pos = JobPosition { variant: None, revision: Some(next_number) };
            let job = ReviseJob {
                topic: Arc::clone(&live.ctx),
                plan: Arc::clone(plan),
                draft,
                review: Arc::new(review),
                human_note: human_note.clone(),
                number: next_number,
            };
            let (result, timing) = self.run_step(&self.directory.reviser, job, pos).await;
            let cost = cost_of(&result);
            match result {
                Ok(s) => {
                    metrics::counter!("scriptorium_revisions_total").increment(1);
                    let revised = Arc::new(s.value.clone());
                    self.journal(
                        live,
                        JournalRecord::Revised { number: next_number, draft: s.value, human_note, cost, timing },
                    )
                    .await?;
                    self.review_revision(live, plan, revised, next_number).await?;
                }
                Err(f) => return Err(self.fail(live, Step::Revise, &f, cost, timing).await?),
            }
        }
    }

    async fn review_revision(
        &self,
        live: &LiveTopic,
        plan: &Arc<DraftPlan>,
        draft: Arc<Draft>,
        number: u32,
    ) -> Result<(), Halt> {
        let pos = JobPosition { variant: None, revision: Some(number) };
        let job = ReviewJob { topic: Arc::clone(&live.ctx), plan: Arc::clone(plan), draft, position: pos };
        let (result, timing) = self.run_step(&self.directory.reviewer, job, pos).await;
        let cost = cost_of(&result);
        match result {
            Ok(s) => {
                self.metrics.review_score.record(s.value.score as f64);
                self.journal(live, JournalRecord::RevisionReviewed { number, review: s.value, cost, timing }).await?;
                Ok(())
            }
            Err(f) => Err(self.fail(live, Step::Review, &f, cost, timing).await?),
        }
    }
}

/// Highest score wins; ties go to the lowest index. Variants without a
/// review (failed) are skipped.
pub fn choose_best(state: &TopicState) -> Option<(u32, String)> {
    let mut best: Option<(u32, &Review)> = None;
    for v in &state.variants {
        if let Some(r) = &v.review {
            if best.is_none_or(|(_, b)| r.score > b.score) {
                best = Some((v.index, r));
            }
        }
    }
    let (index, review) = best?;
    let scores: Vec<String> = state
        .variants
        .iter()
        .map(|v| v.review.as_ref().map(|r| r.score.to_string()).unwrap_or_else(|| "failed".into()))
        .collect();
    Some((
        index,
        format!(
            "highest review score {} among variants [{}] (ties go to the lowest index)",
            review.score,
            scores.join(", ")
        ),
    ))
}

// ---- the Coordinator actor -----------------------------------------------

pub enum CoordinatorMsg {
    /// Reserve a queue slot before the durable insert; false = busy.
    Reserve(RpcReplyPort<bool>),
    /// Give back a reservation whose insert failed or was a duplicate.
    Release,
    /// Queue a stored topic (consumes a reservation when `reserved`).
    Enqueue {
        live: Arc<LiveTopic>,
        reserved: bool,
    },
    Finished(String),
    Cancel(String, RpcReplyPort<CancelOutcome>),
    Counts(RpcReplyPort<(usize, usize)>),
    /// Stop starting queued topics (shutdown).
    Drain(RpcReplyPort<()>),
    /// Abort every running driver (shutdown after the grace period).
    AbortAll(RpcReplyPort<usize>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Was queued or running; the caller journals `Cancelled`.
    Stopped,
    /// Not held by the coordinator (awaiting approval, finished, unknown).
    NotHeld,
}

pub struct CoordinatorArgs {
    pub runner: Arc<TopicRunner>,
    pub max_in_flight: usize,
    pub max_queued: usize,
}

pub struct CoordinatorState {
    args: CoordinatorArgs,
    queue: VecDeque<Arc<LiveTopic>>,
    reserved: usize,
    running: HashMap<String, AbortHandle>,
    draining: bool,
}

pub struct Coordinator;

impl CoordinatorState {
    fn publish_gauges(&self) {
        metrics::gauge!("scriptorium_topics_in_flight").set(self.running.len() as f64);
        metrics::gauge!("scriptorium_topics_queued").set((self.queue.len() + self.reserved) as f64);
    }

    fn start_ready(&mut self, myself: &ActorRef<CoordinatorMsg>) {
        while !self.draining && self.running.len() < self.args.max_in_flight {
            let Some(live) = self.queue.pop_front() else { break };
            let id = live.ctx.id.clone();
            let runner = Arc::clone(&self.args.runner);
            let me = myself.clone();
            let done_id = id.clone();
            let handle = tokio::spawn(async move {
                runner.drive(live).await;
                let _ = me.cast(CoordinatorMsg::Finished(done_id));
            });
            self.running.insert(id, handle.abort_handle());
        }
        self.publish_gauges();
    }
}

impl Actor for Coordinator {
    type Msg = CoordinatorMsg;
    type State = CoordinatorState;
    type Arguments = CoordinatorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: CoordinatorArgs,
    ) -> Result<CoordinatorState, ActorProcessingErr> {
        Ok(CoordinatorState { args, queue: VecDeque::new(), reserved: 0, running: HashMap::new(), draining: false })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut CoordinatorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CoordinatorMsg::Reserve(reply) => {
                // Free in-flight capacity counts as room: such a topic starts
                // at once and never waits in the queue.
                let free_slots = state.args.max_in_flight.saturating_sub(state.running.len());
                let waiting = state.queue.len() + state.reserved;
                let ok = !state.draining && waiting < state.args.max_queued + free_slots;
                if ok {
                    state.reserved += 1;
                }
                let _ = reply.send(ok);
            }
            CoordinatorMsg::Release => {
                state.reserved = state.reserved.saturating_sub(1);
            }
            CoordinatorMsg::Enqueue { live, reserved } => {
                if reserved {
                    state.reserved = state.reserved.saturating_sub(1);
                }
                state.queue.push_back(live);
                state.start_ready(&myself);
            }
            CoordinatorMsg::Finished(id) => {
                state.running.remove(&id);
                state.start_ready(&myself);
            }
            CoordinatorMsg::Cancel(id, reply) => {
                let outcome = if let Some(handle) = state.running.remove(&id) {
                    handle.abort();
                    CancelOutcome::Stopped
                } else if let Some(pos) = state.queue.iter().position(|l| l.ctx.id == id) {
                    state.queue.remove(pos);
                    CancelOutcome::Stopped
                } else {
                    CancelOutcome::NotHeld
                };
                let _ = reply.send(outcome);
                state.start_ready(&myself);
            }
            CoordinatorMsg::Counts(reply) => {
                let _ = reply.send((state.running.len(), state.queue.len() + state.reserved));
            }
            CoordinatorMsg::Drain(reply) => {
                state.draining = true;
                let _ = reply.send(());
            }
            CoordinatorMsg::AbortAll(reply) => {
                let n = state.running.len();
                for (_, h) in state.running.drain() {
                    h.abort();
                }
                state.publish_gauges();
                let _ = reply.send(n);
            }
        }
        Ok(())
    }
}
