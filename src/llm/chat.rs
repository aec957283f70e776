//! OpenAI-compatible Chat Completions provider (`POST {base_url}/chat/completions`),
//! meant for local servers (llama.cpp, Ollama, vLLM) as much as for OpenAI.
//!
//! Owns: the Chat Completions request body (including `response_format` for
//! structured steps) and parsing of `choices[0]` into text and usage.
//! Must not: retry, sleep or rate-limit (that is `retry` and `limiter`), log
//! or return the API key, or use parameters that only OpenAI accepts.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{post_json, BoxFuture, HttpSettings, LlmError, LlmProvider, LlmReply, LlmRequest, ResponseMeta, Usage};
use crate::config::ChatMaxTokensField;
use crate::workflow::prompts::PromptText;

pub struct ChatProvider {
    settings: HttpSettings,
    client: reqwest::Client,
}

impl ChatProvider {
    pub fn new(settings: HttpSettings) -> Result<Self, LlmError> {
        let client = settings.client()?;
        Ok(Self { settings, client })
    }
}

impl LlmProvider for ChatProvider {
    fn name(&self) -> &'static str {
        "chat"
    }

    fn model(&self) -> &str {
        &self.settings.model
    }

    fn complete<'a>(&'a self, request: &'a LlmRequest) -> BoxFuture<'a, Result<LlmReply, LlmError>> {
        Box::pin(async move {
            let body = request_body(&self.settings, request);
            // Everything the server said, errors and reply text alike, is
            // redacted on its way out (the key may be echoed anywhere).
            let result = match post_json(&self.client, &self.settings, "/chat/completions", &body).await {
                Ok((text, meta)) => {
                    let reply = parse_response(&text, request.max_output_tokens, meta.clone());
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
struct ChatRequest<'a> {
    model: &'a str,
    // A tuple serializes as a JSON array: [system, user].
    messages: (Message<'a, str>, Message<'a, PromptText>),
    /// OpenAI's `max_completion_tokens` (reasoning models reject
    /// `max_tokens`) unless `llm.chat_max_tokens_field` asks for the old
    /// name. Exactly one of the two is sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    // Omitted rather than sent as null: some servers reject explicit nulls.
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_effort: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<ResponseFormat<'a>>,
}

#[derive(Serialize)]
struct Message<'a, C: Serialize + ?Sized> {
    role: &'static str,
    content: &'a C,
}

#[derive(Serialize)]
struct ResponseFormat<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    json_schema: JsonSchema<'a>,
}

#[derive(Serialize)]
struct JsonSchema<'a> {
    name: &'a str,
    /// The full schema, string lengths included: local servers compile it
    /// into a grammar, and the bounds stop small models looping to
    /// `max_tokens`.
    schema: &'a Value,
    strict: bool,
}

fn request_body<'a>(settings: &'a HttpSettings, request: &'a LlmRequest) -> ChatRequest<'a> {
    ChatRequest {
        model: request.model.as_deref().unwrap_or(&settings.model),
        messages: (
            Message { role: "system", content: &*request.instructions },
            Message { role: "user", content: &request.input },
        ),
        max_completion_tokens: (settings.chat_max_tokens_field == ChatMaxTokensField::MaxCompletionTokens)
            .then_some(request.max_output_tokens),
        max_tokens: (settings.chat_max_tokens_field == ChatMaxTokensField::MaxTokens)
            .then_some(request.max_output_tokens),
        temperature: request.temperature.or(settings.temperature),
        reasoning_effort: request.reasoning_effort.and_then(|e| e.wire()),
        seed: settings.seed,
        response_format: request.format.as_ref().map(|format| ResponseFormat {
            kind: "json_schema",
            json_schema: JsonSchema { name: format.name, schema: &format.schema, strict: true },
        }),
    }
}

// Every field is defaulted and nullable-tolerant (`Option`): compatible
// servers differ in what they include, and a missing `usage` must not turn a
// good answer into an error.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Completion {
    choices: Vec<Choice>,
    usage: Option<CompletionUsage>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Choice {
    message: Option<ChoiceMessage>,
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ChoiceMessage {
    content: Option<String>,
    refusal: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CompletionUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    prompt_tokens_details: Option<PromptDetails>,
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PromptDetails {
    cached_tokens: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CompletionDetails {
    reasoning_tokens: Option<u64>,
}

impl CompletionUsage {
    fn usage(self) -> Usage {
        Usage {
            input_tokens: self.prompt_tokens.unwrap_or(0),
            output_tokens: self.completion_tokens.unwrap_or(0),
            cached_input_tokens: self.prompt_tokens_details.and_then(|d| d.cached_tokens).unwrap_or(0),
            reasoning_tokens: self.completion_tokens_details.and_then(|d| d.reasoning_tokens).unwrap_or(0),
            cost_usd: None,
        }
    }
}

/// Turns a 2xx Chat Completions body into a reply or a classified error.
fn parse_response(body: &str, cap: u32, meta: ResponseMeta) -> Result<LlmReply, LlmError> {
    let completion: Completion = serde_json::from_str(body)
        .map_err(|e| LlmError::InvalidOutput(format!("response body is not a chat completion: {e}")))?;
    // We never ask for `n > 1`, so only the first choice matters.
    let Some(choice) = completion.choices.into_iter().next() else {
        return Err(LlmError::InvalidOutput("no choices in response".to_string()));
    };
    let message = choice.message.unwrap_or_default();
    if let Some(refusal) = message.refusal {
        return Err(LlmError::Refused(refusal));
    }
    // Checked before the content: a cut-off answer may still carry text,
    // but it is half a document (or half a JSON value).
    let usage = completion.usage.unwrap_or_default().usage();
    if choice.finish_reason.as_deref() == Some("length") {
        let message = format!(
            "finish_reason length ({} output tokens, {} of them reasoning)",
            usage.output_tokens, usage.reasoning_tokens
        );
        return Err(LlmError::Truncated { cap, usage, message });
    }
    let text = message.content.unwrap_or_default();
    if text.trim().is_empty() {
        return Err(LlmError::InvalidOutput("empty output".to_string()));
    }
    Ok(LlmReply { text, usage, finish_reason: choice.finish_reason, meta })
}
