//! The five stage actors (`Router`, `Planner`, `Writer`, `Reviewer`,
//! `Reviser`), written once as `StageActor<S>` over the `Stage` trait.
//!
//! Each actor's handler only validates the message and hands the model call
//! to a task that replies by the message's reply port: a slow call never
//! holds the actor, so no topic waits behind another topic's call. A panic
//! in the handler (real or injected by `[chaos]`) kills the actor; the
//! supervisor restarts it, and the caller re-sends the request it lost.
//! Must not: await a model call inside `handle`, or touch the store.

use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rand::Rng;
use tracing::Instrument;

use super::Services;
use crate::config::{Config, KindConfig};
use crate::events::TopicEvent;
use crate::llm::retry::{Attempt, AttemptReport, StepFailure, StepSuccess};
use crate::llm::LlmRequest;
use crate::state::{now_ms, TopicStatus};
use crate::workflow::gates::{self, GateError};
use crate::workflow::schema::{self, StructuredFormat};
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

pub type StageResult<T> = Result<StepSuccess<T>, StepFailure>;

/// One actor message type per stage: `StageMsg<WriteStage>` is the Writer's.
pub enum StageMsg<S: Stage> {
    Run(S::Job, RpcReplyPort<StageResult<S::Output>>),
}

/// Where a job sits in its topic, for events and seeds.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobPosition {
    pub variant: Option<u32>,
    pub revision: Option<u32>,
}

/// A workflow step as an actor: how to build its request and gate its
/// output.
pub trait Stage: Send + Sync + Sized + 'static {
    const STEP: Step;
    /// Actor name prefix (`writer`, …).
    const NAME: &'static str;
    type Job: Clone + Send + Sync + 'static;
    type Output: Send + 'static;
    fn topic(job: &Self::Job) -> &Arc<TopicCtx>;
    fn position(_job: &Self::Job) -> JobPosition {
        JobPosition::default()
    }
    fn request(services: &Services, job: &Self::Job, attempt: Attempt<'_>) -> LlmRequest;
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
    attempt: Attempt<'_>,
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

/// What every draft step of a topic derives from its kind and outline,
/// built once when the outline is known: the rules text of the writer,
/// reviewer and reviser prompts and, for a `structured_draft` kind, the
/// draft schema. Shared by the topic's write, review and revise jobs (they
/// used to rebuild it on every attempt).
pub struct DraftPlan {
    pub kind: String,
    pub outline: Outline,
    writer_instructions: Arc<str>,
    reviewer_instructions: Arc<str>,
    /// Built on the first revision: most topics never need it.
    reviser_instructions: std::sync::OnceLock<Arc<str>>,
    format: Option<Arc<StructuredFormat>>,
}

impl DraftPlan {
    pub fn new(config: &Config, kind_name: &str, kind: &KindConfig, outline: Outline) -> Arc<DraftPlan> {
        let writer_rules = prompts::writer_rules(kind, &outline);
        Arc::new(DraftPlan {
            kind: kind_name.to_string(),
            writer_instructions: prompts::writer_instructions(config, kind, &writer_rules),
            reviewer_instructions: prompts::reviewer_instructions(config, kind, &prompts::review_rules(kind, &outline)),
            reviser_instructions: std::sync::OnceLock::new(),
            format: kind.structured_draft.then(|| Arc::new(schema::draft_format(kind, &outline))),
            outline,
        })
    }

    fn reviser_instructions(&self, config: &Config, kind: &KindConfig) -> &Arc<str> {
        self.reviser_instructions
            .get_or_init(|| prompts::reviser_instructions(config, kind, &prompts::writer_rules(kind, &self.outline)))
    }
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
    fn request(s: &Services, job: &RouteJob, a: Attempt<'_>) -> LlmRequest {
        let p = prompts::route_with_instructions(&s.formats.router_instructions, &job.topic.topic, a.feedback);
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
    fn request(s: &Services, job: &PlanJob, a: Attempt<'_>) -> LlmRequest {
        let kind = s.kind(&job.kind);
        let p = prompts::plan(&s.config, kind, &job.topic.topic, a.feedback);
        request_for::<Self>(s, job, p, a, Some(s.formats.outline(&job.kind)))
    }
    fn gate(s: &Services, job: &PlanJob, text: &str) -> Result<Outline, GateError> {
        gates::check_outline(text, s.kind(&job.kind))
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
    fn request(s: &Services, job: &WriteJob, a: Attempt<'_>) -> LlmRequest {
        let p = prompts::write_with(&job.plan.writer_instructions, &job.topic.topic, a.feedback);
        request_for::<Self>(s, job, p, a, job.plan.format.clone())
    }
    fn gate(s: &Services, job: &WriteJob, text: &str) -> Result<Draft, GateError> {
        gate_draft(s.kind(&job.plan.kind), &job.plan.outline, text)
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
    fn request(s: &Services, job: &ReviewJob, a: Attempt<'_>) -> LlmRequest {
        let p = prompts::review_with(&job.plan.reviewer_instructions, &job.topic.topic, &job.draft, a.feedback);
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
    fn request(s: &Services, job: &ReviseJob, a: Attempt<'_>) -> LlmRequest {
        let input = prompts::RevisionInput {
            topic: &job.topic.topic,
            draft: &job.draft,
            review: &job.review,
            human_note: job.human_note.as_deref(),
        };
        let instructions = job.plan.reviser_instructions(&s.config, s.kind(&job.plan.kind));
        let p = prompts::revise_with(instructions, &input, a.feedback);
        request_for::<Self>(s, job, p, a, job.plan.format.clone())
    }
    fn gate(s: &Services, job: &ReviseJob, text: &str) -> Result<Draft, GateError> {
        gate_draft(s.kind(&job.plan.kind), &job.plan.outline, text)
    }
}

fn gate_draft(kind: &KindConfig, outline: &Outline, text: &str) -> Result<Draft, GateError> {
    if kind.structured_draft {
        gates::check_structured_draft(text, outline, kind)
    } else {
        gates::check_draft(text, outline, kind)
    }
}

// ---- the actor -------------------------------------------------------------

/// How an injected panic's message starts (the binary keeps them out of
/// stderr: they are counted, and the supervisor logs each restart).
pub const CHAOS_PANIC: &str = "chaos: injected panic";

/// Counts injected panics, so chaos runs can compare them with restarts.
pub static INJECTED_PANICS: AtomicU64 = AtomicU64::new(0);

pub struct StageActor<S: Stage> {
    _stage: PhantomData<fn() -> S>,
}

impl<S: Stage> Default for StageActor<S> {
    fn default() -> Self {
        Self { _stage: PhantomData }
    }
}

pub type Router = StageActor<RouteStage>;
pub type Planner = StageActor<PlanStage>;
pub type Writer = StageActor<WriteStage>;
pub type Reviewer = StageActor<ReviewStage>;
pub type Reviser = StageActor<ReviseStage>;

impl<S: Stage> Actor for StageActor<S> {
    type Msg = StageMsg<S>;
    type State = Arc<Services>;
    type Arguments = Arc<Services>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        services: Arc<Services>,
    ) -> Result<Arc<Services>, ActorProcessingErr> {
        Ok(services)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        services: &mut Arc<Services>,
    ) -> Result<(), ActorProcessingErr> {
        let StageMsg::Run(job, reply) = message;
        let rate = services.config.chaos.actor_panic_rate;
        if rate > 0.0 && rand::rng().random::<f64>() < rate {
            INJECTED_PANICS.fetch_add(1, Ordering::Relaxed);
            panic!("{CHAOS_PANIC} in {}", S::NAME);
        }
        let services = Arc::clone(services);
        tokio::spawn(async move {
            let result = run_stage::<S>(&services, &job).await;
            // The caller may have given up (cancelled topic); nothing to do.
            let _ = reply.send(result);
        });
        Ok(())
    }
}

/// Runs one step with its retries and reports each attempt as an event.
pub async fn run_stage<S: Stage>(services: &Services, job: &S::Job) -> StageResult<S::Output> {
    let ctx = S::topic(job);
    let pos = S::position(job);
    let observe = |r: &AttemptReport| {
        if let Some((reason, message)) = &r.failure {
            tracing::warn!(topic_id = %ctx.id, step = %r.step, attempt = r.attempt, reason = reason.as_str(), error = %message, "step attempt failed");
        }
        services.events.emit(|| TopicEvent {
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
    let span = tracing::info_span!("step", topic_id = %ctx.id, step = S::STEP.as_str(), variant = pos.variant, revision = pos.revision);
    services
        .caller
        .call(S::STEP, |a| S::request(services, job, a), |text| S::gate(services, job, text), &observe)
        .instrument(span)
        .await
}
