//! Logging (tracing) and metrics (Prometheus exporter) setup.
//!
//! Owns: the subscriber (`--log-format text|json`, `RUST_LOG`, colour only
//! on a terminal and never with `NO_COLOR`, the OTLP layer of `traces` when
//! configured), the Prometheus recorder, its histogram buckets, the
//! `process_*` collector and the HELP text of every metric family
//! (`docs/metrics.md` is the reference). Must not: put topic ids, topic
//! text or any other unbounded value in a metric label, or log the API key.
//!
//! Names are exported exactly as written at the call sites: the recorder is
//! built without `with_recommended_naming`, so it neither appends `_total`
//! nor unit suffixes. Every histogram gets explicit buckets (a fallback set
//! covers any name not listed here), so none renders as a summary.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::io::IsTerminal;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::Semaphore;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::TelemetryConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Colour in text logs: only on a terminal, and never when `NO_COLOR` is
/// set to anything non-empty (<https://no-color.org>).
pub fn use_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber, writing to stderr, without traces.
/// `default_filter` applies when `RUST_LOG` is unset.
pub fn init_tracing(format: LogFormat, default_filter: &str) {
    let _ = init(format, default_filter, None);
}

/// Installs the global subscriber: logs on stderr (`RUST_LOG`, else
/// `default_filter`) and, when `telemetry` names an OTLP endpoint (or
/// `OTEL_EXPORTER_OTLP_ENDPOINT` does), the span exporter. Returns the
/// traces URL when tracing is on. Call `traces::shutdown` at exit.
pub fn init(
    format: LogFormat,
    default_filter: &str,
    telemetry: Option<&TelemetryConfig>,
) -> Result<Option<String>, String> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let colour = use_colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(colour);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_current_span(true).boxed(),
    };
    let env_endpoint = std::env::var(crate::traces::OTEL_ENDPOINT_ENV).ok();
    let url = telemetry.and_then(|t| crate::traces::traces_url(t, env_endpoint.as_deref()));
    let otel = match (telemetry, &url) {
        (Some(t), Some(url)) => {
            let tracer = crate::traces::start(t, url.clone())?;
            // Our spans at every level (the per-attempt and model-call spans
            // are debug), whatever RUST_LOG says for the terminal; events
            // only from warn up, as span events.
            let only_ours = tracing_subscriber::filter::filter_fn(|meta| {
                meta.target().starts_with("scriptorium") && (meta.is_span() || *meta.level() <= tracing::Level::WARN)
            });
            Some(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(only_ours))
        }
        _ => None,
    };
    let _ = tracing_subscriber::registry().with(fmt.with_filter(filter)).with(otel).try_init();
    Ok(url)
}

/// Seconds buckets for model calls and steps (sub-second to minutes).
const LATENCY_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0];
const TOPIC_BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];
const WAIT_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const SCORE_BUCKETS: &[f64] = &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0];
/// The OpenTelemetry GenAI semantic conventions' advised boundaries for
/// `gen_ai.client.token.usage`.
const GEN_AI_TOKEN_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
    67108864.0,
];
/// The OpenTelemetry GenAI semantic conventions' advised boundaries for
/// `gen_ai.client.operation.duration` (seconds).
const GEN_AI_DURATION_BUCKETS: &[f64] =
    &[0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92];

/// Every histogram family and its buckets.
const HISTOGRAMS: &[(&str, &[f64])] = &[
    ("scriptorium_topic_duration_seconds", TOPIC_BUCKETS),
    ("scriptorium_step_duration_seconds", LATENCY_BUCKETS),
    ("scriptorium_llm_request_duration_seconds", LATENCY_BUCKETS),
    ("scriptorium_rate_limiter_wait_seconds", WAIT_BUCKETS),
    ("scriptorium_review_score", SCORE_BUCKETS),
    ("scriptorium_variants_per_topic", COUNT_BUCKETS),
    ("gen_ai_client_token_usage", GEN_AI_TOKEN_BUCKETS),
    ("gen_ai_client_operation_duration_seconds", GEN_AI_DURATION_BUCKETS),
];

fn builder() -> Result<PrometheusBuilder, String> {
    // The fallback: a histogram emitted under a name missing from
    // `HISTOGRAMS` still renders as `_bucket`/`_sum`/`_count`.
    let mut b = PrometheusBuilder::new().set_buckets(LATENCY_BUCKETS).map_err(|e| e.to_string())?;
    for (name, buckets) in HISTOGRAMS {
        b = b.set_buckets_for_metric(Matcher::Full((*name).to_string()), buckets).map_err(|e| e.to_string())?;
    }
    Ok(b)
}

/// Installs the global Prometheus recorder and, when `addr` is given, serves
/// `/metrics` there with the default bounds (`MetricsServerOptions`). Must
/// run inside a tokio runtime. Install it before `Scriptorium::start`:
/// values set before the recorder exists (build info, configured limits)
/// are lost.
pub fn install_metrics(addr: Option<SocketAddr>) -> Result<PrometheusHandle, String> {
    install_metrics_with(addr, MetricsServerOptions::default())
}

/// `install_metrics` with explicit bounds for the endpoint. The address is
/// bound before this returns, so a port in use is a startup error.
pub fn install_metrics_with(
    addr: Option<SocketAddr>,
    options: MetricsServerOptions,
) -> Result<PrometheusHandle, String> {
    // Bound first: nothing is installed when the port is taken.
    let listener = match addr {
        Some(addr) => Some(bind_metrics(addr)?),
        None => None,
    };
    let handle = builder()?.install_recorder().map_err(|e| e.to_string())?;
    // Upkeep drains the histograms' buffers between renders, so memory
    // stays bounded however rarely (or never) anybody scrapes.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UPKEEP_INTERVAL).await;
            upkeep.run_upkeep();
        }
    });
    if let Some(listener) = listener {
        let handle = handle.clone();
        tokio::spawn(serve_metrics(listener, handle, options));
    }
    Ok(handle)
}

/// Bounds of the `/metrics` endpoint. A scrape is one short request, so the
/// endpoint needs few connections and little patience; whatever a client
/// does, it holds at most `max_connections` file descriptors.
#[derive(Debug, Clone, Copy)]
pub struct MetricsServerOptions {
    /// Connections served at once. The slot is taken *before* `accept`, so
    /// connections past it wait in the kernel's backlog, costing the
    /// process no file descriptor.
    pub max_connections: usize,
    /// Time a connection gets to send a complete request head, counted from
    /// accept or from the end of the previous response (an idle keep-alive
    /// connection is closed after this too).
    pub header_timeout: Duration,
    /// Longest a connection may live, whatever it does (a client that never
    /// reads its response, for one).
    pub connection_timeout: Duration,
}

impl Default for MetricsServerOptions {
    fn default() -> Self {
        Self {
            max_connections: 64,
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(30),
        }
    }
}

/// Binds like `tokio::net::TcpListener::bind` (SO_REUSEADDR, so a restart
/// is not refused while old connections sit in TIME_WAIT) with an explicit
/// backlog: connections past `max_connections` wait there.
fn bind_metrics(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    let err = |e: std::io::Error| format!("metrics endpoint {addr}: {e}");
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }.map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(1024).map_err(err)
}

/// Accept errors that are not about one connection (out of file
/// descriptors, memory, buffers) pause the accept loop: 100 ms doubling to
/// 5 s, back to 100 ms after the next good accept.
const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(100);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// At most one log line per this interval for accept errors; the line says
/// how many were not logged.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// The accept loop of `/metrics` (see `MetricsServerOptions`). Runs until
/// the process exits.
async fn serve_metrics(listener: tokio::net::TcpListener, handle: PrometheusHandle, options: MetricsServerOptions) {
    let slots = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let mut backoff = ACCEPT_BACKOFF_START;
    let mut log = RateLimitedLog::new(ACCEPT_LOG_EVERY);
    loop {
        // The semaphore is never closed, so this cannot fail.
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else { return };
        match listener.accept().await {
            Ok((stream, _peer)) => {
                backoff = ACCEPT_BACKOFF_START;
                let handle = handle.clone();
                tokio::spawn(async move {
                    serve_metrics_connection(stream, handle, options).await;
                    drop(permit);
                });
            }
            Err(e) if is_connection_error(&e) => {}
            Err(e) => {
                if let Some(suppressed) = log.allow() {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, suppressed,
                        "metrics endpoint: cannot accept a connection");
                }
                drop(permit);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// Errors about the one connection being accepted (it was reset before we
/// got to it): nothing to wait for.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(e.kind(), K::ConnectionAborted | K::ConnectionReset | K::ConnectionRefused | K::Interrupted)
}

/// Lets one event through per interval and counts the ones it held back.
struct RateLimitedLog {
    every: Duration,
    last: Option<tokio::time::Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn new(every: Duration) -> Self {
        Self { every, last: None, suppressed: 0 }
    }

    /// `Some(suppressed since the last line)` when this event may be logged.
    fn allow(&mut self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < self.every) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

async fn serve_metrics_connection(
    stream: tokio::net::TcpStream,
    handle: PrometheusHandle,
    options: MetricsServerOptions,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let response = metrics_response(&req, &handle);
        async move { Ok::<_, std::convert::Infallible>(response) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout)
        // A scrape request is a line and a few headers.
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(stream), service);
    // Timed out or failed, the connection is dropped (closed) either way;
    // neither is worth a log line (that is how a flood would fill the log).
    let _ = tokio::time::timeout(options.connection_timeout, conn).await;
}

fn metrics_response(
    req: &hyper::Request<hyper::body::Incoming>,
    handle: &PrometheusHandle,
) -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
    use hyper::{Method, StatusCode};
    let readable = req.method() == Method::GET || req.method() == Method::HEAD;
    let (status, content_type, body) = match (readable, req.uri().path()) {
        (true, "/metrics") => (StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", handle.render()),
        (false, "/metrics") => (StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use GET\n".to_string()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "metrics are at /metrics\n".to_string()),
    };
    let mut response = hyper::Response::new(http_body_util::Full::new(hyper::body::Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    response
}

/// Raises the soft limit on open files (`RLIMIT_NOFILE`) to the hard limit,
/// so bursts of clients and scrapes meet the system's real ceiling rather
/// than a conservative default of 1024. Returns `(before, after)` soft
/// limits; an error leaves the limit as it was.
// `rlim_t` is u64 on Linux but not everywhere: the casts are for the others.
#[allow(clippy::unnecessary_cast)]
pub fn raise_open_files_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = lim.rlim_cur as u64;
    if lim.rlim_cur >= lim.rlim_max {
        return Ok((before, before));
    }
    let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
    // SAFETY: setrlimit only reads the struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((before, lim.rlim_max as u64))
}

const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Registers the HELP text of every family and pre-registers the label sets
/// we document, so every family appears in a scrape from the start (a zero
/// is a fact; an absent series is a question). Histograms and the
/// per-provider LLM families appear with their first observation.
pub fn describe_metrics() {
    use crate::actors::pool::STAGE_NAMES;
    use crate::llm::FailureReason;
    use crate::workflow::Step;
    use metrics::{describe_counter, describe_gauge, describe_histogram};

    describe_counter!("scriptorium_topics_submitted_total", "Topics accepted by submit (not counting resumed ones).");
    describe_counter!(
        "scriptorium_topics_finished_total",
        "Topics that reached a terminal state, by outcome (approved, not_approved, failed, cancelled)."
    );
    describe_gauge!("scriptorium_topics_in_flight", "Topics being processed now.");
    describe_gauge!("scriptorium_topics_queued", "Topics waiting for a processing slot (including reserved slots).");
    describe_gauge!("scriptorium_topics_awaiting_approval", "Topics parked until a human approves or rejects them.");
    describe_histogram!(
        "scriptorium_topic_duration_seconds",
        "Seconds from submit to a terminal state (includes time queued and awaiting approval)."
    );
    describe_histogram!(
        "scriptorium_step_duration_seconds",
        "Seconds one workflow step took, all attempts and waits included, by step."
    );
    describe_counter!("scriptorium_step_failures_total", "Failed step attempts, by step and classified reason.");
    describe_counter!(
        "scriptorium_llm_requests_total",
        "Model calls, by provider and HTTP status (`error` when no HTTP status: timeout, connection)."
    );
    describe_histogram!("scriptorium_llm_request_duration_seconds", "Seconds one model call took, by provider.");
    describe_counter!("scriptorium_llm_tokens_total", "Tokens reported by the provider, by direction (input, output).");
    describe_counter!("scriptorium_retries_total", "Step attempts after the first, by step.");
    describe_histogram!(
        "scriptorium_rate_limiter_wait_seconds",
        "Seconds a model call waited for the shared rate limiter (pauses included)."
    );
    describe_gauge!("scriptorium_rate_limiter_paused", "1 while a 429 with retry-after pauses every model call.");
    describe_gauge!(
        "scriptorium_rate_limit_requests_per_minute",
        "Configured limits.requests_per_minute (0 = no limit)."
    );
    describe_gauge!("scriptorium_rate_limit_tokens_per_minute", "Configured limits.tokens_per_minute (0 = no limit).");
    describe_histogram!("scriptorium_review_score", "Review scores (0 to 10), one per review.");
    describe_histogram!("scriptorium_variants_per_topic", "Draft variants requested per topic.");
    describe_counter!("scriptorium_revisions_total", "Revisions written (automatic and after a human reject).");
    describe_counter!(
        "scriptorium_actor_restarts_total",
        "Stage workers replaced by their pool (a panic, or a hang past the step timeout), by stage."
    );
    describe_gauge!("scriptorium_build_info", "Always 1; the version label says which build is running.");
    describe_histogram!(
        "gen_ai_client_token_usage",
        "OpenTelemetry GenAI: tokens per model call, by gen_ai_token_type and gen_ai_request_model."
    );
    describe_histogram!(
        "gen_ai_client_operation_duration_seconds",
        "OpenTelemetry GenAI: seconds per model call, by gen_ai_request_model and gen_ai_operation_name."
    );

    metrics::counter!("scriptorium_topics_submitted_total").absolute(0);
    for outcome in ["approved", "not_approved", "failed", "cancelled"] {
        metrics::counter!("scriptorium_topics_finished_total", "outcome" => outcome).absolute(0);
    }
    for step in Step::ALL {
        metrics::counter!("scriptorium_retries_total", "step" => step.as_str()).absolute(0);
        for reason in FailureReason::ALL {
            metrics::counter!("scriptorium_step_failures_total", "step" => step.as_str(), "reason" => reason.as_str())
                .absolute(0);
        }
    }
    describe_gauge!("scriptorium_stage_queue_depth", "Attempts waiting for a free worker in each stage's pool.");
    describe_gauge!("scriptorium_stage_busy_workers", "Workers running an attempt in each stage's pool.");
    describe_gauge!("scriptorium_stage_workers", "Workers in each stage's pool (supervision.stage_workers).");
    describe_gauge!(
        "scriptorium_store_degraded",
        "1 while the store refuses writes (topics wait and retry their journal writes), else 0."
    );
    for actor in STAGE_NAMES {
        metrics::counter!("scriptorium_actor_restarts_total", "actor" => actor).absolute(0);
        metrics::gauge!("scriptorium_stage_queue_depth", "stage" => actor).set(0.0);
        metrics::gauge!("scriptorium_stage_busy_workers", "stage" => actor).set(0.0);
    }
    metrics::gauge!("scriptorium_store_degraded").set(0.0);
    for direction in ["input", "output"] {
        metrics::counter!("scriptorium_llm_tokens_total", "direction" => direction).absolute(0);
    }
    metrics::counter!("scriptorium_revisions_total").absolute(0);
    metrics::gauge!("scriptorium_topics_in_flight").set(0.0);
    metrics::gauge!("scriptorium_topics_queued").set(0.0);
    metrics::gauge!("scriptorium_topics_awaiting_approval").set(0.0);
    metrics::gauge!("scriptorium_rate_limiter_paused").set(0.0);
    // Also set by `Scriptorium::start`; here too so the family exists even
    // when the recorder was installed after the engine started.
    metrics::gauge!("scriptorium_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// How often `process_*` metrics are refreshed.
const PROCESS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Starts the periodic `process_*` collector (CPU seconds, resident and
/// virtual memory, open and max fds, threads, start time) on the current
/// runtime. Independent of the metrics listener: it only writes to the
/// recorder, so install the recorder first.
pub fn spawn_process_metrics() -> tokio::task::JoinHandle<()> {
    let collector = metrics_process::Collector::default();
    collector.describe();
    tokio::spawn(async move {
        loop {
            // Reads /proc: a few small files, well under a millisecond.
            collector.collect();
            tokio::time::sleep(PROCESS_INTERVAL).await;
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn colour_only_on_a_terminal_and_never_with_no_color() {
        use std::ffi::OsStr;
        assert!(super::use_colour(true, None));
        assert!(super::use_colour(true, Some(OsStr::new(""))), "an empty NO_COLOR does not count");
        assert!(!super::use_colour(true, Some(OsStr::new("1"))));
        assert!(!super::use_colour(false, None));
    }
}
