//! Actors: the five stage actors, the supervisor that restarts them, and the
//! coordinator that admits topics and drives each one through the workflow.
//!
//! Message flow (see ARCHITECTURE.md):
//! `Engine::submit` → `Coordinator` (admission, queue, in-flight bound) →
//! topic driver task → `StageDirectory::ask::<S>` → stage actor → model call
//! task → reply → driver journals the step → next step.
//!
//! Must not: do network I/O except through `llm::retry::StepCaller`, or
//! start a step before the previous step's record is journaled.

pub mod coordinator;
pub mod stage;
pub mod supervisor;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::ActorRef;

use crate::config::{Config, KindConfig};
use crate::events::EventBus;
use crate::llm::retry::{StepCaller, StepFailure};
use crate::llm::{LlmError, Usage};
use crate::workflow::schema::{self, StructuredFormat};
use stage::{PlanStage, ReviewStage, ReviseStage, RouteStage, Stage, StageMsg, StageResult, WriteStage};

/// Structured-output schemas, built once from the config.
pub struct Formats {
    pub kind_names: Vec<String>,
    pub route: Arc<StructuredFormat>,
    /// The router's prompt instructions (config-only, so built once).
    pub router_instructions: Arc<str>,
    pub review: Arc<StructuredFormat>,
    outlines: HashMap<String, Arc<StructuredFormat>>,
}

impl Formats {
    pub fn new(config: &Config) -> Formats {
        let kind_names = config.kind_names();
        Formats {
            route: Arc::new(schema::route_format(&kind_names)),
            router_instructions: crate::workflow::prompts::router_instructions(config).into(),
            review: Arc::new(schema::review_format_for(config.llm.steps.review.max_output_tokens)),
            outlines: config.kinds.iter().map(|(n, k)| (n.clone(), Arc::new(schema::outline_format(k)))).collect(),
            kind_names,
        }
    }

    pub fn outline(&self, kind: &str) -> Arc<StructuredFormat> {
        match self.outlines.get(kind) {
            Some(f) => Arc::clone(f),
            // Kinds are validated at submit; fall back rather than panic.
            None => Arc::new(schema::outline_format(&KindConfig::default())),
        }
    }
}

/// What the stage actors share.
pub struct Services {
    pub config: Arc<Config>,
    pub caller: StepCaller,
    pub formats: Formats,
    pub events: EventBus,
    fallback_kind: KindConfig,
}

impl Services {
    pub fn new(config: Arc<Config>, caller: StepCaller, events: EventBus) -> Services {
        Services { formats: Formats::new(&config), config, caller, events, fallback_kind: KindConfig::default() }
    }

    pub fn kind(&self, name: &str) -> &KindConfig {
        self.config.kinds.get(name).unwrap_or(&self.fallback_kind)
    }
}

/// The current `ActorRef` of one stage; replaced by the supervisor on
/// restart.
pub struct Slot<S: Stage>(RwLock<Option<ActorRef<StageMsg<S>>>>);

impl<S: Stage> Default for Slot<S> {
    fn default() -> Self {
        Slot(RwLock::new(None))
    }
}

impl<S: Stage> Slot<S> {
    pub fn get(&self) -> Option<ActorRef<StageMsg<S>>> {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn set(&self, actor: Option<ActorRef<StageMsg<S>>>) {
        match self.0.write() {
            Ok(mut g) => *g = actor,
            Err(p) => *p.into_inner() = actor,
        }
    }
}

/// Where callers find the stage actors, and whether supervision gave up.
#[derive(Default)]
pub struct StageDirectory {
    pub router: Slot<RouteStage>,
    pub planner: Slot<PlanStage>,
    pub writer: Slot<WriteStage>,
    pub reviewer: Slot<ReviewStage>,
    pub reviser: Slot<ReviseStage>,
    escalated: RwLock<Option<String>>,
}

/// How long to wait for a restarted stage actor before trying again.
const RESEND_PAUSE: Duration = Duration::from_millis(2);
/// Re-sends of one request before we call the stage unavailable (~10 s).
const MAX_RESENDS: u32 = 5000;

impl StageDirectory {
    pub fn escalated(&self) -> Option<String> {
        match self.escalated.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn escalate(&self, reason: String) {
        match self.escalated.write() {
            Ok(mut g) => *g = Some(reason),
            Err(p) => *p.into_inner() = Some(reason),
        }
    }

    /// Sends a job to the stage's current actor and waits for its result. A
    /// request lost to an actor failure is re-sent to the restarted actor.
    pub async fn ask<S: Stage>(&self, slot: &Slot<S>, job: S::Job, step_timeout: Duration) -> StageResult<S::Output> {
        let mut resends = 0;
        loop {
            if let Some(reason) = self.escalated() {
                return Err(unavailable(format!("supervision escalated: {reason}")));
            }
            let outcome = match slot.get() {
                Some(actor) => Some(actor.call(|port| StageMsg::Run(job.clone(), port), Some(step_timeout)).await),
                None => None,
            };
            match outcome {
                Some(Ok(CallResult::Success(result))) => return result,
                Some(Ok(CallResult::Timeout)) => {
                    // The attempts inside were counted by `StepCaller`; the
                    // step-level timeout that ends them is a failure too.
                    metrics::counter!(
                        "scriptorium_step_failures_total",
                        "step" => S::STEP.as_str(),
                        "reason" => "timeout"
                    )
                    .increment(1);
                    return Err(StepFailure {
                        error: LlmError::Timeout(step_timeout),
                        attempts: 0,
                        calls: 0,
                        usage: Usage::default(),
                    });
                }
                // The actor died holding our request (or before taking it).
                Some(Ok(CallResult::SenderError)) | Some(Err(_)) => {
                    metrics::counter!(
                        "scriptorium_step_failures_total",
                        "step" => S::STEP.as_str(),
                        "reason" => "actor_restart"
                    )
                    .increment(1);
                }
                None => {}
            }
            resends += 1;
            if resends > MAX_RESENDS {
                return Err(unavailable(format!("{} actor unavailable", S::NAME)));
            }
            tokio::time::sleep(RESEND_PAUSE).await;
        }
    }
}

fn unavailable(message: String) -> StepFailure {
    StepFailure { error: LlmError::Fatal { status: None, message }, attempts: 0, calls: 0, usage: Usage::default() }
}
