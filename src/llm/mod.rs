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

use crate::config::{Config, ProviderChoice};
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
    pub max_output_tokens: u32,
    /// `Some` for structured (JSON) steps; `None` for markdown.
    pub format: Option<Arc<StructuredFormat>>,
    /// Stable per (topic, step, variant, attempt): lets the simulated provider
    /// be deterministic without seeing topic ids.
    pub seed_key: u64,
}

impl LlmRequest {
    /// Token cost charged to the limiter before the call: prompt characters
    /// / 4 plus the output allowance.
    pub fn estimated_tokens(&self) -> u32 {
        let prompt_chars = self.instructions.len() + self.input.len();
        (prompt_chars / 4) as u32 + self.max_output_tokens
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// A successful provider answer: the text, before any gate.
#[derive(Debug, Clone)]
pub struct LlmReply {
    pub text: String,
    pub usage: Usage,
    /// Why the model stopped (`stop`, `length`, …), as the provider said
    /// it; `None` when it did not say.
    pub finish_reason: Option<String>,
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
}

impl FailureReason {
    pub const ALL: [FailureReason; 8] = [
        FailureReason::RateLimited,
        FailureReason::ServerError,
        FailureReason::Timeout,
        FailureReason::Connection,
        FailureReason::InvalidOutput,
        FailureReason::Refused,
        FailureReason::Fatal,
        FailureReason::ActorRestart,
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
        }
    }

    pub fn is_retryable(&self) -> bool {
        !matches!(self, LlmError::Fatal { .. } | LlmError::Cancelled)
    }

    pub fn reason(&self) -> FailureReason {
        match self {
            LlmError::RateLimited { .. } => FailureReason::RateLimited,
            LlmError::Server { .. } => FailureReason::ServerError,
            LlmError::Timeout(_) => FailureReason::Timeout,
            LlmError::Connection(_) => FailureReason::Connection,
            LlmError::InvalidOutput(_) => FailureReason::InvalidOutput,
            LlmError::Refused(_) => FailureReason::Refused,
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
            LlmError::InvalidOutput(_) | LlmError::Refused(_) => Some(200),
            LlmError::Timeout(_) | LlmError::Connection(_) | LlmError::WorkerLost(_) | LlmError::Cancelled => None,
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

/// What the HTTP providers need. `Debug` redacts the key.
#[derive(Clone)]
pub struct HttpSettings {
    pub base_url: String,
    pub api_key: Option<String>,
    pub model: String,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub temperature: Option<f64>,
    pub seed: Option<u64>,
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
/// `{base_url}{path}` (bearer key only when one is set) and returns the body
/// text of a 2xx answer. Every failure comes back already classified, with the
/// key redacted from anything the server said. Parsing the 2xx body is the
/// caller's job: only it knows the wire format.
pub(crate) async fn post_json<B: serde::Serialize + ?Sized>(
    client: &reqwest::Client,
    settings: &HttpSettings,
    path: &str,
    body: &B,
) -> Result<String, LlmError> {
    let mut builder = client.post(format!("{}{path}", settings.base_url)).json(body);
    if let Some(key) = settings.api_key.as_deref() {
        // `bearer_auth` marks the header sensitive, so reqwest never prints it.
        builder = builder.bearer_auth(key);
    }
    let response = builder.send().await.map_err(|e| classify_transport_error(&e, settings.request_timeout))?;
    let status = response.status();
    // Read the headers before `text()` consumes the response.
    let retry_after = retry_after_from_headers(response.headers());
    if !status.is_success() {
        // The body only improves the message; losing it must not hide the
        // status, so a failed read degrades to an empty body.
        let text = response.text().await.unwrap_or_default();
        // Redacted after decoding: the body may spell the key with JSON
        // escapes that only decoding turns back into the key.
        return Err(settings.scrub(LlmError::from_status(status.as_u16(), &text, retry_after)));
    }
    // The client timeout covers the body too, so a stalled body is a Timeout.
    response.text().await.map_err(|e| classify_transport_error(&e, settings.request_timeout))
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
    fn retry_after_headers() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after_from_headers(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "150".parse().unwrap());
        assert_eq!(retry_after_from_headers(&h), Some(Duration::from_millis(150)));
    }
}
