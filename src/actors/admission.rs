//! The `Admission` actor: how many topics this process holds (reserved for
//! a submit in progress, queued, running), the answer `busy` when the queue
//! is full, the cancellation handles of running topics, and draining.
//!
//! Its handlers never await anything: the queue and the store are called by
//! the engine and the dispatcher, which only tell this actor what happened.
//! Must not: run topics (the runner does), or touch the store or the queue.

use std::collections::HashMap;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio_util::sync::CancellationToken;

pub enum AdmissionMsg {
    /// Reserve a queue slot before the durable insert; false = busy.
    Reserve(RpcReplyPort<bool>),
    /// Give back a reservation whose insert failed or was a duplicate.
    Release,
    /// A reservation's topic was pushed to the queue.
    Queued,
    /// Topics pushed without a reservation (resume, a human's rejection).
    Requeued(usize),
    /// A queued topic was taken out of the queue by a cancel.
    Dequeued,
    /// The dispatcher claimed a topic and started its runner.
    Started { id: String, cancel: CancellationToken },
    /// A runner ended (finished, parked, cancelled or cut off).
    Finished(String),
    /// Cancel a running topic's work: its in-flight calls are dropped.
    Cancel(String, RpcReplyPort<bool>),
    /// (running, queued)
    Counts(RpcReplyPort<(usize, usize)>),
    /// Refuse new work from now on (shutdown).
    Drain(RpcReplyPort<()>),
}

pub struct AdmissionArgs {
    pub max_in_flight: usize,
    pub max_queued: usize,
}

pub struct AdmissionState {
    args: AdmissionArgs,
    reserved: usize,
    queued: usize,
    running: HashMap<String, CancellationToken>,
    draining: bool,
    in_flight_gauge: metrics::Gauge,
    queued_gauge: metrics::Gauge,
}

impl AdmissionState {
    fn publish_gauges(&self) {
        self.in_flight_gauge.set(self.running.len() as f64);
        self.queued_gauge.set((self.queued + self.reserved) as f64);
    }
}

pub struct Admission;

impl Actor for Admission {
    type Msg = AdmissionMsg;
    type State = AdmissionState;
    type Arguments = AdmissionArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: AdmissionArgs,
    ) -> Result<AdmissionState, ActorProcessingErr> {
        Ok(AdmissionState {
            args,
            reserved: 0,
            queued: 0,
            running: HashMap::new(),
            draining: false,
            in_flight_gauge: metrics::gauge!("scriptorium_topics_in_flight"),
            queued_gauge: metrics::gauge!("scriptorium_topics_queued"),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut AdmissionState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AdmissionMsg::Reserve(reply) => {
                // Free in-flight capacity counts as room: such a topic starts
                // at once and never waits in the queue.
                let free_slots = state.args.max_in_flight.saturating_sub(state.running.len());
                let waiting = state.queued + state.reserved;
                let ok = !state.draining && waiting < state.args.max_queued + free_slots;
                if ok {
                    state.reserved += 1;
                }
                let _ = reply.send(ok);
            }
            AdmissionMsg::Release => state.reserved = state.reserved.saturating_sub(1),
            AdmissionMsg::Queued => {
                state.reserved = state.reserved.saturating_sub(1);
                state.queued += 1;
            }
            AdmissionMsg::Requeued(n) => state.queued += n,
            AdmissionMsg::Dequeued => state.queued = state.queued.saturating_sub(1),
            AdmissionMsg::Started { id, cancel } => {
                state.queued = state.queued.saturating_sub(1);
                state.running.insert(id, cancel);
            }
            AdmissionMsg::Finished(id) => {
                state.running.remove(&id);
            }
            AdmissionMsg::Cancel(id, reply) => {
                let running = match state.running.get(&id) {
                    Some(token) => {
                        token.cancel();
                        true
                    }
                    None => false,
                };
                let _ = reply.send(running);
            }
            AdmissionMsg::Counts(reply) => {
                let _ = reply.send((state.running.len(), state.queued + state.reserved));
            }
            AdmissionMsg::Drain(reply) => {
                state.draining = true;
                let _ = reply.send(());
            }
        }
        state.publish_gauges();
        Ok(())
    }
}
