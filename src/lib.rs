//! Scriptorium turns topics into reviewed drafts with LLMs.
//!
//! Code controls, the model writes: Rust decides sequence, validation,
//! branching, retries and logging; the model only does language work.
//! See `ARCHITECTURE.md` for the module map and invariants.

pub mod config;
pub mod llm;
pub mod workflow;
pub mod events;
pub mod state;
pub mod store;
