//! Integration tests for the two HTTP providers (`openai`, `chat`) against a
//! local wiremock server that speaks the real OpenAI wire formats.
//!
//! Owns: the request bodies and headers we send, and how every kind of answer
//! (success, HTTP error, odd 200 body, timeout, refused connection) is
//! classified. Must not: touch the network beyond 127.0.0.1, or use a real
//! key.

use std::sync::Arc;
use std::time::Duration;

use scriptorium::llm::chat::ChatProvider;
use scriptorium::llm::openai::OpenAiProvider;
use scriptorium::llm::{FailureReason, HttpSettings, LlmError, LlmProvider, LlmRequest};
use scriptorium::workflow::schema::{check_strict, review_format};
use scriptorium::workflow::Step;
use serde_json::{json, Value};
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const KEY: &str = "test-key";

#[derive(Debug, Clone, Copy)]
enum Kind {
    OpenAi,
    Chat,
}

const BOTH: [Kind; 2] = [Kind::OpenAi, Kind::Chat];

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::OpenAi => "/responses",
            Kind::Chat => "/chat/completions",
        }
    }

    fn provider(self, settings: HttpSettings) -> Box<dyn LlmProvider> {
        match self {
            Kind::OpenAi => Box::new(OpenAiProvider::new(settings).unwrap()),
            Kind::Chat => Box::new(ChatProvider::new(settings).unwrap()),
        }
    }

    /// A realistic successful body carrying `text`.
    fn success_body(self, text: &str) -> Value {
        match self {
            Kind::OpenAi => responses_body(json!([reasoning_item(), message_item(text)])),
            Kind::Chat => chat_body(json!(text), "stop"),
        }
    }
}

fn settings(base_url: &str) -> HttpSettings {
    HttpSettings {
        base_url: base_url.to_string(),
        api_key: Some(KEY.to_string()),
        model: "gpt-test".to_string(),
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(2),
        temperature: None,
        seed: None,
        ..HttpSettings::new("", None, "")
    }
}

fn structured_request() -> LlmRequest {
    LlmRequest {
        step: Step::Plan,
        instructions: "You are a careful editor.".into(),
        input: "Review this draft: # Title\n\nBody.".into(),
        format: Some(Arc::new(review_format())),
        seed_key: 42,
        ..LlmRequest::new(Step::Plan, "".into(), "".into(), 800)
    }
}

fn markdown_request() -> LlmRequest {
    LlmRequest { format: None, ..structured_request() }
}

// ---- realistic wire bodies -------------------------------------------------

fn reasoning_item() -> Value {
    json!({
        "id": "rs_6820f382ee1c8191bc096bee70894d040ac5ba57aafcbac7",
        "type": "reasoning",
        "summary": []
    })
}

fn message_item(text: &str) -> Value {
    json!({
        "id": "msg_67ccd3acc8d48190a77525dc6de64b4104becb25c45c1d41",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}]
    })
}

fn responses_body(output: Value) -> Value {
    json!({
        "id": "resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41",
        "object": "response",
        "created_at": 1741476777,
        "status": "completed",
        "error": null,
        "incomplete_details": null,
        "instructions": "You are a careful editor.",
        "max_output_tokens": 800,
        "model": "gpt-test-2025-04-14",
        "output": output,
        "parallel_tool_calls": true,
        "previous_response_id": null,
        "reasoning": {"effort": "low", "summary": null},
        "store": false,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": {
            "input_tokens": 328,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 52,
            "output_tokens_details": {"reasoning_tokens": 32},
            "total_tokens": 380
        },
        "user": null,
        "metadata": {}
    })
}

fn chat_body(content: Value, finish_reason: &str) -> Value {
    json!({
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion",
        "created": 1741570283,
        "model": "gpt-test-2025-04-14",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": null, "annotations": []},
            "logprobs": null,
            "finish_reason": finish_reason
        }],
        "usage": {
            "prompt_tokens": 19,
            "completion_tokens": 10,
            "total_tokens": 29,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}
        },
        "service_tier": "default",
        "system_fingerprint": "fp_6ec83003ad"
    })
}

async fn serve(server: &MockServer, kind: Kind, response: ResponseTemplate) {
    Mock::given(method("POST")).and(path(kind.path())).respond_with(response).mount(server).await;
}

/// Runs one structured call against a server answering `response`.
async fn call(kind: Kind, response: ResponseTemplate) -> Result<scriptorium::llm::LlmReply, LlmError> {
    let server = MockServer::start().await;
    serve(&server, kind, response).await;
    kind.provider(settings(&server.uri())).complete(&structured_request()).await
}

async fn sent_body(server: &MockServer) -> Value {
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1, "exactly one request expected");
    serde_json::from_slice(&requests[0].body).unwrap()
}

// ---- OpenAI Responses -------------------------------------------------------

#[tokio::test]
async fn openai_structured_success_sends_strict_schema_and_bearer() {
    let server = MockServer::start().await;
    let review = review_format();
    Mock::given(method("POST"))
        .and(path("/responses"))
        .and(header("authorization", "Bearer test-key"))
        .and(header("content-type", "application/json"))
        .and(body_partial_json(json!({
            "model": "gpt-test",
            "store": false,
            "max_output_tokens": 800,
            "text": {"format": {"type": "json_schema", "name": "review", "strict": true}}
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(Kind::OpenAi.success_body(r#"{"score":7}"#)))
        .expect(1)
        .mount(&server)
        .await;

    let provider = OpenAiProvider::new(settings(&server.uri())).unwrap();
    assert_eq!(provider.name(), "openai");
    assert_eq!(provider.model(), "gpt-test");
    let reply = provider.complete(&structured_request()).await.unwrap();
    assert_eq!(reply.text, r#"{"score":7}"#);
    assert_eq!((reply.usage.input_tokens, reply.usage.output_tokens), (328, 52));

    let body = sent_body(&server).await;
    assert_eq!(body["instructions"], "You are a careful editor.");
    assert_eq!(body["input"], "Review this draft: # Title\n\nBody.");
    assert!(body.get("temperature").is_none(), "temperature must be omitted when unset");
    assert!(body.get("seed").is_none(), "the Responses API has no seed");
    let format = &body["text"]["format"];
    let keys: Vec<&str> = format.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys.len(), 4, "{keys:?}");
    let schema = &format["schema"];
    check_strict(schema).unwrap();
    let text = schema.to_string();
    assert!(!text.contains("minLength") && !text.contains("maxLength"), "{text}");
    // Everything else in the schema survives, array bounds included.
    assert_eq!(schema["properties"]["score"], review.schema["properties"]["score"]);
    assert_eq!(schema["properties"]["issues"]["maxItems"], review.schema["properties"]["issues"]["maxItems"]);
}

#[tokio::test]
async fn openai_markdown_request_has_no_format_and_sends_temperature_when_set() {
    let server = MockServer::start().await;
    serve(&server, Kind::OpenAi, ResponseTemplate::new(200).set_body_json(Kind::OpenAi.success_body("# Draft"))).await;
    let mut s = settings(&server.uri());
    s.temperature = Some(0.25);
    s.seed = Some(9);
    let reply = OpenAiProvider::new(s).unwrap().complete(&markdown_request()).await.unwrap();
    assert_eq!(reply.text, "# Draft");
    let body = sent_body(&server).await;
    assert!(body.get("text").is_none(), "{body}");
    assert_eq!(body["temperature"], 0.25);
    assert!(body.get("seed").is_none());
}

#[tokio::test]
async fn openai_without_key_sends_no_authorization() {
    let server = MockServer::start().await;
    serve(&server, Kind::OpenAi, ResponseTemplate::new(200).set_body_json(Kind::OpenAi.success_body("ok"))).await;
    let mut s = settings(&server.uri());
    s.api_key = None;
    OpenAiProvider::new(s).unwrap().complete(&markdown_request()).await.unwrap();
    let requests = server.received_requests().await.unwrap();
    assert!(!requests[0].headers.contains_key("authorization"));
}

#[tokio::test]
async fn openai_skips_reasoning_and_unknown_items_and_joins_text_parts() {
    let output = json!([
        reasoning_item(),
        {"id": "ws_1", "type": "web_search_call", "status": "completed"},
        // An item type we have never heard of, with a non-array `content`.
        {"id": "x_1", "type": "future_thing", "content": "opaque"},
        {
            "id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
            "content": [
                {"type": "output_text", "text": "Hello, ", "annotations": []},
                {"type": "output_text", "text": "world", "annotations": [], "logprobs": []}
            ]
        }
    ]);
    let reply = call(Kind::OpenAi, ResponseTemplate::new(200).set_body_json(responses_body(output))).await.unwrap();
    assert_eq!(reply.text, "Hello, world");
}

#[tokio::test]
async fn openai_missing_usage_is_zero() {
    let mut body = Kind::OpenAi.success_body("text");
    body.as_object_mut().unwrap().remove("usage");
    let reply = call(Kind::OpenAi, ResponseTemplate::new(200).set_body_json(body)).await.unwrap();
    assert_eq!((reply.usage.input_tokens, reply.usage.output_tokens), (0, 0));

    let mut body = Kind::OpenAi.success_body("text");
    body["usage"] = Value::Null;
    let reply = call(Kind::OpenAi, ResponseTemplate::new(200).set_body_json(body)).await.unwrap();
    assert_eq!(reply.usage.input_tokens, 0);
}

#[tokio::test]
async fn openai_refusal_is_refused() {
    let output = json!([{
        "id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
        "content": [{"type": "refusal", "refusal": "I'm sorry, I cannot assist with that request."}]
    }]);
    let err = call(Kind::OpenAi, ResponseTemplate::new(200).set_body_json(responses_body(output))).await.unwrap_err();
    assert!(matches!(&err, LlmError::Refused(m) if m.contains("cannot assist")), "{err:?}");
    assert_eq!(err.reason(), FailureReason::Refused);
}

#[tokio::test]
async fn openai_incomplete_at_the_cap_is_truncated_and_billed() {
    let mut body = responses_body(json!([reasoning_item(), message_item(r#"{"score":"#)]));
    body["status"] = json!("incomplete");
    body["incomplete_details"] = json!({"reason": "max_output_tokens"});
    let err = call(Kind::OpenAi, ResponseTemplate::new(200).set_body_json(body.clone())).await.unwrap_err();
    assert!(matches!(&err, LlmError::Truncated { cap: 800, .. }), "{err:?}");
    assert_eq!(err.reason(), FailureReason::OutputTruncated);
    assert!(err.is_retryable());
    let LlmError::Truncated { usage, .. } = err else { unreachable!() };
    assert_eq!((usage.output_tokens, usage.reasoning_tokens), (52, 32));
    // Any other reason stays invalid output.
    body["incomplete_details"] = json!({"reason": "content_filter"});
    let err = call(Kind::OpenAi, ResponseTemplate::new(200).set_body_json(body)).await.unwrap_err();
    assert!(matches!(&err, LlmError::InvalidOutput(m) if m.contains("content_filter")), "{err:?}");
}

#[tokio::test]
async fn openai_failed_status_is_retryable_server_error() {
    let mut body = responses_body(json!([]));
    body["status"] = json!("failed");
    body["error"] = json!({"code": "server_error", "message": "The model failed to generate a response."});
    let err = call(Kind::OpenAi, ResponseTemplate::new(200).set_body_json(body)).await.unwrap_err();
    assert!(matches!(&err, LlmError::Server { status: 500, .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(err.to_string().contains("failed to generate"), "{err}");
}

#[tokio::test]
async fn openai_empty_output_is_invalid() {
    for output in [json!([]), json!([reasoning_item()]), json!([message_item("")])] {
        let err =
            call(Kind::OpenAi, ResponseTemplate::new(200).set_body_json(responses_body(output))).await.unwrap_err();
        assert!(matches!(&err, LlmError::InvalidOutput(m) if m == "empty output"), "{err:?}");
    }
}

// ---- Chat Completions -------------------------------------------------------

#[tokio::test]
async fn chat_structured_success_sends_full_schema_and_bearer() {
    let server = MockServer::start().await;
    let review = review_format();
    Mock::given(method("POST"))
        .and(path("/chat/completions"))
        .and(header("authorization", "Bearer test-key"))
        .and(body_partial_json(json!({
            "model": "gpt-test",
            "max_completion_tokens": 800,
            "messages": [
                {"role": "system", "content": "You are a careful editor."},
                {"role": "user", "content": "Review this draft: # Title\n\nBody."}
            ],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "review", "strict": true, "schema": review.schema.clone()}
            }
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(Kind::Chat.success_body(r#"{"score":7}"#)))
        .expect(1)
        .mount(&server)
        .await;

    let provider = ChatProvider::new(settings(&server.uri())).unwrap();
    assert_eq!(provider.name(), "chat");
    let reply = provider.complete(&structured_request()).await.unwrap();
    assert_eq!(reply.text, r#"{"score":7}"#);
    assert_eq!((reply.usage.input_tokens, reply.usage.output_tokens), (19, 10));

    let body = sent_body(&server).await;
    // The schema goes out whole, string lengths included.
    assert_eq!(body["response_format"]["json_schema"]["schema"], review.schema);
    assert!(body["response_format"]["json_schema"]["schema"].to_string().contains("maxLength"));
    assert_eq!(body["messages"].as_array().unwrap().len(), 2);
    for absent in ["temperature", "seed", "max_tokens", "store", "reasoning_effort"] {
        assert!(body.get(absent).is_none(), "{absent} must not be sent: {body}");
    }
}

#[tokio::test]
async fn chat_markdown_request_sends_temperature_and_seed_when_set_and_no_key() {
    let server = MockServer::start().await;
    serve(&server, Kind::Chat, ResponseTemplate::new(200).set_body_json(Kind::Chat.success_body("# Draft"))).await;
    let mut s = settings(&server.uri());
    s.temperature = Some(0.5);
    s.seed = Some(1234);
    s.api_key = None;
    let reply = ChatProvider::new(s).unwrap().complete(&markdown_request()).await.unwrap();
    assert_eq!(reply.text, "# Draft");
    let requests = server.received_requests().await.unwrap();
    assert!(!requests[0].headers.contains_key("authorization"));
    let body: Value = serde_json::from_slice(&requests[0].body).unwrap();
    assert!(body.get("response_format").is_none(), "{body}");
    assert_eq!(body["temperature"], 0.5);
    assert_eq!(body["seed"], 1234);
}

#[tokio::test]
async fn chat_refusal_is_refused() {
    let mut body = chat_body(Value::Null, "stop");
    body["choices"][0]["message"]["refusal"] = json!("I'm sorry, I can't help with that.");
    let err = call(Kind::Chat, ResponseTemplate::new(200).set_body_json(body)).await.unwrap_err();
    assert!(matches!(&err, LlmError::Refused(m) if m.contains("can't help")), "{err:?}");
}

#[tokio::test]
async fn chat_length_cutoff_is_truncated() {
    let body = chat_body(json!(r#"{"score": 7, "issues": ["the intro"#), "length");
    let err = call(Kind::Chat, ResponseTemplate::new(200).set_body_json(body)).await.unwrap_err();
    assert!(matches!(&err, LlmError::Truncated { cap: 800, .. }), "{err:?}");
    assert_eq!(err.reason(), FailureReason::OutputTruncated);
}

#[tokio::test]
async fn chat_null_missing_or_absent_content_is_empty_output() {
    let mut missing = chat_body(Value::Null, "stop");
    missing["choices"][0]["message"].as_object_mut().unwrap().remove("content");
    let mut no_choices = chat_body(Value::Null, "stop");
    no_choices["choices"] = json!([]);
    for body in [chat_body(Value::Null, "stop"), chat_body(json!(""), "stop"), missing] {
        let err = call(Kind::Chat, ResponseTemplate::new(200).set_body_json(body)).await.unwrap_err();
        assert!(matches!(&err, LlmError::InvalidOutput(m) if m == "empty output"), "{err:?}");
    }
    let err = call(Kind::Chat, ResponseTemplate::new(200).set_body_json(no_choices)).await.unwrap_err();
    assert_eq!(err.reason(), FailureReason::InvalidOutput);
}

#[tokio::test]
async fn chat_missing_usage_and_extra_fields_are_fine() {
    // Shaped like a llama.cpp answer: no `usage`, extra `timings`.
    let mut body = chat_body(json!("hello"), "stop");
    body.as_object_mut().unwrap().remove("usage");
    body["timings"] = json!({"prompt_n": 12, "predicted_n": 3});
    body["choices"][0]["message"]["reasoning_content"] = json!("thinking…");
    let reply = call(Kind::Chat, ResponseTemplate::new(200).set_body_json(body)).await.unwrap();
    assert_eq!(reply.text, "hello");
    assert_eq!((reply.usage.input_tokens, reply.usage.output_tokens), (0, 0));
}

#[tokio::test]
async fn llama_server_answers_parse_verbatim() {
    // Bodies exactly as llama.cpp's llama-server (Gemma 3 270M) sent them in
    // the end-to-end run: extra fields (`timings`, `system_fingerprint`,
    // `completed_at`, `logprobs`, token details) are ignored, usage is read.
    let chat = r#"{"choices":[{"finish_reason":"stop","index":0,"message":{"role":"assistant","content":"{\n    \"kind\": \"article\"\n}"}}],"created":1795485239,"model":"gemma-3-270m","system_fingerprint":"b0-unknown","object":"chat.completion","usage":{"completion_tokens":12,"prompt_tokens":39,"total_tokens":51,"prompt_tokens_details":{"cached_tokens":0}},"id":"chatcmpl-O6t6jXErKEqyOMmlhCcrjWpLOP3bJtSR","timings":{"cache_n":0,"prompt_n":39,"prompt_ms":1992.018,"prompt_per_token_ms":51.07738461538462,"prompt_per_second":19.578136342141487,"predicted_n":12,"predicted_ms":3589.773,"predicted_per_token_ms":326.343,"predicted_per_second":3.0642606092362943}}"#;
    let reply = call(Kind::Chat, ResponseTemplate::new(200).set_body_raw(chat, "application/json")).await.unwrap();
    assert_eq!(serde_json::from_str::<Value>(&reply.text).unwrap(), json!({"kind": "article"}));
    assert_eq!((reply.usage.input_tokens, reply.usage.output_tokens), (39, 12));

    // Its Responses endpoint ignores `text.format` and reports `completed`
    // even when cut off at max_output_tokens: the text reaches the gate.
    let responses = r#"{"completed_at":1795485229,"created_at":1795485229,"id":"resp_im2VXPx7UJp9SdSVuN0FKLhsB0FziT9w","model":"gemma-3-270m","object":"response","output":[{"content":[{"type":"output_text","annotations":[],"logprobs":[],"text":"You classify writing requests.\nAnswer with a JSON"}],"id":"msg_0qskt7OPAntkj2SV02xX63xESQGRbX1q","role":"assistant","status":"completed","type":"message"}],"status":"completed","usage":{"input_tokens":52,"output_tokens":100,"total_tokens":152,"input_tokens_details":{"cached_tokens":0}}}"#;
    let reply =
        call(Kind::OpenAi, ResponseTemplate::new(200).set_body_raw(responses, "application/json")).await.unwrap();
    assert_eq!(reply.text, "You classify writing requests.\nAnswer with a JSON");
    assert_eq!((reply.usage.input_tokens, reply.usage.output_tokens), (52, 100));

    // Its error answers are OpenAI-shaped; a 400 is fatal with the message.
    let bad = r#"{"error":{"code":400,"message":"llama.cpp does not support 'previous_response_id'.","type":"invalid_request_error"}}"#;
    let err = call(Kind::OpenAi, ResponseTemplate::new(400).set_body_raw(bad, "application/json")).await.unwrap_err();
    assert_eq!((err.reason(), err.http_status()), (FailureReason::Fatal, Some(400)));
    assert!(err.to_string().contains("previous_response_id"), "{err}");
}

// ---- error classification, both providers -----------------------------------

#[tokio::test]
async fn rate_limit_with_retry_after_ms() {
    for kind in BOTH {
        let response = ResponseTemplate::new(429)
            .insert_header("retry-after-ms", "1500")
            .insert_header("retry-after", "2")
            .set_body_json(json!({"error": {
                "message": "Rate limit reached for gpt-test on requests per min (RPM): Limit 3, Used 3.",
                "type": "requests", "param": null, "code": "rate_limit_exceeded"
            }}));
        let err = call(kind, response).await.unwrap_err();
        assert!(matches!(&err, LlmError::RateLimited { .. }), "{kind:?}: {err:?}");
        assert_eq!(err.retry_after(), Some(Duration::from_millis(1500)), "{kind:?}");
        assert!(err.is_retryable());
        assert!(err.to_string().contains("rate_limit_exceeded"), "{err}");
    }
}

#[tokio::test]
async fn insufficient_quota_is_fatal() {
    for kind in BOTH {
        let response = ResponseTemplate::new(429).set_body_json(json!({"error": {
            "message": "You exceeded your current quota, please check your plan and billing details.",
            "type": "insufficient_quota", "param": null, "code": "insufficient_quota"
        }}));
        let err = call(kind, response).await.unwrap_err();
        assert!(matches!(&err, LlmError::Fatal { status: Some(429), .. }), "{kind:?}: {err:?}");
        assert!(!err.is_retryable());
    }
}

#[tokio::test]
async fn server_error_is_retryable() {
    for kind in BOTH {
        let response = ResponseTemplate::new(500).set_body_json(json!({"error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error", "param": null, "code": null
        }}));
        let err = call(kind, response).await.unwrap_err();
        assert!(matches!(&err, LlmError::Server { status: 500, .. }), "{kind:?}: {err:?}");
        assert!(err.is_retryable());
        assert_eq!(err.reason(), FailureReason::ServerError);

        // A proxy's HTML error page still classifies by status.
        let err = call(kind, ResponseTemplate::new(502).set_body_string("<html>Bad Gateway</html>")).await.unwrap_err();
        assert!(matches!(&err, LlmError::Server { status: 502, .. }), "{kind:?}: {err:?}");
    }
}

#[tokio::test]
async fn unauthorized_is_fatal_and_never_shows_the_key() {
    for kind in BOTH {
        // A careless compatible server that echoes the whole key back.
        let response = ResponseTemplate::new(401).set_body_json(json!({"error": {
            "message": format!("Incorrect API key provided: {KEY}. You can find your API key at https://platform.openai.com/account/api-keys."),
            "type": "invalid_request_error", "param": null, "code": "invalid_api_key"
        }}));
        let err = call(kind, response).await.unwrap_err();
        assert!(matches!(&err, LlmError::Fatal { status: Some(401), .. }), "{kind:?}: {err:?}");
        assert!(!err.is_retryable());
        let shown = err.to_string();
        assert!(!shown.contains(KEY), "{shown}");
        assert!(!format!("{err:?}").contains(KEY));
        assert!(shown.contains("invalid_api_key"), "{shown}");
    }
}

#[tokio::test]
async fn malformed_json_is_invalid_output() {
    for kind in BOTH {
        for body in ["{\"id\": \"resp_1\", \"output\": [", "<html>not json</html>", ""] {
            let response = ResponseTemplate::new(200).set_body_raw(body, "application/json");
            let err = call(kind, response).await.unwrap_err();
            assert!(matches!(&err, LlmError::InvalidOutput(_)), "{kind:?} {body:?}: {err:?}");
            assert!(err.is_retryable());
        }
    }
}

#[tokio::test]
async fn slow_server_times_out() {
    for kind in BOTH {
        let server = MockServer::start().await;
        serve(
            &server,
            kind,
            ResponseTemplate::new(200).set_body_json(kind.success_body("late")).set_delay(Duration::from_secs(3)),
        )
        .await;
        let mut s = settings(&server.uri());
        s.request_timeout = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let err = kind.provider(s).complete(&structured_request()).await.unwrap_err();
        assert!(matches!(err, LlmError::Timeout(d) if d == Duration::from_millis(300)), "{kind:?}: {err:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "timeout not enforced");
        assert_eq!(err.reason(), FailureReason::Timeout);
        assert_eq!(err.http_status(), None);
    }
}

#[tokio::test]
async fn refused_connection_is_connection_error() {
    // Bind, note the port, then free it: nothing listens there afterwards.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    for kind in BOTH {
        let err = kind
            .provider(settings(&format!("http://127.0.0.1:{port}")))
            .complete(&structured_request())
            .await
            .unwrap_err();
        assert!(matches!(&err, LlmError::Connection(_)), "{kind:?}: {err:?}");
        assert!(err.is_retryable());
        assert!(!err.to_string().contains(KEY));
    }
}
