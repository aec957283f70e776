//! Scriptorium turns topics into reviewed drafts with LLMs.
//!
//! Code controls, the model writes: Rust decides sequence, validation,
//! branching, retries and logging; the model only does language work.
//! See `ARCHITECTURE.md` for the module map and invariants.

pub mod actors;
pub mod config;
pub mod engine;
pub mod events;
pub mod fake_openai;
pub mod llm;
pub mod paths;
pub mod queue;
pub mod scaleout;
pub mod server;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod traces;
pub mod web;
pub mod workflow;

pub use engine::{EngineError, EngineOptions, Scriptorium, SubmitReceipt, SubmitRequest};
