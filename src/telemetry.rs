//! Logging (tracing) and metrics (Prometheus exporter) setup.
//!
//! Owns: the subscriber format (`--log-format text|json`, `RUST_LOG`), the
//! Prometheus recorder and its histogram buckets. Must not: put topic ids,
//! topic text or any other unbounded value in a metric label, or log the
//! API key.

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
const TOKEN_BUCKETS: &[f64] = &[16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0];

fn builder() -> Result<PrometheusBuilder, String> {
    let b = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full("scriptorium_llm_request_duration_seconds".into()), LATENCY_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full("scriptorium_step_duration_seconds".into()), LATENCY_BUCKETS)
        })
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full("gen_ai_client_operation_duration_seconds".into()), LATENCY_BUCKETS)
        })
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full("scriptorium_topic_duration_seconds".into()), TOPIC_BUCKETS)
        })
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full("scriptorium_rate_limiter_wait_seconds".into()), WAIT_BUCKETS)
        })
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full("scriptorium_review_score".into()), SCORE_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full("scriptorium_variants_per_topic".into()), COUNT_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full("gen_ai_client_token_usage".into()), TOKEN_BUCKETS))
        .map_err(|e| e.to_string())?;
    Ok(b)
}

/// Installs the global Prometheus recorder and, when `addr` is given, serves
/// `/metrics` there. Must run inside a tokio runtime.
pub fn install_metrics(addr: Option<SocketAddr>) -> Result<PrometheusHandle, String> {
    let b = builder()?;
    match addr {
        Some(addr) => {
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
        None => b.install_recorder().map_err(|e| e.to_string()),
    }
}

/// Pre-registers the label sets we document so every family appears in a
/// scrape from the start (a zero is a fact; an absent series is a question).
pub fn describe_metrics() {
    use crate::llm::FailureReason;
    use crate::workflow::Step;
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
    for actor in ["router", "planner", "writer", "reviewer", "reviser"] {
        metrics::counter!("scriptorium_actor_restarts_total", "actor" => actor).absolute(0);
    }
    metrics::counter!("scriptorium_revisions_total").absolute(0);
    metrics::gauge!("scriptorium_topics_in_flight").set(0.0);
    metrics::gauge!("scriptorium_topics_queued").set(0.0);
    metrics::gauge!("scriptorium_topics_awaiting_approval").set(0.0);
    metrics::gauge!("scriptorium_rate_limiter_paused").set(0.0);
}
