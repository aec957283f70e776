//! OpenAI Responses API provider (stub, being written).
use super::{BoxFuture, HttpSettings, LlmError, LlmProvider, LlmReply, LlmRequest};

pub struct OpenAiProvider {
    settings: HttpSettings,
}

impl OpenAiProvider {
    pub fn new(settings: HttpSettings) -> Result<Self, LlmError> {
        Ok(Self { settings })
    }
}

impl LlmProvider for OpenAiProvider {
    fn name(&self) -> &'static str {
        "openai"
    }
    fn model(&self) -> &str {
        &self.settings.model
    }
    fn complete<'a>(&'a self, _request: &'a LlmRequest) -> BoxFuture<'a, Result<LlmReply, LlmError>> {
        Box::pin(async move { Err(LlmError::Fatal { status: None, message: "not implemented".into() }) })
    }
}
