//! Configuration: the typed `Config`, loading it from a TOML file (which
//! file is `paths::find_config`'s business), and
//! `SCRIPTORIUM_<SECTION>__<KEY>` environment overrides.
//!
//! Owns: every tunable and its default, and the startup validation that names
//! the offending key. Must not: read secrets into the struct (the API key is
//! read from the environment by `llm/` at the moment a provider is built, so a
//! `Config` can be logged or serialised without leaking it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Prefix of environment overrides, e.g. `SCRIPTORIUM_LLM__PROVIDER`.
pub const ENV_PREFIX: &str = "SCRIPTORIUM_";
/// The documented default config (`scriptorium config init` writes it; a
/// test checks it matches the built-in defaults).
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../config/scriptorium.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config: {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), message: message.into() }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub llm: LlmConfig,
    pub limits: LimitsConfig,
    pub retry: RetryConfig,
    pub supervision: SupervisionConfig,
    pub workflow: WorkflowConfig,
    pub daemon: DaemonConfig,
    pub store: StoreConfig,
    pub chaos: ChaosConfig,
    pub telemetry: TelemetryConfig,
    pub prompts: PromptsConfig,
    /// Workflow kinds by name (`article`, `tutorial`, …).
    pub kinds: BTreeMap<String, KindConfig>,
    /// USD per million tokens, by model name (`[prices."gpt-5.4-mini"]`).
    /// A model with no entry has no cost: never a guessed one.
    pub prices: BTreeMap<String, Price>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            llm: LlmConfig::default(),
            limits: LimitsConfig::default(),
            retry: RetryConfig::default(),
            supervision: SupervisionConfig::default(),
            workflow: WorkflowConfig::default(),
            daemon: DaemonConfig::default(),
            chaos: ChaosConfig::default(),
            prompts: PromptsConfig::default(),
            kinds: BTreeMap::new(),
            prices: default_prices(),
            store: StoreConfig::default(),
            telemetry: TelemetryConfig::default(),
        }
    }
}

/// The shipped price of the default model (OpenAI's published standard
/// rates when this was written; check them before relying on a cost).
pub fn default_prices() -> BTreeMap<String, Price> {
    let mut prices = BTreeMap::new();
    prices.insert(
        "gpt-5.4-mini".to_string(),
        Price { input_per_mtok: 0.75, cached_input_per_mtok: Some(0.075), output_per_mtok: 4.50 },
    );
    prices
}

/// What one model costs, in USD per million tokens. Prices change: they
/// are the user's to keep current.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_mtok: f64,
    /// Input tokens served from the prompt cache; defaults to the input price.
    #[serde(default)]
    pub cached_input_per_mtok: Option<f64>,
    /// Output tokens, reasoning tokens included (they are billed as output).
    pub output_per_mtok: f64,
}

impl Price {
    /// USD for one call: uncached input, cached input and output (which
    /// includes reasoning) each at their rate.
    pub fn cost_usd(&self, input_tokens: u64, cached_input_tokens: u64, output_tokens: u64) -> f64 {
        let cached = cached_input_tokens.min(input_tokens);
        let uncached = input_tokens - cached;
        let cached_rate = self.cached_input_per_mtok.unwrap_or(self.input_per_mtok);
        (uncached as f64 * self.input_per_mtok
            + cached as f64 * cached_rate
            + output_tokens as f64 * self.output_per_mtok)
            / 1e6
    }
}

/// Responses `reasoning.effort` / Chat `reasoning_effort`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ReasoningEffort {
    None,
    Minimal,
    Low,
    Medium,
    High,
    Xhigh,
    /// Send no effort at all (models without reasoning, local servers).
    Omit,
}

impl ReasoningEffort {
    /// The value sent; `None` for `Omit`.
    pub fn wire(self) -> Option<&'static str> {
        (self != ReasoningEffort::Omit).then(|| self.as_str())
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReasoningEffort::Omit => "omit",
            ReasoningEffort::None => "none",
            ReasoningEffort::Minimal => "minimal",
            ReasoningEffort::Low => "low",
            ReasoningEffort::Medium => "medium",
            ReasoningEffort::High => "high",
            ReasoningEffort::Xhigh => "xhigh",
        }
    }
}

/// Which field carries the output cap on Chat Completions.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ChatMaxTokensField {
    /// OpenAI's current name; reasoning models reject `max_tokens`.
    MaxCompletionTokens,
    /// The old name, for servers that ignore the new one (see the config
    /// file's comment for which).
    MaxTokens,
}

/// Per-step model settings (`[llm.steps.<step>]`). A key a step table
/// leaves out keeps that step's built-in default (`StepsConfig::default`,
/// filled in by `Config::load`); `model` and `temperature` then fall back
/// to `[llm]`'s. `reasoning_effort = "omit"` sends none.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StepSettings {
    pub model: Option<String>,
    /// The step's first output cap; a truncated answer's next attempt
    /// doubles it, up to `llm.max_output_tokens`.
    pub max_output_tokens: u32,
    pub reasoning_effort: Option<ReasoningEffort>,
    pub temperature: Option<f64>,
}

impl StepSettings {
    fn sized(max_output_tokens: u32, effort: ReasoningEffort) -> StepSettings {
        StepSettings { model: None, max_output_tokens, reasoning_effort: Some(effort), temperature: None }
    }
}

/// `[llm.steps]`: one table per workflow step. Sized for a reasoning model
/// at the shipped kinds' word counts: route and review answer in a few
/// dozen tokens, write and revise need the draft (~1.4 tokens a word) plus
/// reasoning.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StepsConfig {
    pub route: StepSettings,
    pub plan: StepSettings,
    pub write: StepSettings,
    pub review: StepSettings,
    pub revise: StepSettings,
}

impl Default for StepsConfig {
    fn default() -> Self {
        StepsConfig {
            route: StepSettings::sized(300, ReasoningEffort::Minimal),
            plan: StepSettings::sized(1000, ReasoningEffort::Low),
            write: StepSettings::sized(3000, ReasoningEffort::Medium),
            review: StepSettings::sized(1200, ReasoningEffort::Low),
            revise: StepSettings::sized(3000, ReasoningEffort::Medium),
        }
    }
}

impl StepsConfig {
    pub fn get(&self, step: crate::workflow::Step) -> &StepSettings {
        use crate::workflow::Step;
        match step {
            Step::Route => &self.route,
            Step::Plan => &self.plan,
            Step::Write => &self.write,
            Step::Review => &self.review,
            Step::Revise => &self.revise,
        }
    }

    fn all(&self) -> [(&'static str, &StepSettings); 5] {
        [
            ("route", &self.route),
            ("plan", &self.plan),
            ("write", &self.write),
            ("review", &self.review),
            ("revise", &self.revise),
        ]
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProviderChoice {
    Auto,
    Openai,
    Chat,
    Simulated,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    pub provider: ProviderChoice,
    pub model: String,
    pub base_url: String,
    pub request_timeout_s: f64,
    pub connect_timeout_s: f64,
    /// The most output tokens any one call may ask for: each step starts at
    /// its own `[llm.steps.<step>].max_output_tokens`, and a truncated
    /// answer's retry doubles that step's cap up to this ceiling.
    pub max_output_tokens: u32,
    /// Sampling temperature; omitted from requests when unset (reasoning
    /// models reject it). Local models want 0.
    pub temperature: Option<f64>,
    /// Sampling seed, sent to Chat Completions servers when set.
    pub seed: Option<u64>,
    /// The Chat provider's name for the output cap.
    pub chat_max_tokens_field: ChatMaxTokensField,
    pub steps: StepsConfig,
    pub simulated: SimulatedConfig,
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            provider: ProviderChoice::Auto,
            model: "gpt-5.4-mini".into(),
            base_url: "https://api.openai.com/v1".into(),
            request_timeout_s: 120.0,
            connect_timeout_s: 10.0,
            max_output_tokens: 8000,
            temperature: None,
            seed: None,
            chat_max_tokens_field: ChatMaxTokensField::MaxCompletionTokens,
            steps: StepsConfig::default(),
            simulated: SimulatedConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatedConfig {
    pub seed: u64,
    pub latency_ms: u64,
    pub jitter_ms: u64,
    pub error_rate: f64,
    pub rate_limit_rate: f64,
    pub malformed_rate: f64,
    pub hang_rate: f64,
}

impl Default for SimulatedConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            latency_ms: 150,
            jitter_ms: 100,
            error_rate: 0.0,
            rate_limit_rate: 0.0,
            malformed_rate: 0.0,
            hang_rate: 0.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// 0 disables the request limit.
    pub requests_per_minute: u32,
    /// 0 disables the token limit.
    pub tokens_per_minute: u32,
    pub max_in_flight_topics: usize,
    pub max_queued_topics: usize,
    pub max_topic_chars: usize,
    /// USD spent per UTC day (by topics submitted that day) after which a
    /// submit answers `budget`; unset = no limit. Needs a price for every
    /// model the steps use.
    pub max_cost_usd_per_day: Option<f64>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            requests_per_minute: 500,
            tokens_per_minute: 500_000,
            max_in_flight_topics: 64,
            max_queued_topics: 10_000,
            max_topic_chars: 4000,
            max_cost_usd_per_day: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub budget_percent: u32,
    pub budget_min_per_s: u32,
    /// Longest server `retry-after` obeyed (seconds); a longer one is cut to
    /// this, as OpenAI's SDKs do (they obey 0–60 s).
    pub max_retry_after_s: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            initial_backoff_ms: 500,
            max_backoff_ms: 8000,
            budget_percent: 20,
            budget_min_per_s: 10,
            max_retry_after_s: 60.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisionConfig {
    pub max_restarts: u32,
    pub window_s: f64,
    /// A stage worker still busy with one attempt of a step after this long
    /// is stopped and replaced; the attempt counts as failed (`timeout`).
    pub step_timeout_s: f64,
    /// Workers in each stage's pool: the stage's concurrency. Jobs beyond it
    /// wait in the stage's queue.
    pub stage_workers: usize,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        Self { max_restarts: 50, window_s: 10.0, step_timeout_s: 300.0, stage_workers: 256 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkflowConfig {
    pub variants: u32,
    pub max_revisions: u32,
    pub default_kind: String,
    /// Route topics with a model call when the submitter names no kind.
    /// When false, `default_kind` is used without a call.
    pub route: bool,
    /// Code's share of the approval: a review counts as approved only when
    /// the model says so *and* its score is at least this (0..=10; 0 trusts
    /// the model's verdict alone). Small models approve drafts they score 1.
    pub approval_min_score: u8,
    /// Tokens (input + output, as billed) one topic may use; unset = no
    /// limit. Overridable per submit.
    pub max_tokens: Option<u64>,
    /// USD one topic may cost; unset = no limit. Overridable per submit.
    /// Needs a price for every model the steps use.
    pub max_cost_usd: Option<f64>,
}

impl Default for WorkflowConfig {
    fn default() -> Self {
        Self {
            variants: 3,
            max_revisions: 1,
            default_kind: "article".into(),
            route: true,
            approval_min_score: 7,
            max_tokens: None,
            max_cost_usd: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Empty means the XDG state directory (`paths::Layout`).
    pub data_dir: PathBuf,
    /// Unix socket path; empty means `paths::Layout`'s choice.
    pub socket: PathBuf,
    /// Optional TCP listener (`host:port`); empty disables it.
    pub tcp: String,
    /// Prometheus endpoint (`host:port`, path `/metrics`); empty disables it.
    pub metrics_addr: String,
    pub shutdown_grace_s: f64,
    pub max_connections: usize,
    /// Scrape connections served at once by the metrics endpoint.
    pub metrics_max_connections: usize,
    /// Seconds a metrics connection gets to send its request head (also
    /// how long an idle keep-alive connection stays open).
    pub metrics_header_timeout_s: f64,
    /// Longest a metrics connection may live, whatever it does (seconds).
    pub metrics_connection_timeout_s: f64,
    /// Also write `<data_dir>/topics/<id>.json` after every step.
    pub topic_files: bool,
    /// Web console (`host:port`); empty disables it. A non-loopback address
    /// needs `web_token`.
    pub web_addr: String,
    /// Shared secret the web console asks for (bearer header or login
    /// form); empty means no login, allowed on loopback only.
    pub web_token: Secret,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::new(),
            socket: PathBuf::new(),
            tcp: String::new(),
            metrics_addr: "127.0.0.1:9464".into(),
            shutdown_grace_s: 10.0,
            max_connections: 256,
            metrics_max_connections: 64,
            metrics_header_timeout_s: 5.0,
            metrics_connection_timeout_s: 30.0,
            topic_files: true,
            web_addr: "127.0.0.1:8765".into(),
            web_token: Secret::default(),
        }
    }
}

/// How hard a commit is pushed to the disk before a submit or a step is
/// acknowledged (SQLite `synchronous`, in WAL mode).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// `synchronous = NORMAL`: a commit survives the process dying (kill -9,
    /// panic, OOM kill) but the last commits may be lost on power loss or an
    /// OS crash.
    #[default]
    Process,
    /// `synchronous = FULL`: every commit is fsync'ed before it is
    /// acknowledged, so it survives power loss too.
    Power,
}

/// A secret read from the config or environment: `Debug` never shows it,
/// so a logged config cannot leak it.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.trim().is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_empty() { "Secret(empty)" } else { "Secret(redacted)" })
    }
}

/// Shortest `daemon.web_token` accepted: a guessable token on a network
/// listener is no protection.
pub const MIN_WEB_TOKEN_CHARS: usize = 16;

impl DaemonConfig {
    /// The web console's address, or `None` when `web_addr` is empty.
    /// Refuses a non-loopback address without `web_token` (the console can
    /// approve and reject topics), and a token shorter than
    /// `MIN_WEB_TOKEN_CHARS`. The error never shows the token.
    pub fn web_listen(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        let addr = self.web_addr.trim();
        if addr.is_empty() {
            return Ok(None);
        }
        let addr: std::net::SocketAddr = addr
            .parse()
            .map_err(|_| invalid("daemon.web_addr", format!("`{addr}` is not an address like 127.0.0.1:8765")))?;
        let token = self.web_token.expose().trim();
        if !token.is_empty() && token.chars().count() < MIN_WEB_TOKEN_CHARS {
            return Err(invalid("daemon.web_token", format!("must be at least {MIN_WEB_TOKEN_CHARS} characters")));
        }
        if token.is_empty() && !addr.ip().is_loopback() {
            return Err(invalid(
                "daemon.web_token",
                format!(
                    "daemon.web_addr `{addr}` is not a loopback address: set daemon.web_token \
                     (SCRIPTORIUM_DAEMON__WEB_TOKEN) so the console asks for it, or bind 127.0.0.1"
                ),
            ));
        }
        Ok(Some(addr))
    }
}

/// Where topics, the queue and the shared rate limit live.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// One daemon: an SQLite file in `daemon.data_dir`, an in-process queue
    /// and limiter.
    #[default]
    Sqlite,
    /// Several daemons share one Redis: queue, journal, idempotency keys and
    /// the rate limit.
    Redis,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    /// Redis URL (`redis://host:port/db` or `unix:///path/redis.sock`),
    /// used when `backend = "redis"`. A password in it is never logged.
    pub url: String,
    /// Seconds a claimed topic stays leased without a renewal; past that
    /// another daemon takes it over.
    pub lease_s: f64,
    /// Claims of one topic (its first included) after which it is moved to
    /// the `dead_letter` status instead of being run again.
    pub max_deliveries: u32,
    /// What an SQLite commit survives (`backend = "sqlite"`).
    pub durability: Durability,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Sqlite,
            url: "redis://127.0.0.1:6379/0".into(),
            lease_s: 30.0,
            max_deliveries: 5,
            durability: Durability::Process,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ChaosConfig {
    /// Share of stage-actor messages whose handler panics (0 = off).
    pub actor_panic_rate: f64,
    pub seed: u64,
}

/// Traces over OTLP/HTTP. Off unless an endpoint is set here (or in
/// `OTEL_EXPORTER_OTLP_ENDPOINT`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Base URL of an OTLP/HTTP receiver, e.g. `http://127.0.0.1:4318`;
    /// spans go to `<endpoint>/v1/traces`. Empty: off, unless
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    pub otlp_endpoint: String,
    /// Put prompts and model answers on model-call spans. Off: spans carry
    /// only sizes, token counts and outcomes.
    pub capture_content: bool,
    /// `service.name` of the exported resource.
    pub service_name: String,
    /// Spans waiting for export; past this, new spans are dropped (and
    /// counted) so exporting never slows a topic.
    pub max_queued_spans: usize,
    /// Upper bound on one export request.
    pub export_timeout_s: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            capture_content: false,
            service_name: "scriptorium".into(),
            max_queued_spans: 2048,
            export_timeout_s: 10.0,
        }
    }
}

/// Prompt templates. `{placeholders}` are filled by `workflow::prompts`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromptsConfig {
    pub router: String,
    pub planner: String,
    pub writer: String,
    pub reviewer: String,
    pub reviser: String,
}

impl Default for PromptsConfig {
    fn default() -> Self {
        Self {
            router: "You classify writing requests. Pick the workflow kind that fits the topic best.\nKinds:\n{kinds}".into(),
            planner: "{persona}\nPlan a piece of writing about the topic. Give a short title and between {min_sections} and {max_sections} section headings (plain text, no numbering, no markdown, each under 80 characters). Do not include a conclusion section; it is added automatically.".into(),
            writer: "{persona}\nWrite the piece in markdown.".into(),
            reviewer: "You are a demanding editor. Review the draft against the rubric and the rules. Score it from 0 to 10 and approve it only if it is ready to publish.\nRubric: {rubric}".into(),
            reviser: "{persona}\nRevise the draft so that it addresses every issue and suggestion from the review while keeping to the rules.".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KindConfig {
    pub description: String,
    pub persona: String,
    pub rubric: String,
    pub min_words: u32,
    pub max_words: u32,
    pub min_sections: u32,
    pub max_sections: u32,
    pub require_approval: bool,
    /// Ask the writer and reviser for JSON with one text field per outline
    /// section (headings fixed by the schema) and render the markdown in
    /// code, instead of asking for markdown. Constrained decoding then
    /// guarantees the structure even on a weak local model.
    pub structured_draft: bool,
}

impl Default for KindConfig {
    fn default() -> Self {
        Self {
            description: "A general article".into(),
            persona: "You are a clear, accurate writer.".into(),
            rubric: "accuracy, structure, clarity".into(),
            min_words: 250,
            max_words: 400,
            min_sections: 3,
            max_sections: 5,
            require_approval: false,
            structured_draft: false,
        }
    }
}

impl Config {
    /// Loads the given file (or the built-in defaults for `None`), applies
    /// the process's environment overrides and validates. Which file to
    /// read is `paths::find_config`'s decision.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let (table, source) = match path {
            Some(p) => (read_table(p)?, p.to_path_buf()),
            None => (toml::Table::new(), PathBuf::from("<defaults>")),
        };
        Self::from_table(table, &env, &source)
    }

    /// Parses TOML text with the given environment overrides (tests use this
    /// to avoid touching the process environment).
    pub fn from_toml_str(text: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let source = PathBuf::from("<string>");
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Parse {
            path: source.clone(),
            message: one_line(&e.to_string()),
        })?;
        Self::from_table(table, env, &source)
    }

    /// A parsed file plus overrides (`config show` reads the file once and
    /// reports where each value came from).
    pub fn from_table(mut table: toml::Table, env: &[(String, String)], source: &Path) -> Result<Config, ConfigError> {
        apply_env_overrides(&mut table, env)?;
        fill_step_defaults(&mut table);
        let de = toml::Value::Table(table);
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Invalid {
                key: if key == "." { source.display().to_string() } else { key },
                message: one_line(&e.inner().to_string()),
            }
        })?;
        if config.kinds.is_empty() {
            config.kinds = default_kinds();
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the semantic rules serde cannot: ranges, cross-references.
    /// Every numeric key has a documented range (`config/scriptorium.toml`),
    /// checked here so nothing downstream can panic on a config value
    /// (`Duration::from_secs_f64` of 1e300, an overflowing semaphore size).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.llm.model.trim().is_empty() {
            return Err(invalid("llm.model", "must not be empty"));
        }
        if !(self.llm.base_url.starts_with("http://") || self.llm.base_url.starts_with("https://")) {
            return Err(invalid("llm.base_url", "must start with http:// or https://"));
        }
        seconds("llm.request_timeout_s", self.llm.request_timeout_s, MAX_TIMEOUT_S)?;
        seconds("llm.connect_timeout_s", self.llm.connect_timeout_s, MAX_TIMEOUT_S)?;
        int("llm.max_output_tokens", self.llm.max_output_tokens, 1, 1_000_000)?;
        if let Some(t) = self.llm.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(invalid("llm.temperature", "must be between 0 and 2"));
            }
        }
        for (step, s) in self.llm.steps.all() {
            if s.max_output_tokens == 0 || s.max_output_tokens > self.llm.max_output_tokens {
                return Err(invalid(
                    format!("llm.steps.{step}.max_output_tokens"),
                    format!("must be between 1 and llm.max_output_tokens ({})", self.llm.max_output_tokens),
                ));
            }
            if s.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
                return Err(invalid(format!("llm.steps.{step}.model"), "must not be empty"));
            }
            if let Some(t) = s.temperature {
                if !(0.0..=2.0).contains(&t) {
                    return Err(invalid(format!("llm.steps.{step}.temperature"), "must be between 0 and 2"));
                }
            }
        }
        for (model, p) in &self.prices {
            let rates = [Some(p.input_per_mtok), p.cached_input_per_mtok, Some(p.output_per_mtok)];
            if rates.into_iter().flatten().any(|r| !r.is_finite() || r < 0.0) {
                return Err(invalid(format!("prices.{model}"), "prices must be non-negative numbers"));
            }
        }
        for (key, usd) in [
            ("workflow.max_cost_usd", self.workflow.max_cost_usd),
            ("limits.max_cost_usd_per_day", self.limits.max_cost_usd_per_day),
        ] {
            let Some(usd) = usd else { continue };
            if !(usd.is_finite() && usd > 0.0) {
                return Err(invalid(key, "must be a positive number of US dollars"));
            }
            if let Some(model) = self.unpriced_model() {
                return Err(invalid(key, format!("needs a price for model `{model}` ([prices.\"{model}\"])")));
            }
        }
        if self.workflow.max_tokens == Some(0) {
            return Err(invalid("workflow.max_tokens", "must be at least 1"));
        }
        let sim = &self.llm.simulated;
        int("llm.simulated.latency_ms", sim.latency_ms, 0, MAX_DELAY_MS)?;
        int("llm.simulated.jitter_ms", sim.jitter_ms, 0, MAX_DELAY_MS)?;
        for (key, rate) in [
            ("llm.simulated.error_rate", sim.error_rate),
            ("llm.simulated.rate_limit_rate", sim.rate_limit_rate),
            ("llm.simulated.malformed_rate", sim.malformed_rate),
            ("llm.simulated.hang_rate", sim.hang_rate),
            ("chaos.actor_panic_rate", self.chaos.actor_panic_rate),
        ] {
            // `contains` is false for NaN, so NaN is refused too.
            if !(0.0..=1.0).contains(&rate) {
                return Err(invalid(key, "must be between 0 and 1"));
            }
        }
        if sim.error_rate + sim.rate_limit_rate + sim.malformed_rate + sim.hang_rate > 1.0 {
            return Err(invalid("llm.simulated", "fault rates must add up to at most 1"));
        }
        let limits = &self.limits;
        int("limits.requests_per_minute", limits.requests_per_minute, 0, 10_000_000)?;
        int("limits.tokens_per_minute", limits.tokens_per_minute, 0, 2_000_000_000)?;
        int("limits.max_in_flight_topics", limits.max_in_flight_topics, 1, 100_000)?;
        int("limits.max_queued_topics", limits.max_queued_topics, 0, 10_000_000)?;
        // A protocol line is at most 64 KiB, so a longer topic could never arrive.
        int("limits.max_topic_chars", limits.max_topic_chars, 1, 65_536)?;
        let retry = &self.retry;
        int("retry.max_attempts", retry.max_attempts, 1, 100)?;
        int("retry.initial_backoff_ms", retry.initial_backoff_ms, 0, MAX_DELAY_MS)?;
        int("retry.max_backoff_ms", retry.max_backoff_ms, 0, MAX_DELAY_MS)?;
        if retry.initial_backoff_ms > retry.max_backoff_ms {
            return Err(invalid("retry.initial_backoff_ms", "must not exceed retry.max_backoff_ms"));
        }
        int("retry.budget_percent", retry.budget_percent, 0, 1000)?;
        int("retry.budget_min_per_s", retry.budget_min_per_s, 0, 1_000_000)?;
        int("supervision.max_restarts", self.supervision.max_restarts, 0, 1_000_000)?;
        seconds("supervision.window_s", self.supervision.window_s, MAX_TIMEOUT_S)?;
        seconds("supervision.step_timeout_s", self.supervision.step_timeout_s, 7.0 * MAX_TIMEOUT_S)?;
        int("workflow.variants", self.workflow.variants, 1, 16)?;
        int("workflow.max_revisions", self.workflow.max_revisions, 0, 20)?;
        int("workflow.approval_min_score", self.workflow.approval_min_score, 0, 10)?;
        int("supervision.stage_workers", self.supervision.stage_workers, 1, 4096)?;
        if !(0.0..=3600.0).contains(&self.retry.max_retry_after_s) {
            return Err(invalid("retry.max_retry_after_s", "must be a number of seconds from 0 to 3600"));
        }
        if !self.kinds.contains_key(&self.workflow.default_kind) {
            return Err(invalid(
                "workflow.default_kind",
                format!(
                    "`{}` is not a configured kind (have: {})",
                    self.workflow.default_kind,
                    self.kind_names().join(", ")
                ),
            ));
        }
        seconds("daemon.shutdown_grace_s", self.daemon.shutdown_grace_s, MAX_TIMEOUT_S)?;
        int("daemon.max_connections", self.daemon.max_connections, 1, 100_000)?;
        int("daemon.metrics_max_connections", self.daemon.metrics_max_connections, 1, 4096)?;
        seconds("daemon.metrics_header_timeout_s", self.daemon.metrics_header_timeout_s, 3600.0)?;
        seconds("daemon.metrics_connection_timeout_s", self.daemon.metrics_connection_timeout_s, 3600.0)?;
        for (key, value) in [("daemon.tcp", &self.daemon.tcp), ("daemon.metrics_addr", &self.daemon.metrics_addr)] {
            if !value.trim().is_empty() && value.trim().parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(
                    key,
                    format!("`{value}` is not an address like 127.0.0.1:9464 (empty turns it off)"),
                ));
            }
        }
        if !(self.store.lease_s.is_finite() && self.store.lease_s >= 1.0 && self.store.lease_s <= 3600.0) {
            return Err(invalid("store.lease_s", "must be between 1 and 3600 seconds"));
        }
        if self.store.max_deliveries == 0 {
            return Err(invalid("store.max_deliveries", "must be at least 1"));
        }
        if self.store.backend == StoreBackend::Redis {
            let url = self.store.url.as_str();
            let known = ["redis://", "rediss://", "unix://", "redis+unix://"];
            if !known.iter().any(|p| url.starts_with(p)) {
                return Err(invalid("store.url", "must start with redis://, rediss:// or unix://"));
            }
        }
        seconds("telemetry.export_timeout_s", self.telemetry.export_timeout_s, 3600.0)?;
        int("telemetry.max_queued_spans", self.telemetry.max_queued_spans, 1, 1_000_000)?;
        let ep = self.telemetry.otlp_endpoint.trim();
        if !(ep.is_empty() || ep.starts_with("http://") || ep.starts_with("https://")) {
            return Err(invalid("telemetry.otlp_endpoint", "must be empty or start with http:// or https://"));
        }
        self.daemon.web_listen()?;
        for (name, kind) in &self.kinds {
            let key = |field: &str| format!("kinds.{name}.{field}");
            if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(invalid(format!("kinds.{name}"), "kind names use only letters, digits, `_` and `-`"));
            }
            int(&key("max_words"), kind.max_words, 1, 100_000)?;
            if kind.min_words == 0 || kind.min_words > kind.max_words {
                return Err(invalid(key("min_words"), "must be at least 1 and not above max_words"));
            }
            if kind.min_sections == 0 || kind.min_sections > kind.max_sections || kind.max_sections > 12 {
                return Err(invalid(key("min_sections"), "need 1 <= min_sections <= max_sections <= 12"));
            }
        }
        Ok(())
    }

    /// The model a step's calls go to.
    pub fn step_model(&self, step: crate::workflow::Step) -> &str {
        self.llm.steps.get(step).model.as_deref().unwrap_or(&self.llm.model)
    }

    /// The price of a step's model, if the table has one.
    pub fn step_price(&self, step: crate::workflow::Step) -> Option<&Price> {
        self.prices.get(self.step_model(step))
    }

    /// A model some step uses that has no price (a USD budget cannot be
    /// checked without one).
    pub fn unpriced_model(&self) -> Option<&str> {
        crate::workflow::Step::ALL.into_iter().map(|s| self.step_model(s)).find(|m| !self.prices.contains_key(*m))
    }

    pub fn kind_names(&self) -> Vec<String> {
        self.kinds.keys().cloned().collect()
    }

    pub fn kind(&self, name: &str) -> Option<&KindConfig> {
        self.kinds.get(name)
    }
}

/// Upper bound of every timeout and grace key (seconds): one day.
/// (`supervision.step_timeout_s` allows a week.)
pub const MAX_TIMEOUT_S: f64 = 86_400.0;
/// Upper bound of every millisecond delay key: one hour.
pub const MAX_DELAY_MS: u64 = 3_600_000;

/// A number of seconds in `(0, max]`; NaN and infinities are refused.
fn seconds(key: &str, value: f64, max: f64) -> Result<(), ConfigError> {
    if value.is_finite() && value > 0.0 && value <= max {
        Ok(())
    } else {
        Err(invalid(key, format!("must be a number of seconds above 0 and at most {max}")))
    }
}

/// An integer in `lo..=hi`.
fn int<T: TryInto<u64>>(key: &str, value: T, lo: u64, hi: u64) -> Result<(), ConfigError> {
    if value.try_into().is_ok_and(|v: u64| (lo..=hi).contains(&v)) {
        Ok(())
    } else {
        Err(invalid(key, format!("must be between {lo} and {hi}")))
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Reads and parses one TOML file.
pub fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    text.parse().map_err(|e: toml::de::Error| ConfigError::Parse {
        path: path.to_path_buf(),
        message: one_line(&e.to_string()),
    })
}

/// The dotted keys the environment overrides, each with its variable
/// (`("llm.model", "SCRIPTORIUM_LLM__MODEL")`).
pub fn override_keys(env: &[(String, String)]) -> Vec<(String, String)> {
    env.iter()
        .filter_map(|(name, _)| {
            let rest = name.strip_prefix(ENV_PREFIX)?;
            rest.contains("__")
                .then(|| (rest.split("__").map(str::to_ascii_lowercase).collect::<Vec<_>>().join("."), name.clone()))
        })
        .collect()
}

/// `SCRIPTORIUM_LLM__SIMULATED__LATENCY_MS=5` sets `llm.simulated.latency_ms`.
/// Values are read as TOML scalars (`5`, `0.1`, `true`), else as strings, so a
/// bad value fails deserialisation with the key's name.
fn apply_env_overrides(table: &mut toml::Table, env: &[(String, String)]) -> Result<(), ConfigError> {
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else { continue };
        if !rest.contains("__") {
            continue; // SCRIPTORIUM_CONFIG and friends are not overrides.
        }
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(invalid(name.clone(), "malformed override name"));
        }
        let value = parse_env_value(raw);
        let mut cursor = &mut *table;
        for segment in &path[..path.len() - 1] {
            let entry = cursor.entry(segment.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cursor = match entry {
                toml::Value::Table(t) => t,
                _ => return Err(invalid(path.join("."), format!("{name} overrides a value that is not a section"))),
            };
        }
        cursor.insert(path[path.len() - 1].clone(), value);
    }
    Ok(())
}

/// A step table that sets only some keys keeps the step's own defaults for
/// the rest (serde would fill them from `StepSettings::default`, the same
/// for every step). Values of the wrong type are left for serde to name.
fn fill_step_defaults(table: &mut toml::Table) {
    let Ok(toml::Value::Table(defaults)) = toml::Value::try_from(StepsConfig::default()) else { return };
    let llm = table.entry("llm").or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(llm) = llm.as_table_mut() else { return };
    let steps = llm.entry("steps").or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(steps) = steps.as_table_mut() else { return };
    for (step, values) in defaults {
        let toml::Value::Table(values) = values else { continue };
        let entry = steps.entry(step).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let Some(t) = entry.as_table_mut() {
            for (k, v) in values {
                t.entry(k).or_insert(v);
            }
        }
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// Kinds used when the config names none, so a bare `scriptorium run` works.
pub fn default_kinds() -> BTreeMap<String, KindConfig> {
    let mut kinds = BTreeMap::new();
    kinds.insert(
        "article".to_string(),
        KindConfig {
            description: "An explanatory article for a general audience".into(),
            persona: "You are an experienced science and technology journalist.".into(),
            rubric: "accuracy, clear structure, concrete examples, no filler".into(),
            ..KindConfig::default()
        },
    );
    kinds.insert(
        "tutorial".to_string(),
        KindConfig {
            description: "A step-by-step guide that teaches how to do something".into(),
            persona: "You are a patient technical instructor.".into(),
            rubric: "correct steps in order, prerequisites stated, each step actionable".into(),
            min_words: 300,
            max_words: 500,
            min_sections: 3,
            max_sections: 6,
            ..KindConfig::default()
        },
    );
    kinds.insert(
        "opinion".to_string(),
        KindConfig {
            description: "An argued opinion piece that takes a clear position".into(),
            persona: "You are a thoughtful columnist who argues fairly.".into(),
            rubric: "clear thesis, strong arguments, counter-arguments addressed".into(),
            min_words: 250,
            max_words: 400,
            min_sections: 3,
            max_sections: 4,
            ..KindConfig::default()
        },
    );
    kinds.insert(
        "brief".to_string(),
        KindConfig {
            description: "A short overview in a few plain paragraphs".into(),
            persona: "You are a clear, plain-spoken writer.".into(),
            rubric: "on topic, plain language, one idea per section".into(),
            min_words: 60,
            max_words: 150,
            min_sections: 1,
            max_sections: 3,
            require_approval: false,
            structured_draft: true,
        },
    );
    kinds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn shipped_config_file_is_valid_and_matches_defaults() {
        let file = Config::from_toml_str(DEFAULT_CONFIG_TOML, &[]).unwrap();
        let defaults = Config::from_toml_str("", &[]).unwrap();
        // The commented file documents the built-in defaults.
        assert_eq!(toml::to_string(&file).unwrap(), toml::to_string(&defaults).unwrap());
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::from_toml_str("", &[]).unwrap();
        assert_eq!(c.llm.model, "gpt-5.4-mini");
        assert_eq!(c.kinds.len(), 4);
        assert!(c.kinds["brief"].structured_draft && !c.kinds["article"].structured_draft);
    }

    #[test]
    fn env_overrides_nested_keys() {
        let c = Config::from_toml_str(
            "[llm]\nprovider = \"openai\"\n",
            &env(&[
                ("SCRIPTORIUM_LLM__PROVIDER", "simulated"),
                ("SCRIPTORIUM_LIMITS__REQUESTS_PER_MINUTE", "600"),
                ("SCRIPTORIUM_LLM__SIMULATED__LATENCY_MS", "5"),
                ("SCRIPTORIUM_CONFIG", "ignored.toml"),
            ]),
        )
        .unwrap();
        assert_eq!(c.llm.provider, ProviderChoice::Simulated);
        assert_eq!(c.limits.requests_per_minute, 600);
        assert_eq!(c.llm.simulated.latency_ms, 5);
    }

    #[test]
    fn every_numeric_key_refuses_absurd_values_by_name() {
        let numeric = [
            "llm.request_timeout_s",
            "llm.connect_timeout_s",
            "llm.max_output_tokens",
            "llm.temperature",
            "llm.simulated.latency_ms",
            "llm.simulated.jitter_ms",
            "llm.simulated.error_rate",
            "llm.simulated.rate_limit_rate",
            "llm.simulated.malformed_rate",
            "llm.simulated.hang_rate",
            "limits.requests_per_minute",
            "limits.tokens_per_minute",
            "limits.max_in_flight_topics",
            "limits.max_queued_topics",
            "limits.max_topic_chars",
            "retry.max_attempts",
            "retry.initial_backoff_ms",
            "retry.max_backoff_ms",
            "retry.budget_percent",
            "retry.budget_min_per_s",
            "supervision.max_restarts",
            "supervision.window_s",
            "supervision.step_timeout_s",
            "supervision.stage_workers",
            "retry.max_retry_after_s",
            "workflow.variants",
            "workflow.max_revisions",
            "workflow.approval_min_score",
            "daemon.shutdown_grace_s",
            "daemon.max_connections",
            "daemon.metrics_max_connections",
            "daemon.metrics_header_timeout_s",
            "daemon.metrics_connection_timeout_s",
            "chaos.actor_panic_rate",
        ];
        for key in numeric {
            let var = format!("SCRIPTORIUM_{}", key.to_ascii_uppercase().replace('.', "__"));
            for value in ["1e300", "nan", "-inf", "-1", "4611686018427387904", "18446744073709551615"] {
                let e = match Config::from_toml_str("", &env(&[(&var, value)])) {
                    Ok(_) => panic!("{key}={value} accepted"),
                    Err(e) => e.to_string(),
                };
                assert!(e.contains(key), "{key}={value}: {e}");
                assert!(!e.contains('\n'), "{key}={value}: {e}");
            }
        }
        let c = Config::from_toml_str("", &[]).unwrap();
        assert_eq!(c.store.durability, Durability::Process);
        let c = Config::from_toml_str("[store]\ndurability = \"power\"\n", &[]).unwrap();
        assert_eq!(c.store.durability, Durability::Power);
    }

    #[test]
    fn web_console_addr_and_token() {
        let c = Config::from_toml_str("", &[]).unwrap();
        assert_eq!(c.daemon.web_listen().unwrap(), Some("127.0.0.1:8765".parse().unwrap()));
        let token = "a-long-enough-web-token";
        let c = Config::from_toml_str(
            "",
            &env(&[("SCRIPTORIUM_DAEMON__WEB_ADDR", "0.0.0.0:9000"), ("SCRIPTORIUM_DAEMON__WEB_TOKEN", token)]),
        )
        .unwrap();
        assert_eq!(c.daemon.web_listen().unwrap(), Some("0.0.0.0:9000".parse().unwrap()));
        assert_eq!(c.daemon.web_token.expose(), token);
        assert!(!format!("{c:?}").contains(token), "Debug must not show the token");
        let off = Config::from_toml_str("[daemon]\nweb_addr = \"\"\n", &[]).unwrap();
        assert_eq!(off.daemon.web_listen().unwrap(), None);
        let err = Config::from_toml_str("", &env(&[("SCRIPTORIUM_DAEMON__WEB_ADDR", "[::]:8765")])).unwrap_err();
        assert!(err.to_string().contains("web_token"), "{err}");
    }

    #[test]
    fn store_keys_come_from_the_environment() {
        let c = Config::from_toml_str(
            "[store]\nbackend = \"sqlite\"\n",
            &env(&[
                ("SCRIPTORIUM_STORE__BACKEND", "redis"),
                ("SCRIPTORIUM_STORE__URL", "unix:///run/redis/redis.sock"),
                ("SCRIPTORIUM_STORE__LEASE_S", "5"),
            ]),
        )
        .unwrap();
        assert_eq!(c.store.backend, StoreBackend::Redis);
        assert_eq!(c.store.url, "unix:///run/redis/redis.sock");
        assert_eq!(c.store.lease_s, 5.0);
        let d = Config::from_toml_str("", &[]).unwrap();
        assert_eq!((d.store.backend, d.store.lease_s), (StoreBackend::Sqlite, 30.0));
    }

    #[test]
    fn unknown_and_bad_keys_name_the_key() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            ("[llm]\nmodle = \"x\"\n", &[], "llm"),
            ("", &[("SCRIPTORIUM_LIMITS__REQUESTS_PER_MINUTE", "lots")], "limits.requests_per_minute"),
            ("", &[("SCRIPTORIUM_LIMITS__NOPE", "1")], "limits"),
            ("[workflow]\nvariants = 0\n", &[], "workflow.variants"),
            ("[workflow]\napproval_min_score = 11\n", &[], "workflow.approval_min_score"),
            ("[workflow]\ndefault_kind = \"poem\"\n", &[], "workflow.default_kind"),
            ("[llm.simulated]\nerror_rate = 2.0\n", &[], "llm.simulated.error_rate"),
            ("", &[("SCRIPTORIUM_DAEMON__WEB_ADDR", "0.0.0.0:8765")], "daemon.web_token"),
            ("", &[("SCRIPTORIUM_DAEMON__WEB_ADDR", "localhost")], "daemon.web_addr"),
            ("", &[("SCRIPTORIUM_DAEMON__WEB_TOKEN", "short")], "daemon.web_token"),
            ("[store]\nbackend = \"mysql\"\n", &[], "store.backend"),
            ("[store]\nlease_s = 0.5\n", &[], "store.lease_s"),
            ("", &[("SCRIPTORIUM_STORE__BACKEND", "redis"), ("SCRIPTORIUM_STORE__URL", "http://x")], "store.url"),
        ];
        for (text, vars, key) in cases {
            let err = Config::from_toml_str(text, &env(vars)).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?} {vars:?}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }
}
