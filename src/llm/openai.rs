//! OpenAI Responses API provider (`POST {base_url}/responses`).
//!
//! Owns: the Responses request body (including `text.format` for structured
//! steps) and parsing of the response object into text and usage.
//! Must not: retry, sleep or rate-limit (that is `retry` and `limiter`), log
//! or return the API key, or assume anything about the order or kinds of
//! `output` items beyond what the API documents.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{post_json, BoxFuture, HttpSettings, LlmError, LlmProvider, LlmReply, LlmRequest, ResponseMeta, Usage};
use crate::workflow::prompts::PromptText;
use crate::workflow::schema::without_string_lengths;

pub struct OpenAiProvider {
    settings: HttpSettings,
    client: reqwest::Client,
}

impl OpenAiProvider {
    pub fn new(settings: HttpSettings) -> Result<Self, LlmError> {
        let client = settings.client()?;
        Ok(Self { settings, client })
    }
}

impl LlmProvider for OpenAiProvider {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn model(&self) -> &str {
        &self.settings.model
    }

    fn complete<'a>(&'a self, request: &'a LlmRequest) -> BoxFuture<'a, Result<LlmReply, LlmError>> {
        Box::pin(async move {
            let body = request_body(&self.settings, request);
            // Everything the server said, errors and reply text alike, is
            // redacted on its way out (the key may be echoed anywhere).
            let result = match post_json(&self.client, &self.settings, "/responses", &body).await {
                Ok((text, meta)) => {
                    let reply = parse_response(&text, &self.settings, request.max_output_tokens, meta.clone());
                    match (reply, &meta.request_id) {
                        (Err(e), Some(id)) => Err(e.with_request_id(id)),
                        (other, _) => other,
                    }
                }
                Err(e) => Err(e),
            };
            self.settings.scrubbed(result)
        })
    }
}

#[derive(Serialize)]
struct ResponsesRequest<'a> {
    model: &'a str,
    instructions: &'a str,
    input: &'a PromptText,
    max_output_tokens: u32,
    /// We never fetch a response back by id, so do not leave drafts stored
    /// on OpenAI's side.
    store: bool,
    /// Sent only when configured: reasoning models reject any temperature.
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    /// `{"effort": …}`, only when the step sets one.
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning: Option<Reasoning>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<TextConfig<'a>>,
}

#[derive(Serialize)]
struct Reasoning {
    effort: &'static str,
}

#[derive(Serialize)]
struct TextConfig<'a> {
    format: JsonSchemaFormat<'a>,
}

#[derive(Serialize)]
struct JsonSchemaFormat<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    name: &'a str,
    schema: Value,
    strict: bool,
}

// The Responses API has no `seed` parameter, so `settings.seed` is not sent.
fn request_body<'a>(settings: &'a HttpSettings, request: &'a LlmRequest) -> ResponsesRequest<'a> {
    ResponsesRequest {
        model: request.model.as_deref().unwrap_or(&settings.model),
        instructions: &request.instructions,
        input: &request.input,
        max_output_tokens: request.max_output_tokens,
        store: false,
        temperature: request.temperature.or(settings.temperature),
        reasoning: request.reasoning_effort.and_then(|e| e.wire()).map(|effort| Reasoning { effort }),
        text: request.format.as_ref().map(|format| TextConfig {
            format: JsonSchemaFormat {
                kind: "json_schema",
                name: format.name,
                // OpenAI strict mode documents only `pattern` and `format` for
                // strings; the gates re-check the lengths after parsing. The
                // copy per call is small next to the network round trip.
                schema: without_string_lengths(&format.schema),
                strict: true,
            },
        }),
    }
}

// Every field is defaulted and nullable-tolerant (`Option`): the API adds
// fields and item types over time, and a missing `usage` must not turn a good
// answer into an error.
#[derive(Deserialize, Default)]
#[serde(default)]
struct ResponseObject {
    status: Option<String>,
    /// Kept untyped: only `message` items are parsed, so an unknown item type
    /// with an unexpected shape cannot break the whole response.
    output: Vec<Value>,
    incomplete_details: Option<IncompleteDetails>,
    usage: Option<ResponseUsage>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct IncompleteDetails {
    reason: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ResponseUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    input_tokens_details: Option<InputDetails>,
    output_tokens_details: Option<OutputDetails>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct InputDetails {
    cached_tokens: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct OutputDetails {
    reasoning_tokens: Option<u64>,
}

impl ResponseUsage {
    fn usage(self) -> Usage {
        Usage {
            input_tokens: self.input_tokens.unwrap_or(0),
            output_tokens: self.output_tokens.unwrap_or(0),
            cached_input_tokens: self.input_tokens_details.and_then(|d| d.cached_tokens).unwrap_or(0),
            reasoning_tokens: self.output_tokens_details.and_then(|d| d.reasoning_tokens).unwrap_or(0),
            cost_usd: None,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MessageItem {
    content: Vec<ContentPart>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
    refusal: Option<String>,
}

/// Turns a 2xx Responses body into a reply or a classified error.
fn parse_response(body: &str, settings: &HttpSettings, cap: u32, meta: ResponseMeta) -> Result<LlmReply, LlmError> {
    let response: ResponseObject = serde_json::from_str(body)
        .map_err(|e| LlmError::InvalidOutput(format!("response body is not a Responses object: {e}")))?;

    match response.status.as_deref() {
        // A missing status is tolerated: compatible servers sometimes omit it.
        None | Some("completed") => {}
        Some("incomplete") => {
            let reason =
                response.incomplete_details.and_then(|d| d.reason).unwrap_or_else(|| "unknown reason".to_string());
            if reason == "max_output_tokens" {
                // Billed, and worth a retry with a larger cap (reasoning may
                // have used it all, leaving no text).
                let usage = response.usage.unwrap_or_default().usage();
                let message = format!(
                    "response incomplete: max_output_tokens ({} output tokens, {} of them reasoning)",
                    usage.output_tokens, usage.reasoning_tokens
                );
                return Err(LlmError::Truncated { cap, usage, message });
            }
            return Err(LlmError::InvalidOutput(format!("response incomplete: {reason}")));
        }
        Some("failed") => {
            // A failure on OpenAI's side delivered with HTTP 200: worth a
            // retry, so it is reported as a server error. The top-level
            // `error` has the same shape as an error body.
            let message = super::error_message_from_body(body)
                .map(|m| settings.redact(&m))
                .unwrap_or_else(|| "response failed".to_string());
            return Err(LlmError::Server { status: 500, retry_after: None, message });
        }
        // `queued`, `in_progress`, `cancelled`: only possible with background
        // mode, which we never request.
        Some(other) => {
            return Err(LlmError::InvalidOutput(format!("unexpected response status `{other}`")));
        }
    }

    // Reasoning (and any future) items may come before the message, so
    // search all of `output` instead of trusting `output[0]`.
    let mut text = String::new();
    for item in &response.output {
        if item.get("type").and_then(Value::as_str) != Some("message") {
            continue;
        }
        let message = MessageItem::deserialize(item)
            .map_err(|e| LlmError::InvalidOutput(format!("malformed message item: {e}")))?;
        for part in message.content {
            match part.kind.as_str() {
                "output_text" => text.push_str(part.text.as_deref().unwrap_or_default()),
                "refusal" => {
                    let reason = part.refusal.unwrap_or_else(|| "no reason given".to_string());
                    return Err(LlmError::Refused(reason));
                }
                _ => {}
            }
        }
    }
    if text.trim().is_empty() {
        return Err(LlmError::InvalidOutput("empty output".to_string()));
    }

    Ok(LlmReply {
        text,
        usage: response.usage.unwrap_or_default().usage(),
        // Responses has a status, not a finish reason; a completed one
        // stopped on its own (an `incomplete` one is an error above).
        finish_reason: Some("stop".to_string()),
        meta,
    })
}
