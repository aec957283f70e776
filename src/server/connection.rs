//! One client connection: framing (newline-delimited JSON, bounded lines),
//! timeouts, dispatch of each request to the engine, and `watch` streams.
//!
//! Owns: the per-connection read/answer loop, generic over any byte stream
//! (Unix socket, TCP, an in-memory duplex in tests). Must not: accept
//! connections or count them (that is `server/mod.rs`), define wire shapes
//! (that is `protocol.rs`), or buffer without bound: a request line is read
//! through a `take()`-limited reader, so a client can make the daemon hold
//! at most `MAX_LINE_BYTES + 1` bytes per connection.
//!
//! Requests on one connection are answered one at a time, in order. A
//! client that stops reading its answers is dropped after `write_timeout`;
//! one that sends nothing for `idle_timeout` is closed. Neither can hold
//! anything but its own connection slot.

use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{broadcast, watch};
use tokio::time::timeout;

use super::protocol::{
    codes, ends_watch, settled_event, to_line, Empty, EventLine, Failure, HealthBody, LaggedLine, ListBody, Request,
    ResultBody, ResultParams, StatusBody, Submitted, Success, WatchParams, Watching, WireError, MAX_LINE_BYTES,
};
use crate::engine::Scriptorium;
use crate::state::TopicSummary;

/// After a too-long line the rest of the client's data is read and thrown
/// away for a moment before closing: closing a socket with unread input
/// makes the kernel reset the connection, and the client could lose the
/// `too_large` answer it has not read yet.
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 1024 * 1024;

/// Upper bound on one engine call that is not a `result` wait. The engine
/// has its own internal timeouts; this one keeps a wedged store or actor
/// from parking a connection forever.
const OP_TIMEOUT: Duration = Duration::from_secs(60);

/// Per-connection limits (from `ServerOptions`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnLimits {
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
}

/// Why a connection ended early. Logged at debug level only: a client
/// going away is routine.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the client did not read its answers within {0:?}")]
    WriteTimeout(Duration),
}

enum LineRead {
    Line,
    TooLong,
    Eof,
}

/// What to do after an answer.
enum Flow {
    Continue,
    Close,
}

/// Serves one connection until the client leaves, it misbehaves, or the
/// server shuts down (`shutdown` turns true or its sender is dropped).
pub(crate) async fn serve_connection<S>(
    engine: Scriptorium,
    stream: S,
    limits: ConnLimits,
    shutdown: watch::Receiver<bool>,
    conn_id: u64,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    tracing::debug!(conn_id, "connection opened");
    let (rd, wr) = tokio::io::split(stream);
    let mut conn = Connection { engine, reader: BufReader::new(rd), writer: wr, limits, shutdown };
    match conn.run().await {
        Ok(()) => tracing::debug!(conn_id, "connection closed"),
        Err(e) => tracing::debug!(conn_id, error = %e, "connection dropped"),
    }
}

struct Connection<R, W> {
    engine: Scriptorium,
    reader: BufReader<R>,
    writer: W,
    limits: ConnLimits,
    shutdown: watch::Receiver<bool>,
}

/// Resolves once the server asks connections to stop.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    // An error means the server dropped the sender: stop as well.
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Reads one line into `buf` (newline and a trailing `\r` removed), never
/// holding more than `max + 1` bytes. A final line without a newline is
/// treated as the client going away mid-request and is discarded.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<LineRead> {
    buf.clear();
    let n = (&mut *reader).take(max as u64 + 1).read_until(b'\n', buf).await?;
    if n == 0 {
        return Ok(LineRead::Eof);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        return Ok(LineRead::Line);
    }
    if buf.len() > max {
        return Ok(LineRead::TooLong);
    }
    Ok(LineRead::Eof)
}

impl<R, W> Connection<R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    async fn run(&mut self) -> Result<(), ConnError> {
        let mut buf = Vec::with_capacity(1024);
        loop {
            let read = tokio::select! {
                biased;
                _ = stopped(&mut self.shutdown) => return Ok(()),
                r = timeout(self.limits.idle_timeout, read_line(&mut self.reader, &mut buf, MAX_LINE_BYTES)) => r,
            };
            match read {
                Err(_) => {
                    tracing::debug!(idle_timeout = ?self.limits.idle_timeout, "closing an idle connection");
                    return Ok(());
                }
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(LineRead::Eof)) => return Ok(()),
                Ok(Ok(LineRead::TooLong)) => {
                    let msg = format!("request line longer than {MAX_LINE_BYTES} bytes; closing the connection");
                    self.write(&to_line(&Failure::new(WireError::new(codes::TOO_LARGE, msg)))).await?;
                    self.linger().await;
                    return Ok(());
                }
                Ok(Ok(LineRead::Line)) => {}
            }
            // Blank lines are ignored, so a human typing into socat can
            // press enter without getting an error.
            if buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let flow = match Request::parse(&buf) {
                Err(e) => {
                    self.write(&to_line(&Failure::new(e))).await?;
                    Flow::Continue
                }
                Ok(Request::Watch(params)) => self.watch(params).await?,
                Ok(request) => {
                    let op = request.op();
                    let answer = tokio::select! {
                        biased;
                        _ = stopped(&mut self.shutdown) => {
                            to_line(&Failure::new(WireError::new(codes::SHUTTING_DOWN, "the daemon is shutting down")))
                        }
                        answer = answer(&self.engine, request) => answer,
                    };
                    tracing::trace!(op, "answered");
                    self.write(&answer).await?;
                    if *self.shutdown.borrow() {
                        return Ok(());
                    }
                    Flow::Continue
                }
            };
            if let Flow::Close = flow {
                return Ok(());
            }
        }
    }

    /// Writes one whole line, or gives up on the client after
    /// `write_timeout`.
    async fn write(&mut self, line: &[u8]) -> Result<(), ConnError> {
        let limit = self.limits.write_timeout;
        let writer = &mut self.writer;
        match timeout(limit, async move {
            writer.write_all(line).await?;
            writer.flush().await
        })
        .await
        {
            Ok(r) => r.map_err(ConnError::from),
            Err(_) => Err(ConnError::WriteTimeout(limit)),
        }
    }

    /// Half-closes, then discards what the client still sends (bounded in
    /// time and bytes) so that closing does not reset the connection before
    /// the client read our last answer.
    async fn linger(&mut self) {
        let _ = timeout(self.limits.write_timeout, self.writer.shutdown()).await;
        let reader = &mut self.reader;
        let _ = timeout(LINGER_TIME, async move {
            let mut sink = [0u8; 8192];
            let mut total = 0usize;
            while total < LINGER_BYTES {
                match reader.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
        })
        .await;
    }

    /// Streams events. With an id: until that topic settles (terminal or
    /// awaiting approval), sending its final event at once when it already
    /// has. Without: until the client leaves or the server stops.
    async fn watch(&mut self, params: WatchParams) -> Result<Flow, ConnError> {
        // Subscribe before looking at the topic so an event between the two
        // cannot be missed.
        let mut events = self.engine.events();
        if let Some(id) = &params.id {
            match timeout(OP_TIMEOUT, self.engine.get(id)).await {
                Err(_) => {
                    let e = WireError::new(codes::TIMEOUT, "the engine did not answer in time");
                    self.write(&to_line(&Failure::new(e))).await?;
                    return Ok(Flow::Continue);
                }
                Ok(Err(e)) => {
                    self.write(&to_line(&Failure::new(e.into()))).await?;
                    return Ok(Flow::Continue);
                }
                Ok(Ok(state)) if state.status.is_settled() => {
                    self.write(&to_line(&Success::new(Watching { watching: Some(id.clone()) }))).await?;
                    self.write(&to_line(&EventLine { event: settled_event(&state) })).await?;
                    return Ok(Flow::Continue);
                }
                Ok(Ok(_)) => {}
            }
        }
        self.write(&to_line(&Success::new(Watching { watching: params.id.clone() }))).await?;
        // While streaming, the only input we look for is the client hanging
        // up; a request sent meanwhile stays buffered and is answered after
        // the stream ends.
        let mut watch_input = true;
        loop {
            tokio::select! {
                biased;
                _ = stopped(&mut self.shutdown) => return Ok(Flow::Close),
                input = self.reader.fill_buf(), if watch_input => match input {
                    Ok([]) | Err(_) => return Ok(Flow::Close),
                    Ok(_) => watch_input = false,
                },
                received = events.recv() => match received {
                    Ok(event) => {
                        if params.id.as_ref().is_some_and(|id| *id != event.topic_id) {
                            continue;
                        }
                        self.write(&to_line(&EventLine { event: (*event).clone() })).await?;
                        if params.id.is_some() && ends_watch(&event) {
                            return Ok(Flow::Continue);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        self.write(&to_line(&LaggedLine { lagged: n })).await?;
                        // The dropped events may include the one that ends
                        // this watch: look at the topic again.
                        if let Some(id) = &params.id {
                            if let Ok(Ok(state)) = timeout(OP_TIMEOUT, self.engine.get(id)).await {
                                if state.status.is_settled() {
                                    self.write(&to_line(&EventLine { event: settled_event(&state) })).await?;
                                    return Ok(Flow::Continue);
                                }
                            }
                        }
                    }
                    // The engine is gone: nothing more will come.
                    Err(broadcast::error::RecvError::Closed) => return Ok(Flow::Close),
                },
            }
        }
    }
}

/// Answers one request other than `watch` with one response line.
async fn answer(engine: &Scriptorium, request: Request) -> Vec<u8> {
    let op = request.op();
    let result = match request {
        // `result` with `wait` is bounded by its own (validated) timeout.
        Request::Result(p) if p.wait => result_wait(engine, p).await,
        request => match timeout(OP_TIMEOUT, call(engine, request)).await {
            Ok(r) => r,
            Err(_) => Err(WireError::new(
                codes::TIMEOUT,
                format!("the engine did not answer `{op}` within {}s", OP_TIMEOUT.as_secs()),
            )),
        },
    };
    match result {
        Ok(line) => line,
        Err(e) => {
            if e.code == codes::INTERNAL {
                tracing::warn!(op, error = %e.message, "request failed");
            }
            to_line(&Failure::new(e))
        }
    }
}

async fn result_wait(engine: &Scriptorium, p: ResultParams) -> Result<Vec<u8>, WireError> {
    let state = engine.wait(&p.id, Some(p.timeout()?)).await?;
    Ok(to_line(&Success::new(ResultBody { state })))
}

async fn call(engine: &Scriptorium, request: Request) -> Result<Vec<u8>, WireError> {
    Ok(match request {
        Request::Submit(p) => to_line(&Success::new(Submitted::from(engine.submit(p.into()).await?))),
        Request::Status(p) => {
            let state = engine.get(&p.id).await?;
            to_line(&Success::new(StatusBody { topic: TopicSummary::from(&state) }))
        }
        Request::Result(p) => to_line(&Success::new(ResultBody { state: engine.get(&p.id).await? })),
        Request::Approve(p) => {
            engine.approve(&p.id, p.note).await?;
            to_line(&Success::new(Empty {}))
        }
        Request::Reject(p) => {
            engine.reject(&p.id, p.note).await?;
            to_line(&Success::new(Empty {}))
        }
        Request::Cancel(p) => {
            engine.cancel(&p.id).await?;
            to_line(&Success::new(Empty {}))
        }
        Request::List(p) => {
            let query = p.to_query()?;
            let limit = query.limit;
            to_line(&Success::new(ListBody::new(engine.list(query).await?, limit)))
        }
        Request::Health => to_line(&Success::new(HealthBody::from(engine.health().await?))),
        // Streams are served by `Connection::watch`, never routed here.
        Request::Watch(_) => return Err(WireError::new(codes::INTERNAL, "watch is a stream, not a single answer")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::EngineOptions;

    #[tokio::test]
    async fn serves_any_byte_stream_in_order() {
        let config = Config::from_toml_str("[llm]\nprovider = \"simulated\"\n", &[]).unwrap();
        let engine = Scriptorium::start(config, EngineOptions::default()).await.unwrap();
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (_stop, stop_rx) = watch::channel(false);
        let limits = ConnLimits { idle_timeout: Duration::from_secs(5), write_timeout: Duration::from_secs(5) };
        let task = tokio::spawn(serve_connection(engine, server, limits, stop_rx, 0));
        let (rd, mut wr) = tokio::io::split(client);
        wr.write_all(b"{\"op\":\"health\"}\r\n\n  \nnope\n{\"op\":\"status\",\"id\":\"x\"}\n").await.unwrap();
        let mut lines = BufReader::new(rd).lines();
        let first = lines.next_line().await.unwrap().unwrap();
        assert!(first.starts_with("{\"ok\":true,\"protocol\":1,"), "{first}");
        assert!(lines.next_line().await.unwrap().unwrap().contains("\"bad_request\""));
        assert!(lines.next_line().await.unwrap().unwrap().contains("\"not_found\""));
        wr.shutdown().await.unwrap();
        assert_eq!(lines.next_line().await.unwrap(), None);
        task.await.unwrap();
    }
}
