//! Traces over OTLP/HTTP (JSON): the spans `tracing` already opens (`topic`,
//! `step`, `attempt`, and the model-call span of `llm::traced`) exported to
//! any OTLP receiver (Jaeger, Tempo, an OpenTelemetry Collector, Langfuse).
//!
//! Owns: the endpoint choice (`telemetry.otlp_endpoint`, else
//! `OTEL_EXPORTER_OTLP_ENDPOINT`), the bounded export queue and its
//! counters, and the flush at exit. Must not: slow or fail a topic — a span
//! that finds the queue full is dropped and counted, exports run on their
//! own thread with a timeout — or export prompt and draft text unless
//! `telemetry.capture_content` (that decision is made where the span is
//! filled, in `llm::traced`).

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;

use crate::config::TelemetryConfig;

/// The standard variable, honoured when `telemetry.otlp_endpoint` is empty.
pub const OTEL_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// Spans per export request.
const MAX_BATCH: usize = 512;
/// How long a span waits for companions before a partial batch is sent.
const BATCH_DELAY: Duration = Duration::from_millis(500);
/// Upper bound on the flush at exit.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The traces endpoint (`<base>/v1/traces`) for this config and
/// environment value, or `None` when tracing is off.
pub fn traces_url(config: &TelemetryConfig, env_endpoint: Option<&str>) -> Option<String> {
    let base = Some(config.otlp_endpoint.trim())
        .filter(|s| !s.is_empty())
        .or_else(|| env_endpoint.map(str::trim).filter(|s| !s.is_empty()))?;
    let base = base.trim_end_matches('/');
    Some(if base.ends_with("/v1/traces") { base.to_string() } else { format!("{base}/v1/traces") })
}

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Builds the tracer provider for `url` and returns the tracer for the
/// `tracing` layer. The exporter lives on its own thread.
pub fn start(config: &TelemetryConfig, url: String) -> Result<opentelemetry_sdk::trace::SdkTracer, String> {
    let processor = QueueProcessor::spawn(url, config)?;
    // The resource is handed to the exporter on its thread (see `spawn`).
    let provider = SdkTracerProvider::builder().with_span_processor(processor).build();
    let tracer = provider.tracer("scriptorium");
    let _ = PROVIDER.set(provider);
    Ok(tracer)
}

/// Exports what is queued (bounded by `SHUTDOWN_TIMEOUT`) and stops the
/// exporter. Call once at exit, outside the async runtime; a no-op when
/// tracing is off.
pub fn shutdown() {
    if let Some(p) = PROVIDER.get() {
        if let Err(e) = p.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            eprintln!("warning: traces: flushing at exit: {e}");
        }
    }
}

/// HELP text and zero values of the trace counters. Call after installing
/// the metrics recorder (tracing starts before it; the counters are looked
/// up at each use, so they count from whenever the recorder exists).
pub fn describe_metrics() {
    metrics::describe_counter!(
        "scriptorium_trace_spans_exported_total",
        "Spans accepted by the OTLP receiver (only with telemetry.otlp_endpoint set)."
    );
    metrics::describe_counter!(
        "scriptorium_trace_spans_dropped_total",
        "Spans dropped because the export queue (telemetry.max_queued_spans) was full or an export failed."
    );
    metrics::describe_counter!("scriptorium_trace_export_failures_total", "Export requests that failed or timed out.");
    metrics::counter!("scriptorium_trace_spans_exported_total").absolute(0);
    metrics::counter!("scriptorium_trace_spans_dropped_total").absolute(0);
    metrics::counter!("scriptorium_trace_export_failures_total").absolute(0);
}

enum Msg {
    Span(Box<SpanData>),
    /// Export everything queued so far, then answer.
    Flush(SyncSender<()>),
    Shutdown(SyncSender<()>),
}

/// A span processor with a bounded queue: `on_end` never blocks (a full
/// queue drops the span and counts it), one worker thread batches and
/// exports. The SDK's batch processor drops too, but does not say how many.
struct QueueProcessor {
    tx: SyncSender<Msg>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for QueueProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueProcessor").finish_non_exhaustive()
    }
}

impl QueueProcessor {
    fn spawn(url: String, config: &TelemetryConfig) -> Result<QueueProcessor, String> {
        let (tx, rx) = mpsc::sync_channel(config.max_queued_spans);
        let timeout = Duration::from_secs_f64(config.export_timeout_s);
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        // The exporter (and its blocking HTTP client) is built and dropped
        // on this thread: reqwest's blocking client must not live inside
        // the async runtime.
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), String>>(1);
        let worker = std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || {
                let built = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(Protocol::HttpJson)
                    .with_endpoint(url.clone())
                    .with_timeout(timeout)
                    .build();
                let mut exporter = match built {
                    Ok(e) => {
                        let _ = ready_tx.send(Ok(()));
                        e
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("telemetry.otlp_endpoint {url}: {e}")));
                        return;
                    }
                };
                exporter.set_resource(&resource);
                run_worker(&exporter, rx);
                let _ = exporter.shutdown();
            })
            .map_err(|e| format!("cannot start the trace exporter thread: {e}"))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("the trace exporter thread stopped while starting".into()),
        }
        Ok(QueueProcessor { tx, worker: Mutex::new(Some(worker)) })
    }

    fn control(&self, make: impl FnOnce(SyncSender<()>) -> Msg, timeout: Duration) -> OTelSdkResult {
        let deadline = Instant::now() + timeout;
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        // Control messages queue behind the spans (that is what a flush
        // means), and waiting for room is bounded by `timeout` too.
        let mut msg = make(done_tx);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return Err(OTelSdkError::AlreadyShutdown),
                Err(TrySendError::Full(back)) => {
                    if Instant::now() >= deadline {
                        return Err(OTelSdkError::Timeout(timeout));
                    }
                    msg = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        done_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| OTelSdkError::Timeout(timeout))
    }
}

fn run_worker(exporter: &opentelemetry_otlp::SpanExporter, rx: Receiver<Msg>) {
    // Counters are looked up per batch, not held: this thread starts
    // before the metrics recorder is installed.
    let mut batch: Vec<SpanData> = Vec::with_capacity(MAX_BATCH);
    let mut first_at: Option<Instant> = None;
    let export = |batch: &mut Vec<SpanData>| {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        match futures_executor::block_on(exporter.export(std::mem::take(batch))) {
            Ok(()) => metrics::counter!("scriptorium_trace_spans_exported_total").increment(n),
            Err(e) => {
                metrics::counter!("scriptorium_trace_export_failures_total").increment(1);
                metrics::counter!("scriptorium_trace_spans_dropped_total").increment(n);
                tracing::debug!(target: "scriptorium::traces", error = %e, spans = n, "trace export failed");
            }
        }
    };
    loop {
        let wait = first_at.map_or(Duration::from_secs(3600), |t| BATCH_DELAY.saturating_sub(t.elapsed()));
        match rx.recv_timeout(wait) {
            Ok(Msg::Span(span)) => {
                first_at.get_or_insert_with(Instant::now);
                batch.push(*span);
                if batch.len() >= MAX_BATCH {
                    export(&mut batch);
                    first_at = None;
                }
            }
            Ok(Msg::Flush(done)) => {
                export(&mut batch);
                first_at = None;
                let _ = done.send(());
            }
            Ok(Msg::Shutdown(done)) => {
                export(&mut batch);
                let _ = done.send(());
                return;
            }
            Err(RecvTimeoutError::Timeout) => {
                export(&mut batch);
                first_at = None;
            }
            Err(RecvTimeoutError::Disconnected) => {
                export(&mut batch);
                return;
            }
        }
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        match self.tx.try_send(Msg::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                metrics::counter!("scriptorium_trace_spans_dropped_total").increment(1)
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.control(Msg::Flush, SHUTDOWN_TIMEOUT)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let result = self.control(Msg::Shutdown, timeout);
        let handle = match self.worker.lock() {
            Ok(mut g) => g.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if result.is_ok() {
            if let Some(h) = handle {
                let _ = h.join();
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_from_config_then_environment() {
        let mut c = TelemetryConfig::default();
        assert_eq!(traces_url(&c, None), None);
        assert_eq!(traces_url(&c, Some("  ")), None);
        assert_eq!(traces_url(&c, Some("http://env:4318")).as_deref(), Some("http://env:4318/v1/traces"));
        c.otlp_endpoint = "http://cfg:4318/".into();
        assert_eq!(traces_url(&c, Some("http://env:4318")).as_deref(), Some("http://cfg:4318/v1/traces"));
        c.otlp_endpoint = "http://cfg:4318/v1/traces".into();
        assert_eq!(traces_url(&c, None).as_deref(), Some("http://cfg:4318/v1/traces"));
    }
}
