//! The daemon's local socket server: binding the Unix socket (or a TCP
//! address), accepting connections under a bound, and shutting down.
//!
//! Owns: listener setup (stale-socket cleanup, `0600` mode), the accept
//! loop, the connection limit and graceful stop. The per-connection protocol
//! is `connection.rs`; the wire shapes are `protocol.rs` (version 1,
//! documented in `docs/protocol.md`). Must not: decide what to listen on
//! (the daemon reads the config and passes a path or an address; a TCP
//! listener binds exactly what it is given), or run workflow logic (every
//! request goes through the `Scriptorium` handle).
//!
//! Binding and serving are separate calls so the daemon can report "ready"
//! only once the socket accepts connections.

mod connection;
pub mod protocol;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::engine::Scriptorium;
use connection::{serve_connection, ConnLimits};

/// How long `bind_unix` waits for an existing socket to answer a connect.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Accept errors that are not per-connection (out of file descriptors,
/// memory) are retried after this pause, doubling up to `MAX_BACKOFF`.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("another daemon is listening on {} (stop it first, or use another socket path)", .0.display())]
    AlreadyRunning(PathBuf),
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Tcp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ServerError + 'a {
    move |source| ServerError::Io { what, path: path.to_path_buf(), source }
}

/// Limits of a running server. `ServerOptions::new(max_connections)` has
/// the production timeouts; tests shorten them.
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    /// Connections served at once; further clients wait in the listen
    /// backlog until one closes.
    pub max_connections: usize,
    /// A connection with no complete request for this long is closed.
    pub idle_timeout: Duration,
    /// A client that does not take one answer line within this is dropped.
    pub write_timeout: Duration,
    /// On shutdown, how long open connections get to finish before they
    /// are cut.
    pub shutdown_wait: Duration,
}

impl ServerOptions {
    pub fn new(max_connections: usize) -> ServerOptions {
        ServerOptions {
            max_connections,
            idle_timeout: Duration::from_secs(300),
            write_timeout: Duration::from_secs(10),
            shutdown_wait: Duration::from_secs(2),
        }
    }
}

/// Binds the Unix socket at `path`:
/// - creates the parent directory (mode `0700`) when it is missing;
/// - when `path` exists and is a socket, connects to it: a daemon answering
///   means `AlreadyRunning`; a refused connect means a dead daemon left it,
///   and it is removed; anything that is not a socket is left alone
///   (`NotASocket`);
/// - binds and sets the socket's mode to `0600` (owner only).
///
/// Two daemons starting in the same instant can both see a stale file;
/// the loser's bind then fails with "address in use".
pub async fn bind_unix(path: &Path) -> Result<UnixListener, ServerError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io_error("create the directory", parent))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => return Err(ServerError::NotASocket(path.to_path_buf())),
        Ok(_) => match tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await {
            // Something accepted (or is too busy to refuse): not ours to take.
            Ok(Ok(_)) | Err(_) => return Err(ServerError::AlreadyRunning(path.to_path_buf())),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "removing a stale socket left by a daemon that is gone");
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error("remove the stale socket", path)(e)),
                }
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Ok(Err(e)) => return Err(io_error("probe the existing socket", path)(e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("inspect", path)(e)),
    }
    let listener = UnixListener::bind(path).map_err(io_error("bind the socket", path))?;
    // The socket carries every op (approve, cancel, ...): owner only.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_error("set permissions on", path))?;
    Ok(listener)
}

/// Binds a TCP listener on exactly `addr` (the caller decides that it is
/// loopback unless configured otherwise: the protocol has no auth).
pub async fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr).await.map_err(|source| ServerError::Tcp { addr, source })
}

/// Binds `path` (see `bind_unix`), serves until `shutdown` resolves, then
/// removes the socket file.
pub async fn serve_unix(
    engine: Scriptorium,
    path: &Path,
    max_connections: usize,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let listener = bind_unix(path).await?;
    let result = serve_unix_listener(engine, listener, ServerOptions::new(max_connections), shutdown).await;
    remove_socket(path);
    result
}

/// Binds `addr` and serves until `shutdown` resolves.
pub async fn serve_tcp(
    engine: Scriptorium,
    addr: SocketAddr,
    max_connections: usize,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let listener = bind_tcp(addr).await?;
    serve_tcp_listener(engine, listener, ServerOptions::new(max_connections), shutdown).await
}

/// Serves an already bound Unix listener. The caller removes the socket
/// file afterwards (`remove_socket`).
pub async fn serve_unix_listener(
    engine: Scriptorium,
    listener: UnixListener,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    serve(engine, listener, options, shutdown).await
}

/// Serves an already bound TCP listener.
pub async fn serve_tcp_listener(
    engine: Scriptorium,
    listener: TcpListener,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    serve(engine, listener, options, shutdown).await
}

/// Best-effort removal of our socket file on the way out.
pub fn remove_socket(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "could not remove the socket file"),
    }
}

/// A listener the accept loop can take connections from.
trait Acceptor: Send {
    type Stream: AsyncRead + AsyncWrite + Send + 'static;
    fn accept_one(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Acceptor for UnixListener {
    type Stream = UnixStream;
    async fn accept_one(&self) -> io::Result<UnixStream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Acceptor for TcpListener {
    type Stream = TcpStream;
    async fn accept_one(&self) -> io::Result<TcpStream> {
        let (s, _) = self.accept().await?;
        // Answers are single small lines: send them at once.
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}

/// Errors about one connection that went away before we accepted it; the
/// next accept is tried at once.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted)
}

static CONN_IDS: AtomicU64 = AtomicU64::new(1);

/// The accept loop shared by both listeners.
///
/// A connection slot (a semaphore permit) is taken *before* accepting and
/// moves into the connection's task, so at most `max_connections` are
/// served; further clients wait in the kernel's backlog. Accept errors:
/// per-connection ones are skipped; others (e.g. out of file descriptors)
/// are logged and retried after a pause of 100 ms doubling to 5 s, reset by
/// the next success; the loop never gives up on its own.
///
/// When `shutdown` resolves: stop accepting (the listener is closed), tell
/// every connection to stop, wait up to `shutdown_wait` for them, abort the
/// rest, return.
async fn serve<L: Acceptor>(
    engine: Scriptorium,
    listener: L,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    tokio::pin!(shutdown);
    let slots = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let limits = ConnLimits { idle_timeout: options.idle_timeout, write_timeout: options.write_timeout };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut backoff = INITIAL_BACKOFF;
    'accept: loop {
        // Reap finished connection tasks so the set stays small.
        while tasks.try_join_next().is_some() {}
        let permit = tokio::select! {
            _ = &mut shutdown => break 'accept,
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(p) => p,
                // The semaphore is never closed; treat it as a stop anyway.
                Err(_) => break 'accept,
            },
        };
        let stream = loop {
            tokio::select! {
                _ = &mut shutdown => break 'accept,
                accepted = listener.accept_one() => match accepted {
                    Ok(stream) => {
                        backoff = INITIAL_BACKOFF;
                        break stream;
                    }
                    Err(e) if is_per_connection(&e) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "accept failed");
                        tokio::select! {
                            _ = &mut shutdown => break 'accept,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                },
            }
        };
        let engine = engine.clone();
        let stop = stop_rx.clone();
        let conn_id = CONN_IDS.fetch_add(1, Ordering::Relaxed);
        tasks.spawn(async move {
            serve_connection(engine, stream, limits, stop, conn_id).await;
            drop(permit);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let open = tasks.len();
    let drained =
        tokio::time::timeout(options.shutdown_wait, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(open, still_open = tasks.len(), "connections did not finish in time; closing them");
        tasks.shutdown().await;
    }
    Ok(())
}
