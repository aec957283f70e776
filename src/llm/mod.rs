//! The LLM layer: the one trait the actors call (`LlmProvider`), the three
//! providers behind it, the shared rate limiter and the retry machinery.
//!
//! Owns: all network I/O to model providers, error classification (done once,
//! here: `LlmError::is_retryable`), the API key. Must not: know about topics,
//! actors or the store; log or return the API key; retry anywhere but in
//! `retry::call_with_retries`.

pub mod chat;
pub mod limiter;
pub mod limiter_redis;
pub mod openai;
pub mod retry;
pub mod simulated;
pub mod traced;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{ChatMaxTokensField, Config, Price, ProviderChoice, ReasoningEffort};
use crate::workflow::prompts::PromptText;
use crate::workflow::schema::StructuredFormat;
use crate::workflow::Step;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One model call, provider-neutral. Cheap to clone: the schema is shared.
#[derive(Debug, Clone)]
pub struct LlmRequest {
    pub step: Step,
    /// System / developer instructions (shared between requests).
    pub instructions: Arc<str>,
    /// The user input (topic, draft to review, …).
    pub input: PromptText,
    /// This attempt's output cap (reasoning included). `StepCaller::call`
    /// raises it after a truncated answer (`output_cap`).
    pub max_output_tokens: u32,
    /// The most `max_output_tokens` may be raised to.
    pub max_output_tokens_ceiling: u32,
    /// The step's model; `None` = the provider's (`llm.model`).
    pub model: Option<Arc<str>>,
    /// Omitted from the request when `None`.
    pub reasoning_effort: Option<ReasoningEffort>,
    /// Omitted from the request when `None` (reasoning models reject it).
    pub temperature: Option<f64>,
    /// The model's price, when the table has one: the call's cost.
    pub price: Option<Price>,
    /// What this step may still spend (the topic runner's share for it);
    /// `StepCaller::call` starts no attempt whose worst case (prompt
    /// estimate + this attempt's cap) does not fit in what is left of it.
    /// `None` = no budget.
    pub spend_limit: Option<crate::workflow::budget::Remaining>,
    /// `Some` for structured (JSON) steps; `None` for markdown.
    pub format: Option<Arc<StructuredFormat>>,
    /// Stable per (topic, step, variant, attempt): lets the simulated provider
    /// be deterministic without seeing topic ids.
    pub seed_key: u64,
}

impl LlmRequest {
    /// A request with no per-step settings: the provider's model, no
    /// reasoning effort or temperature, no price, `max_output_tokens` as
    /// both the cap and its ceiling (tests and benches).
    pub fn new(step: Step, instructions: Arc<str>, input: PromptText, max_output_tokens: u32) -> LlmRequest {
        LlmRequest {
            step,
            instructions,
            input,
            max_output_tokens,
            max_output_tokens_ceiling: max_output_tokens,
            model: None,
            reasoning_effort: None,
            temperature: None,
            price: None,
            spend_limit: None,
            format: None,
            seed_key: 0,
        }
    }

    /// Token cost charged to the limiter before the call: prompt characters
    /// / 4 plus this attempt's output cap (the step's own, not a global one).
    pub fn estimated_tokens(&self) -> u32 {
        self.prompt_tokens_estimate().saturating_add(self.max_output_tokens)
    }

    /// Prompt characters / 4: the input half of `estimated_tokens`.
    pub fn prompt_tokens_estimate(&self) -> u32 {
        let prompt_chars = self.instructions.len() + self.input.len();
        u32::try_from(prompt_chars / 4).unwrap_or(u32::MAX)
    }

    /// Applies a step's settings (model, cap, effort, temperature, price).
    pub fn with_settings(mut self, s: &StepCallSettings) -> LlmRequest {
        self.model = s.model.clone();
        self.max_output_tokens = s.max_output_tokens;
        self.max_output_tokens_ceiling = s.max_output_tokens_ceiling;
        self.reasoning_effort = s.reasoning_effort;
        self.temperature = s.temperature;
        self.price = s.price;
        self
    }

    /// The worst case of this attempt: prompt estimate + its cap, priced.
    pub fn worst_case(&self) -> crate::workflow::budget::WorstCase {
        crate::workflow::budget::step_worst_case(
            self.prompt_tokens_estimate(),
            self.max_output_tokens,
            1,
            self.price.as_ref(),
        )
    }
}

/// What a step's calls are sent with, from `[llm]`, `[llm.steps.<step>]`
/// and `[prices]`. Pure: the runner can compute a step's worst case from it
/// before the step runs (`workflow::budget`).
#[derive(Debug, Clone, PartialEq)]
pub struct StepCallSettings {
    /// `Some` only when the step names a model of its own.
    pub model: Option<Arc<str>>,
    /// The first attempt's cap.
    pub max_output_tokens: u32,
    pub max_output_tokens_ceiling: u32,
    pub reasoning_effort: Option<ReasoningEffort>,
    pub temperature: Option<f64>,
    pub price: Option<Price>,
}

impl StepCallSettings {
    pub fn for_step(config: &Config, step: Step) -> StepCallSettings {
        let s = config.llm.steps.get(step);
        StepCallSettings {
            model: s.model.as_deref().map(Arc::from),
            max_output_tokens: s.max_output_tokens,
            max_output_tokens_ceiling: config.llm.max_output_tokens.max(s.max_output_tokens),
            reasoning_effort: s.reasoning_effort,
            temperature: s.temperature.or(config.llm.temperature),
            price: config.step_price(step).copied(),
        }
    }

    /// The most output tokens any attempt of this step may be billed for
    /// (the cap after every doubling).
    pub fn worst_case_output(&self) -> u32 {
        self.max_output_tokens_ceiling
    }
}

/// The output cap of an attempt after `truncations` truncated answers:
/// the step's first cap doubled once per truncation, never above the
/// ceiling. A function of the settings and the attempt history only, so the
/// retry loop and a budget check compute the same number.
pub fn output_cap(first: u32, ceiling: u32, truncations: u32) -> u32 {
    let ceiling = ceiling.max(first);
    let factor = 1u64 << truncations.min(20);
    u32::try_from((u64::from(first) * factor).min(u64::from(ceiling))).unwrap_or(ceiling)
}

/// Tokens one call (or a step's calls, summed) was billed for, as the
/// server reported them. `cached_input_tokens` is part of `input_tokens`,
/// `reasoning_tokens` part of `output_tokens` (as OpenAI counts them).
/// `cost_usd` is `None` when the model has no price.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    // Defaults keep journals written before these fields readable.
    #[serde(default)]
    pub cached_input_tokens: u64,
    #[serde(default)]
    pub reasoning_tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

impl Usage {
    /// Input + output: what counts against a token budget.
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens + self.output_tokens
    }

    /// Adds one call's tokens, priced with `price` (no price → the sum has
    /// no cost either: a partial cost would understate).
    pub fn add_call(&mut self, call: &Usage, price: Option<&Price>) {
        self.input_tokens += call.input_tokens;
        self.output_tokens += call.output_tokens;
        self.cached_input_tokens += call.cached_input_tokens;
        self.reasoning_tokens += call.reasoning_tokens;
        self.cost_usd = match (self.cost_usd, price) {
            (Some(c), Some(p)) => Some(c + p.cost_usd(call.input_tokens, call.cached_input_tokens, call.output_tokens)),
            _ => None,
        };
    }
}

/// What the response headers said besides the body: the request id (for
/// support tickets and logs) and the server's view of its rate limits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResponseMeta {
    pub request_id: Option<String>,
    pub limits: RateLimitHeaders,
}

/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateLimitHeaders {
    pub limit_requests: Option<u64>,
    pub limit_tokens: Option<u64>,
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub reset_requests: Option<Duration>,
    pub reset_tokens: Option<Duration>,
}

/// Longest pause the rate-limit headers may impose on the limiter.
pub const MAX_HEADER_PAUSE: Duration = Duration::from_secs(60);

impl RateLimitHeaders {
    pub fn from_headers(h: &reqwest::header::HeaderMap) -> RateLimitHeaders {
        let num = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
        let dur = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).and_then(parse_reset);
        RateLimitHeaders {
            limit_requests: num("x-ratelimit-limit-requests"),
            limit_tokens: num("x-ratelimit-limit-tokens"),
            remaining_requests: num("x-ratelimit-remaining-requests"),
            remaining_tokens: num("x-ratelimit-remaining-tokens"),
            reset_requests: dur("x-ratelimit-reset-requests"),
            reset_tokens: dur("x-ratelimit-reset-tokens"),
        }
    }

    /// How long every caller should hold back: only when the server is
    /// stricter than our own limiter (its limit below ours, or ours off) and
    /// says a limit is spent, until it resets (at most `MAX_HEADER_PAUSE`).
    /// With equal limits the limiter already keeps the pace; pausing on
    /// every empty bucket would only slow it.
    pub fn pause(&self, configured_rpm: u32, configured_tpm: u32) -> Option<Duration> {
        let stricter = |server: Option<u64>, ours: u32| server.is_some_and(|s| ours == 0 || s < u64::from(ours));
        let mut pause: Option<Duration> = None;
        if stricter(self.limit_requests, configured_rpm) && self.remaining_requests == Some(0) {
            pause = pause.max(self.reset_requests);
        }
        if stricter(self.limit_tokens, configured_tpm) && self.remaining_tokens == Some(0) {
            pause = pause.max(self.reset_tokens);
        }
        pause.filter(|p| !p.is_zero()).map(|p| p.min(MAX_HEADER_PAUSE))
    }
}

/// OpenAI's reset format: `17ms`, `1s`, `1.5s`, `6m0s`, `1h2m3s`.
pub fn parse_reset(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let mut total = 0.0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let split = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (number, tail) = rest.split_at(split);
        let value: f64 = number.parse().ok()?;
        let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        total += value
            * match unit {
                "ms" => 0.001,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                _ => return None,
            };
        rest = next;
    }
    (total.is_finite() && total >= 0.0).then(|| Duration::from_secs_f64(total))
}

/// A successful provider answer: the text, before any gate.
#[derive(Debug, Clone)]
pub struct LlmReply {
    pub text: String,
    pub usage: Usage,
    /// Why the model stopped (`stop`, `length`, …), as the provider said
    /// it; `None` when it did not say.
    pub finish_reason: Option<String>,
    pub meta: ResponseMeta,
}

/// Small fixed set of failure reasons, used as metric label values and in
/// state files. Stable names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    RateLimited,
    ServerError,
    Timeout,
    Connection,
    InvalidOutput,
    Refused,
    Fatal,
    ActorRestart,
    /// The answer hit the output cap (`incomplete` / `finish_reason:
    /// length`); the next attempt raises the cap.
    OutputTruncated,
    /// The next attempt's worst case did not fit the step's budget.
    BudgetExceeded,
}

impl FailureReason {
    pub const ALL: [FailureReason; 10] = [
        FailureReason::RateLimited,
        FailureReason::ServerError,
        FailureReason::Timeout,
        FailureReason::Connection,
        FailureReason::InvalidOutput,
        FailureReason::Refused,
        FailureReason::Fatal,
        FailureReason::ActorRestart,
        FailureReason::OutputTruncated,
        FailureReason::BudgetExceeded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::RateLimited => "rate_limited",
            FailureReason::ServerError => "server_error",
            FailureReason::Timeout => "timeout",
            FailureReason::Connection => "connection",
            FailureReason::InvalidOutput => "invalid_output",
            FailureReason::Refused => "refused",
            FailureReason::Fatal => "fatal",
            FailureReason::ActorRestart => "actor_restart",
            FailureReason::OutputTruncated => "output_truncated",
            FailureReason::BudgetExceeded => "budget_exceeded",
        }
    }
}

/// A failed call, classified once. Messages never contain the API key.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LlmError {
    #[error("rate limited (HTTP 429): {message}")]
    RateLimited { retry_after: Option<Duration>, message: String },
    #[error("server error (HTTP {status}): {message}")]
    Server { status: u16, retry_after: Option<Duration>, message: String },
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    #[error("connection error: {0}")]
    Connection(String),
    /// Malformed JSON, wrong schema, incomplete, empty, or a gate rejection.
    #[error("invalid output: {0}")]
    InvalidOutput(String),
    #[error("model refused: {0}")]
    Refused(String),
    /// The answer stopped at the output cap, maybe with no text at all when
    /// reasoning used it up. Billed: `usage` is what the server counted.
    #[error("output truncated at max output tokens {cap}: {message}")]
    Truncated { cap: u32, usage: Usage, message: String },
    /// Not sent: the attempt could cost more than the budget has left.
    /// Never retried.
    #[error("budget exceeded: {0}")]
    BudgetExceeded(String),
    /// 400/401/403/404, `insufficient_quota`: never retried.
    #[error("fatal error{}: {message}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Fatal { status: Option<u16>, message: String },
    /// The stage worker running the attempt died (a panic, or it was
    /// stopped for hanging) and was restarted. Retryable: counted against
    /// `retry.max_attempts` like any other failed attempt.
    #[error("stage worker restarted: {0}")]
    WorkerLost(String),
    /// The topic was cancelled (or its lease lost) while the attempt ran:
    /// its request was dropped. Never retried, never journaled as a failure.
    #[error("cancelled")]
    Cancelled,
}

impl LlmError {
    /// The same error with its message rewritten by `f` (used to redact).
    pub fn map_message(self, f: impl FnOnce(String) -> String) -> LlmError {
        match self {
            LlmError::RateLimited { retry_after, message } => {
                LlmError::RateLimited { retry_after, message: f(message) }
            }
            LlmError::Server { status, retry_after, message } => {
                LlmError::Server { status, retry_after, message: f(message) }
            }
            LlmError::Timeout(d) => LlmError::Timeout(d),
            LlmError::Connection(m) => LlmError::Connection(f(m)),
            LlmError::InvalidOutput(m) => LlmError::InvalidOutput(f(m)),
            LlmError::Refused(m) => LlmError::Refused(f(m)),
            LlmError::Fatal { status, message } => LlmError::Fatal { status, message: f(message) },
            LlmError::WorkerLost(m) => LlmError::WorkerLost(f(m)),
            LlmError::Cancelled => LlmError::Cancelled,
            LlmError::Truncated { cap, usage, message } => LlmError::Truncated { cap, usage, message: f(message) },
            LlmError::BudgetExceeded(m) => LlmError::BudgetExceeded(f(m)),
        }
    }

    pub fn is_retryable(&self) -> bool {
        !matches!(self, LlmError::Fatal { .. } | LlmError::Cancelled | LlmError::BudgetExceeded(_))
    }

    pub fn reason(&self) -> FailureReason {
        match self {
            LlmError::RateLimited { .. } => FailureReason::RateLimited,
            LlmError::Server { .. } => FailureReason::ServerError,
            LlmError::Timeout(_) => FailureReason::Timeout,
            LlmError::Connection(_) => FailureReason::Connection,
            LlmError::InvalidOutput(_) => FailureReason::InvalidOutput,
            LlmError::Refused(_) => FailureReason::Refused,
            LlmError::Truncated { .. } => FailureReason::OutputTruncated,
            LlmError::BudgetExceeded(_) => FailureReason::BudgetExceeded,
            LlmError::Fatal { .. } | LlmError::Cancelled => FailureReason::Fatal,
            LlmError::WorkerLost(_) => FailureReason::ActorRestart,
        }
    }

    /// Server-requested delay (`retry-after-ms` / `retry-after`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            LlmError::RateLimited { retry_after, .. } | LlmError::Server { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// HTTP status for the requests metric; `None` when no response came.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            LlmError::RateLimited { .. } => Some(429),
            LlmError::Server { status, .. } => Some(*status),
            LlmError::Fatal { status, .. } => *status,
            // Invalid output and refusals arrived in a 200 response.
            LlmError::InvalidOutput(_) | LlmError::Refused(_) | LlmError::Truncated { .. } => Some(200),
            LlmError::Timeout(_)
            | LlmError::Connection(_)
            | LlmError::WorkerLost(_)
            | LlmError::Cancelled
            | LlmError::BudgetExceeded(_) => None,
        }
    }

    /// Classifies an HTTP error status and body the way OpenAI documents
    /// them. `insufficient_quota` is a 429 that will not go away by waiting.
    pub fn from_status(status: u16, body: &str, retry_after: Option<Duration>) -> LlmError {
        let message = error_message_from_body(body).unwrap_or_else(|| format!("HTTP {status}"));
        let quota = body.contains("insufficient_quota");
        match status {
            429 if quota => LlmError::Fatal { status: Some(status), message },
            429 => LlmError::RateLimited { retry_after, message },
            408 | 409 => LlmError::Server { status, retry_after, message },
            s if s >= 500 => LlmError::Server { status, retry_after, message },
            _ => LlmError::Fatal { status: Some(status), message },
        }
    }
}

/// Pulls `error.message` (and code) out of an OpenAI-style error body; one
/// line, bounded length.
pub fn error_message_from_body(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let err = v.get("error")?;
    let msg = match err {
        serde_json::Value::String(s) => s.clone(),
        _ => {
            let m = err.get("message").and_then(|m| m.as_str()).unwrap_or("").to_string();
            match err.get("code").and_then(|c| c.as_str()) {
                Some(code) if !m.is_empty() => format!("{m} ({code})"),
                Some(code) => code.to_string(),
                None => m,
            }
        }
    };
    let line: String = msg.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.is_empty() {
        None
    } else {
        Some(line.chars().take(300).collect())
    }
}

/// Longest server-requested pause we honour (seconds): a hostile or broken
/// `retry-after: 1e300` must neither panic (`Duration` overflow) nor park
/// every topic for ever.
const MAX_RETRY_AFTER_S: f64 = 600.0;

/// Parses `retry-after-ms` (preferred) or `retry-after` (seconds), capped at
/// `MAX_RETRY_AFTER_S`.
pub fn retry_after_from_headers(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    if let Some(ms) =
        headers.get("retry-after-ms").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<f64>().ok())
    {
        if ms.is_finite() && ms >= 0.0 {
            return Some(Duration::from_secs_f64((ms / 1000.0).min(MAX_RETRY_AFTER_S)));
        }
    }
    headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(MAX_RETRY_AFTER_S)))
}

/// The one interface actors use to reach a model.
pub trait LlmProvider: Send + Sync + 'static {
    /// `openai`, `chat` or `simulated`; a metrics label.
    fn name(&self) -> &'static str;
    fn model(&self) -> &str;
    fn complete<'a>(&'a self, request: &'a LlmRequest) -> BoxFuture<'a, Result<LlmReply, LlmError>>;
}

/// Resolves `llm.provider` (including `auto`) and the environment into a
/// provider. Returns the provider and a one-line notice for stderr when the
/// choice was automatic.
pub fn build_provider(config: &Config) -> Result<(Arc<dyn LlmProvider>, Option<String>), LlmError> {
    let (provider, notice) = build_untraced(config)?;
    Ok((traced::TracedProvider::wrap(provider, config.telemetry.capture_content), notice))
}

fn build_untraced(config: &Config) -> Result<(Arc<dyn LlmProvider>, Option<String>), LlmError> {
    let key = std::env::var("OPENAI_API_KEY").ok().filter(|k| !k.trim().is_empty());
    let base_url = std::env::var("OPENAI_BASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| config.llm.base_url.clone());
    let http = HttpSettings {
        base_url: base_url.trim_end_matches('/').to_string(),
        api_key: key.clone(),
        model: config.llm.model.clone(),
        request_timeout: Duration::from_secs_f64(config.llm.request_timeout_s),
        connect_timeout: Duration::from_secs_f64(config.llm.connect_timeout_s),
        temperature: config.llm.temperature,
        seed: config.llm.seed,
        chat_max_tokens_field: config.llm.chat_max_tokens_field,
        organization: env_nonempty("OPENAI_ORG_ID"),
        project: env_nonempty("OPENAI_PROJECT_ID"),
    };
    match config.llm.provider {
        ProviderChoice::Simulated => {
            Ok((Arc::new(simulated::SimulatedProvider::new(config.llm.simulated.clone())), None))
        }
        ProviderChoice::Auto if key.is_none() => Ok((
            Arc::new(simulated::SimulatedProvider::new(config.llm.simulated.clone())),
            Some("provider: simulated (offline) — set OPENAI_API_KEY to use OpenAI".to_string()),
        )),
        ProviderChoice::Auto | ProviderChoice::Openai => {
            if http.api_key.is_none() {
                return Err(LlmError::Fatal {
                    status: None,
                    message: "llm.provider = \"openai\" needs an API key: set the OPENAI_API_KEY environment variable \
                              (or set llm.provider = \"simulated\" to run offline)"
                        .into(),
                });
            }
            Ok((Arc::new(openai::OpenAiProvider::new(http)?), None))
        }
        ProviderChoice::Chat => Ok((Arc::new(chat::ChatProvider::new(http)?), None)),
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

/// `scriptorium/<version>`, sent as `User-Agent` on every call.
pub const USER_AGENT: &str = concat!("scriptorium/", env!("CARGO_PKG_VERSION"));

/// What the HTTP providers need. `Debug` redacts the key.
#[derive(Clone)]
pub struct HttpSettings {
    pub base_url: String,
    pub api_key: Option<String>,
    pub model: String,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Used when a request carries no temperature of its own.
    pub temperature: Option<f64>,
    pub seed: Option<u64>,
    /// Chat provider only: the output cap's field name.
    pub chat_max_tokens_field: ChatMaxTokensField,
    /// `OPENAI_ORG_ID` → `OpenAI-Organization`.
    pub organization: Option<String>,
    /// `OPENAI_PROJECT_ID` → `OpenAI-Project`.
    pub project: Option<String>,
}

impl HttpSettings {
    /// Settings for a server at `base_url` with everything else at its
    /// default (tests and benches).
    pub fn new(base_url: impl Into<String>, api_key: Option<String>, model: impl Into<String>) -> HttpSettings {
        HttpSettings {
            base_url: base_url.into(),
            api_key,
            model: model.into(),
            request_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(10),
            temperature: None,
            seed: None,
            chat_max_tokens_field: ChatMaxTokensField::MaxCompletionTokens,
            organization: None,
            project: None,
        }
    }
}

impl std::fmt::Debug for HttpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSettings")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("model", &self.model)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl HttpSettings {
    /// One pooled client per provider (never per call).
    pub fn client(&self) -> Result<reqwest::Client, LlmError> {
        reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .timeout(self.request_timeout)
            .connect_timeout(self.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| LlmError::Fatal { status: None, message: format!("cannot build HTTP client: {e}") })
    }
}

/// Maps a reqwest transport error (no HTTP status) to our classes.
pub fn classify_transport_error(err: &reqwest::Error, timeout: Duration) -> LlmError {
    if err.is_timeout() {
        LlmError::Timeout(timeout)
    } else {
        // reqwest errors carry the URL, never headers, so the key cannot leak.
        let mut msg = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(s) = source {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            source = s.source();
        }
        LlmError::Connection(msg)
    }
}

impl HttpSettings {
    /// Replaces the API key, and any run of at least `MIN_LEAK` of its
    /// characters, in text a server supplied. OpenAI masks keys it rejects,
    /// but compatible servers and proxies echo the `Authorization` value
    /// back, whole, cut short or `\u`-escaped in JSON: this runs on decoded
    /// text, never on the raw body, so escapes cannot hide the key.
    pub(crate) fn redact(&self, text: &str) -> String {
        match self.api_key.as_deref() {
            Some(key) if !key.is_empty() => redact_secret(text, key),
            _ => text.to_string(),
        }
    }

    /// `redact` applied to every message an error carries.
    pub(crate) fn scrub(&self, error: LlmError) -> LlmError {
        error.map_message(|m| self.redact(&m))
    }

    /// What a provider returns: the reply text (the model's words come from
    /// the server too) and any error, both redacted.
    pub(crate) fn scrubbed(&self, result: Result<LlmReply, LlmError>) -> Result<LlmReply, LlmError> {
        match result {
            Ok(reply) => Ok(LlmReply { text: self.redact(&reply.text), ..reply }),
            Err(e) => Err(self.scrub(e)),
        }
    }
}

/// Shortest run of a secret's bytes that counts as leaking it: long enough
/// that ordinary text never matches by chance, short enough that a key cut
/// at any point (or masked in the middle) still loses both halves.
pub const MIN_LEAK: usize = 8;

/// Replaces every stretch of `text` made of runs of at least `MIN_LEAK`
/// bytes that occur in `secret` (the whole secret included) with
/// `<redacted>`. Linear in `text`: each window is one hash lookup.
pub fn redact_secret(text: &str, secret: &str) -> String {
    let (t, k) = (text.as_bytes(), secret.as_bytes());
    let w = MIN_LEAK.min(k.len());
    if w == 0 || t.len() < w {
        return text.to_string();
    }
    let windows: std::collections::HashSet<&[u8]> = k.windows(w).collect();
    let mut covered: Option<Vec<bool>> = None;
    for i in 0..=t.len() - w {
        if windows.contains(&t[i..i + w]) {
            let c = covered.get_or_insert_with(|| vec![false; t.len()]);
            c[i..i + w].iter_mut().for_each(|b| *b = true);
        }
    }
    let Some(covered) = covered else { return text.to_string() };
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < t.len() {
        if !covered[i] {
            // Copy up to the next covered byte, whole characters only.
            let mut j = i;
            while j < t.len() && !covered[j] {
                j += 1;
            }
            while !text.is_char_boundary(j) {
                j += 1;
            }
            if j > i {
                out.push_str(&text[i..j]);
            }
            i = j;
            continue;
        }
        let mut j = i;
        while j < t.len() && covered[j] {
            j += 1;
        }
        // A run may end inside a multi-byte character: take all of it.
        while !text.is_char_boundary(j) {
            j += 1;
        }
        out.push_str("<redacted>");
        i = j;
    }
    out
}

/// The HTTP half shared by the two network providers: POSTs `body` as JSON to
/// `{base_url}{path}` (bearer key only when one is set, OpenAI's organization
/// and project headers when configured) and returns the body text of a 2xx
/// answer with what its headers said. Every failure comes back already
/// classified, with the key redacted from anything the server said and the
/// server's `x-request-id` in the message. Parsing the 2xx body is the
/// caller's job: only it knows the wire format.
pub(crate) async fn post_json<B: serde::Serialize + ?Sized>(
    client: &reqwest::Client,
    settings: &HttpSettings,
    path: &str,
    body: &B,
) -> Result<(String, ResponseMeta), LlmError> {
    let mut builder = client.post(format!("{}{path}", settings.base_url)).json(body);
    if let Some(key) = settings.api_key.as_deref() {
        // `bearer_auth` marks the header sensitive, so reqwest never prints it.
        builder = builder.bearer_auth(key);
    }
    if let Some(org) = settings.organization.as_deref() {
        builder = builder.header("OpenAI-Organization", org);
    }
    if let Some(project) = settings.project.as_deref() {
        builder = builder.header("OpenAI-Project", project);
    }
    let response = builder.send().await.map_err(|e| classify_transport_error(&e, settings.request_timeout))?;
    let status = response.status();
    // Read the headers before `text()` consumes the response.
    let retry_after = retry_after_from_headers(response.headers());
    let meta = ResponseMeta {
        request_id: response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            // Bounded and printable: it goes into errors and log lines.
            .map(|v| v.chars().filter(|c| c.is_ascii_graphic()).take(100).collect::<String>())
            .filter(|v| !v.is_empty()),
        limits: RateLimitHeaders::from_headers(response.headers()),
    };
    if !status.is_success() {
        // The body only improves the message; losing it must not hide the
        // status, so a failed read degrades to an empty body.
        let text = response.text().await.unwrap_or_default();
        // Redacted after decoding: the body may spell the key with JSON
        // escapes that only decoding turns back into the key.
        let error = settings.scrub(LlmError::from_status(status.as_u16(), &text, retry_after));
        return Err(match &meta.request_id {
            Some(id) => error.with_request_id(id),
            None => error,
        });
    }
    // The client timeout covers the body too, so a stalled body is a Timeout.
    let text = response.text().await.map_err(|e| classify_transport_error(&e, settings.request_timeout))?;
    Ok((text, meta))
}

impl LlmError {
    /// Appends `(request id …)` to the message: support needs it, and the
    /// step's error and log line carry the message.
    pub fn with_request_id(self, id: &str) -> LlmError {
        let tag = |m: String| format!("{m} (request id {id})");
        match self {
            LlmError::RateLimited { retry_after, message } => {
                LlmError::RateLimited { retry_after, message: tag(message) }
            }
            LlmError::Server { status, retry_after, message } => {
                LlmError::Server { status, retry_after, message: tag(message) }
            }
            LlmError::Fatal { status, message } => LlmError::Fatal { status, message: tag(message) },
            LlmError::InvalidOutput(m) => LlmError::InvalidOutput(tag(m)),
            LlmError::Refused(m) => LlmError::Refused(tag(m)),
            LlmError::Truncated { cap, usage, message } => LlmError::Truncated { cap, usage, message: tag(message) },
            other @ (LlmError::Timeout(_)
            | LlmError::Connection(_)
            | LlmError::BudgetExceeded(_)
            | LlmError::WorkerLost(_)
            | LlmError::Cancelled) => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classification() {
        let cases: &[(u16, &str, bool, FailureReason)] = &[
            (
                429,
                r#"{"error":{"message":"slow down","code":"rate_limit_exceeded"}}"#,
                true,
                FailureReason::RateLimited,
            ),
            (
                429,
                r#"{"error":{"message":"quota","type":"insufficient_quota","code":"insufficient_quota"}}"#,
                false,
                FailureReason::Fatal,
            ),
            (408, "", true, FailureReason::ServerError),
            (409, "", true, FailureReason::ServerError),
            (500, "oops", true, FailureReason::ServerError),
            (503, "", true, FailureReason::ServerError),
            (400, r#"{"error":{"message":"bad schema"}}"#, false, FailureReason::Fatal),
            (401, "", false, FailureReason::Fatal),
            (403, "", false, FailureReason::Fatal),
            (404, "", false, FailureReason::Fatal),
        ];
        for (status, body, retryable, reason) in cases {
            let e = LlmError::from_status(*status, body, None);
            assert_eq!(e.is_retryable(), *retryable, "{status} {body}");
            assert_eq!(e.reason(), *reason, "{status}");
            assert_eq!(e.http_status(), Some(*status));
        }
        assert!(LlmError::from_status(400, r#"{"error":{"message":"bad schema"}}"#, None)
            .to_string()
            .contains("bad schema"));
    }

    #[test]
    fn redaction_covers_whole_cut_and_masked_keys() {
        let key = "sk-proj-AbCdEfGh0123456789xyzXYZ";
        let cases = [
            (format!("Incorrect API key provided: Bearer {key}."), "Incorrect API key provided: Bearer <redacted>."),
            (format!("key {} cut", &key[..14]), "key <redacted> cut"),
            (format!("masked {}****{}", &key[..12], &key[key.len() - 10..]), "masked <redacted>****<redacted>"),
            ("nothing here, sk-other".to_string(), "nothing here, sk-other"),
            (format!("ünïcödé {key}é"), "ünïcödé <redacted>é"),
        ];
        for (text, want) in cases {
            assert_eq!(redact_secret(&text, key), want, "{text}");
        }
        assert_eq!(redact_secret("short", key), "short");
    }

    #[test]
    fn absurd_retry_after_is_capped_not_a_panic() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "1e300".parse().unwrap());
        assert_eq!(retry_after_from_headers(&h), Some(Duration::from_secs(600)));
        h.insert("retry-after-ms", "1e300".parse().unwrap());
        assert_eq!(retry_after_from_headers(&h), Some(Duration::from_secs(600)));
    }

    #[test]
    fn output_cap_doubles_to_the_ceiling() {
        assert_eq!(output_cap(500, 8000, 0), 500);
        assert_eq!(output_cap(500, 8000, 1), 1000);
        assert_eq!(output_cap(500, 8000, 4), 8000);
        assert_eq!(output_cap(500, 8000, 40), 8000);
        assert_eq!(output_cap(3000, 8000, 2), 8000);
        // A ceiling below the first cap never lowers it.
        assert_eq!(output_cap(4000, 2000, 3), 4000);
    }

    #[test]
    fn reset_durations_and_header_pauses() {
        assert_eq!(parse_reset("17ms"), Some(Duration::from_millis(17)));
        assert_eq!(parse_reset("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_reset("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_reset("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_reset("soon"), None);
        assert_eq!(parse_reset(""), None);
        let spent = RateLimitHeaders {
            limit_requests: Some(60),
            remaining_requests: Some(0),
            reset_requests: Some(Duration::from_millis(900)),
            ..RateLimitHeaders::default()
        };
        // Server allows 60/min, we were told 500/min: it is stricter.
        assert_eq!(spent.pause(500, 0), Some(Duration::from_millis(900)));
        // Same limit as ours: our own limiter keeps the pace.
        assert_eq!(spent.pause(60, 0), None);
        let left = RateLimitHeaders { remaining_requests: Some(3), ..spent };
        assert_eq!(left.pause(500, 0), None);
        let long = RateLimitHeaders { reset_requests: Some(Duration::from_secs(3600)), ..spent };
        assert_eq!(long.pause(500, 0), Some(MAX_HEADER_PAUSE));
    }

    #[test]
    fn usage_sums_cost_only_with_a_price() {
        let price = Price { input_per_mtok: 1.0, cached_input_per_mtok: Some(0.1), output_per_mtok: 10.0 };
        let call = Usage {
            input_tokens: 1_000_000,
            cached_input_tokens: 500_000,
            output_tokens: 100_000,
            reasoning_tokens: 50_000,
            cost_usd: None,
        };
        let mut priced = Usage { cost_usd: Some(0.0), ..Usage::default() };
        priced.add_call(&call, Some(&price));
        // 0.5 M uncached at $1 + 0.5 M cached at $0.1 + 0.1 M out at $10.
        assert!((priced.cost_usd.unwrap() - 1.55).abs() < 1e-9, "{priced:?}");
        assert_eq!((priced.reasoning_tokens, priced.total_tokens()), (50_000, 1_100_000));
        let mut unpriced = Usage { cost_usd: Some(0.0), ..Usage::default() };
        unpriced.add_call(&call, None);
        assert_eq!(unpriced.cost_usd, None);
        // Old journals without the new fields still read.
        let old: Usage = serde_json::from_str(r#"{"input_tokens":1,"output_tokens":2}"#).unwrap();
        assert_eq!((old.cached_input_tokens, old.reasoning_tokens, old.cost_usd), (0, 0, None));
    }

    #[test]
    fn retry_after_headers() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after_from_headers(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "150".parse().unwrap());
        assert_eq!(retry_after_from_headers(&h), Some(Duration::from_millis(150)));
    }
}
