//! Actors: the five stage pools (ractor factories of workers that run the
//! steps), the admission actor (queue bound, running topics, cancel, drain),
//! and the topic runner that takes each claimed topic through the workflow.
//!
//! Message flow (see ARCHITECTURE.md):
//! `Engine::submit` → `Admission` (reserve) → store insert → `TopicQueue`
//! push → dispatcher claims a lease → `TopicRunner` loop: `decide` → one
//! attempt at a time on the stage's pool (`StagePools::attempt`, inside
//! `StepCaller::call`) → journal (durable) → decide again.
//!
//! Must not: do network I/O except through `llm::retry::StepCaller`, or
//! start a step before the previous step's record is journaled.

pub mod admission;
pub mod pool;
pub mod runner;
pub mod stage;

use std::sync::Arc;

use crate::config::Config;
use crate::events::EventBus;
use crate::llm::retry::StepCaller;
use crate::workflow::plan::Formats;

/// What the stage workers share.
pub struct Services {
    pub config: Arc<Config>,
    pub caller: StepCaller,
    pub formats: Formats,
    pub events: EventBus,
}

impl Services {
    pub fn new(config: Arc<Config>, caller: StepCaller, events: EventBus) -> Services {
        Services { formats: Formats::new(&config), config, caller, events }
    }
}
