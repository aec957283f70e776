//! Test support: a fake OpenAI server (wiremock) that speaks the Responses
//! and Chat Completions wire formats, answers each step with output that
//! passes the gates, and can be scripted to fail specific steps.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::SeedableRng;
use scriptorium::config::Config;
use scriptorium::llm::chat::ChatProvider;
use scriptorium::llm::openai::OpenAiProvider;
use scriptorium::llm::simulated::fake_output;
use scriptorium::llm::{HttpSettings, LlmProvider};
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

pub const KEY: &str = "sk-test-secret-key-123";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Responses,
    Chat,
}

/// One scripted misbehaviour, consumed by the next request of its step.
#[derive(Debug, Clone)]
pub enum Fault {
    Status {
        status: u16,
        body: Value,
        retry_after_ms: Option<u64>,
    },
    /// 200 with text that is not valid JSON (or, for markdown steps, a draft
    /// that breaks the rules).
    Malformed,
    /// 200 with valid JSON of the wrong shape.
    WrongSchema,
    /// Responses `status: incomplete` (Chat: finish_reason length).
    Incomplete,
}

#[derive(Debug, Clone)]
pub struct Seen {
    pub step: String,
    /// The topic text, read back from the prompt's topic line.
    pub topic: String,
    pub at: Instant,
    pub body: Value,
    pub authorization: Option<String>,
    pub status: u16,
}

#[derive(Default)]
struct Script {
    faults: HashMap<String, VecDeque<Fault>>,
    /// Reviews to give, in order: (approved, score). Empty = generated.
    reviews: VecDeque<(bool, u8)>,
    /// Per-draft-marker review scores (writer embeds `marker-N`).
    seen: Vec<Seen>,
    writes: u32,
}

#[derive(Clone)]
pub struct FakeModel {
    wire: Wire,
    delay: Duration,
    script: Arc<Mutex<Script>>,
    seed: Arc<Mutex<u64>>,
}

/// Which workflow step a request body is for.
pub fn step_of(wire: Wire, body: &Value) -> String {
    let format_name = match wire {
        Wire::Responses => body["text"]["format"]["name"].as_str(),
        Wire::Chat => body["response_format"]["json_schema"]["name"].as_str(),
    };
    match format_name {
        Some("route") => "route".into(),
        Some("outline") => "plan".into(),
        Some("review") => "review".into(),
        // Writer and reviser of a structured-draft kind: told apart like the
        // markdown ones, by the input.
        Some(other) if other != "draft" => other.into(),
        _ => {
            let input = input_of(wire, body);
            if input.contains("Draft to revise") {
                "revise".into()
            } else {
                "write".into()
            }
        }
    }
}

fn input_of(wire: Wire, body: &Value) -> String {
    match wire {
        Wire::Responses => body["input"].as_str().unwrap_or("").to_string(),
        Wire::Chat => body["messages"][1]["content"].as_str().unwrap_or("").to_string(),
    }
}

/// The topic from the prompt's `Topic (…): "<json string>"` line.
pub fn topic_of(input: &str) -> String {
    input
        .lines()
        .find_map(|l| l.strip_prefix("Topic (").and_then(|rest| rest.split_once("): ")).map(|(_, t)| t))
        .and_then(|t| serde_json::from_str::<String>(t).ok())
        .unwrap_or_default()
}

fn instructions_of(wire: Wire, body: &Value) -> String {
    match wire {
        Wire::Responses => body["instructions"].as_str().unwrap_or("").to_string(),
        Wire::Chat => body["messages"][0]["content"].as_str().unwrap_or("").to_string(),
    }
}

fn schema_of(wire: Wire, body: &Value) -> Option<(String, Value)> {
    let f = match wire {
        Wire::Responses => &body["text"]["format"],
        Wire::Chat => &body["response_format"]["json_schema"],
    };
    Some((f["name"].as_str()?.to_string(), f["schema"].clone()))
}

fn ok_body(wire: Wire, text: &str, incomplete: bool) -> Value {
    match wire {
        Wire::Responses => json!({
            "id": "resp_test",
            "object": "response",
            "status": if incomplete { "incomplete" } else { "completed" },
            "incomplete_details": if incomplete { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "output": [
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                 "content": [{"type": "output_text", "text": text, "annotations": []}]}
            ],
            "usage": {"input_tokens": 100, "output_tokens": 50, "total_tokens": 150}
        }),
        Wire::Chat => json!({
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": if incomplete { "length" } else { "stop" }}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150}
        }),
    }
}

impl FakeModel {
    pub fn new(wire: Wire) -> FakeModel {
        FakeModel {
            wire,
            delay: Duration::ZERO,
            script: Arc::new(Mutex::new(Script::default())),
            seed: Arc::new(Mutex::new(7)),
        }
    }

    /// Every answer takes this long.
    pub fn with_delay(mut self, delay: Duration) -> FakeModel {
        self.delay = delay;
        self
    }

    pub fn fail(&self, step: &str, fault: Fault) -> &Self {
        self.script.lock().unwrap().faults.entry(step.to_string()).or_default().push_back(fault);
        self
    }

    pub fn reviews(&self, reviews: &[(bool, u8)]) -> &Self {
        self.script.lock().unwrap().reviews.extend(reviews.iter().copied());
        self
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.script.lock().unwrap().seen.clone()
    }

    pub fn count(&self, step: &str) -> usize {
        self.seen().iter().filter(|s| s.step == step).count()
    }

    fn generate(&self, body: &Value, step: &str) -> String {
        let mut rng = {
            let mut seed = self.seed.lock().unwrap();
            *seed += 1;
            SmallRng::seed_from_u64(*seed)
        };
        let schema = schema_of(self.wire, body);
        let mut script = self.script.lock().unwrap();
        if step == "review" {
            if let Some((approved, score)) = script.reviews.pop_front() {
                return json!({"approved": approved, "score": score, "issues": ["needs work"], "suggestions": ["add detail"]})
                    .to_string();
            }
        }
        let text = fake_output(
            schema.as_ref().map(|(n, s)| (n.as_str(), s)),
            &instructions_of(self.wire, body),
            &input_of(self.wire, body),
            &mut rng,
        );
        if step == "write" {
            script.writes += 1;
        }
        text
    }

    pub async fn mount(&self, server: &MockServer) {
        let route = match self.wire {
            Wire::Responses => "/v1/responses",
            Wire::Chat => "/v1/chat/completions",
        };
        Mock::given(method("POST")).and(path(route)).respond_with(self.clone()).mount(server).await;
    }
}

impl Respond for FakeModel {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let step = step_of(self.wire, &body);
        let authorization = request.headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
        let fault = self.script.lock().unwrap().faults.get_mut(&step).and_then(VecDeque::pop_front);
        let (template, status) = match fault {
            Some(Fault::Status { status, body, retry_after_ms }) => {
                let mut t = ResponseTemplate::new(status).set_body_json(body);
                if let Some(ms) = retry_after_ms {
                    t = t.insert_header("retry-after-ms", ms.to_string().as_str());
                }
                (t, status)
            }
            Some(Fault::Malformed) => {
                let text = if step == "write" || step == "revise" { "# too short" } else { "{\"broken\": " };
                (ResponseTemplate::new(200).set_body_json(ok_body(self.wire, text, false)), 200)
            }
            Some(Fault::WrongSchema) => {
                (ResponseTemplate::new(200).set_body_json(ok_body(self.wire, "{\"unexpected\": [1, 2]}", false)), 200)
            }
            Some(Fault::Incomplete) => {
                let text = self.generate(&body, &step);
                (ResponseTemplate::new(200).set_body_json(ok_body(self.wire, &text[..text.len() / 2], true)), 200)
            }
            None => {
                let text = self.generate(&body, &step);
                (ResponseTemplate::new(200).set_body_json(ok_body(self.wire, &text, false)), 200)
            }
        };
        let topic = topic_of(&input_of(self.wire, &body));
        self.script.lock().unwrap().seen.push(Seen { step, topic, at: Instant::now(), body, authorization, status });
        template.set_delay(self.delay)
    }
}

/// A provider of the given wire format pointed at the mock server.
pub fn provider(wire: Wire, server: &MockServer) -> Arc<dyn LlmProvider> {
    let settings = HttpSettings {
        base_url: format!("{}/v1", server.uri()),
        api_key: Some(KEY.to_string()),
        model: "gpt-5.4-mini".into(),
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        temperature: None,
        seed: None,
        ..HttpSettings::new("", None, "")
    };
    match wire {
        Wire::Responses => Arc::new(OpenAiProvider::new(settings).unwrap()),
        Wire::Chat => Arc::new(ChatProvider::new(settings).unwrap()),
    }
}

/// A config for tests: fast retries, no rate limits to wait on. Overrides
/// use the environment-variable syntax (`("RETRY__MAX_ATTEMPTS", "1")`).
pub fn test_config(overrides: &[(&str, &str)]) -> Config {
    let base = r#"
[llm]
provider = "simulated"
[llm.simulated]
latency_ms = 0
jitter_ms = 0
[limits]
requests_per_minute = 0
tokens_per_minute = 0
[retry]
initial_backoff_ms = 10
max_backoff_ms = 50
"#;
    let env: Vec<(String, String)> =
        overrides.iter().map(|(k, v)| (format!("SCRIPTORIUM_{k}"), v.to_string())).collect();
    Config::from_toml_str(base, &env).unwrap()
}
