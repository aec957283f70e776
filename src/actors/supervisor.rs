//! `StageSupervisor`: owns the five stage actors, restarts one that fails,
//! and escalates a restart storm.
//!
//! ractor's default supervisor behaviour is to stop when a child fails and
//! it has no restart-intensity limit; the policy here is ours: restart the
//! failed stage at once, count restarts in a sliding window, and when more
//! than `supervision.max_restarts` happen within `supervision.window_s`,
//! mark the directory escalated (callers fail fast with that reason) and
//! stop, so the daemon exits with a clear error instead of looping.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::watch;

use super::stage::{PlanStage, ReviewStage, ReviseStage, RouteStage, Stage, StageActor};
use super::{Services, Slot, StageDirectory};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageKind {
    Router,
    Planner,
    Writer,
    Reviewer,
    Reviser,
}

impl StageKind {
    pub const ALL: [StageKind; 5] =
        [StageKind::Router, StageKind::Planner, StageKind::Writer, StageKind::Reviewer, StageKind::Reviser];

    pub fn as_str(self) -> &'static str {
        match self {
            StageKind::Router => "router",
            StageKind::Planner => "planner",
            StageKind::Writer => "writer",
            StageKind::Reviewer => "reviewer",
            StageKind::Reviser => "reviser",
        }
    }
}

/// The supervisor takes no messages of its own; it reacts to supervision
/// events only.
pub enum SupervisorMsg {}

pub struct SupervisorArgs {
    pub services: Arc<Services>,
    pub directory: Arc<StageDirectory>,
    pub max_restarts: u32,
    pub window: Duration,
    /// Set to the reason when the supervisor escalates.
    pub escalation: watch::Sender<Option<String>>,
}

pub struct SupervisorState {
    args: SupervisorArgs,
    children: HashMap<ActorId, StageKind>,
    restarts: VecDeque<Instant>,
    generation: u64,
}

pub struct StageSupervisor;

static ACTOR_SERIAL: AtomicU64 = AtomicU64::new(1);

/// Stage actors restarted by any supervisor in this process. Chaos runs
/// compare it with `stage::INJECTED_PANICS`; unlike the
/// `scriptorium_actor_restarts_total` metric it needs no recorder.
pub static ACTOR_RESTARTS: AtomicU64 = AtomicU64::new(0);

async fn spawn_one<S: Stage>(
    slot: &Slot<S>,
    services: &Arc<Services>,
    generation: u64,
    supervisor: ActorCell,
) -> Result<ActorId, ActorProcessingErr> {
    // Names are process-global in ractor's registry, and a dead actor's
    // name may not be unregistered yet when its replacement starts: number
    // them across every engine in the process.
    let name = format!("{}-{}", S::NAME, ACTOR_SERIAL.fetch_add(1, Ordering::Relaxed));
    let _ = generation;
    let (actor, _join) =
        Actor::spawn_linked(Some(name), StageActor::<S>::default(), Arc::clone(services), supervisor).await?;
    let id = actor.get_id();
    slot.set(Some(actor));
    Ok(id)
}

impl SupervisorState {
    async fn spawn(&mut self, kind: StageKind, me: ActorCell) -> Result<(), ActorProcessingErr> {
        self.generation += 1;
        let (dir, s, g) = (&self.args.directory, &self.args.services, self.generation);
        let id = match kind {
            StageKind::Router => spawn_one::<RouteStage>(&dir.router, s, g, me).await?,
            StageKind::Planner => spawn_one::<PlanStage>(&dir.planner, s, g, me).await?,
            StageKind::Writer => spawn_one::<super::stage::WriteStage>(&dir.writer, s, g, me).await?,
            StageKind::Reviewer => spawn_one::<ReviewStage>(&dir.reviewer, s, g, me).await?,
            StageKind::Reviser => spawn_one::<ReviseStage>(&dir.reviser, s, g, me).await?,
        };
        self.children.insert(id, kind);
        Ok(())
    }

    /// Records a restart; true when the storm limit is exceeded.
    fn storm(&mut self) -> bool {
        let now = Instant::now();
        self.restarts.push_back(now);
        while self.restarts.front().is_some_and(|t| now.duration_since(*t) > self.args.window) {
            self.restarts.pop_front();
        }
        self.restarts.len() as u32 > self.args.max_restarts
    }
}

impl Actor for StageSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let mut state = SupervisorState { args, children: HashMap::new(), restarts: VecDeque::new(), generation: 0 };
        for kind in StageKind::ALL {
            state.spawn(kind, myself.get_cell()).await?;
        }
        Ok(state)
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let SupervisionEvent::ActorFailed(cell, err) = event else {
            // Normal stops happen at shutdown; nothing to restart.
            return Ok(());
        };
        let Some(kind) = state.children.remove(&cell.get_id()) else { return Ok(()) };
        metrics::counter!("scriptorium_actor_restarts_total", "actor" => kind.as_str()).increment(1);
        if state.storm() {
            let reason = format!(
                "{} stage actors failed within {:?} (limit supervision.max_restarts = {}); last: {} failed with: {}",
                state.restarts.len(),
                state.args.window,
                state.args.max_restarts,
                kind.as_str(),
                one_line(&err.to_string()),
            );
            tracing::error!(actor = kind.as_str(), %reason, "restart storm: escalating");
            state.args.directory.escalate(reason.clone());
            let _ = state.args.escalation.send(Some(reason.clone()));
            myself.stop(Some(reason));
            return Ok(());
        }
        tracing::warn!(actor = kind.as_str(), error = %one_line(&err.to_string()), "stage actor failed; restarting");
        state.spawn(kind, myself.get_cell()).await?;
        ACTOR_RESTARTS.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let d = &state.args.directory;
        d.router.set(None);
        d.planner.set(None);
        d.writer.set(None);
        d.reviewer.set(None);
        d.reviser.set(None);
        Ok(())
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
