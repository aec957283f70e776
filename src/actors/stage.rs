//! The five workflow stages (`RouteStage`, `PlanStage`, `WriteStage`,
//! `ReviewStage`, `ReviseStage`), written once over the `Stage` trait, and
//! `StageWorker<S>`, the ractor factory worker that runs one attempt of a
//! stage's step inside its own handler: limiter, model call, gate.
//!
//! Because the worker runs the work itself, supervision sees it: a panic
//! anywhere in an attempt (prompt building, provider parsing, a gate, or an
//! injected `[chaos]` panic) kills that worker; its factory restarts it and
//! the caller gets one failed attempt (`actor_restart`). A worker stuck past
//! `supervision.step_timeout_s` is killed and replaced the same way.
//! Must not: touch the store, decide workflow steps, or retry (the retry
//! loop is `StepCaller::call`, run by the topic runner).

use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ractor::factory::{FactoryMessage, Job, Worker, WorkerId};
use ractor::{ActorProcessingErr, ActorRef, RpcReplyPort};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Services;
use crate::llm::retry::{Attempt, AttemptOutcome};
use crate::llm::LlmRequest;
use crate::workflow::gates::{self, GateError};
use crate::workflow::plan::DraftPlan;
use crate::workflow::schema::StructuredFormat;
use crate::workflow::{prompts, Draft, Outline, Review, Step};

/// What every job knows about its topic. Shared, never copied per step.
#[derive(Debug)]
pub struct TopicCtx {
    pub id: String,
    pub topic: String,
    /// Derived from the id: keeps the simulated provider deterministic.
    pub seed: u64,
}

impl TopicCtx {
    pub fn new(id: &str, topic: &str) -> Arc<TopicCtx> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        id.hash(&mut h);
        Arc::new(TopicCtx { id: id.to_string(), topic: topic.to_string(), seed: h.finish() })
    }
}

/// Where a job sits in its topic, for events and seeds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobPosition {
    pub variant: Option<u32>,
    pub revision: Option<u32>,
}

/// One attempt of a step, as sent to a stage worker.
pub struct AttemptJob<S: Stage> {
    pub job: S::Job,
    pub attempt: Attempt,
    /// The topic's cancellation: drops the limiter wait or the request.
    pub cancel: CancellationToken,
    /// The caller's step span: the worker runs the attempt inside it, so
    /// traces nest topic → step → attempt → model call across the hop.
    pub span: tracing::Span,
}

/// The one message type of a stage's workers: `StageMsg<WriteStage>` is
/// the Writer's.
pub enum StageMsg<S: Stage> {
    Run(AttemptJob<S>, RpcReplyPort<AttemptOutcome<S::Output>>),
}

/// A workflow step as a stage: how to build its request and gate its
/// output.
pub trait Stage: Send + Sync + Sized + 'static {
    const STEP: Step;
    /// Pool name (`writer`, …): metric label and log field.
    const NAME: &'static str;
    type Job: Clone + Send + Sync + 'static;
    type Output: Send + 'static;
    fn topic(job: &Self::Job) -> &Arc<TopicCtx>;
    fn position(_job: &Self::Job) -> JobPosition {
        JobPosition::default()
    }
    fn request(services: &Services, job: &Self::Job, attempt: &Attempt) -> LlmRequest;
    fn gate(services: &Services, job: &Self::Job, text: &str) -> Result<Self::Output, GateError>;
}

fn seed_key(ctx: &TopicCtx, step: Step, pos: JobPosition, attempt: u32) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (ctx.seed, step, pos.variant, pos.revision, attempt).hash(&mut h);
    h.finish()
}

fn request_for<S: Stage>(
    services: &Services,
    job: &S::Job,
    prompt: prompts::Prompt,
    attempt: &Attempt,
    structured: Option<Arc<StructuredFormat>>,
) -> LlmRequest {
    LlmRequest {
        step: S::STEP,
        instructions: prompt.instructions,
        input: prompt.input,
        max_output_tokens: 0,
        max_output_tokens_ceiling: 0,
        model: None,
        reasoning_effort: None,
        temperature: None,
        price: None,
        spend_limit: None,
        format: structured,
        seed_key: seed_key(S::topic(job), S::STEP, S::position(job), attempt.number),
    }
    // Per-step model, cap, effort, temperature and price; `StepCaller`
    // raises the cap after a truncated attempt.
    .with_settings(&crate::llm::StepCallSettings::for_step(&services.config, S::STEP))
}

// ---- the five stages -------------------------------------------------------

#[derive(Clone)]
pub struct RouteJob {
    pub topic: Arc<TopicCtx>,
}

#[derive(Clone)]
pub struct PlanJob {
    pub topic: Arc<TopicCtx>,
    pub kind: String,
}

#[derive(Clone)]
pub struct WriteJob {
    pub topic: Arc<TopicCtx>,
    pub plan: Arc<DraftPlan>,
    pub variant: u32,
}

#[derive(Clone)]
pub struct ReviewJob {
    pub topic: Arc<TopicCtx>,
    pub plan: Arc<DraftPlan>,
    pub draft: Arc<Draft>,
    pub position: JobPosition,
}

#[derive(Clone)]
pub struct ReviseJob {
    pub topic: Arc<TopicCtx>,
    pub plan: Arc<DraftPlan>,
    pub draft: Arc<Draft>,
    pub review: Arc<Review>,
    pub human_note: Option<String>,
    pub number: u32,
}

pub struct RouteStage;
pub struct PlanStage;
pub struct WriteStage;
pub struct ReviewStage;
pub struct ReviseStage;

impl Stage for RouteStage {
    const STEP: Step = Step::Route;
    const NAME: &'static str = "router";
    type Job = RouteJob;
    type Output = String;
    fn topic(job: &RouteJob) -> &Arc<TopicCtx> {
        &job.topic
    }
    fn request(s: &Services, job: &RouteJob, a: &Attempt) -> LlmRequest {
        let p = prompts::route_with_instructions(&s.formats.router_instructions, &job.topic.topic, a.feedback());
        request_for::<Self>(s, job, p, a, Some(s.formats.route.clone()))
    }
    fn gate(s: &Services, _job: &RouteJob, text: &str) -> Result<String, GateError> {
        gates::check_route(text, &s.formats.kind_names).map(|r| r.kind)
    }
}

impl Stage for PlanStage {
    const STEP: Step = Step::Plan;
    const NAME: &'static str = "planner";
    type Job = PlanJob;
    type Output = Outline;
    fn topic(job: &PlanJob) -> &Arc<TopicCtx> {
        &job.topic
    }
    fn request(s: &Services, job: &PlanJob, a: &Attempt) -> LlmRequest {
        let kind = s.formats.kind(&job.kind);
        let p = prompts::plan_with(&kind.rendered.planner, &job.topic.topic, a.feedback());
        request_for::<Self>(s, job, p, a, Some(kind.outline_format.clone()))
    }
    fn gate(s: &Services, job: &PlanJob, text: &str) -> Result<Outline, GateError> {
        gates::check_outline(text, &s.formats.kind(&job.kind).config)
    }
}

impl Stage for WriteStage {
    const STEP: Step = Step::Write;
    const NAME: &'static str = "writer";
    type Job = WriteJob;
    type Output = Draft;
    fn topic(job: &WriteJob) -> &Arc<TopicCtx> {
        &job.topic
    }
    fn position(job: &WriteJob) -> JobPosition {
        JobPosition { variant: Some(job.variant), revision: None }
    }
    fn request(s: &Services, job: &WriteJob, a: &Attempt) -> LlmRequest {
        let p = prompts::write_with(&job.plan.writer_instructions, &job.topic.topic, a.feedback());
        request_for::<Self>(s, job, p, a, job.plan.format.clone())
    }
    fn gate(_s: &Services, job: &WriteJob, text: &str) -> Result<Draft, GateError> {
        gate_draft(&job.plan, text)
    }
}

impl Stage for ReviewStage {
    const STEP: Step = Step::Review;
    const NAME: &'static str = "reviewer";
    type Job = ReviewJob;
    type Output = Review;
    fn topic(job: &ReviewJob) -> &Arc<TopicCtx> {
        &job.topic
    }
    fn position(job: &ReviewJob) -> JobPosition {
        job.position
    }
    fn request(s: &Services, job: &ReviewJob, a: &Attempt) -> LlmRequest {
        let p = prompts::review_with(&job.plan.reviewer_instructions, &job.topic.topic, &job.draft, a.feedback());
        request_for::<Self>(s, job, p, a, Some(s.formats.review.clone()))
    }
    fn gate(s: &Services, _job: &ReviewJob, text: &str) -> Result<Review, GateError> {
        gates::check_review(text, s.config.workflow.approval_min_score)
    }
}

impl Stage for ReviseStage {
    const STEP: Step = Step::Revise;
    const NAME: &'static str = "reviser";
    type Job = ReviseJob;
    type Output = Draft;
    fn topic(job: &ReviseJob) -> &Arc<TopicCtx> {
        &job.topic
    }
    fn position(job: &ReviseJob) -> JobPosition {
        JobPosition { variant: None, revision: Some(job.number) }
    }
    fn request(s: &Services, job: &ReviseJob, a: &Attempt) -> LlmRequest {
        let input = prompts::RevisionInput {
            topic: &job.topic.topic,
            draft: &job.draft,
            review: &job.review,
            human_note: job.human_note.as_deref(),
        };
        let p = prompts::revise_with(job.plan.reviser_instructions(), &input, a.feedback());
        request_for::<Self>(s, job, p, a, job.plan.format.clone())
    }
    fn gate(_s: &Services, job: &ReviseJob, text: &str) -> Result<Draft, GateError> {
        gate_draft(&job.plan, text)
    }
}

fn gate_draft(plan: &DraftPlan, text: &str) -> Result<Draft, GateError> {
    let kind = &plan.kind.config;
    if kind.structured_draft {
        gates::check_structured_draft(text, &plan.outline, kind)
    } else {
        gates::check_draft(text, &plan.outline, kind)
    }
}

// ---- the worker ------------------------------------------------------------

/// How an injected panic's message starts (the binary keeps them out of
/// stderr: they are counted, and each restart is logged).
pub const CHAOS_PANIC: &str = "chaos: injected panic";

/// Counts injected panics, so chaos runs can compare them with restarts.
pub static INJECTED_PANICS: AtomicU64 = AtomicU64::new(0);

/// A pool worker of stage `S`. Stateless: everything it needs is in
/// `Services` and the job, so a restarted worker is as good as the old one.
pub struct StageWorker<S: Stage> {
    _stage: PhantomData<fn() -> S>,
}

impl<S: Stage> Default for StageWorker<S> {
    fn default() -> Self {
        Self { _stage: PhantomData }
    }
}

impl<S: Stage> Worker for StageWorker<S> {
    type Key = ();
    type Message = StageMsg<S>;
    type Arguments = Arc<Services>;
    type State = Arc<Services>;

    async fn pre_start(
        &self,
        _wid: WorkerId,
        _factory: &ActorRef<FactoryMessage<(), StageMsg<S>>>,
        services: Arc<Services>,
    ) -> Result<Arc<Services>, ActorProcessingErr> {
        Ok(services)
    }

    async fn handle(
        &self,
        _wid: WorkerId,
        _factory: &ActorRef<FactoryMessage<(), StageMsg<S>>>,
        Job { msg, key, .. }: Job<(), StageMsg<S>>,
        services: &mut Arc<Services>,
    ) -> Result<(), ActorProcessingErr> {
        let StageMsg::Run(AttemptJob { job, attempt, cancel, span }, reply) = msg;
        let outcome = run_attempt::<S>(services, &job, &attempt, &cancel).instrument(span).await;
        // The caller may have given up (cancelled topic); nothing to do.
        let _ = reply.send(outcome);
        Ok(key)
    }
}

/// One attempt, in the worker: the request, the call, the gate. The
/// `[chaos]` panic fires inside the gate, after the model answered, where
/// real parsing panics would.
async fn run_attempt<S: Stage>(
    services: &Services,
    job: &S::Job,
    attempt: &Attempt,
    cancel: &CancellationToken,
) -> AttemptOutcome<S::Output> {
    let request = S::request(services, job, attempt);
    let gate = |text: &str| {
        let rate = services.config.chaos.actor_panic_rate;
        if rate > 0.0 && rand::rng().random::<f64>() < rate {
            INJECTED_PANICS.fetch_add(1, Ordering::Relaxed);
            panic!("{CHAOS_PANIC} in {}", S::NAME);
        }
        S::gate(services, job, text)
    };
    services.caller.attempt(request, attempt, gate, cancel).await
}
