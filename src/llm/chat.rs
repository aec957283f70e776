//! OpenAI-compatible Chat Completions provider (stub, being written).
use super::{BoxFuture, HttpSettings, LlmError, LlmProvider, LlmReply, LlmRequest};

pub struct ChatProvider {
    settings: HttpSettings,
}

impl ChatProvider {
    pub fn new(settings: HttpSettings) -> Result<Self, LlmError> {
        Ok(Self { settings })
    }
}

impl LlmProvider for ChatProvider {
    fn name(&self) -> &'static str {
        "chat"
    }
    fn model(&self) -> &str {
        &self.settings.model
    }
    fn complete<'a>(&'a self, _request: &'a LlmRequest) -> BoxFuture<'a, Result<LlmReply, LlmError>> {
        Box::pin(async move { Err(LlmError::Fatal { status: None, message: "not implemented".into() }) })
    }
}
