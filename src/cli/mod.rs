//! Command implementations for the binary.

pub mod bench;
pub mod client;
pub mod daemon;
pub mod fake;
pub mod run;
