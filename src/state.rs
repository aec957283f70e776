//! `TopicState` (the full state JSON that `run --json`, `--out`, the daemon's
//! `result` op and the per-topic files show) and `JournalRecord` (one
//! completed step, as persisted).
//!
//! These are wire types: versioned, serde, kept separate from actor messages.
//! A topic's state is always `TopicState::new` + its journal replayed with
//! `apply`; that is how a restarted daemon resumes without re-running steps.
//! Must not: do I/O.

use serde::{Deserialize, Serialize};

use crate::llm::{FailureReason, Usage};
use crate::workflow::{Draft, Outline, Review, Step};

/// Bump when a field changes meaning; readers reject newer versions.
pub const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopicStatus {
    Queued,
    Running,
    AwaitingApproval,
    Completed,
    Failed,
    Cancelled,
    /// Claimed `store.max_deliveries` times without finishing (the daemons
    /// running it kept dying): parked instead of run again. Terminal.
    DeadLetter,
}

impl TopicStatus {
    pub const ALL: [TopicStatus; 7] = [
        TopicStatus::Queued,
        TopicStatus::Running,
        TopicStatus::AwaitingApproval,
        TopicStatus::Completed,
        TopicStatus::Failed,
        TopicStatus::Cancelled,
        TopicStatus::DeadLetter,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TopicStatus::Queued => "queued",
            TopicStatus::Running => "running",
            TopicStatus::AwaitingApproval => "awaiting_approval",
            TopicStatus::Completed => "completed",
            TopicStatus::Failed => "failed",
            TopicStatus::Cancelled => "cancelled",
            TopicStatus::DeadLetter => "dead_letter",
        }
    }

    pub fn parse(s: &str) -> Option<TopicStatus> {
        TopicStatus::ALL.into_iter().find(|t| t.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, TopicStatus::Completed | TopicStatus::Failed | TopicStatus::Cancelled | TopicStatus::DeadLetter)
    }

    /// Terminal, or parked waiting for a human: `result --wait` returns.
    pub fn is_settled(self) -> bool {
        self.is_terminal() || self == TopicStatus::AwaitingApproval
    }
}

/// Why a topic (or a variant) failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepError {
    pub step: Step,
    pub kind: FailureReason,
    pub message: String,
}

/// Tokens and money, summed over a topic's steps (or one step name's).
/// `cached_input_tokens` is part of `input_tokens` and `reasoning_tokens`
/// part of `output_tokens`. `cost_usd` is `None` as soon as one step with
/// calls had no price: a partial sum would understate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageTotals {
    pub llm_calls: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    // Defaults keep state files written before these fields readable.
    #[serde(default)]
    pub cached_input_tokens: u64,
    #[serde(default)]
    pub reasoning_tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

impl UsageTotals {
    /// Input + output tokens: what a token budget counts.
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens + self.output_tokens
    }

    pub fn charge(&mut self, cost: &StepCost) {
        if cost.calls == 0 {
            return;
        }
        self.cost_usd = match (self.llm_calls, self.cost_usd, cost.usage.cost_usd) {
            (0, _, step) => step,
            (_, Some(total), Some(step)) => Some(total + step),
            _ => None,
        };
        self.llm_calls += cost.calls as u64;
        self.input_tokens += cost.usage.input_tokens;
        self.output_tokens += cost.usage.output_tokens;
        self.cached_input_tokens += cost.usage.cached_input_tokens;
        self.reasoning_tokens += cost.usage.reasoning_tokens;
    }
}

/// A topic's own limits (`workflow.max_tokens` / `max_cost_usd`, or the
/// submitter's override), fixed at submit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TopicBudget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
}

impl TopicBudget {
    pub fn is_unlimited(&self) -> bool {
        self.max_tokens.is_none() && self.max_cost_usd.is_none()
    }
}

/// Cost of one step: calls made (all attempts) and tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StepCost {
    pub calls: u32,
    pub attempts: u32,
    pub usage: Usage,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepTiming {
    pub step: Step,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub variant: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub revision: Option<u32>,
    pub attempts: u32,
    /// Unix milliseconds.
    pub started_ms: u64,
    pub finished_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct VariantState {
    pub index: u32,
    pub draft: Option<Draft>,
    pub review: Option<Review>,
    pub error: Option<StepError>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevisionState {
    pub number: u32,
    pub draft: Draft,
    pub review: Option<Review>,
    /// The human reviewer's note this revision answered, if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub human_note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalDraft {
    pub draft: Draft,
    pub review: Review,
    /// `variant N` or `revision N`.
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Approved,
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRecord {
    pub decision: Decision,
    pub note: Option<String>,
    pub at_ms: u64,
}

/// What a submitter asked for. Persisted before the submit is acknowledged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Submission {
    pub id: String,
    pub topic: String,
    pub kind: Option<String>,
    pub variants: u32,
    pub require_approval: bool,
    pub idempotency_key: Option<String>,
    pub submitted_ms: u64,
    #[serde(default, skip_serializing_if = "TopicBudget::is_unlimited")]
    pub budget: TopicBudget,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopicState {
    pub version: u32,
    pub id: String,
    pub topic: String,
    /// The kind the submitter named, if any (routing is then skipped).
    pub requested_kind: Option<String>,
    /// The workflow kind chosen by the router (or requested).
    pub route: Option<String>,
    pub status: TopicStatus,
    /// The step running now, or the last one that finished.
    pub step: Option<String>,
    pub variants_requested: u32,
    pub require_approval: bool,
    pub idempotency_key: Option<String>,
    pub outline: Option<Outline>,
    pub variants: Vec<VariantState>,
    pub chosen_variant: Option<u32>,
    pub chosen_reason: Option<String>,
    pub revisions: Vec<RevisionState>,
    pub approvals: Vec<ApprovalRecord>,
    /// A human rejection waiting to be answered by a revision.
    pub pending_human_note: Option<String>,
    #[serde(rename = "final")]
    pub final_draft: Option<FinalDraft>,
    pub error: Option<StepError>,
    pub usage: UsageTotals,
    /// The same totals per step name (`route`, `plan`, `write`, `review`,
    /// `revise`).
    #[serde(default)]
    pub usage_by_step: std::collections::BTreeMap<String, UsageTotals>,
    /// The topic's limits; unlimited when absent.
    #[serde(default, skip_serializing_if = "TopicBudget::is_unlimited")]
    pub budget: TopicBudget,
    pub timings: Vec<StepTiming>,
    pub submitted_at_ms: u64,
    pub updated_at_ms: u64,
    pub finished_at_ms: Option<u64>,
}

/// One completed step or decision, in the order it happened. A failed
/// step's `timing` is `None` in journals written before failures had one,
/// and on `Failed` when no single step failed (every variant did).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JournalRecord {
    Started,
    Routed {
        kind: String,
        cost: StepCost,
        timing: Option<StepTiming>,
    },
    Planned {
        outline: Outline,
        cost: StepCost,
        timing: StepTiming,
    },
    Drafted {
        variant: u32,
        draft: Draft,
        cost: StepCost,
        timing: StepTiming,
    },
    Reviewed {
        variant: u32,
        review: Review,
        cost: StepCost,
        timing: StepTiming,
    },
    VariantFailed {
        variant: u32,
        error: StepError,
        cost: StepCost,
        timing: Option<StepTiming>,
    },
    Chosen {
        variant: u32,
        reason: String,
    },
    Revised {
        number: u32,
        draft: Draft,
        human_note: Option<String>,
        cost: StepCost,
        timing: StepTiming,
    },
    RevisionReviewed {
        number: u32,
        review: Review,
        cost: StepCost,
        timing: StepTiming,
    },
    AwaitingApproval,
    Approved {
        note: Option<String>,
        at_ms: u64,
    },
    Rejected {
        note: String,
        at_ms: u64,
    },
    Completed,
    Failed {
        error: StepError,
        cost: StepCost,
        timing: Option<StepTiming>,
    },
    Cancelled,
    /// The queue gave up on the topic after `deliveries` claims (a shared
    /// queue whose workers kept dying on it).
    DeadLettered {
        deliveries: u32,
    },
}

impl JournalRecord {
    /// Stable short name, for the store's `kind` column and events.
    pub fn name(&self) -> &'static str {
        match self {
            JournalRecord::Started => "started",
            JournalRecord::Routed { .. } => "routed",
            JournalRecord::Planned { .. } => "planned",
            JournalRecord::Drafted { .. } => "drafted",
            JournalRecord::Reviewed { .. } => "reviewed",
            JournalRecord::VariantFailed { .. } => "variant_failed",
            JournalRecord::Chosen { .. } => "chosen",
            JournalRecord::Revised { .. } => "revised",
            JournalRecord::RevisionReviewed { .. } => "revision_reviewed",
            JournalRecord::AwaitingApproval => "awaiting_approval",
            JournalRecord::Approved { .. } => "approved",
            JournalRecord::Rejected { .. } => "rejected",
            JournalRecord::Completed => "completed",
            JournalRecord::Failed { .. } => "failed",
            JournalRecord::Cancelled => "cancelled",
            JournalRecord::DeadLettered { .. } => "dead_lettered",
        }
    }

    /// False for the records `apply` never changes a topic's status with
    /// (the step results): the store then leaves the status column, and
    /// its index, alone.
    pub fn may_change_status(&self) -> bool {
        use JournalRecord as J;
        !matches!(
            self,
            J::Routed { .. }
                | J::Planned { .. }
                | J::Drafted { .. }
                | J::Reviewed { .. }
                | J::VariantFailed { .. }
                | J::Chosen { .. }
                | J::RevisionReviewed { .. }
        )
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl TopicState {
    pub fn new(s: &Submission) -> TopicState {
        TopicState {
            version: STATE_VERSION,
            id: s.id.clone(),
            topic: s.topic.clone(),
            requested_kind: s.kind.clone(),
            route: None,
            status: TopicStatus::Queued,
            step: None,
            variants_requested: s.variants,
            require_approval: s.require_approval,
            idempotency_key: s.idempotency_key.clone(),
            outline: None,
            variants: Vec::new(),
            chosen_variant: None,
            chosen_reason: None,
            revisions: Vec::new(),
            approvals: Vec::new(),
            pending_human_note: None,
            final_draft: None,
            error: None,
            usage: UsageTotals::default(),
            usage_by_step: Default::default(),
            budget: s.budget,
            timings: Vec::new(),
            submitted_at_ms: s.submitted_ms,
            updated_at_ms: s.submitted_ms,
            finished_at_ms: None,
        }
    }

    pub fn submission(&self) -> Submission {
        Submission {
            id: self.id.clone(),
            topic: self.topic.clone(),
            kind: self.requested_kind.clone(),
            variants: self.variants_requested,
            require_approval: self.require_approval,
            idempotency_key: self.idempotency_key.clone(),
            submitted_ms: self.submitted_at_ms,
            budget: self.budget,
        }
    }

    fn charge(&mut self, step: Step, cost: &StepCost) {
        self.usage.charge(cost);
        if cost.calls > 0 {
            self.usage_by_step.entry(step.as_str().to_string()).or_default().charge(cost);
        }
    }

    fn variant_mut(&mut self, index: u32) -> &mut VariantState {
        while self.variants.len() <= index as usize {
            let i = self.variants.len() as u32;
            self.variants.push(VariantState { index: i, ..VariantState::default() });
        }
        &mut self.variants[index as usize]
    }

    /// The draft and review the workflow currently stands on: the latest
    /// reviewed revision, else the chosen variant.
    pub fn current(&self) -> Option<(&Draft, Option<&Review>, String)> {
        if let Some(r) = self.revisions.last() {
            return Some((&r.draft, r.review.as_ref(), format!("revision {}", r.number)));
        }
        let v = self.variants.get(self.chosen_variant? as usize)?;
        Some((v.draft.as_ref()?, v.review.as_ref(), format!("variant {}", v.index)))
    }

    /// Revisions made by the automatic loop (human-requested ones excluded).
    pub fn automatic_revisions(&self) -> u32 {
        self.revisions.iter().filter(|r| r.human_note.is_none()).count() as u32
    }

    pub fn apply(&mut self, record: &JournalRecord, at_ms: u64) {
        use JournalRecord as J;
        self.updated_at_ms = at_ms;
        match record {
            J::Started => {
                self.status = TopicStatus::Running;
            }
            J::Routed { kind, cost, timing } => {
                self.route = Some(kind.clone());
                self.charge(Step::Route, cost);
                self.timings.extend(timing.clone());
                self.step = Some("route".into());
            }
            J::Planned { outline, cost, timing } => {
                self.outline = Some(outline.clone());
                self.charge(Step::Plan, cost);
                self.timings.push(timing.clone());
                self.step = Some("plan".into());
            }
            J::Drafted { variant, draft, cost, timing } => {
                self.variant_mut(*variant).draft = Some(draft.clone());
                self.charge(Step::Write, cost);
                self.timings.push(timing.clone());
                self.step = Some("write".into());
            }
            J::Reviewed { variant, review, cost, timing } => {
                self.variant_mut(*variant).review = Some(review.clone());
                self.charge(Step::Review, cost);
                self.timings.push(timing.clone());
                self.step = Some("review".into());
            }
            J::VariantFailed { variant, error, cost, timing } => {
                self.variant_mut(*variant).error = Some(error.clone());
                self.charge(error.step, cost);
                self.timings.extend(timing.clone());
            }
            J::Chosen { variant, reason } => {
                self.chosen_variant = Some(*variant);
                self.chosen_reason = Some(reason.clone());
            }
            J::Revised { number, draft, human_note, cost, timing } => {
                self.revisions.push(RevisionState {
                    number: *number,
                    draft: draft.clone(),
                    review: None,
                    human_note: human_note.clone(),
                });
                if human_note.is_some() {
                    self.pending_human_note = None;
                }
                self.charge(Step::Revise, cost);
                self.timings.push(timing.clone());
                self.step = Some("revise".into());
                self.status = TopicStatus::Running;
            }
            J::RevisionReviewed { number, review, cost, timing } => {
                if let Some(r) = self.revisions.iter_mut().find(|r| r.number == *number) {
                    r.review = Some(review.clone());
                }
                self.charge(Step::Review, cost);
                self.timings.push(timing.clone());
                self.step = Some("review".into());
            }
            J::AwaitingApproval => {
                self.status = TopicStatus::AwaitingApproval;
                self.step = Some("approval".into());
            }
            J::Approved { note, at_ms } => {
                // Approval completes the topic in the same record, so a
                // check-then-approve cannot interleave with another decision.
                self.approvals.push(ApprovalRecord { decision: Decision::Approved, note: note.clone(), at_ms: *at_ms });
                self.complete(at_ms);
            }
            J::Rejected { note, at_ms } => {
                self.approvals.push(ApprovalRecord {
                    decision: Decision::Rejected,
                    note: Some(note.clone()),
                    at_ms: *at_ms,
                });
                self.pending_human_note = Some(note.clone());
                self.status = TopicStatus::Running;
            }
            J::Completed => self.complete(&at_ms),
            J::Failed { error, cost, timing } => {
                self.error = Some(error.clone());
                self.charge(error.step, cost);
                self.timings.extend(timing.clone());
                self.status = TopicStatus::Failed;
                self.finished_at_ms = Some(at_ms);
            }
            J::Cancelled => {
                self.status = TopicStatus::Cancelled;
                self.finished_at_ms = Some(at_ms);
            }
            J::DeadLettered { .. } => {
                self.status = TopicStatus::DeadLetter;
                self.finished_at_ms = Some(at_ms);
            }
        }
    }

    fn complete(&mut self, at_ms: &u64) {
        if let Some((draft, Some(review), source)) = self.current() {
            self.final_draft = Some(FinalDraft { draft: draft.clone(), review: review.clone(), source });
        }
        self.status = TopicStatus::Completed;
        self.finished_at_ms = Some(*at_ms);
    }

    /// Whether the human approved the current draft (the last decision).
    pub fn approved_by_human(&self) -> bool {
        matches!(self.approvals.last(), Some(a) if a.decision == Decision::Approved)
    }
}

/// The summary the daemon's `status` and `list` ops show.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopicSummary {
    pub id: String,
    pub topic: String,
    pub kind: Option<String>,
    pub status: TopicStatus,
    pub step: Option<String>,
    pub submitted_at_ms: u64,
    pub updated_at_ms: u64,
    pub best_score: Option<u8>,
    pub approved: Option<bool>,
    pub revisions: u32,
    pub error: Option<String>,
    /// The topic's cost so far (`usage.cost_usd`); the daily limit sums it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

impl From<&TopicState> for TopicSummary {
    fn from(s: &TopicState) -> Self {
        TopicSummary {
            id: s.id.clone(),
            topic: s.topic.clone(),
            kind: s.route.clone().or_else(|| s.requested_kind.clone()),
            status: s.status,
            step: s.step.clone(),
            submitted_at_ms: s.submitted_at_ms,
            updated_at_ms: s.updated_at_ms,
            best_score: s
                .final_draft
                .as_ref()
                .map(|f| f.review.score)
                .or_else(|| s.variants.iter().filter_map(|v| v.review.as_ref().map(|r| r.score)).max()),
            approved: s.final_draft.as_ref().map(|f| f.review.approved),
            revisions: s.revisions.len() as u32,
            error: s.error.as_ref().map(|e| e.message.clone()),
            cost_usd: s.usage.cost_usd,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_that_may_not_change_status_do_not() {
        let cost = r#""cost":{"calls":1,"attempts":1,"usage":{"input_tokens":1,"output_tokens":2}}"#;
        let timing = r#""timing":{"step":"write","attempts":1,"started_ms":1,"finished_ms":2}"#;
        let review = r#""review":{"approved":false,"score":3,"issues":[],"suggestions":[]}"#;
        let steps = [
            format!(r#"{{"type":"routed","kind":"article",{cost},"timing":null}}"#),
            format!(r#"{{"type":"planned","outline":{{"title":"t","sections":["a"]}},{cost},{timing}}}"#),
            format!(r#"{{"type":"drafted","variant":0,"draft":{{"markdown":"m","words":1}},{cost},{timing}}}"#),
            format!(r#"{{"type":"reviewed","variant":0,{review},{cost},{timing}}}"#),
            format!(
                r#"{{"type":"variant_failed","variant":1,"error":{{"step":"write","kind":"timeout","message":"m"}},{cost},"timing":null}}"#
            ),
            r#"{"type":"chosen","variant":0,"reason":"r"}"#.to_string(),
            format!(r#"{{"type":"revision_reviewed","number":1,{review},{cost},{timing}}}"#),
        ];
        let submission = Submission {
            id: "t1".into(),
            topic: "x".into(),
            kind: None,
            variants: 3,
            require_approval: false,
            idempotency_key: None,
            submitted_ms: 0,
            budget: TopicBudget::default(),
        };
        for status in TopicStatus::ALL {
            for json in &steps {
                let record: JournalRecord = serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
                assert!(!record.may_change_status(), "{json}");
                let mut state = TopicState::new(&submission);
                state.status = status;
                state.apply(&record, 5);
                assert_eq!(state.status, status, "{json}");
            }
        }
        assert!(JournalRecord::Started.may_change_status() && JournalRecord::Completed.may_change_status());
    }

    #[test]
    fn failures_journaled_without_timing_still_read() {
        let old = r#"{"type":"failed","error":{"step":"plan","kind":"invalid_output","message":"m"},"cost":{"calls":6,"attempts":6,"usage":{"input_tokens":1,"output_tokens":2}}}"#;
        match serde_json::from_str::<JournalRecord>(old).unwrap() {
            JournalRecord::Failed { timing, cost, .. } => assert_eq!((timing, cost.attempts), (None, 6)),
            other => panic!("{other:?}"),
        }
        let old = r#"{"type":"variant_failed","variant":1,"error":{"step":"write","kind":"timeout","message":"m"},"cost":{"calls":1,"attempts":1,"usage":{"input_tokens":0,"output_tokens":0}}}"#;
        assert!(matches!(
            serde_json::from_str::<JournalRecord>(old).unwrap(),
            JournalRecord::VariantFailed { variant: 1, timing: None, .. }
        ));
    }
}
