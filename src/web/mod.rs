//! The web console for editors: a small HTTP/1.1 server (hyper) that the
//! daemon runs next to its socket. Pages are rendered on the server (maud);
//! one static script adds live updates over Server-Sent Events from the
//! engine's event bus, and every page works without it.
//!
//! Owns: the listener and its bounds (connection cap taken before accept,
//! header-read and request timeouts, body size limit), routing, security
//! headers, login (`daemon.web_token`) and CSRF checks. Pages are
//! `pages.rs`, untrusted-text rendering is `render.rs`, secrets are
//! `auth.rs`, the event stream is `sse.rs`.
//!
//! Must not: run workflow logic (every action is the same `Scriptorium`
//! call the socket makes: `submit`, `approve`, `reject`), change state on a
//! GET, or listen beyond loopback without `web_token` (`bind` refuses).

mod auth;
mod pages;
mod render;
mod sse;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use maud::Markup;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::config::{ConfigError, DaemonConfig, Secret};
use crate::engine::{EngineError, Scriptorium, SubmitRequest};
use crate::state::{TopicStatus, UsageTotals};
use crate::store::ListQuery;
use auth::{Auth, LOGIN_COOKIE, SESSION_COOKIE};

/// Simultaneous connections (an open live-update stream holds one).
pub const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this time (also the
/// keep-alive idle limit between requests).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Reading a body and building a response may take this long.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request body accepted (forms only; a topic is at most
/// `limits.max_topic_chars`).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Rows on the topic list (awaiting approval first, then newest).
pub const MAX_LIST_ROWS: usize = 200;
/// Tokens of finished topics are cached; the cache is dropped past this.
const TOKEN_CACHE_MAX: usize = 10_000;
/// How long a stopping server waits for open connections.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);
/// Accept errors that are not per-connection back off, doubling to the max.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

const CONSOLE_JS: &str = include_str!("static/console.js");
const CONSOLE_CSS: &str = include_str!("static/console.css");

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr} (daemon.web_addr): {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("web console: {0}")]
    Random(#[from] auth::RandomFailed),
}

/// A bound console listener, not serving yet (bind early, so a port in use
/// fails before the engine starts).
pub struct WebListener {
    listener: TcpListener,
    auth: Auth,
}

/// Binds `daemon.web_addr`; `Ok(None)` when it is empty.
pub async fn bind(daemon: &DaemonConfig) -> Result<Option<WebListener>, WebError> {
    match daemon.web_listen()? {
        Some(addr) => bind_addr(addr, &daemon.web_token).await.map(Some),
        None => Ok(None),
    }
}

/// Binds exactly `addr`, with the same rules as the config: a non-loopback
/// address needs a token.
pub async fn bind_addr(addr: SocketAddr, token: &Secret) -> Result<WebListener, WebError> {
    let check = DaemonConfig { web_addr: addr.to_string(), web_token: token.clone(), ..DaemonConfig::default() };
    check.web_listen()?;
    let token = (!token.is_empty()).then(|| token.expose().trim());
    let auth = Auth::new(token)?;
    let listener = TcpListener::bind(addr).await.map_err(|source| WebError::Bind { addr, source })?;
    Ok(WebListener { listener, auth })
}

impl WebListener {
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then closes open connections
    /// (live-update streams end; EventSource reconnects to the next daemon).
    pub fn serve(self, engine: Scriptorium, shutdown: impl Future<Output = ()> + Send + 'static) -> WebServer {
        let (stop_tx, stop_rx) = watch::channel(false);
        let addr = self.listener.local_addr().ok();
        let shared = Arc::new(Shared { engine, auth: self.auth, tokens: Mutex::new(HashMap::new()), stop: stop_rx });
        let task = tokio::spawn(async move {
            let trigger = async move {
                shutdown.await;
                let _ = stop_tx.send(true);
            };
            tokio::join!(accept_loop(shared, self.listener), trigger);
        });
        WebServer { task, addr }
    }
}

/// The running console; `join` waits for it after shutdown was signalled.
pub struct WebServer {
    task: JoinHandle<()>,
    addr: Option<SocketAddr>,
}

impl WebServer {
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    pub async fn join(self, timeout: Duration) {
        if tokio::time::timeout(timeout, self.task).await.is_err() {
            tracing::warn!("web console did not stop in time");
        }
    }
}

struct Shared {
    engine: Scriptorium,
    auth: Auth,
    /// Tokens of topics that can no longer change (terminal).
    tokens: Mutex<HashMap<String, u64>>,
    stop: watch::Receiver<bool>,
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// A permit is taken before `accept`, so at most `MAX_CONNECTIONS` are
/// open; dropping the connection task frees its slot. On stop, open
/// connections get `DRAIN_TIMEOUT` to finish (live streams end at once).
async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut stop = shared.stop.clone();
    let mut conns = JoinSet::new();
    let mut backoff = INITIAL_BACKOFF;
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stopped(&mut stop) => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopped(&mut stop) => break,
        };
        match accepted {
            Ok((stream, _)) => {
                backoff = INITIAL_BACKOFF;
                conns.spawn(serve_connection(Arc::clone(&shared), stream, permit));
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset) => {}
            Err(e) => {
                tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "web console: accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(open = conns.len(), "web console: connections still open after the drain timeout; closing them");
    }
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream, _permit: OwnedSemaphorePermit) {
    let _ = stream.set_nodelay(true);
    let mut stop = shared.stop.clone();
    let service = {
        let shared = Arc::clone(&shared);
        hyper::service::service_fn(move |req| {
            let shared = Arc::clone(&shared);
            async move { Ok::<_, Infallible>(handle(shared, req).await) }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BODY_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, conn).await;
        }
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;
type Reply = Response<Body>;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed()
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn page(status: StatusCode, markup: Markup) -> Reply {
    reply(status, "text/html; charset=utf-8", markup.into_string())
}

fn error_reply(status: StatusCode, code: &str, message: &str) -> Reply {
    page(status, pages::error_page(code, message))
}

fn redirect(to: &str) -> Reply {
    let mut r = reply(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "");
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn engine_error(e: &EngineError) -> Reply {
    let status = match e {
        EngineError::BadRequest(_) => StatusCode::BAD_REQUEST,
        EngineError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        EngineError::NotFound(_) => StatusCode::NOT_FOUND,
        EngineError::Busy(_) | EngineError::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        EngineError::Budget(_) => StatusCode::TOO_MANY_REQUESTS,
        EngineError::InvalidState(_) => StatusCode::CONFLICT,
        EngineError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        EngineError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error_reply(status, e.code(), &e.to_string())
}

/// Headers on every response, error pages and redirects included.
fn secure(headers: &mut HeaderMap, cacheable: bool) {
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    if !cacheable {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
}

/// What the router knows about the caller.
struct Caller {
    /// The session id (from the cookie, or new: then it is set on the reply).
    session: String,
    new_session: bool,
    /// Logged in, by bearer header or login cookie (always true without a
    /// token configured).
    authenticated: bool,
}

fn caller(shared: &Shared, headers: &HeaderMap) -> Result<Caller, auth::RandomFailed> {
    let cookies = headers.get(header::COOKIE).and_then(|v| v.to_str().ok());
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| shared.auth.token_ok(t));
    let cookie_login = auth::cookie(cookies, LOGIN_COOKIE).is_some_and(|c| shared.auth.login_cookie_ok(c));
    let authenticated = !shared.auth.requires_login() || bearer || cookie_login;
    let (session, new_session) = match auth::cookie(cookies, SESSION_COOKIE).filter(|s| Auth::session_valid(s)) {
        Some(s) => (s.to_string(), false),
        None => (shared.auth.new_session()?, true),
    };
    Ok(Caller { session, new_session, authenticated })
}

fn set_cookie(headers: &mut HeaderMap, name: &str, value: &str) {
    // HttpOnly: scripts cannot read it; SameSite=Strict: other sites'
    // pages cannot make the browser send it.
    let cookie = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict");
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        headers.append(header::SET_COOKIE, v);
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_string();
    let cacheable = path.starts_with("/static/");
    let caller = match caller(&shared, req.headers()) {
        Ok(c) => c,
        Err(e) => {
            let mut r = error_reply(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e.to_string());
            secure(r.headers_mut(), false);
            return r;
        }
    };
    let mut r = match tokio::time::timeout(REQUEST_TIMEOUT, route(&shared, &caller, req)).await {
        Ok(r) => r,
        Err(_) => error_reply(StatusCode::SERVICE_UNAVAILABLE, "timeout", "the request took too long"),
    };
    if caller.new_session {
        set_cookie(r.headers_mut(), SESSION_COOKIE, &caller.session);
    }
    secure(r.headers_mut(), cacheable);
    r
}

/// Topic ids are generated by the engine (`t` + hex); anything else in a
/// path is not a topic.
fn topic_id(s: &str) -> Option<&str> {
    (!s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        .then_some(s)
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    let q = req.uri().query()?;
    form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

async fn route(shared: &Shared, caller: &Caller, req: Request<Incoming>) -> Reply {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();

    if !caller.authenticated {
        return match (&method, segments.as_slice()) {
            (&Method::GET, ["login"]) => {
                page(StatusCode::OK, pages::login_page(&shared.auth.csrf_token(&caller.session), false))
            }
            (&Method::POST, ["login"]) => login(shared, caller, req).await,
            _ => {
                let mut r =
                    page(StatusCode::UNAUTHORIZED, pages::login_page(&shared.auth.csrf_token(&caller.session), false));
                r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                r
            }
        };
    }

    match (&method, segments.as_slice()) {
        (&Method::GET, [""]) => list(shared, caller, &req).await,
        (&Method::GET, ["topics", id]) => match topic_id(id) {
            Some(id) => topic(shared, caller, id).await,
            None => error_reply(StatusCode::NOT_FOUND, "not_found", "no such page"),
        },
        (&Method::GET, ["events"]) => {
            let filter = query_param(&req, "topic").filter(|t| topic_id(t).is_some());
            let mut r = Response::new(sse::stream(shared.engine.clone(), filter, shared.stop.clone()).boxed());
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        (&Method::GET, ["static", "console.js"]) => reply(StatusCode::OK, "text/javascript; charset=utf-8", CONSOLE_JS),
        (&Method::GET, ["static", "console.css"]) => reply(StatusCode::OK, "text/css; charset=utf-8", CONSOLE_CSS),
        (&Method::GET, ["login"]) => redirect("/"),
        (&Method::POST, ["login"]) => login(shared, caller, req).await,
        (&Method::POST, ["submit"]) => submit(shared, caller, req).await,
        (&Method::POST, ["topics", id, action @ ("approve" | "reject")]) => match topic_id(id) {
            Some(id) => {
                let (id, action) = (id.to_string(), action.to_string());
                decide(shared, caller, req, &id, &action).await
            }
            None => error_reply(StatusCode::NOT_FOUND, "not_found", "no such page"),
        },
        (_, [""] | ["topics", _] | ["events"] | ["static", _] | ["submit"] | ["topics", _, _]) => {
            let mut r = error_reply(StatusCode::METHOD_NOT_ALLOWED, "bad_request", "method not allowed here");
            r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, POST"));
            r
        }
        _ => error_reply(StatusCode::NOT_FOUND, "not_found", "no such page"),
    }
}

/// A form body: size-limited, `application/x-www-form-urlencoded`, and
/// carrying this session's CSRF token. Anything else is refused before the
/// engine is called.
async fn form(shared: &Shared, caller: &Caller, req: Request<Incoming>) -> Result<HashMap<String, String>, Reply> {
    let is_form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return Err(error_reply(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "bad_request",
            "send an application/x-www-form-urlencoded form",
        ));
    }
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Err(error_reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                &format!("the form is larger than {MAX_BODY_BYTES} bytes"),
            ))
        }
    };
    let mut fields = HashMap::new();
    for (k, v) in form_urlencoded::parse(&body) {
        fields.entry(k.into_owned()).or_insert_with(|| v.into_owned());
    }
    let csrf_ok = !caller.new_session && fields.get("csrf").is_some_and(|t| shared.auth.csrf_ok(&caller.session, t));
    if !csrf_ok {
        return Err(error_reply(
            StatusCode::FORBIDDEN,
            "csrf",
            "the form's CSRF token is missing or does not belong to this session; reload the page and try again",
        ));
    }
    Ok(fields)
}

async fn login(shared: &Shared, caller: &Caller, req: Request<Incoming>) -> Reply {
    let fields = match form(shared, caller, req).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    if fields.get("token").is_some_and(|t| shared.auth.token_ok(t)) && shared.auth.requires_login() {
        let mut r = redirect("/");
        set_cookie(r.headers_mut(), LOGIN_COOKIE, &shared.auth.login_cookie());
        return r;
    }
    if !shared.auth.requires_login() {
        return redirect("/");
    }
    // A pause makes guessing slow (the connection cap bounds parallelism).
    tokio::time::sleep(Duration::from_millis(300)).await;
    page(StatusCode::UNAUTHORIZED, pages::login_page(&shared.auth.csrf_token(&caller.session), true))
}

async fn submit(shared: &Shared, caller: &Caller, req: Request<Incoming>) -> Reply {
    let fields = match form(shared, caller, req).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let field = |k: &str| fields.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let variants = match field("variants").map(str::parse::<u32>) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return error_reply(StatusCode::BAD_REQUEST, "bad_request", "variants must be a whole number"),
    };
    let request = SubmitRequest {
        topic: field("topic").unwrap_or_default().to_string(),
        kind: field("kind").map(str::to_string),
        variants,
        // An unticked box means "as the kind says", not "never".
        require_approval: field("require_approval").map(|_| true),
        idempotency_key: None,
        ..SubmitRequest::default()
    };
    match shared.engine.submit(request).await {
        Ok(receipt) => redirect(&format!("/topics/{}", receipt.id)),
        Err(e) => engine_error(&e),
    }
}

async fn decide(shared: &Shared, caller: &Caller, req: Request<Incoming>, id: &str, action: &str) -> Reply {
    let fields = match form(shared, caller, req).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let note = fields.get("note").map(|n| n.trim().to_string()).filter(|n| !n.is_empty());
    let result = if action == "approve" {
        shared.engine.approve(id, note).await
    } else {
        shared.engine.reject(id, note.unwrap_or_default()).await
    };
    match result {
        Ok(()) => redirect(&format!("/topics/{id}")),
        Err(e) => engine_error(&e),
    }
}

async fn list(shared: &Shared, caller: &Caller, req: &Request<Incoming>) -> Reply {
    let filter_text = query_param(req, "status").filter(|s| !s.is_empty());
    let filter = match filter_text.as_deref().map(TopicStatus::parse) {
        None => None,
        Some(Some(s)) => Some(s),
        Some(None) => return error_reply(StatusCode::BAD_REQUEST, "bad_request", "unknown status filter"),
    };
    let mut all = match shared.engine.list(ListQuery { status: filter, ..ListQuery::default() }).await {
        Ok(all) => all,
        Err(e) => return engine_error(&e),
    };
    let total = all.len();
    // Awaiting approval first (a person is waiting), then newest first.
    all.sort_by(|a, b| {
        (b.status == TopicStatus::AwaitingApproval)
            .cmp(&(a.status == TopicStatus::AwaitingApproval))
            .then(b.submitted_at_ms.cmp(&a.submitted_at_ms))
            .then(b.id.cmp(&a.id))
    });
    all.truncate(MAX_LIST_ROWS);
    let mut rows = Vec::with_capacity(all.len());
    for summary in all {
        let tokens = tokens_of(shared, &summary.id, summary.status).await;
        rows.push(pages::ListRow { summary, tokens });
    }
    let config = shared.engine.config();
    let kinds = config.kind_names();
    let form = pages::SubmitForm {
        kinds: &kinds,
        default_variants: config.workflow.variants,
        max_topic_chars: config.limits.max_topic_chars,
    };
    let csrf = shared.auth.csrf_token(&caller.session);
    page(StatusCode::OK, pages::list_page(&rows, filter, total, now_ms(), &csrf, &form))
}

/// The list's summaries have no token counts: read the topic (cached once
/// it can no longer change).
async fn tokens_of(shared: &Shared, id: &str, status: TopicStatus) -> Option<u64> {
    if let Some(t) = lock(&shared.tokens).get(id) {
        return Some(*t);
    }
    let state = shared.engine.get(id).await.ok()?;
    let UsageTotals { input_tokens, output_tokens, .. } = state.usage;
    let total = input_tokens + output_tokens;
    if status.is_terminal() && state.status.is_terminal() {
        let mut cache = lock(&shared.tokens);
        if cache.len() >= TOKEN_CACHE_MAX {
            cache.clear();
        }
        cache.insert(id.to_string(), total);
    }
    Some(total)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

async fn topic(shared: &Shared, caller: &Caller, id: &str) -> Reply {
    match shared.engine.get(id).await {
        Ok(state) => {
            let csrf = shared.auth.csrf_token(&caller.session);
            page(StatusCode::OK, pages::topic_page(&state, now_ms(), &csrf))
        }
        Err(e) => engine_error(&e),
    }
}
