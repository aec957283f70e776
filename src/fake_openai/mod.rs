//! A fake OpenAI server for benchmarks, tests and rehearsals: real HTTP/1.1
//! on loopback, speaking the Responses (`POST /v1/responses`) and Chat
//! Completions (`POST /v1/chat/completions`) wire formats.
//!
//! It answers structured requests with JSON that fits the request's schema
//! and markdown requests with a draft that follows the prompt's rules (both
//! from `llm::simulated::fake_output`), after a configurable latency and
//! jitter; enforces requests-per-minute and tokens-per-minute limits the way
//! OpenAI does (429 + `retry-after-ms` + `x-ratelimit-*` headers); injects
//! faults at configured rates or from a script (500, 503, 429, malformed
//! JSON, wrong schema, hang, connection reset); and counts what it saw
//! (`FakeStats`).
//!
//! Owns: its listener, connections and counters. Must not: bind anything
//! but loopback, read or log the `Authorization` header, or keep a task alive
//! past `shutdown` (hangs end at shutdown or after `hang_for`).

pub mod limits;
pub mod stats;
pub mod wire;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::llm::simulated::fake_output;
use limits::{format_reset, Gcra, Refusal};
pub use stats::{FakeStats, StatsSnapshot};
use wire::{error_body, error_body_param, is_reasoning_model, ok_body, reasoning_range, Billing, ParsedRequest, Wire};

/// Largest request body read; bigger ones get a 413.
const MAX_BODY_BYTES: usize = 8 << 20;
/// How long a client may take to send headers or a body.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Share of requests that get each fault (0..=1 each, at most 1 together).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultRates {
    /// HTTP 500.
    pub server_error: f64,
    /// HTTP 503.
    pub unavailable: f64,
    /// HTTP 429 that no limit caused, with `retry-after-ms` =
    /// `FakeConfig::injected_retry_after`.
    pub rate_limit: f64,
    /// 200 whose body is cut in half (not valid JSON).
    pub malformed: f64,
    /// 200 whose output is valid but of the wrong shape (JSON that misses
    /// the schema; a draft that breaks the rules).
    pub wrong_schema: f64,
    /// Never answered: the connection is dropped after `hang_for`.
    pub hang: f64,
    /// The connection is reset (RST) without a response.
    pub reset: f64,
}

impl FaultRates {
    /// The chaos mix of issue 5 (22 % of requests), shared by the `chaos`
    /// bench scenario and the chaos property test.
    pub fn chaos_mix() -> FaultRates {
        FaultRates {
            server_error: 0.05,
            unavailable: 0.05,
            rate_limit: 0.05,
            malformed: 0.03,
            wrong_schema: 0.02,
            hang: 0.01,
            reset: 0.01,
        }
    }

    pub fn total(&self) -> f64 {
        self.server_error
            + self.unavailable
            + self.rate_limit
            + self.malformed
            + self.wrong_schema
            + self.hang
            + self.reset
    }

    fn check(&self) -> Result<(), String> {
        let all = [
            self.server_error,
            self.unavailable,
            self.rate_limit,
            self.malformed,
            self.wrong_schema,
            self.hang,
            self.reset,
        ];
        if all.iter().any(|r| !(0.0..=1.0).contains(r)) || self.total() > 1.0 {
            return Err("fault rates must each be between 0 and 1 and add up to at most 1".into());
        }
        Ok(())
    }

    fn pick(&self, x: f64) -> Option<Fault> {
        let table = [
            (self.server_error, Fault::ServerError),
            (self.unavailable, Fault::Unavailable),
            (self.rate_limit, Fault::RateLimited),
            (self.malformed, Fault::Malformed),
            (self.wrong_schema, Fault::WrongSchema),
            (self.hang, Fault::Hang),
            (self.reset, Fault::Reset),
        ];
        let mut edge = 0.0;
        for (rate, fault) in table {
            edge += rate;
            if x < edge {
                return Some(fault);
            }
        }
        None
    }
}

/// One injected misbehaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    ServerError,
    Unavailable,
    RateLimited,
    Malformed,
    WrongSchema,
    Hang,
    Reset,
}

impl Fault {
    /// Stable name, used as the counter key in `StatsSnapshot::faults`.
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::ServerError => "500",
            Fault::Unavailable => "503",
            Fault::RateLimited => "429",
            Fault::Malformed => "malformed",
            Fault::WrongSchema => "wrong_schema",
            Fault::Hang => "hang",
            Fault::Reset => "reset",
        }
    }
}

#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// Loopback port; 0 picks a free one.
    pub port: u16,
    pub latency: Duration,
    /// Latency is uniform in `latency ± jitter`.
    pub jitter: Duration,
    /// 0 disables the limit.
    pub requests_per_minute: u32,
    /// 0 disables the limit.
    pub tokens_per_minute: u32,
    pub faults: FaultRates,
    /// `retry-after-ms` on injected 429s.
    pub injected_retry_after: Duration,
    /// How long a hung request holds its connection before it is dropped.
    pub hang_for: Duration,
    /// Seeds fault choice and generated outputs (per request, in arrival
    /// order).
    pub seed: u64,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            port: 0,
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            requests_per_minute: 0,
            tokens_per_minute: 0,
            faults: FaultRates::default(),
            injected_retry_after: Duration::from_millis(100),
            hang_for: Duration::from_secs(300),
            seed: 7,
        }
    }
}

struct Limits {
    requests: Option<Gcra>,
    tokens: Option<Gcra>,
}

struct Shared {
    config: FakeConfig,
    stats: Arc<FakeStats>,
    limits: Mutex<Limits>,
    script: Mutex<VecDeque<Fault>>,
    prompt_cache: Mutex<std::collections::HashSet<u64>>,
    serial: AtomicU64,
    shutdown: watch::Receiver<bool>,
}

/// A running fake server. Dropping it stops the server too.
pub struct FakeServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

/// Starts the server on `127.0.0.1:{config.port}`.
pub async fn start(config: FakeConfig) -> std::io::Result<FakeServer> {
    config.faults.check().map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, config.port)).await?;
    let addr = listener.local_addr()?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let limits = Limits {
        requests: (config.requests_per_minute > 0).then(|| Gcra::per_minute(config.requests_per_minute)),
        tokens: (config.tokens_per_minute > 0).then(|| Gcra::per_minute(config.tokens_per_minute)),
    };
    let shared = Arc::new(Shared {
        config,
        stats: Arc::new(FakeStats::new()),
        limits: Mutex::new(limits),
        script: Mutex::new(VecDeque::new()),
        prompt_cache: Mutex::new(std::collections::HashSet::new()),
        serial: AtomicU64::new(0),
        shutdown: shutdown_rx,
    });
    let task = tokio::spawn(accept_loop(Arc::clone(&shared), listener));
    Ok(FakeServer { addr, shared, shutdown, task: Some(task) })
}

impl FakeServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/v1`, what `llm.base_url` / `OPENAI_BASE_URL`
    /// take.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn stats(&self) -> &Arc<FakeStats> {
        &self.shared.stats
    }

    pub fn config(&self) -> &FakeConfig {
        &self.shared.config
    }

    /// The next requests (after the limits admit them) get these faults, in
    /// order, before the random rates apply again.
    pub fn script(&self, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.shared.script).extend(faults);
    }

    /// Stops accepting, drops every connection (hung ones included) and
    /// waits for the accept loop to end.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Resolves once shutdown is signalled (or the server handle is gone). The
/// watch guard is dropped inside, so callers' futures stay `Send`.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut stop = shared.shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // Small request/response pairs: do not wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve_connection(Arc::clone(&shared), stream));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "fake-openai: accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            _ = stopped(&mut stop) => break,
        }
    }
}

enum ConnEnd {
    Done,
    Reset,
    Shutdown,
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream) {
    let reset = Arc::new(Notify::new());
    let service = {
        let (shared, reset) = (Arc::clone(&shared), Arc::clone(&reset));
        hyper::service::service_fn(move |req| {
            let (shared, reset) = (Arc::clone(&shared), Arc::clone(&reset));
            async move { Ok::<_, Infallible>(handle(shared, req, reset).await) }
        })
    };
    let mut conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    let mut stop = shared.shutdown.clone();
    let end = tokio::select! {
        _ = &mut conn => ConnEnd::Done,
        _ = reset.notified() => ConnEnd::Reset,
        _ = stopped(&mut stop) => ConnEnd::Shutdown,
    };
    if let ConnEnd::Reset = end {
        // Zero linger makes the close below send RST instead of FIN: the
        // client sees "connection reset", as when a proxy dies mid-request.
        let _ = conn.into_parts().io.inner().set_zero_linger();
    }
}

type Reply = Response<Full<Bytes>>;
type Headers = Vec<(&'static str, String)>;
/// `Err((why, "requests" | "tokens", the limit))`.
type Verdict = Result<(), (Refusal, &'static str, u32)>;

fn json_reply(status: StatusCode, body: &Value, headers: &[(&'static str, String)]) -> Reply {
    raw_reply(status, body.to_string(), headers)
}

fn raw_reply(status: StatusCode, body: String, headers: &[(&'static str, String)]) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(*name, v);
        }
    }
    r
}

/// Prompt caching as OpenAI documents it: prompts of 1,024 tokens or more
/// whose prefix was seen recently are served from the cache in 128-token
/// blocks. The fake caches the instructions (the shared prefix).
const CACHE_MIN_TOKENS: u32 = 1024;
/// Distinct prefixes remembered; the set is cleared when full.
const CACHE_ENTRIES: usize = 10_000;

impl Shared {
    fn cached_tokens(&self, parsed: &ParsedRequest) -> u32 {
        let prefix = (parsed.instructions.len() / 4) as u32;
        if parsed.input_tokens() < CACHE_MIN_TOKENS || prefix < CACHE_MIN_TOKENS {
            return 0;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&parsed.instructions, &mut h);
        let key = std::hash::Hasher::finish(&h);
        let mut seen = lock(&self.prompt_cache);
        if seen.len() >= CACHE_ENTRIES {
            seen.clear();
        }
        if seen.insert(key) {
            0
        } else {
            prefix / 128 * 128
        }
    }

    fn now_ns(&self) -> f64 {
        self.stats.started().elapsed().as_nanos() as f64
    }

    /// Admits the request against both limits, or says which refused it
    /// (and the limit's value). Returns the `x-ratelimit-*` headers either
    /// way.
    fn check_limits(&self, tokens: u32) -> (Verdict, Headers) {
        let mut limits = lock(&self.limits);
        let now = self.now_ns();
        let mut verdict = Ok(());
        let mut next = (None, None);
        if let Some(r) = &limits.requests {
            match r.test(now, 1) {
                Ok(t) => next.0 = Some(t),
                Err(refusal) => verdict = Err((refusal, "requests", r.limit())),
            }
        }
        if verdict.is_ok() {
            if let Some(t) = &limits.tokens {
                match t.test(now, tokens) {
                    Ok(tat) => next.1 = Some(tat),
                    Err(refusal) => verdict = Err((refusal, "tokens", t.limit())),
                }
            }
        }
        if verdict.is_ok() {
            if let (Some(r), Some(t)) = (&mut limits.requests, next.0) {
                r.commit(t);
            }
            if let (Some(k), Some(t)) = (&mut limits.tokens, next.1) {
                k.commit(t);
            }
        }
        let mut headers = Vec::new();
        for (which, g) in [("requests", &limits.requests), ("tokens", &limits.tokens)] {
            let Some(g) = g else { continue };
            let (limit, remaining, reset) = match which {
                "requests" => {
                    ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")
                }
                _ => ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
            };
            headers.push((limit, g.limit().to_string()));
            headers.push((remaining, g.remaining(now).to_string()));
            headers.push((reset, format_reset(g.reset(now))));
        }
        (verdict, headers)
    }

    fn latency(&self, rng: &mut SmallRng) -> Duration {
        let (base, jitter) = (self.config.latency, self.config.jitter);
        if jitter.is_zero() {
            return base;
        }
        let lo = base.saturating_sub(jitter);
        let hi = base + jitter;
        Duration::from_nanos(rng.random_range(lo.as_nanos() as u64..=hi.as_nanos() as u64))
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>, reset: Arc<Notify>) -> Reply {
    let stats = &shared.stats;
    let wire = match (req.method(), req.uri().path().trim_end_matches('/')) {
        (&Method::POST, "/v1/responses") => Wire::Responses,
        (&Method::POST, "/v1/chat/completions") => Wire::Chat,
        (_, path) => {
            stats.answered("404");
            let message = format!("Invalid URL ({} {path})", req.method());
            return json_reply(
                StatusCode::NOT_FOUND,
                &error_body(&message, "invalid_request_error", Some("unknown_url")),
                &[],
            );
        }
    };
    for name in ["user-agent", "openai-organization", "openai-project"] {
        if let Some(v) = req.headers().get(name).and_then(|v| v.to_str().ok()) {
            stats.saw_header(name, v);
        }
    }
    // OpenAI gives every answer a request id, refusals included.
    let request_id =
        || vec![("x-request-id", format!("req_fake{:012x}", shared.serial.fetch_add(1, Ordering::Relaxed)))];
    let bad_request = |message: &str| {
        stats.answered("400");
        json_reply(StatusCode::BAD_REQUEST, &error_body(message, "invalid_request_error", None), &request_id())
    };
    let body = match tokio::time::timeout(READ_TIMEOUT, Limited::new(req.into_body(), MAX_BODY_BYTES).collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => return bad_request(&format!("could not read the request body: {e}")),
        Err(_) => return bad_request("timed out reading the request body"),
    };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad_request(&format!("We could not parse the JSON body of your request: {e}")),
    };
    let parsed = match ParsedRequest::parse(wire, &value) {
        Ok(p) => p,
        Err(message) => return bad_request(&message),
    };
    if let Some((message, param, code)) = parsed.reasoning_violation(wire) {
        stats.answered("400");
        let body = error_body_param(&message, "invalid_request_error", Some(param), Some(code));
        return json_reply(StatusCode::BAD_REQUEST, &body, &request_id());
    }
    let step = parsed.step();
    let topic = parsed.topic();
    let arrived = Instant::now();
    stats.arrived(&topic, step, arrived);

    let tokens = parsed.estimated_tokens();
    let (verdict, mut headers) = shared.check_limits(tokens);
    if let Err((refusal, which, limit)) = verdict {
        stats.rate_limited();
        stats.answered("429");
        let unit = if which == "requests" { "RPM" } else { "TPM" };
        let (message, retry_after) = if refusal.too_large {
            (
                format!(
                    "Request too large for {} on {which} per min ({unit}): Limit {limit}, Requested {tokens}.",
                    parsed.model
                ),
                None,
            )
        } else {
            let ms = refusal.wait.as_millis().max(1);
            (
                format!(
                    "Rate limit reached for {} on {which} per min ({unit}): Limit {limit}. Please try again in {ms}ms.",
                    parsed.model
                ),
                Some(ms),
            )
        };
        if let Some(ms) = retry_after {
            headers.push(("retry-after-ms", ms.to_string()));
            headers.push(("retry-after", ms.div_ceil(1000).to_string()));
        }
        return json_reply(
            StatusCode::TOO_MANY_REQUESTS,
            &error_body(&message, which, Some("rate_limit_exceeded")),
            &headers,
        );
    }
    stats.admitted(arrived, tokens);

    let serial = shared.serial.fetch_add(1, Ordering::Relaxed);
    let mut rng = SmallRng::seed_from_u64(shared.config.seed ^ serial.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let scripted = lock(&shared.script).pop_front();
    let fault = scripted.or_else(|| shared.config.faults.pick(rng.random::<f64>()));
    if let Some(f) = fault {
        stats.fault(f.as_str(), &topic, step);
    }
    headers.push(("x-request-id", format!("req_fake{serial:012x}")));
    let delay = shared.latency(&mut rng);
    headers.push(("openai-processing-ms", delay.as_millis().to_string()));
    tokio::time::sleep(delay).await;

    match fault {
        Some(Fault::Hang) | Some(Fault::Reset) => {
            stats.answered(if fault == Some(Fault::Hang) { "hang" } else { "reset" });
            if fault == Some(Fault::Hang) {
                let mut stop = shared.shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(shared.config.hang_for) => {}
                    _ = stopped(&mut stop) => {}
                }
            }
            // The connection task drops the connection (and this future
            // with it) as soon as it sees the notification.
            reset.notify_one();
            std::future::pending::<Reply>().await
        }
        Some(Fault::ServerError) => {
            stats.answered("500");
            let message = "The server had an error while processing your request. Sorry about that! (injected)";
            json_reply(StatusCode::INTERNAL_SERVER_ERROR, &error_body(message, "server_error", None), &headers)
        }
        Some(Fault::Unavailable) => {
            stats.answered("503");
            let message = "The engine is currently overloaded, please try again later. (injected)";
            json_reply(StatusCode::SERVICE_UNAVAILABLE, &error_body(message, "server_error", None), &headers)
        }
        Some(Fault::RateLimited) => {
            stats.answered("429");
            let ms = shared.config.injected_retry_after.as_millis();
            headers.push(("retry-after-ms", ms.to_string()));
            headers.push(("retry-after", ms.div_ceil(1000).to_string()));
            let message = format!("Rate limit reached for {}. Please try again in {ms}ms. (injected)", parsed.model);
            json_reply(
                StatusCode::TOO_MANY_REQUESTS,
                &error_body(&message, "requests", Some("rate_limit_exceeded")),
                &headers,
            )
        }
        Some(Fault::Malformed) => {
            stats.answered("200");
            let text = generate(&parsed, &mut rng);
            let bill = Billing {
                input_tokens: parsed.input_tokens(),
                text_tokens: (text.len() / 4) as u32,
                ..Billing::default()
            };
            let full = ok_body(wire, serial, &parsed.model, &text, &bill).to_string();
            // Cut on a char boundary: still UTF-8, no longer JSON.
            let mut cut = full.len() / 2;
            while !full.is_char_boundary(cut) {
                cut -= 1;
            }
            raw_reply(StatusCode::OK, full[..cut].to_string(), &headers)
        }
        Some(Fault::WrongSchema) => {
            stats.answered("200");
            let text = if parsed.format.is_some() {
                r#"{"unexpected": [1, 2], "note": "[fake] wrong schema (injected)"}"#
            } else {
                "# [fake] wrong shape\n\nThis draft ignores the rules (injected)."
            };
            let bill = Billing {
                input_tokens: parsed.input_tokens(),
                text_tokens: (text.len() / 4) as u32,
                ..Billing::default()
            };
            stats.billed(&topic, bill.total_tokens(), 0, false);
            let body = ok_body(wire, serial, &parsed.model, text, &bill);
            json_reply(StatusCode::OK, &body, &headers)
        }
        None => {
            stats.answered("200");
            let text = generate(&parsed, &mut rng);
            let reasoning = if is_reasoning_model(&parsed.model) {
                let (lo, hi) = reasoning_range(parsed.reasoning_effort.as_deref());
                rng.random_range(lo..=hi)
            } else {
                0
            };
            let cached = shared.cached_tokens(&parsed);
            let (bill, fits) =
                Billing::spend(parsed.input_tokens(), cached, reasoning, &text, parsed.max_output_tokens);
            stats.billed(&topic, bill.total_tokens(), u64::from(bill.reasoning_tokens), bill.truncated);
            let body = ok_body(wire, serial, &parsed.model, &text[..fits], &bill);
            json_reply(StatusCode::OK, &body, &headers)
        }
    }
}

fn generate(parsed: &ParsedRequest, rng: &mut SmallRng) -> String {
    let format = parsed.format.as_ref().map(|(name, schema)| (name.as_str(), schema));
    fake_output(format, &parsed.instructions, &parsed.input, rng)
}
