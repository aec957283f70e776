//! The runtime core at its boundaries: stage workers that run the work
//! under real supervision (a real panic in a step's path, a real hang),
//! cancel that drops the in-flight HTTP request, and the retry-after cap.
//! Model calls go over HTTP to a fake OpenAI server (`support::FakeModel`),
//! or, for the cancel test, to a raw TCP server that reports what the
//! client did with its connection.

mod support;

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use scriptorium::actors::pool::ACTOR_RESTARTS;
use scriptorium::llm::openai::OpenAiProvider;
use scriptorium::llm::{BoxFuture, FailureReason, HttpSettings, LlmError, LlmProvider, LlmReply, LlmRequest};
use scriptorium::state::TopicStatus;
use scriptorium::workflow::Step;
use scriptorium::{EngineOptions, Scriptorium, SubmitRequest};
use support::{test_config, FakeModel, Fault, Wire};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wiremock::MockServer;

/// A provider with a bug in its response handling: after the server
/// answered a plan request, it panics (as a parser hitting an unexpected
/// shape would), `panics` times, then behaves.
struct PanickyParser {
    inner: Arc<dyn LlmProvider>,
    step: Step,
    panics: AtomicU32,
    /// Hang (never answer) instead of panicking.
    hang: bool,
}

impl LlmProvider for PanickyParser {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn model(&self) -> &str {
        self.inner.model()
    }
    fn complete<'a>(&'a self, request: &'a LlmRequest) -> BoxFuture<'a, Result<LlmReply, LlmError>> {
        Box::pin(async move {
            let reply = self.inner.complete(request).await;
            let misbehave = request.step == self.step
                && self.panics.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
            if misbehave && self.hang {
                std::future::pending::<()>().await;
            }
            if misbehave {
                panic!("unexpected shape in the {} answer", request.step);
            }
            reply
        })
    }
}

async fn engine_with(
    server: &MockServer,
    step: Step,
    panics: u32,
    hang: bool,
    overrides: &[(&str, &str)],
) -> Scriptorium {
    let mut all = vec![("WORKFLOW__VARIANTS", "1"), ("WORKFLOW__MAX_REVISIONS", "0"), ("WORKFLOW__ROUTE", "false")];
    all.extend_from_slice(overrides);
    let provider = Arc::new(PanickyParser {
        inner: support::provider(Wire::Responses, server),
        step,
        panics: panics.into(),
        hang,
    });
    let options = EngineOptions { provider: Some(provider), ..EngineOptions::default() };
    Scriptorium::start(test_config(&all), options).await.unwrap()
}

fn attempts_of(state: &scriptorium::state::TopicState, step: Step) -> u32 {
    state.timings.iter().filter(|t| t.step == step).map(|t| t.attempts).sum()
}

#[tokio::test]
async fn a_panic_in_a_step_restarts_its_worker_and_counts_as_one_attempt() {
    let server = MockServer::start().await;
    let fake = FakeModel::new(Wire::Responses);
    fake.mount(&server).await;
    let restarts_before = ACTOR_RESTARTS.load(Ordering::SeqCst);
    let engine = engine_with(&server, Step::Plan, 2, false, &[]).await;
    let id = engine.submit(SubmitRequest { topic: "Heat pumps".into(), ..Default::default() }).await.unwrap().id;
    let state = engine.wait(&id, Some(Duration::from_secs(30))).await.unwrap();
    assert_eq!(state.status, TopicStatus::Completed, "{:?}", state.error);
    assert_eq!(attempts_of(&state, Step::Plan), 3, "two panicked attempts, then one that succeeded");
    assert_eq!(fake.count("plan"), 3, "the server saw exactly one request per attempt");
    assert!(ACTOR_RESTARTS.load(Ordering::SeqCst) - restarts_before >= 2, "each panic restarted a worker");
    assert!(engine.escalation().borrow().is_none());
    engine.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_step_that_panics_every_time_fails_after_max_attempts_with_actor_restart() {
    let server = MockServer::start().await;
    let fake = FakeModel::new(Wire::Responses);
    fake.mount(&server).await;
    let engine = engine_with(&server, Step::Plan, u32::MAX, false, &[("RETRY__MAX_ATTEMPTS", "3")]).await;
    let id = engine.submit(SubmitRequest { topic: "Always broken".into(), ..Default::default() }).await.unwrap().id;
    let state = engine.wait(&id, Some(Duration::from_secs(30))).await.unwrap();
    assert_eq!(state.status, TopicStatus::Failed);
    let error = state.error.unwrap();
    assert_eq!((error.step, error.kind), (Step::Plan, FailureReason::ActorRestart), "{}", error.message);
    assert_eq!(fake.count("plan"), 3, "bounded by retry.max_attempts, never re-sent behind it");
    assert_eq!(fake.count("write"), 0);
    engine.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_restart_storm_escalates_and_stops_spending() {
    let server = MockServer::start().await;
    let fake = FakeModel::new(Wire::Responses);
    fake.mount(&server).await;
    let overrides =
        [("RETRY__MAX_ATTEMPTS", "20"), ("SUPERVISION__MAX_RESTARTS", "2"), ("SUPERVISION__WINDOW_S", "60")];
    let engine = engine_with(&server, Step::Plan, u32::MAX, false, &overrides).await;
    let id = engine.submit(SubmitRequest { topic: "Storm".into(), ..Default::default() }).await.unwrap().id;
    let state = engine.wait(&id, Some(Duration::from_secs(30))).await.unwrap();
    assert_eq!(state.status, TopicStatus::Failed);
    assert!(state.error.unwrap().message.contains("supervision escalated"));
    let reason = engine.escalation().borrow().clone().unwrap();
    assert!(reason.contains("supervision.max_restarts = 2"), "{reason}");
    assert!(fake.count("plan") <= 3, "{} plan requests: the storm must stop the spending", fake.count("plan"));
    assert!(engine.submit(SubmitRequest { topic: "after".into(), ..Default::default() }).await.is_err());
    engine.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_hung_worker_is_replaced_after_the_step_timeout_and_the_step_goes_on() {
    let server = MockServer::start().await;
    let fake = FakeModel::new(Wire::Responses);
    fake.mount(&server).await;
    let restarts_before = ACTOR_RESTARTS.load(Ordering::SeqCst);
    let engine = engine_with(&server, Step::Plan, 1, true, &[("SUPERVISION__STEP_TIMEOUT_S", "0.3")]).await;
    let id = engine.submit(SubmitRequest { topic: "Hangs once".into(), ..Default::default() }).await.unwrap().id;
    // The provider's own request timeout is 5 s and the hang never ends:
    // only the pool's dead man's switch can end this attempt in time.
    let state = engine.wait(&id, Some(Duration::from_secs(20))).await.unwrap();
    assert_eq!(state.status, TopicStatus::Completed, "{:?}", state.error);
    assert_eq!(attempts_of(&state, Step::Plan), 2);
    let timed_out = state.timings.iter().any(|t| t.step == Step::Plan && t.attempts == 2);
    assert!(timed_out);
    eventually("the stuck worker to be replaced", || ACTOR_RESTARTS.load(Ordering::SeqCst) > restarts_before).await;
    engine.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_server_retry_after_longer_than_the_cap_is_cut_to_it() {
    let server = MockServer::start().await;
    let fake = FakeModel::new(Wire::Responses);
    fake.fail(
        "plan",
        Fault::Status {
            status: 429,
            body: serde_json::json!({"error": {"message": "slow down", "type": "requests"}}),
            retry_after_ms: Some(3_600_000),
        },
    );
    fake.mount(&server).await;
    let engine = engine_with(&server, Step::Plan, 0, false, &[("RETRY__MAX_RETRY_AFTER_S", "0.2")]).await;
    let id = engine.submit(SubmitRequest { topic: "Patience".into(), ..Default::default() }).await.unwrap().id;
    // An hour's retry-after obeyed would outlast this wait by far.
    let state = engine.wait(&id, Some(Duration::from_secs(20))).await.unwrap();
    assert_eq!(state.status, TopicStatus::Completed, "{:?}", state.error);
    assert_eq!(fake.count("plan"), 2);
    engine.shutdown(Duration::from_secs(1)).await;
}

/// A model server that takes requests and never answers them: it counts
/// requests and notices when the client drops the connection.
struct SilentServer {
    url: String,
    requests: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

async fn silent_server() -> SilentServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let (requests, dropped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (r, d) = (requests.clone(), dropped.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else { return };
            let (r, d) = (r.clone(), d.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                // Read the request head and body (content-length).
                loop {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                    let text = String::from_utf8_lossy(&seen).to_string();
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let length = text[..head_end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                            })
                            .and_then(|v| v.parse::<usize>().ok())
                            .unwrap_or(0);
                        if seen.len() >= head_end + 4 + length {
                            break;
                        }
                    }
                }
                r.fetch_add(1, Ordering::SeqCst);
                tokio::select! {
                    n = socket.read(&mut buf) => {
                        if matches!(n, Ok(0) | Err(_)) {
                            d.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {
                        let _ = socket.write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n").await;
                    }
                }
            });
        }
    });
    SilentServer { url, requests, dropped }
}

/// An OpenAI (Responses) provider pointed at the silent server, with a
/// request timeout far longer than the tests wait.
fn silent_provider(server: &SilentServer) -> Arc<dyn LlmProvider> {
    let settings = HttpSettings {
        base_url: server.url.clone(),
        api_key: Some(support::KEY.to_string()),
        model: "gpt-5.4-mini".into(),
        request_timeout: Duration::from_secs(60),
        connect_timeout: Duration::from_secs(2),
        temperature: None,
        seed: None,
        ..HttpSettings::new("", None, "")
    };
    Arc::new(OpenAiProvider::new(settings).unwrap())
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test]
async fn cancel_drops_the_in_flight_request_and_makes_no_further_call() {
    let server = silent_server().await;
    let provider = silent_provider(&server);
    let config = test_config(&[("WORKFLOW__VARIANTS", "1")]);
    let engine = Scriptorium::start(config, EngineOptions { provider: Some(provider), ..EngineOptions::default() })
        .await
        .unwrap();
    let id = engine.submit(SubmitRequest { topic: "Never answered".into(), ..Default::default() }).await.unwrap().id;
    eventually("the first request to reach the server", || server.requests.load(Ordering::SeqCst) == 1).await;
    engine.cancel(&id).await.unwrap();
    eventually("the client to drop the connection", || server.dropped.load(Ordering::SeqCst) == 1).await;
    let state = engine.get(&id).await.unwrap();
    assert_eq!(state.status, TopicStatus::Cancelled);
    // Nothing more goes out for the cancelled topic.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
    let health = engine.health().await.unwrap();
    assert_eq!((health.in_flight, health.queued), (0, 0));
    engine.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn shutdown_after_the_grace_period_drops_in_flight_requests() {
    let server = silent_server().await;
    let provider = silent_provider(&server);
    let engine =
        Scriptorium::start(test_config(&[]), EngineOptions { provider: Some(provider), ..EngineOptions::default() })
            .await
            .unwrap();
    let id = engine.submit(SubmitRequest { topic: "Cut off".into(), ..Default::default() }).await.unwrap().id;
    eventually("the first request", || server.requests.load(Ordering::SeqCst) == 1).await;
    let cut = engine.shutdown(Duration::from_millis(100)).await;
    assert_eq!(cut, 1);
    eventually("the client to drop the connection", || server.dropped.load(Ordering::SeqCst) == 1).await;
    // Cut off, not cancelled: it resumes on the next start.
    assert_eq!(engine.get(&id).await.unwrap().status, TopicStatus::Running);
}
