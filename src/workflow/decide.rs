//! `decide`: the workflow's decisions as pure code. Given a topic's state
//! (its submission plus its journal replayed) and the workflow policy, it
//! names the next thing to do. The runner is a loop around it: decide → run
//! the step on its stage → journal → repeat; resume is the same loop started
//! from a journal read back from the store.
//!
//! Must not: do I/O, read the clock, or know about actors, stores or
//! providers. Everything a decision depends on is in `TopicState` and
//! `Policy`, so every branch is a table-driven unit test.

use std::collections::BTreeSet;

use crate::llm::FailureReason;
use crate::state::{StepError, TopicState, TopicStatus};
use crate::workflow::{Review, Step};

/// What the workflow needs from the configuration, as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Ask the router (a model call) when no kind was requested. False when
    /// routing is off or only one kind is configured.
    pub route_with_model: bool,
    /// The kind used when the router is not asked.
    pub default_kind: String,
    /// Automatic revisions while the best draft is not approved.
    pub max_revisions: u32,
    /// Kinds whose topics always wait for a human (`require_approval`).
    pub approval_kinds: BTreeSet<String>,
}

/// One variant's next step inside the fan-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VariantStep {
    Write(u32),
    Review(u32),
}

impl VariantStep {
    pub fn variant(self) -> u32 {
        match self {
            VariantStep::Write(v) | VariantStep::Review(v) => v,
        }
    }
}

/// The next thing to do for a topic.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Ask the router for a kind.
    Route,
    /// Record a kind without a model call (requested, or routing is off).
    AssignKind(String),
    Plan,
    /// Run these variants, in parallel, each to its end (write, then
    /// review; `decide_variant` says which step a variant is at).
    Variants(Vec<VariantStep>),
    /// Record the winning variant.
    Choose {
        variant: u32,
        reason: String,
    },
    /// Every variant failed: fail the topic with this error.
    FailAllVariants(StepError),
    /// Revise the current draft into revision `number`; `human_note` is the
    /// rejection being answered, if any.
    Revise {
        number: u32,
        human_note: Option<String>,
    },
    /// Review revision `number` (written, not yet reviewed).
    ReviewRevision {
        number: u32,
    },
    /// Park the topic until a human approves or rejects it.
    AwaitApproval,
    /// Finish the topic with its current draft.
    Complete,
    /// Nothing to do now: waiting for a human.
    Wait,
    /// Finished (completed, failed or cancelled): nothing more, ever.
    Done,
}

/// The next step for a topic.
pub fn decide(state: &TopicState, policy: &Policy) -> Next {
    match state.status {
        TopicStatus::Completed | TopicStatus::Failed | TopicStatus::Cancelled | TopicStatus::DeadLetter => {
            return Next::Done
        }
        TopicStatus::AwaitingApproval => return Next::Wait,
        TopicStatus::Queued | TopicStatus::Running => {}
    }
    let Some(kind) = &state.route else {
        return match &state.requested_kind {
            Some(kind) => Next::AssignKind(kind.clone()),
            None if policy.route_with_model => Next::Route,
            None => Next::AssignKind(policy.default_kind.clone()),
        };
    };
    if state.outline.is_none() {
        return Next::Plan;
    }
    if state.chosen_variant.is_none() {
        let pending: Vec<VariantStep> =
            (0..state.variants_requested).filter_map(|i| decide_variant(state, i)).collect();
        if !pending.is_empty() {
            return Next::Variants(pending);
        }
        return match choose_best(state) {
            Some((variant, reason)) => Next::Choose { variant, reason },
            None => Next::FailAllVariants(all_variants_failed(state)),
        };
    }
    let Some(last_review) = current_review(state) else {
        // A revision was written (and journaled) but not reviewed yet.
        return match state.revisions.last() {
            Some(r) => Next::ReviewRevision { number: r.number },
            // The chosen variant always has a review; a state without one
            // is not one this workflow writes. Finishing it is the safe end.
            None => Next::Complete,
        };
    };
    let next_number = state.revisions.len() as u32 + 1;
    if let Some(note) = &state.pending_human_note {
        return Next::Revise { number: next_number, human_note: Some(note.clone()) };
    }
    // A human's rejection that was answered and re-reviewed goes back to
    // the human, not into the automatic loop.
    let answered_human = state.revisions.last().is_some_and(|r| r.human_note.is_some());
    if !answered_human && !last_review.approved && state.automatic_revisions() < policy.max_revisions {
        return Next::Revise { number: next_number, human_note: None };
    }
    let needs_human = state.require_approval || policy.approval_kinds.contains(kind);
    if needs_human && !state.approved_by_human() {
        return Next::AwaitApproval;
    }
    Next::Complete
}

/// A variant's next step, or `None` when it is finished (reviewed or
/// failed).
pub fn decide_variant(state: &TopicState, variant: u32) -> Option<VariantStep> {
    match state.variants.get(variant as usize) {
        Some(v) if v.error.is_some() || v.review.is_some() => None,
        Some(v) if v.draft.is_some() => Some(VariantStep::Review(variant)),
        _ => Some(VariantStep::Write(variant)),
    }
}

/// The review the workflow stands on: the latest revision's, else the
/// chosen variant's.
fn current_review(state: &TopicState) -> Option<&Review> {
    state.current().and_then(|(_, review, _)| review)
}

/// Highest score wins; ties go to the lowest index. Variants without a
/// review (failed) are skipped.
pub fn choose_best(state: &TopicState) -> Option<(u32, String)> {
    let mut best: Option<(u32, &Review)> = None;
    for v in &state.variants {
        if let Some(r) = &v.review {
            if best.is_none_or(|(_, b)| r.score > b.score) {
                best = Some((v.index, r));
            }
        }
    }
    let (index, review) = best?;
    let scores: Vec<String> = state
        .variants
        .iter()
        .map(|v| v.review.as_ref().map(|r| r.score.to_string()).unwrap_or_else(|| "failed".into()))
        .collect();
    Some((
        index,
        format!(
            "highest review score {} among variants [{}] (ties go to the lowest index)",
            review.score,
            scores.join(", ")
        ),
    ))
}

/// The topic's error when no variant survived, classified by the variants'
/// own failures (the first variant's step and reason; they usually agree).
fn all_variants_failed(state: &TopicState) -> StepError {
    let errors: Vec<&StepError> = state.variants.iter().filter_map(|v| v.error.as_ref()).collect();
    let listed: Vec<String> = state
        .variants
        .iter()
        .filter_map(|v| v.error.as_ref().map(|e| format!("variant {}: {}", v.index, e.message)))
        .collect();
    let (step, kind) = errors.first().map(|e| (e.step, e.kind)).unwrap_or((Step::Write, FailureReason::InvalidOutput));
    let message = format!("all {} variants failed ({})", state.variants_requested, listed.join("; "));
    StepError { step, kind, message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::Usage;
    use crate::state::{JournalRecord, StepCost, StepTiming, Submission};
    use crate::workflow::{Draft, Outline};

    fn policy() -> Policy {
        Policy {
            route_with_model: true,
            default_kind: "article".into(),
            max_revisions: 2,
            approval_kinds: BTreeSet::from(["memo".to_string()]),
        }
    }

    fn fresh(variants: u32, require_approval: bool, kind: Option<&str>) -> TopicState {
        TopicState::new(&Submission {
            id: "t1".into(),
            topic: "Heat pumps".into(),
            kind: kind.map(str::to_string),
            variants,
            require_approval,
            idempotency_key: None,
            submitted_ms: 0,
            budget: Default::default(),
        })
    }

    fn cost() -> StepCost {
        StepCost { calls: 1, attempts: 1, usage: Usage { input_tokens: 10, output_tokens: 20, ..Usage::default() } }
    }

    fn timing(step: Step) -> StepTiming {
        StepTiming { step, variant: None, revision: None, attempts: 1, started_ms: 1, finished_ms: 2 }
    }

    fn draft(text: &str) -> Draft {
        Draft { markdown: text.into(), words: 1 }
    }

    fn review(approved: bool, score: u8) -> Review {
        Review { approved, score, issues: vec!["i".into()], suggestions: vec!["s".into()] }
    }

    fn error(step: Step) -> StepError {
        StepError { step, kind: FailureReason::Timeout, message: "timed out".into() }
    }

    fn apply(state: &mut TopicState, records: &[JournalRecord]) {
        for r in records {
            state.apply(r, 5);
        }
    }

    fn routed_planned() -> Vec<JournalRecord> {
        vec![
            JournalRecord::Started,
            JournalRecord::Routed { kind: "article".into(), cost: cost(), timing: Some(timing(Step::Route)) },
            JournalRecord::Planned {
                outline: Outline { title: "T".into(), sections: vec!["A".into()] },
                cost: cost(),
                timing: timing(Step::Plan),
            },
        ]
    }

    fn drafted(variant: u32) -> JournalRecord {
        JournalRecord::Drafted { variant, draft: draft("d"), cost: cost(), timing: timing(Step::Write) }
    }

    fn reviewed(variant: u32, approved: bool, score: u8) -> JournalRecord {
        JournalRecord::Reviewed { variant, review: review(approved, score), cost: cost(), timing: timing(Step::Review) }
    }

    fn revised(number: u32, note: Option<&str>) -> JournalRecord {
        JournalRecord::Revised {
            number,
            draft: draft("r"),
            human_note: note.map(str::to_string),
            cost: cost(),
            timing: timing(Step::Revise),
        }
    }

    fn revision_reviewed(number: u32, approved: bool) -> JournalRecord {
        JournalRecord::RevisionReviewed {
            number,
            review: review(approved, 8),
            cost: cost(),
            timing: timing(Step::Review),
        }
    }

    #[test]
    fn routing_and_planning() {
        assert_eq!(decide(&fresh(3, false, None), &policy()), Next::Route);
        assert_eq!(decide(&fresh(3, false, Some("memo")), &policy()), Next::AssignKind("memo".into()));
        let no_router = Policy { route_with_model: false, ..policy() };
        assert_eq!(decide(&fresh(3, false, None), &no_router), Next::AssignKind("article".into()));
        let mut st = fresh(3, false, None);
        apply(&mut st, &routed_planned()[..2]);
        assert_eq!(decide(&st, &policy()), Next::Plan);
    }

    #[test]
    fn variants_fan_out_from_where_each_stands() {
        let mut st = fresh(3, false, None);
        apply(&mut st, &routed_planned());
        use VariantStep::*;
        assert_eq!(decide(&st, &policy()), Next::Variants(vec![Write(0), Write(1), Write(2)]));
        apply(&mut st, &[drafted(1), drafted(2), reviewed(2, false, 4)]);
        assert_eq!(decide(&st, &policy()), Next::Variants(vec![Write(0), Review(1)]));
        apply(
            &mut st,
            &[JournalRecord::VariantFailed { variant: 0, error: error(Step::Write), cost: cost(), timing: None }],
        );
        assert_eq!(decide(&st, &policy()), Next::Variants(vec![Review(1)]));
        apply(&mut st, &[reviewed(1, false, 6)]);
        match decide(&st, &policy()) {
            Next::Choose { variant: 1, reason } => assert!(reason.contains("[failed, 6, 4]"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ties_go_to_the_lowest_index() {
        let mut st = fresh(3, false, None);
        apply(&mut st, &routed_planned());
        apply(
            &mut st,
            &[drafted(0), drafted(1), drafted(2), reviewed(0, false, 7), reviewed(1, true, 9), reviewed(2, true, 9)],
        );
        assert!(matches!(decide(&st, &policy()), Next::Choose { variant: 1, .. }));
    }

    #[test]
    fn all_variants_failed_fails_with_their_reason() {
        let mut st = fresh(2, false, None);
        apply(&mut st, &routed_planned());
        for v in 0..2 {
            apply(
                &mut st,
                &[JournalRecord::VariantFailed { variant: v, error: error(Step::Review), cost: cost(), timing: None }],
            );
        }
        match decide(&st, &policy()) {
            Next::FailAllVariants(e) => {
                assert_eq!((e.step, e.kind), (Step::Review, FailureReason::Timeout));
                assert!(e.message.starts_with("all 2 variants failed"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
    }

    fn chosen(approved: bool, require_approval: bool) -> TopicState {
        let mut st = fresh(1, require_approval, None);
        apply(&mut st, &routed_planned());
        apply(
            &mut st,
            &[drafted(0), reviewed(0, approved, 5), JournalRecord::Chosen { variant: 0, reason: "r".into() }],
        );
        st
    }

    #[test]
    fn revisions_while_not_approved_up_to_the_limit() {
        // (approved at each revision count, revisions so far, expected)
        let mut st = chosen(false, false);
        assert_eq!(decide(&st, &policy()), Next::Revise { number: 1, human_note: None });
        apply(&mut st, &[revised(1, None)]);
        assert_eq!(decide(&st, &policy()), Next::ReviewRevision { number: 1 });
        apply(&mut st, &[revision_reviewed(1, false)]);
        assert_eq!(decide(&st, &policy()), Next::Revise { number: 2, human_note: None });
        apply(&mut st, &[revised(2, None), revision_reviewed(2, false)]);
        assert_eq!(decide(&st, &policy()), Next::Complete, "max_revisions = 2 reached");

        let mut st = chosen(false, false);
        apply(&mut st, &[revised(1, None), revision_reviewed(1, true)]);
        assert_eq!(decide(&st, &policy()), Next::Complete, "approved at revision 1");
        assert_eq!(decide(&chosen(true, false), &policy()), Next::Complete, "approved at once");
        let none = Policy { max_revisions: 0, ..policy() };
        assert_eq!(decide(&chosen(false, false), &none), Next::Complete, "no revisions allowed");
    }

    #[test]
    fn human_approval_and_rejection_with_a_note() {
        let mut st = chosen(true, true);
        assert_eq!(decide(&st, &policy()), Next::AwaitApproval);
        apply(&mut st, &[JournalRecord::AwaitingApproval]);
        assert_eq!(decide(&st, &policy()), Next::Wait);
        apply(&mut st, &[JournalRecord::Rejected { note: "shorter".into(), at_ms: 6 }]);
        assert_eq!(decide(&st, &policy()), Next::Revise { number: 1, human_note: Some("shorter".into()) });
        apply(&mut st, &[revised(1, Some("shorter"))]);
        assert_eq!(decide(&st, &policy()), Next::ReviewRevision { number: 1 });
        // A not-approved review of the human's revision goes back to the
        // human, not into the automatic loop.
        apply(&mut st, &[revision_reviewed(1, false)]);
        assert_eq!(decide(&st, &policy()), Next::AwaitApproval);
        apply(&mut st, &[JournalRecord::AwaitingApproval, JournalRecord::Approved { note: None, at_ms: 7 }]);
        assert_eq!(st.status, TopicStatus::Completed);
        assert_eq!(decide(&st, &policy()), Next::Done);
        // A kind that requires approval, without the submitter asking.
        let mut memo = chosen(true, false);
        memo.route = Some("memo".into());
        assert_eq!(decide(&memo, &policy()), Next::AwaitApproval);
    }

    #[test]
    fn finished_topics_have_nothing_to_do() {
        for record in [JournalRecord::Cancelled, JournalRecord::Completed] {
            let mut st = chosen(false, false);
            apply(&mut st, &[record]);
            assert_eq!(decide(&st, &policy()), Next::Done);
        }
        let mut st = fresh(3, false, None);
        apply(&mut st, &[JournalRecord::Started, JournalRecord::Cancelled]);
        assert_eq!(decide(&st, &policy()), Next::Done);
        apply(&mut st, &[]);
        let mut failed = fresh(3, false, None);
        apply(&mut failed, &[JournalRecord::Failed { error: error(Step::Plan), cost: cost(), timing: None }]);
        assert_eq!(decide(&failed, &policy()), Next::Done);
    }

    /// What a decision would record, to compare with what is recorded.
    fn step_of(next: &Next) -> Vec<(Step, Option<u32>, Option<u32>)> {
        match next {
            Next::Route => vec![(Step::Route, None, None)],
            Next::Plan => vec![(Step::Plan, None, None)],
            Next::Variants(v) => v
                .iter()
                .map(|s| match s {
                    VariantStep::Write(i) => (Step::Write, Some(*i), None),
                    VariantStep::Review(i) => (Step::Review, Some(*i), None),
                })
                .collect(),
            Next::Revise { number, .. } => vec![(Step::Revise, None, Some(*number))],
            Next::ReviewRevision { number } => vec![(Step::Review, None, Some(*number))],
            _ => vec![],
        }
    }

    fn recorded(r: &JournalRecord) -> Option<(Step, Option<u32>, Option<u32>)> {
        use JournalRecord as J;
        match r {
            J::Routed { .. } => Some((Step::Route, None, None)),
            J::Planned { .. } => Some((Step::Plan, None, None)),
            J::Drafted { variant, .. } => Some((Step::Write, Some(*variant), None)),
            J::Reviewed { variant, .. } => Some((Step::Review, Some(*variant), None)),
            J::Revised { number, .. } => Some((Step::Revise, None, Some(*number))),
            J::RevisionReviewed { number, .. } => Some((Step::Review, None, Some(*number))),
            _ => None,
        }
    }

    /// Resume never re-runs a finished step: after every prefix of a full
    /// journal, `decide` asks only for steps the prefix has not recorded.
    #[test]
    fn resume_never_reruns_a_finished_step() {
        let mut journal = routed_planned();
        journal.extend([
            drafted(0),
            drafted(2),
            reviewed(2, false, 5),
            JournalRecord::VariantFailed { variant: 1, error: error(Step::Write), cost: cost(), timing: None },
            reviewed(0, false, 6),
            JournalRecord::Chosen { variant: 0, reason: "r".into() },
            revised(1, None),
            revision_reviewed(1, false),
            revised(2, None),
            revision_reviewed(2, false),
            JournalRecord::AwaitingApproval,
            JournalRecord::Rejected { note: "more".into(), at_ms: 9 },
            revised(3, Some("more")),
            revision_reviewed(3, true),
            JournalRecord::AwaitingApproval,
            JournalRecord::Approved { note: None, at_ms: 10 },
        ]);
        for n in 0..=journal.len() {
            let mut st = fresh(3, true, None);
            apply(&mut st, &journal[..n]);
            let done: Vec<_> = journal[..n].iter().filter_map(recorded).collect();
            let next = decide(&st, &policy());
            for step in step_of(&next) {
                assert!(!done.contains(&step), "prefix {n}: {next:?} re-runs {step:?}");
            }
            // Whatever comes next in the journal is what decide asked for.
            if let Some(want) = journal.get(n).and_then(recorded) {
                assert!(step_of(&next).contains(&want), "prefix {n}: expected {want:?}, decide said {next:?}");
            }
        }
    }
}
