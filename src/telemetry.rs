//! Logging (tracing) and metrics (Prometheus exporter) setup.
//!
//! Owns: the subscriber format (`--log-format text|json`, `RUST_LOG`), the
//! Prometheus recorder, its histogram buckets and the HELP text of every
//! metric family (`docs/metrics.md` is the reference). Must not: put topic
//! ids, topic text or any other unbounded value in a metric label, or log
//! the API key.
//!
//! Names are exported exactly as written at the call sites: the recorder is
//! built without `with_recommended_naming`, so it neither appends `_total`
//! nor unit suffixes. Every histogram gets explicit buckets (a fallback set
//! covers any name not listed here), so none renders as a summary.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber, writing to stderr. `default_filter`
/// applies when `RUST_LOG` is unset.
pub fn init_tracing(format: LogFormat, default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
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
/// `/metrics` there. Must run inside a tokio runtime. Install it before
/// `Scriptorium::start`: values set before the recorder exists (build info,
/// configured limits) are lost.
pub fn install_metrics(addr: Option<SocketAddr>) -> Result<PrometheusHandle, String> {
    let b = builder()?;
    match addr {
        Some(addr) => {
            // `build` also spawns the recorder's upkeep task.
            let (recorder, exporter) =
                b.with_http_listener(addr).build().map_err(|e| format!("metrics endpoint {addr}: {e}"))?;
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                if let Err(e) = exporter.await {
                    tracing::error!(error = ?e, "metrics endpoint stopped");
                }
            });
            Ok(handle)
        }
        None => {
            let handle = b.install_recorder().map_err(|e| e.to_string())?;
            // Without an exporter nobody drains the histograms' buffers;
            // upkeep does, so memory stays bounded between renders.
            let upkeep = handle.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(UPKEEP_INTERVAL).await;
                    upkeep.run_upkeep();
                }
            });
            Ok(handle)
        }
    }
}

const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

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
