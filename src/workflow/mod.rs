//! The workflow's vocabulary: typed step outputs (`Route`, `Outline`, `Draft`,
//! `Review`), the JSON Schemas sent to the model (derived from those types),
//! the validation gates, and the prompts.
//!
//! Owns: what a valid step output is, and what we ask the model for.
//! Must not: do I/O, call a provider or know about actors. Everything here is
//! pure so it can be tested table-driven and reused by fakes.

pub mod budget;
pub mod decide;
pub mod gates;
pub mod plan;
pub mod prompts;
pub mod schema;

use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The model-backed steps of a topic's workflow. Names are part of the wire
/// (events, metrics labels), keep them stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    Route,
    Plan,
    Write,
    Review,
    Revise,
}

impl Step {
    pub const ALL: [Step; 5] = [Step::Route, Step::Plan, Step::Write, Step::Review, Step::Revise];

    pub fn as_str(self) -> &'static str {
        match self {
            Step::Route => "route",
            Step::Plan => "plan",
            Step::Write => "write",
            Step::Review => "review",
            Step::Revise => "revise",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Router output: which workflow kind fits the topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Route {
    /// One of the configured workflow kinds.
    pub kind: String,
}

/// Planner output: a title and the section headings the writer must use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Outline {
    /// Title of the piece, plain text.
    pub title: String,
    /// Section headings in order, plain text, no conclusion.
    pub sections: Vec<String>,
}

/// Writer/reviser output: a markdown document. Not JSON: the text is the
/// output, checked by `gates::check_draft`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Draft {
    /// Shared: a draft is handed to reviewers, journals and state without
    /// copying its text.
    pub markdown: Arc<str>,
    pub words: u32,
}

/// Reviewer output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Review {
    /// True only when the draft is ready to publish.
    pub approved: bool,
    /// Overall quality from 0 (unusable) to 10 (excellent).
    pub score: u8,
    /// Concrete problems found in the draft.
    pub issues: Vec<String>,
    /// Concrete changes that would fix the issues.
    pub suggestions: Vec<String>,
}
