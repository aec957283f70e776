//! The model-call span: a provider decorator that wraps every `complete`
//! in a `chat` span carrying the OpenTelemetry GenAI attributes
//! (`gen_ai.operation.name`, `gen_ai.provider.name`, `gen_ai.request.model`,
//! `gen_ai.request.max_tokens`, `gen_ai.usage.input_tokens`,
//! `gen_ai.usage.output_tokens`, `gen_ai.response.finish_reasons`,
//! `error.type` on failure).
//!
//! Must not: put prompt or answer text on the span unless
//! `telemetry.capture_content` is set (then `gen_ai.system_instructions`,
//! `gen_ai.input.messages` and `gen_ai.output.messages`, as JSON). The span
//! is at debug level: the terminal log does not show it unless `RUST_LOG`
//! asks; the OTLP layer exports it.

use std::sync::Arc;

use tracing::field::Empty;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{BoxFuture, LlmError, LlmProvider, LlmReply, LlmRequest};

/// `gen_ai.operation.name` of every call: both APIs we speak are chat.
pub const OPERATION: &str = "chat";

pub struct TracedProvider {
    inner: Arc<dyn LlmProvider>,
    capture_content: bool,
}

impl TracedProvider {
    pub fn wrap(inner: Arc<dyn LlmProvider>, capture_content: bool) -> Arc<dyn LlmProvider> {
        Arc::new(TracedProvider { inner, capture_content })
    }
}

impl LlmProvider for TracedProvider {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn model(&self) -> &str {
        self.inner.model()
    }

    fn complete<'a>(&'a self, request: &'a LlmRequest) -> BoxFuture<'a, Result<LlmReply, LlmError>> {
        // The span is opened on first poll, not here: callers build the
        // future before entering their `attempt` span, and the model call
        // belongs under it.
        Box::pin(async move {
            let model = self.inner.model();
            let span = tracing::debug_span!(
                "chat",
                "otel.name" = %format_args!("{OPERATION} {model}"),
                "otel.kind" = "client",
                "otel.status_code" = Empty,
                "gen_ai.operation.name" = OPERATION,
                "gen_ai.provider.name" = self.inner.name(),
                "gen_ai.request.model" = model,
                // i64: the OTel layer exports i64 as an int, u64 as a string.
                "gen_ai.request.max_tokens" = i64::from(request.max_output_tokens),
                "gen_ai.usage.input_tokens" = Empty,
                "gen_ai.usage.output_tokens" = Empty,
                "error.type" = Empty,
            );
            if span.is_disabled() {
                return self.inner.complete(request).await;
            }
            if self.capture_content {
                span.set_attribute("gen_ai.system_instructions", request.instructions.to_string());
                let input = serde_json::json!([
                    {"role": "user", "parts": [{"type": "text", "content": request.input.to_string()}]}
                ]);
                span.set_attribute("gen_ai.input.messages", input.to_string());
            }
            let result = self.inner.complete(request).instrument(span.clone()).await;
            record(&span, &result, self.capture_content);
            result
        })
    }
}

fn record(span: &tracing::Span, result: &Result<LlmReply, LlmError>, capture: bool) {
    match result {
        Ok(reply) => {
            let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            span.record("gen_ai.usage.input_tokens", int(reply.usage.input_tokens));
            span.record("gen_ai.usage.output_tokens", int(reply.usage.output_tokens));
            let reason = reply.finish_reason.clone().unwrap_or_else(|| "stop".to_string());
            if capture {
                let output = serde_json::json!([{
                    "role": "assistant",
                    "parts": [{"type": "text", "content": reply.text}],
                    "finish_reason": reason,
                }]);
                span.set_attribute("gen_ai.output.messages", output.to_string());
            }
            span.set_attribute(
                "gen_ai.response.finish_reasons",
                opentelemetry::Value::Array(opentelemetry::Array::String(vec![reason.into()])),
            );
        }
        Err(e) => {
            span.record("error.type", e.reason().as_str());
            span.record("otel.status_code", "ERROR");
        }
    }
}
