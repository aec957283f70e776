//! OpenAI-compatible Chat Completions provider (`POST {base_url}/chat/completions`),
//! meant for local servers (llama.cpp, Ollama, vLLM) as much as for OpenAI.
//!
//! Owns: the Chat Completions request body (including `response_format` for
//! structured steps) and parsing of `choices[0]` into text and usage.
//! Must not: retry, sleep or rate-limit (that is `retry` and `limiter`), log
//! or return the API key, or use parameters that only OpenAI accepts.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{post_json, BoxFuture, HttpSettings, LlmError, LlmProvider, LlmReply, LlmRequest, Usage};
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
                Ok(text) => parse_response(&text),
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
    /// `max_tokens`, not OpenAI's newer `max_completion_tokens`: llama.cpp,
    /// Ollama and vLLM all accept this one.
    max_tokens: u32,
    // Omitted rather than sent as null: some servers reject explicit nulls.
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
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
        model: &settings.model,
        messages: (
            Message { role: "system", content: &*request.instructions },
            Message { role: "user", content: &request.input },
        ),
        max_tokens: request.max_output_tokens,
        temperature: settings.temperature,
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
}

/// Turns a 2xx Chat Completions body into a reply or a classified error.
fn parse_response(body: &str) -> Result<LlmReply, LlmError> {
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
    if choice.finish_reason.as_deref() == Some("length") {
        return Err(LlmError::InvalidOutput("output cut off at max_tokens".to_string()));
    }
    let text = message.content.unwrap_or_default();
    if text.trim().is_empty() {
        return Err(LlmError::InvalidOutput("empty output".to_string()));
    }
    let usage = completion.usage.unwrap_or_default();
    Ok(LlmReply {
        text,
        usage: Usage {
            input_tokens: usage.prompt_tokens.unwrap_or(0),
            output_tokens: usage.completion_tokens.unwrap_or(0),
        },
        finish_reason: choice.finish_reason,
    })
}
