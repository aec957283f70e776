//! `scriptorium daemon`: validates the whole config (addresses, provider
//! settings) before touching the disk, raises the soft open-files limit,
//! binds the metrics endpoint and the socket(s), opens the store, brings the
//! topic files up to date with it, starts the engine (which resumes
//! unfinished topics), serves the web console, logs one line and tells systemd `READY=1` when the
//! socket accepts, and drains on SIGTERM/SIGINT (`STOPPING=1`) within
//! `daemon.shutdown_grace_s`. Exit 0 after a clean drain; 4 when
//! supervision escalated.
//!
//! Paths come from `paths::Layout`: the XDG state dir and runtime dir unless
//! the config names them; nothing is created in the working directory.
//! Must not: create a file or directory before every check that can fail on
//! config alone has passed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use scriptorium::config::StoreBackend;
use scriptorium::paths::{self, Layout, PathEnv};
use scriptorium::scaleout;
use scriptorium::server::{self, ServerOptions};
use scriptorium::store::files::FileMirror;
use scriptorium::store::sqlite::SqliteStore;
use scriptorium::store::TopicStore;
use scriptorium::telemetry::{self, LogFormat};
use scriptorium::{EngineOptions, Scriptorium};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

use super::sd_notify;

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
    value.trim().parse().map(Some).with_context(|| format!("{key}: `{value}` is not an address like 127.0.0.1:9464"))
}

pub async fn run(
    config_path: Option<PathBuf>,
    socket: Option<PathBuf>,
    log_format: LogFormat,
    args: DaemonArgs,
) -> anyhow::Result<ExitCode> {
    let (config, source) = super::load_config(config_path.as_deref())?;
    let traces = telemetry::init(log_format, "info", Some(&config.telemetry)).map_err(anyhow::Error::msg)?;
    // Listening from the start: a SIGTERM that arrives once clients can
    // connect (the socket is served before "ready" is logged) must drain,
    // not kill the process with the default action.
    let signals = (
        signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
        signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
    );
    // Everything that can be checked is checked before anything touches the
    // disk: a config error leaves no data dir, database or socket behind.
    let metrics_addr =
        parse_addr("daemon.metrics_addr", args.metrics_addr.as_deref().unwrap_or(&config.daemon.metrics_addr))?;
    let tcp_addr = parse_addr("daemon.tcp", &config.daemon.tcp)?;
    // Provider settings complete (an `openai` provider without a key, say):
    // the engine builds its own provider later; this one only checks.
    scriptorium::llm::build_provider(&config).map_err(|e| anyhow::anyhow!("{}", provider_error(e)))?;
    let layout = Layout::resolve(&config.daemon, &PathEnv::from_process())?;
    let data_dir = layout.state_dir.clone();
    let socket_path = socket.unwrap_or_else(|| layout.socket.clone());

    let mut options = EngineOptions::default();
    let grace = Duration::from_secs_f64(config.daemon.shutdown_grace_s);
    let max_connections = config.daemon.max_connections;

    match telemetry::raise_open_files_limit() {
        Ok((before, after)) => tracing::info!(before, after, "open files limit (soft) raised to the hard limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
    }

    if let Some(addr) = metrics_addr {
        let options = telemetry::MetricsServerOptions {
            max_connections: config.daemon.metrics_max_connections,
            header_timeout: Duration::from_secs_f64(config.daemon.metrics_header_timeout_s),
            connection_timeout: Duration::from_secs_f64(config.daemon.metrics_connection_timeout_s),
        };
        telemetry::install_metrics_with(Some(addr), options).map_err(anyhow::Error::msg)?;
        telemetry::describe_metrics();
        telemetry::spawn_process_metrics();
        if traces.is_some() {
            scriptorium::traces::describe_metrics();
        }
    }
    let tcp = match tcp_addr {
        Some(addr) => {
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "daemon.tcp binds a non-loopback address: the protocol has no authentication");
            }
            Some(server::bind_tcp(addr).await?)
        }
        None => None,
    };
    let web = scriptorium::web::bind(&config.daemon).await?;

    paths::create_private_dir(&data_dir).with_context(|| format!("cannot create data_dir {}", data_dir.display()))?;
    if let Some(dir) = socket_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        paths::create_private_dir(dir)
            .with_context(|| format!("cannot create the socket's directory {}", dir.display()))?;
    }
    // Bind before opening the store: a second daemon on the same socket
    // must fail before it touches the store's unfinished topics.
    let unix = server::bind_unix(&socket_path).await?;

    let store: Arc<dyn TopicStore> = match config.store.backend {
        StoreBackend::Sqlite => Arc::new(SqliteStore::open_with(&layout.database(), config.store.durability)?),
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
    let files = if config.daemon.topic_files {
        let files = FileMirror::new(layout.topics_dir())?;
        // Before the engine runs anything: files a crash left behind the
        // database (a commit not yet mirrored) are rewritten from it.
        let r = files.reconcile(store.as_ref()).await?;
        if r.rewritten > 0 || r.temp_removed > 0 {
            tracing::info!(
                checked = r.checked,
                rewritten = r.rewritten,
                temp_removed = r.temp_removed,
                "topic files brought up to date with the database"
            );
        }
        Some(files)
    } else {
        None
    };

    let engine = match Scriptorium::start(config, EngineOptions { store: Some(store), files, ..options }).await {
        Ok(engine) => engine,
        Err(e) => {
            // No socket file is left behind for clients to find.
            server::remove_socket(&socket_path);
            return Err(e.into());
        }
    };
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
    let web = web.map(|w| {
        let mut rx = stop_rx.clone();
        w.serve(engine.clone(), async move {
            let _ = rx.wait_for(|s| *s).await;
        })
    });
    tracing::info!(
        socket = %socket_path.display(),
        state_dir = %data_dir.display(),
        config = %source.describe(),
        tcp = ?tcp_addr,
        web = ?web.as_ref().and_then(|w| w.addr()),
        metrics = ?metrics_addr,
        traces = traces.as_deref().unwrap_or("off"),
        provider = engine.provider_name(),
        "scriptorium daemon ready"
    );
    // The listeners are bound (so connections queue) and being served.
    sd_notify::notify("READY=1");

    let escalated = wait_for_stop(&engine, signals).await?;
    sd_notify::notify("STOPPING=1");
    tracing::info!(grace_s = grace.as_secs_f64(), "shutting down: no new topics; draining");
    let _ = stop_tx.send(true);
    for s in servers {
        match tokio::time::timeout(Duration::from_secs(5), s).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "listener ended with an error"),
            Ok(_) => {}
            Err(_) => tracing::warn!("listener did not stop in time"),
        }
    }
    if let Some(web) = web {
        web.join(Duration::from_secs(5)).await;
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

/// The provider's own words, without the error class prefix: "fatal error:"
/// would suggest a crash where the fix is a setting.
fn provider_error(e: scriptorium::llm::LlmError) -> String {
    match e {
        scriptorium::llm::LlmError::Fatal { message, .. } => message,
        other => other.to_string(),
    }
}

/// Waits for SIGTERM, SIGINT or an escalation; returns the escalation
/// reason if that was the cause.
async fn wait_for_stop(engine: &Scriptorium, signals: (Signal, Signal)) -> anyhow::Result<Option<String>> {
    let (mut term, mut int) = signals;
    let mut escalation = engine.escalation();
    tokio::select! {
        _ = term.recv() => Ok(None),
        _ = int.recv() => Ok(None),
        r = escalation.wait_for(|e| e.is_some()) => Ok(r.ok().and_then(|e| e.clone())),
    }
}
