//! End-to-end pipeline tests: the engine against a fake OpenAI server over
//! real HTTP (both wire formats), and against the simulated provider for
//! fan-out, revision, supervision and concurrency properties.

mod support;

use std::time::Duration;

use scriptorium::config::Config;
use scriptorium::llm::FailureReason;
use scriptorium::state::{TopicState, TopicStatus};
use scriptorium::workflow::Step;
use scriptorium::{EngineOptions, Scriptorium, SubmitRequest};
use serde_json::json;
use support::{provider, test_config, FakeModel, Fault, Wire, KEY};
use wiremock::MockServer;

const WIRES: [Wire; 2] = [Wire::Responses, Wire::Chat];

async fn start(config: Config, wire: Wire, server: &MockServer) -> Scriptorium {
    let options = EngineOptions { provider: Some(provider(wire, server)), ..EngineOptions::default() };
    Scriptorium::start(config, options).await.unwrap()
}

async fn run_one(engine: &Scriptorium, topic: &str) -> TopicState {
    let receipt = engine.submit(SubmitRequest { topic: topic.into(), ..SubmitRequest::default() }).await.unwrap();
    engine.wait(&receipt.id, Some(Duration::from_secs(60))).await.unwrap()
}

fn attempts_of(state: &TopicState, step: Step) -> Vec<u32> {
    state.timings.iter().filter(|t| t.step == step).map(|t| t.attempts).collect()
}

#[tokio::test]
async fn a_topic_completes_over_both_wire_formats() {
    for wire in WIRES {
        let server = MockServer::start().await;
        let fake = FakeModel::new(wire);
        fake.mount(&server).await;
        let engine = start(test_config(&[]), wire, &server).await;
        let state = run_one(&engine, "How do heat pumps work?").await;
        assert_eq!(state.status, TopicStatus::Completed, "{wire:?}: {:?}", state.error);
        assert_eq!(state.variants.len(), 3);
        assert!(state.final_draft.is_some());
        assert!(state.usage.llm_calls >= 8, "route + plan + 3 writes + 3 reviews");
        assert_eq!(state.usage.input_tokens, 100 * state.usage.llm_calls);
        let seen = fake.seen();
        // The router may pick a kind whose writer answers in JSON too.
        let config = test_config(&[]);
        let structured_draft = state.route.as_deref().and_then(|k| config.kind(k)).is_some_and(|k| k.structured_draft);
        for s in &seen {
            assert_eq!(s.authorization.as_deref(), Some(format!("Bearer {KEY}").as_str()));
            let structured = matches!(s.step.as_str(), "route" | "plan" | "review")
                || (structured_draft && matches!(s.step.as_str(), "write" | "revise"));
            let format = match wire {
                Wire::Responses => &s.body["text"]["format"],
                Wire::Chat => &s.body["response_format"],
            };
            assert_eq!(format["type"] == "json_schema", structured, "{wire:?} {}: {format}", s.step);
            if structured && wire == Wire::Responses {
                assert_eq!(format["strict"], true);
                scriptorium::workflow::schema::check_strict(&format["schema"]).unwrap();
            }
        }
        engine.shutdown(Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn a_structured_draft_kind_gets_sections_as_json_and_renders_markdown() {
    for wire in WIRES {
        let server = MockServer::start().await;
        let fake = FakeModel::new(wire);
        // Not approved first: the reviser answers in JSON as well.
        fake.reviews(&[(false, 5), (false, 4), (false, 3), (true, 9)]);
        fake.mount(&server).await;
        let engine = start(test_config(&[]), wire, &server).await;
        let request =
            SubmitRequest { topic: "Why do cats purr?".into(), kind: Some("brief".into()), ..SubmitRequest::default() };
        let receipt = engine.submit(request).await.unwrap();
        let state = engine.wait(&receipt.id, Some(Duration::from_secs(60))).await.unwrap();
        assert_eq!(state.status, TopicStatus::Completed, "{wire:?}: {:?}", state.error);
        assert_eq!(state.revisions.len(), 1, "{wire:?}");
        let outline = state.outline.clone().unwrap();
        let final_draft = state.final_draft.clone().unwrap();
        let markdown = &final_draft.draft.markdown;
        assert!(markdown.starts_with(&format!("# {}\n", outline.title)), "{markdown}");
        for heading in outline.sections.iter().chain(std::iter::once(&"Conclusion".to_string())) {
            assert!(markdown.contains(&format!("\n## {heading}\n")), "{heading}: {markdown}");
        }
        let drafts: Vec<_> = fake.seen().into_iter().filter(|s| s.step == "write" || s.step == "revise").collect();
        assert_eq!(drafts.len(), 4, "{wire:?}: 3 writes and 1 revision");
        for s in &drafts {
            let format = match wire {
                Wire::Responses => s.body["text"]["format"].clone(),
                Wire::Chat => s.body["response_format"]["json_schema"].clone(),
            };
            assert_eq!(format["name"], "draft", "{wire:?} {}", s.step);
            assert_eq!(format["strict"], true);
            scriptorium::workflow::schema::check_strict(&format["schema"]).unwrap();
            let keys = format["schema"]["required"].as_array().unwrap().len();
            assert_eq!(keys, outline.sections.len() + 1, "one key per section and the conclusion");
        }
        engine.shutdown(Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn transient_failures_are_retried_and_the_topic_completes() {
    let faults = [
        ("plan", Fault::Status { status: 500, body: json!({"error": {"message": "boom"}}), retry_after_ms: None }),
        ("plan", Fault::Malformed),
        ("plan", Fault::WrongSchema),
        ("plan", Fault::Incomplete),
        ("route", Fault::Status { status: 503, body: json!({"error": "unavailable"}), retry_after_ms: None }),
        ("write", Fault::Malformed),
    ];
    for wire in WIRES {
        for (step, fault) in faults.clone() {
            let server = MockServer::start().await;
            let fake = FakeModel::new(wire);
            fake.fail(step, fault.clone());
            fake.mount(&server).await;
            let engine = start(test_config(&[("WORKFLOW__VARIANTS", "1")]), wire, &server).await;
            let state = run_one(&engine, "Retry me").await;
            assert_eq!(state.status, TopicStatus::Completed, "{wire:?} {step} {fault:?}: {:?}", state.error);
            let s = match step {
                "plan" => Step::Plan,
                "route" => Step::Route,
                _ => Step::Write,
            };
            assert_eq!(attempts_of(&state, s), vec![2], "{wire:?} {step} {fault:?}");
            if matches!(fault, Fault::Malformed | Fault::WrongSchema) {
                // The retry tells the model what was wrong.
                let retry = fake.seen().into_iter().filter(|x| x.step == step).nth(1).unwrap();
                let text = retry.body.to_string();
                assert!(text.contains("previous answer was rejected"), "{text}");
            }
            engine.shutdown(Duration::from_secs(1)).await;
        }
    }
}

#[tokio::test]
async fn rate_limit_with_retry_after_pauses_the_shared_limiter() {
    for wire in WIRES {
        let server = MockServer::start().await;
        let fake = FakeModel::new(wire);
        let limited =
            json!({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}});
        // One of the three parallel writes is told to wait 400 ms.
        fake.fail("write", Fault::Status { status: 429, body: limited, retry_after_ms: Some(400) });
        fake.mount(&server).await;
        let config = test_config(&[("LIMITS__REQUESTS_PER_MINUTE", "60000")]);
        let engine = start(config, wire, &server).await;
        let state = run_one(&engine, "Slow down").await;
        assert_eq!(state.status, TopicStatus::Completed, "{:?}", state.error);
        let seen = fake.seen();
        let limited_at = seen.iter().find(|s| s.status == 429).unwrap().at;
        // The other variants' reviews would follow their writes within
        // milliseconds; the shared pause holds them too.
        let reviews: Vec<_> = seen.iter().filter(|s| s.step == "review").collect();
        assert_eq!(reviews.len(), 3);
        for r in reviews {
            let after = r.at.duration_since(limited_at);
            assert!(after >= Duration::from_millis(380), "{wire:?}: a review went out {after:?} after the 429");
        }
        assert_eq!(attempts_of(&state, Step::Write).iter().max(), Some(&2));
        engine.shutdown(Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn fatal_errors_fail_the_topic_at_once() {
    for wire in WIRES {
        for (status, body) in [
            (
                401,
                json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}}),
            ),
            (
                429,
                json!({"error": {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"}}),
            ),
        ] {
            let server = MockServer::start().await;
            let fake = FakeModel::new(wire);
            fake.fail("route", Fault::Status { status, body, retry_after_ms: None });
            fake.mount(&server).await;
            let engine = start(test_config(&[]), wire, &server).await;
            let state = run_one(&engine, "Doomed").await;
            assert_eq!(state.status, TopicStatus::Failed);
            let error = state.error.unwrap();
            assert_eq!(error.kind, FailureReason::Fatal);
            assert_eq!(error.step, Step::Route);
            assert!(!error.message.contains(KEY));
            assert_eq!(fake.seen().len(), 1, "{wire:?} {status}: never retried");
            engine.shutdown(Duration::from_secs(1)).await;
        }
    }
}

#[tokio::test]
async fn best_review_is_chosen_and_a_failed_variant_is_tolerated() {
    let server = MockServer::start().await;
    let fake = FakeModel::new(Wire::Responses);
    // One write fails for good (one attempt allowed); the two reviews that
    // follow score 5 and 9.
    fake.fail("write", Fault::Status { status: 500, body: json!({}), retry_after_ms: None });
    fake.reviews(&[(true, 5), (true, 9)]);
    fake.mount(&server).await;
    let engine = start(test_config(&[("RETRY__MAX_ATTEMPTS", "1")]), Wire::Responses, &server).await;
    let state = run_one(&engine, "Pick the best").await;
    assert_eq!(state.status, TopicStatus::Completed, "{:?}", state.error);
    let failed: Vec<_> = state.variants.iter().filter(|v| v.error.is_some()).collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].error.as_ref().unwrap().kind, FailureReason::ServerError);
    let chosen = &state.variants[state.chosen_variant.unwrap() as usize];
    assert_eq!(chosen.review.as_ref().unwrap().score, 9);
    assert!(state.chosen_reason.unwrap().contains("highest review score 9"));
    assert!(state.revisions.is_empty(), "approved: no revision");
}

#[tokio::test]
async fn an_approval_with_a_low_score_is_revised_by_code() {
    let server = MockServer::start().await;
    let fake = FakeModel::new(Wire::Chat);
    // The model approves every variant but scores them 3, 2 and 1: code's
    // threshold (7 by default) overrules it, so the best is revised, and
    // the revision's approval with 9 counts.
    fake.reviews(&[(true, 3), (true, 2), (true, 1), (true, 9)]);
    fake.mount(&server).await;
    let engine = start(test_config(&[]), Wire::Chat, &server).await;
    let state = run_one(&engine, "Low scores").await;
    assert_eq!(state.status, TopicStatus::Completed, "{:?}", state.error);
    let chosen = &state.variants[state.chosen_variant.unwrap() as usize];
    let review = chosen.review.as_ref().unwrap();
    assert!(!review.approved && review.score == 3, "{review:?}");
    assert!(review.issues.iter().any(|i| i.contains("below the approval threshold 7")), "{review:?}");
    assert_eq!(state.revisions.len(), 1);
    let revise = fake.seen().into_iter().find(|s| s.step == "revise").unwrap();
    assert!(revise.body.to_string().contains("below the approval threshold 7"), "the reviser is told why");
    assert!(state.final_draft.unwrap().review.approved);
}

#[tokio::test]
async fn all_variants_failing_fails_the_topic() {
    let server = MockServer::start().await;
    let fake = FakeModel::new(Wire::Responses);
    for _ in 0..3 {
        fake.fail("write", Fault::Malformed);
    }
    fake.mount(&server).await;
    let engine = start(test_config(&[("RETRY__MAX_ATTEMPTS", "1")]), Wire::Responses, &server).await;
    let state = run_one(&engine, "Nothing works").await;
    assert_eq!(state.status, TopicStatus::Failed);
    let error = state.error.clone().unwrap();
    assert!(error.message.contains("all 3 variants failed"));
    assert_eq!((error.step, error.kind), (Step::Write, FailureReason::InvalidOutput));
    // Failed steps keep their timings (attempts) in the state too.
    assert_eq!(attempts_of(&state, Step::Write), vec![1, 1, 1]);

    // Classified by what the variants died of, not as a gate failure.
    let server = MockServer::start().await;
    let fake = FakeModel::new(Wire::Chat);
    for _ in 0..3 {
        fake.fail("review", Fault::Status { status: 503, body: json!({"error": "busy"}), retry_after_ms: None });
    }
    fake.mount(&server).await;
    let engine = start(test_config(&[("RETRY__MAX_ATTEMPTS", "1")]), Wire::Chat, &server).await;
    let state = run_one(&engine, "Reviews fail").await;
    let error = state.error.clone().unwrap();
    assert_eq!((error.step, error.kind), (Step::Review, FailureReason::ServerError), "{error:?}");
    assert_eq!(attempts_of(&state, Step::Review), vec![1, 1, 1]);
}

#[tokio::test]
async fn revision_loop_runs_until_approved_or_max_revisions() {
    // Never approved: stops at max_revisions = 2.
    let server = MockServer::start().await;
    let fake = FakeModel::new(Wire::Responses);
    fake.reviews(&[(false, 4), (false, 5), (false, 6)]);
    fake.mount(&server).await;
    let config = test_config(&[("WORKFLOW__VARIANTS", "1"), ("WORKFLOW__MAX_REVISIONS", "2")]);
    let engine = start(config, Wire::Responses, &server).await;
    let state = run_one(&engine, "Needs work").await;
    assert_eq!(state.status, TopicStatus::Completed);
    assert_eq!(state.revisions.len(), 2);
    assert_eq!(fake.count("revise"), 2);
    let fin = state.final_draft.unwrap();
    assert_eq!((fin.review.score, fin.review.approved, fin.source.as_str()), (6, false, "revision 2"));
    // The reviser saw the review's issues.
    let revise = fake.seen().into_iter().find(|s| s.step == "revise").unwrap();
    assert!(revise.body["input"].as_str().unwrap().contains("needs work"));

    // Approved after the first revision: stops there.
    let server = MockServer::start().await;
    let fake = FakeModel::new(Wire::Responses);
    fake.reviews(&[(false, 4), (true, 8)]);
    fake.mount(&server).await;
    let config = test_config(&[("WORKFLOW__VARIANTS", "1"), ("WORKFLOW__MAX_REVISIONS", "3")]);
    let engine = start(config, Wire::Responses, &server).await;
    let state = run_one(&engine, "Almost").await;
    assert_eq!(state.revisions.len(), 1);
    assert!(state.final_draft.unwrap().review.approved);
}

#[tokio::test]
async fn panicking_stage_actors_are_restarted_and_topics_complete() {
    let config = test_config(&[("CHAOS__ACTOR_PANIC_RATE", "0.1"), ("SUPERVISION__MAX_RESTARTS", "100000")]);
    let engine = Scriptorium::start(config, EngineOptions::default()).await.unwrap();
    let mut ids = vec![];
    for i in 0..30 {
        ids.push(engine.submit(SubmitRequest { topic: format!("chaos {i}"), ..Default::default() }).await.unwrap().id);
    }
    for id in ids {
        let s = engine.wait(&id, Some(Duration::from_secs(60))).await.unwrap();
        assert_eq!(s.status, TopicStatus::Completed, "{:?}", s.error);
    }
    assert!(scriptorium::actors::stage::INJECTED_PANICS.load(std::sync::atomic::Ordering::Relaxed) > 0);
    assert!(engine.escalation().borrow().is_none());
}

#[tokio::test]
async fn a_restart_storm_escalates_instead_of_looping() {
    let config = test_config(&[
        ("CHAOS__ACTOR_PANIC_RATE", "1.0"),
        ("SUPERVISION__MAX_RESTARTS", "3"),
        ("SUPERVISION__WINDOW_S", "60"),
    ]);
    let engine = Scriptorium::start(config, EngineOptions::default()).await.unwrap();
    let id = engine.submit(SubmitRequest { topic: "storm".into(), ..Default::default() }).await.unwrap().id;
    let state = engine.wait(&id, Some(Duration::from_secs(30))).await.unwrap();
    assert_eq!(state.status, TopicStatus::Failed);
    assert!(state.error.unwrap().message.contains("supervision escalated"));
    let reason = engine.escalation().borrow().clone().unwrap();
    assert!(reason.contains("supervision.max_restarts = 3"), "{reason}");
    assert!(engine.submit(SubmitRequest { topic: "after".into(), ..Default::default() }).await.is_err());
}

#[tokio::test]
async fn a_hundred_topics_run_concurrently() {
    let config = test_config(&[
        ("LLM__SIMULATED__LATENCY_MS", "200"),
        ("LIMITS__MAX_IN_FLIGHT_TOPICS", "100"),
        ("WORKFLOW__MAX_REVISIONS", "0"),
    ]);
    let engine = Scriptorium::start(config, EngineOptions::default()).await.unwrap();
    let mut ids = vec![];
    for i in 0..100 {
        ids.push(engine.submit(SubmitRequest { topic: format!("topic {i}"), ..Default::default() }).await.unwrap().id);
    }
    let mut plans = vec![];
    for id in ids {
        let s = engine.wait(&id, Some(Duration::from_secs(120))).await.unwrap();
        assert_eq!(s.status, TopicStatus::Completed);
        let t = s.timings.iter().find(|t| t.step == Step::Plan).unwrap();
        plans.push((t.started_ms, t.finished_ms));
    }
    // Count plan steps that overlap the first one: with serialised actors
    // there would be none; each takes >= 200 ms.
    let (s0, f0) = plans[0];
    let overlapping = plans.iter().filter(|(s, f)| *s < f0 && *f > s0).count();
    assert!(overlapping >= 50, "only {overlapping} of 100 plan steps overlapped");
}
