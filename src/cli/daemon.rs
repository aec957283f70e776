//! `scriptorium daemon`: opens the store, starts the engine (which resumes
//! unfinished topics), binds the socket(s) and the metrics endpoint, logs one
//! line when ready, and drains on SIGTERM/SIGINT within
//! `daemon.shutdown_grace_s`. Exit 0 after a clean drain; non-zero when
//! supervision escalated.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use scriptorium::config::{Config, StoreBackend};
use scriptorium::scaleout;
use scriptorium::server::{self, ServerOptions};
use scriptorium::store::files::FileMirror;
use scriptorium::store::sqlite::SqliteStore;
use scriptorium::store::TopicStore;
use scriptorium::telemetry::{self, LogFormat};
use scriptorium::{EngineOptions, Scriptorium};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

#[derive(clap::Args, Debug)]
pub struct DaemonArgs {
    /// Serve Prometheus metrics here instead of daemon.metrics_addr
    /// ("" disables).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
}

fn parse_addr(key: &str, value: &str) -> anyhow::Result<Option<SocketAddr>> {
    if value.trim().is_empty() {
        return Ok(None);
    }
    value.parse().map(Some).with_context(|| format!("{key}: `{value}` is not an address like 127.0.0.1:9464"))
}

pub async fn run(
    config_path: Option<PathBuf>,
    socket: Option<PathBuf>,
    log_format: LogFormat,
    args: DaemonArgs,
) -> anyhow::Result<ExitCode> {
    telemetry::init_tracing(log_format, "info");
    let config = Config::load(config_path.as_deref())?;
    let data_dir = config.daemon.data_dir.clone();
    std::fs::create_dir_all(&data_dir).with_context(|| format!("cannot create data_dir {}", data_dir.display()))?;
    let socket_path = socket.unwrap_or_else(|| config.daemon.socket_path());

    let metrics_addr =
        parse_addr("daemon.metrics_addr", args.metrics_addr.as_deref().unwrap_or(&config.daemon.metrics_addr))?;
    if let Some(addr) = metrics_addr {
        telemetry::install_metrics(Some(addr)).map_err(anyhow::Error::msg)?;
        telemetry::describe_metrics();
    }
    let tcp_addr = parse_addr("daemon.tcp", &config.daemon.tcp)?;

    let mut options = EngineOptions::default();
    let store: Arc<dyn TopicStore> = match config.store.backend {
        StoreBackend::Sqlite => Arc::new(SqliteStore::open(&data_dir.join("scriptorium.db"))?),
        StoreBackend::Redis => {
            // Queue, journal and rate limit shared with every daemon on this
            // Redis; the consumer name is stable across this daemon's restarts.
            let consumer = scaleout::default_consumer(&data_dir);
            let largest = config.llm.max_output_tokens.saturating_add(16_000);
            let backend = scaleout::connect(&config, consumer, largest).await?;
            tracing::info!(consumer = %backend.consumer, "sharing queue, journal and rate limit through redis");
            options.queue = Some(backend.queue);
            options.limiter = Some(backend.limiter);
            options.lease_renew_every = Some(Duration::from_secs_f64(config.store.lease_s / 3.0));
            backend.store
        }
    };
    let files = if config.daemon.topic_files { Some(FileMirror::new(data_dir.join("topics"))?) } else { None };
    let grace = Duration::from_secs_f64(config.daemon.shutdown_grace_s);
    let max_connections = config.daemon.max_connections;

    // Bind before starting the engine: a second daemon on the same socket
    // must fail before it touches the store's unfinished topics.
    let unix = server::bind_unix(&socket_path).await?;
    let tcp = match tcp_addr {
        Some(addr) => {
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "daemon.tcp binds a non-loopback address: the protocol has no authentication");
            }
            Some(server::bind_tcp(addr).await?)
        }
        None => None,
    };

    let engine = Scriptorium::start(config, EngineOptions { store: Some(store), files, ..options }).await?;
    if let Some(notice) = engine.provider_notice() {
        eprintln!("{notice}");
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut servers = Vec::new();
    let options = ServerOptions::new(max_connections);
    {
        let (engine, mut rx) = (engine.clone(), stop_rx.clone());
        servers.push(tokio::spawn(async move {
            server::serve_unix_listener(engine, unix, options, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
        }));
    }
    if let Some(listener) = tcp {
        let (engine, mut rx) = (engine.clone(), stop_rx.clone());
        servers.push(tokio::spawn(async move {
            server::serve_tcp_listener(engine, listener, options, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
        }));
    }
    tracing::info!(
        socket = %socket_path.display(),
        tcp = ?tcp_addr,
        metrics = ?metrics_addr,
        provider = engine.provider_name(),
        "scriptorium daemon ready"
    );

    let escalated = wait_for_stop(&engine).await?;
    tracing::info!(grace_s = grace.as_secs_f64(), "shutting down: no new topics; draining");
    let _ = stop_tx.send(true);
    for s in servers {
        match tokio::time::timeout(Duration::from_secs(5), s).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "listener ended with an error"),
            Ok(_) => {}
            Err(_) => tracing::warn!("listener did not stop in time"),
        }
    }
    server::remove_socket(&socket_path);
    let cut = engine.shutdown(grace).await;
    if cut > 0 {
        tracing::info!(topics = cut, "unfinished topics will resume on the next start");
    }
    match escalated {
        Some(reason) => bail!("stopped because supervision escalated: {reason}"),
        None => {
            tracing::info!("stopped");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Waits for SIGTERM, SIGINT or an escalation; returns the escalation
/// reason if that was the cause.
async fn wait_for_stop(engine: &Scriptorium) -> anyhow::Result<Option<String>> {
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut escalation = engine.escalation();
    tokio::select! {
        _ = term.recv() => Ok(None),
        _ = int.recv() => Ok(None),
        r = escalation.wait_for(|e| e.is_some()) => Ok(r.ok().and_then(|e| e.clone())),
    }
}
