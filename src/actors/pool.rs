//! The stage pools: one ractor factory per stage (router, planner, writer,
//! reviewer, reviser), each a pool of `StageWorker`s behind a queue
//! (`QueuerRouting`: a job goes to the next free worker, so no topic waits
//! behind another topic's call while a worker is free), and the restart
//! policy that watches them all.
//!
//! Supervision: the factory is each worker's supervisor. A worker that
//! panics is replaced at once; a worker busy with one job for longer than
//! `supervision.step_timeout_s` is killed by the factory's dead man's switch
//! and replaced. Every replacement passes through `StageWorkerBuilder::build`,
//! where `Supervision` counts it; more than `supervision.max_restarts` within
//! `supervision.window_s` escalates: callers fail fast with the reason and
//! the engine refuses new work. The job the lost worker held comes back to
//! its caller as one failed attempt (`LlmError::WorkerLost`), counted
//! against `retry.max_attempts`: never re-sent behind the retry loop's back.
//! Must not: retry, journal, or run anything but the stage's own attempts.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ractor::factory::queues::DefaultQueue;
use ractor::factory::routing::QueuerRouting;
use ractor::factory::stats::FactoryStatsLayer;
use ractor::factory::{
    DeadMansSwitchConfiguration, Factory, FactoryArguments, FactoryMessage, Job, WorkerBuilder, WorkerId,
};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::stage::{
    AttemptJob, PlanStage, ReviewStage, ReviseStage, RouteStage, Stage, StageMsg, StageWorker, WriteStage,
};
use super::Services;
use crate::llm::retry::{Attempt, AttemptOutcome};
use crate::llm::LlmError;

/// The pools' names, as the `actor` / `stage` metric labels.
pub const STAGE_NAMES: [&str; 5] = ["router", "planner", "writer", "reviewer", "reviser"];

/// Stage workers restarted by any pool in this process (panics and
/// hang-kills). Chaos runs compare it with `stage::INJECTED_PANICS`; unlike
/// the `scriptorium_actor_restarts_total` metric it needs no recorder.
pub static ACTOR_RESTARTS: AtomicU64 = AtomicU64::new(0);

/// The restart-intensity limit shared by the five pools.
pub struct Supervision {
    max_restarts: u32,
    window: Duration,
    restarts: Mutex<VecDeque<Instant>>,
    escalated: RwLock<Option<String>>,
    escalation: watch::Sender<Option<String>>,
}

impl Supervision {
    pub fn new(max_restarts: u32, window: Duration) -> Arc<Supervision> {
        let (escalation, _) = watch::channel(None);
        Arc::new(Supervision {
            max_restarts,
            window,
            restarts: Mutex::new(VecDeque::new()),
            escalated: RwLock::new(None),
            escalation,
        })
    }

    /// Why supervision gave up, once it has.
    pub fn escalated(&self) -> Option<String> {
        match self.escalated.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Changes to `Some(reason)` when supervision gives up.
    pub fn subscribe(&self) -> watch::Receiver<Option<String>> {
        self.escalation.subscribe()
    }

    /// Counts one worker replacement; escalates past the limit.
    fn restarted(&self, stage: &'static str) {
        ACTOR_RESTARTS.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("scriptorium_actor_restarts_total", "actor" => stage).increment(1);
        let now = Instant::now();
        let in_window = {
            let mut restarts = match self.restarts.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            restarts.push_back(now);
            while restarts.front().is_some_and(|t| now.duration_since(*t) > self.window) {
                restarts.pop_front();
            }
            restarts.len()
        };
        if in_window as u32 <= self.max_restarts {
            tracing::warn!(stage, "stage worker failed; restarted");
            return;
        }
        if self.escalated().is_some() {
            return;
        }
        let reason = format!(
            "{in_window} stage workers failed within {:?} (limit supervision.max_restarts = {}); last: {stage}",
            self.window, self.max_restarts
        );
        tracing::error!(stage, %reason, "restart storm: escalating");
        match self.escalated.write() {
            Ok(mut g) => *g = Some(reason.clone()),
            Err(p) => *p.into_inner() = Some(reason.clone()),
        }
        self.escalation.send_replace(Some(reason));
    }
}

/// Builds (and rebuilds) a pool's workers. The factory calls `build` for
/// every worker it starts: the first call per worker id is the initial
/// spawn, every later one a restart.
struct StageWorkerBuilder<S: Stage> {
    services: Arc<Services>,
    supervision: Arc<Supervision>,
    started: HashSet<WorkerId>,
    _stage: std::marker::PhantomData<fn() -> S>,
}

impl<S: Stage> WorkerBuilder<StageWorker<S>, Arc<Services>> for StageWorkerBuilder<S> {
    fn build(&mut self, wid: WorkerId) -> (StageWorker<S>, Arc<Services>) {
        if !self.started.insert(wid) {
            self.supervision.restarted(S::NAME);
        }
        (StageWorker::default(), Arc::clone(&self.services))
    }
}

/// Queue depth and busy workers of one pool, as gauges (the factory
/// reports them about once a second).
struct PoolStats {
    queued: metrics::Gauge,
    busy: metrics::Gauge,
    workers: metrics::Gauge,
}

impl PoolStats {
    fn new(stage: &'static str) -> PoolStats {
        PoolStats {
            queued: metrics::gauge!("scriptorium_stage_queue_depth", "stage" => stage),
            busy: metrics::gauge!("scriptorium_stage_busy_workers", "stage" => stage),
            workers: metrics::gauge!("scriptorium_stage_workers", "stage" => stage),
        }
    }
}

impl FactoryStatsLayer for PoolStats {
    fn record_queue_depth(&self, _factory: &str, depth: usize) {
        self.queued.set(depth as f64);
    }
    fn record_processing_messages_count(&self, _factory: &str, count: usize) {
        self.busy.set(count as f64);
    }
    fn record_worker_count(&self, _factory: &str, count: usize) {
        self.workers.set(count as f64);
    }
}

type PoolRef<S> = ActorRef<FactoryMessage<(), StageMsg<S>>>;

/// One stage's pool.
pub struct StagePool<S: Stage> {
    factory: PoolRef<S>,
}

impl<S: Stage> StagePool<S> {
    async fn start(
        services: &Arc<Services>,
        supervision: &Arc<Supervision>,
        workers: usize,
        step_timeout: Duration,
    ) -> Result<StagePool<S>, ractor::SpawnErr> {
        let builder = StageWorkerBuilder::<S> {
            services: Arc::clone(services),
            supervision: Arc::clone(supervision),
            started: HashSet::new(),
            _stage: std::marker::PhantomData,
        };
        let args = FactoryArguments::builder()
            .worker_builder(Box::new(builder))
            .num_initial_workers(workers)
            .queue(DefaultQueue::default())
            .router(QueuerRouting::default())
            .dead_mans_switch(DeadMansSwitchConfiguration::builder().detection_timeout(step_timeout).build())
            .stats(Arc::new(PoolStats::new(S::NAME)) as Arc<dyn FactoryStatsLayer>)
            .build();
        let factory = Factory::<(), StageMsg<S>, Arc<Services>, StageWorker<S>, _, _>::default();
        let (factory, _) = Actor::spawn(None, factory, args).await?;
        Ok(StagePool { factory })
    }

    fn stop(&self) {
        self.factory.stop(None);
    }
}

/// The five pools, and the policy that watches them.
pub struct StagePools {
    pub router: StagePool<RouteStage>,
    pub planner: StagePool<PlanStage>,
    pub writer: StagePool<WriteStage>,
    pub reviewer: StagePool<ReviewStage>,
    pub reviser: StagePool<ReviseStage>,
    pub supervision: Arc<Supervision>,
    step_timeout: Duration,
}

impl StagePools {
    pub async fn start(services: &Arc<Services>) -> Result<StagePools, ractor::SpawnErr> {
        let c = &services.config.supervision;
        let supervision = Supervision::new(c.max_restarts, Duration::from_secs_f64(c.window_s));
        let (n, t) = (c.stage_workers, Duration::from_secs_f64(c.step_timeout_s));
        Ok(StagePools {
            router: StagePool::start(services, &supervision, n, t).await?,
            planner: StagePool::start(services, &supervision, n, t).await?,
            writer: StagePool::start(services, &supervision, n, t).await?,
            reviewer: StagePool::start(services, &supervision, n, t).await?,
            reviser: StagePool::start(services, &supervision, n, t).await?,
            supervision,
            step_timeout: t,
        })
    }

    pub fn stop(&self) {
        self.router.stop();
        self.planner.stop();
        self.writer.stop();
        self.reviewer.stop();
        self.reviser.stop();
    }

    /// Runs one attempt of a step on the stage's pool and waits for it. A
    /// worker lost while holding the job (panic, or killed for hanging) is
    /// one failed attempt; so is a pool that does not answer within three
    /// step timeouts and a second (the dead man's switch checks once per
    /// timeout, so it has killed a stuck worker by then).
    pub async fn attempt<S: Stage>(
        &self,
        pool: &StagePool<S>,
        job: S::Job,
        attempt: Attempt,
        cancel: &CancellationToken,
    ) -> AttemptOutcome<S::Output> {
        if let Some(reason) = self.supervision.escalated() {
            return AttemptOutcome::without_call(
                LlmError::Fatal { status: None, message: format!("supervision escalated: {reason}") },
                Duration::ZERO,
            );
        }
        let started = Instant::now();
        let message = AttemptJob { job, attempt, cancel: cancel.clone() };
        let backstop = self.step_timeout.saturating_mul(3).saturating_add(Duration::from_secs(1));
        let call = pool
            .factory
            .call(|port| FactoryMessage::Dispatch(Job::new((), StageMsg::Run(message, port))), Some(backstop));
        let answer = tokio::select! {
            biased;
            _ = cancel.cancelled() => return AttemptOutcome::without_call(LlmError::Cancelled, started.elapsed()),
            answer = call => answer,
        };
        match answer {
            Ok(CallResult::Success(outcome)) => outcome,
            Ok(CallResult::Timeout) => AttemptOutcome::without_call(LlmError::Timeout(backstop), started.elapsed()),
            Ok(CallResult::SenderError) | Err(_) => {
                let waited = started.elapsed();
                if let Some(reason) = self.supervision.escalated() {
                    let message = format!("supervision escalated: {reason}");
                    return AttemptOutcome::without_call(LlmError::Fatal { status: None, message }, waited);
                }
                // The worker died holding the job. Killed by the dead man's
                // switch after the step timeout: a timeout; else a panic.
                let error = if waited >= self.step_timeout {
                    LlmError::Timeout(self.step_timeout)
                } else {
                    LlmError::WorkerLost(format!("the {} worker running this attempt panicked", S::NAME))
                };
                // A request may have gone out before the worker died: the
                // usage is lost with it, the call is not.
                AttemptOutcome {
                    result: Err(error),
                    usage: Default::default(),
                    waited,
                    elapsed: Duration::ZERO,
                    called: true,
                }
            }
        }
    }
}
