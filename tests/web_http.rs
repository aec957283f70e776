//! The web console over plain HTTP: security headers, CSRF refusal, token
//! auth, the non-loopback refusal, escaping of hostile text, request bounds
//! and the event stream. The engine runs in-process on the simulated
//! provider; the console listens on a real loopback port.

#[path = "web/common.rs"]
mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{config, Console, HostileProvider, HOSTILE_TOPIC};
use reqwest::header::{HeaderMap, SET_COOKIE};
use reqwest::{redirect, Client, StatusCode};
use scriptorium::config::Secret;
use scriptorium::state::TopicStatus;
use scriptorium::SubmitRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(30);

fn client() -> Client {
    Client::builder().redirect(redirect::Policy::none()).timeout(Duration::from_secs(20)).build().unwrap()
}

/// A browser-like session: the cookies the console set, and the CSRF token
/// of the last page.
#[derive(Default)]
struct Session {
    cookies: HashMap<String, String>,
    bearer: Option<String>,
}

impl Session {
    fn absorb(&mut self, headers: &HeaderMap) {
        for v in headers.get_all(SET_COOKIE) {
            let v = v.to_str().unwrap();
            let (kv, _) = v.split_once(';').unwrap_or((v, ""));
            let (k, val) = kv.split_once('=').unwrap();
            self.cookies.insert(k.to_string(), val.to_string());
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ")
    }

    async fn get(&mut self, url: &str) -> (StatusCode, HeaderMap, String) {
        let mut req = client().get(url).header("cookie", self.cookie_header());
        if let Some(b) = &self.bearer {
            req = req.bearer_auth(b);
        }
        let r = req.send().await.unwrap();
        let (status, headers) = (r.status(), r.headers().clone());
        self.absorb(&headers);
        (status, headers, r.text().await.unwrap())
    }

    async fn post(&mut self, url: &str, form: &[(&str, &str)]) -> (StatusCode, HeaderMap, String) {
        let mut req = client().post(url).header("cookie", self.cookie_header()).form(form);
        if let Some(b) = &self.bearer {
            req = req.bearer_auth(b);
        }
        let r = req.send().await.unwrap();
        let (status, headers) = (r.status(), r.headers().clone());
        self.absorb(&headers);
        (status, headers, r.text().await.unwrap())
    }
}

/// The value of `<input type="hidden" name="csrf" value="…">` in a page.
fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("the page has a CSRF field") + 19;
    html[at..].split('"').next().unwrap().to_string()
}

async fn awaiting_topic(console: &Console) -> String {
    let receipt = console
        .engine
        .submit(SubmitRequest {
            topic: "How do tides work?".into(),
            require_approval: Some(true),
            ..SubmitRequest::default()
        })
        .await
        .unwrap();
    let state = console.engine.wait(&receipt.id, Some(WAIT)).await.unwrap();
    assert_eq!(state.status, TopicStatus::AwaitingApproval);
    receipt.id
}

fn assert_security_headers(what: &str, h: &HeaderMap) {
    let csp = h.get("content-security-policy").unwrap_or_else(|| panic!("{what}: no CSP")).to_str().unwrap();
    assert!(csp.contains("script-src 'self'"), "{what}: {csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{what}: {csp}");
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{what}: {csp}");
    assert_eq!(h.get("x-content-type-options").map(|v| v.to_str().unwrap()), Some("nosniff"), "{what}");
}

#[tokio::test]
async fn every_response_carries_the_security_headers() {
    let console = Console::start(config(0), None, None).await;
    let id = awaiting_topic(&console).await;
    let mut s = Session::default();
    for path in ["/", &format!("/topics/{id}"), "/topics/nope", "/static/console.js", "/static/console.css", "/x"] {
        let (status, h, _) = s.get(&console.url(path)).await;
        assert_security_headers(&format!("GET {path} ({status})"), &h);
    }
    let (status, h, _) = s.post(&console.url("/submit"), &[("topic", "x")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_security_headers("POST /submit without csrf", &h);
    let (_, h, _) = s.get(&console.url("/static/console.js")).await;
    assert!(h["content-type"].to_str().unwrap().starts_with("text/javascript"));
    // No inline script anywhere: the only <script> is the static file.
    let (_, _, html) = s.get(&console.url(&format!("/topics/{id}"))).await;
    assert_eq!(html.matches("<script").count(), 1, "{html}");
    assert!(html.contains("<script src=\"/static/console.js\" defer></script>"));
    assert!(!html.contains(" style="), "inline styles are blocked by the CSP");
    console.stop().await;
}

#[tokio::test]
async fn state_changing_posts_need_the_sessions_csrf_token() {
    let console = Console::start(config(0), None, None).await;
    let id = awaiting_topic(&console).await;
    let approve = console.url(&format!("/topics/{id}/approve"));

    // No session at all.
    let mut stranger = Session::default();
    let (status, _, body) = stranger.post(&approve, &[("note", "ok")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("csrf"), "{body}");

    // A session, but no token / a wrong token / another session's token.
    let mut alice = Session::default();
    let (_, _, page) = alice.get(&console.url(&format!("/topics/{id}"))).await;
    let alice_csrf = csrf_of(&page);
    let mut bob = Session::default();
    let (_, _, page) = bob.get(&console.url("/")).await;
    let bob_csrf = csrf_of(&page);
    assert_ne!(alice_csrf, bob_csrf);
    for form in [vec![], vec![("csrf", "")], vec![("csrf", "00ff")], vec![("csrf", bob_csrf.as_str())]] {
        let (status, _, _) = alice.post(&approve, &form).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{form:?}");
    }
    let (status, _, _) = alice.post(&console.url("/submit"), &[("topic", "Sneaky"), ("csrf", &bob_csrf)]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // A GET never changes anything.
    let (status, _, _) = alice.get(&approve).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

    // Nothing changed: still awaiting, no second topic.
    assert_eq!(console.engine.get(&id).await.unwrap().status, TopicStatus::AwaitingApproval);
    assert_eq!(console.engine.list(Default::default()).await.unwrap().len(), 1);

    // Reject needs a note (the engine's rule, answered as a page).
    let (status, _, body) = alice.post(&console.url(&format!("/topics/{id}/reject")), &[("csrf", &alice_csrf)]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("bad_request"), "{body}");

    // With the right token it works: 303 back to the topic, and it completes.
    let (status, h, _) = alice.post(&approve, &[("csrf", &alice_csrf), ("note", "Fine")]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(h["location"].to_str().unwrap(), format!("/topics/{id}"));
    let state = console.engine.get(&id).await.unwrap();
    assert_eq!(state.status, TopicStatus::Completed);
    // A second approve is answered, not applied twice.
    let (status, _, body) = alice.post(&approve, &[("csrf", &alice_csrf)]).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // Submitting through the form: 303 to the new topic's page.
    let (status, h, _) = alice
        .post(&console.url("/submit"), &[("csrf", &alice_csrf), ("topic", "Why do cats purr?"), ("variants", "1")])
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let new_id = h["location"].to_str().unwrap().trim_start_matches("/topics/").to_string();
    let st = console.engine.wait(&new_id, Some(WAIT)).await.unwrap();
    assert_eq!((st.topic.as_str(), st.variants_requested), ("Why do cats purr?", 1));
    console.stop().await;
}

#[tokio::test]
async fn web_token_guards_every_request() {
    let token = "a-sufficiently-long-test-token";
    let console = Console::start(config(0), Some(token), None).await;
    let id = awaiting_topic(&console).await;
    let mut anon = Session::default();
    for path in ["/", &format!("/topics/{id}"), "/static/console.js", "/events"] {
        let (status, h, body) = anon.get(&console.url(path)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(!body.contains("How do tides work"), "{path} leaked topic text");
        assert_security_headers(path, &h);
    }
    let (status, _, _) = anon.post(&console.url(&format!("/topics/{id}/approve")), &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Bearer header: wrong, then right.
    let mut wrong = Session { bearer: Some(format!("{token}x")), ..Session::default() };
    assert_eq!(wrong.get(&console.url("/")).await.0, StatusCode::UNAUTHORIZED);
    let mut api = Session { bearer: Some(token.to_string()), ..Session::default() };
    let (status, _, body) = api.get(&console.url("/")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("How do tides work"));

    // Login form: needs its CSRF token, refuses a wrong token, sets an
    // HttpOnly SameSite=Strict cookie for the right one.
    let mut browser = Session::default();
    let (status, _, page) = browser.get(&console.url("/login")).await;
    assert_eq!(status, StatusCode::OK);
    let csrf = csrf_of(&page);
    assert_eq!(browser.post(&console.url("/login"), &[("token", token)]).await.0, StatusCode::FORBIDDEN);
    let (status, _, body) = browser.post(&console.url("/login"), &[("csrf", &csrf), ("token", "nope")]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(!body.contains(token));
    let (status, h, _) = browser.post(&console.url("/login"), &[("csrf", &csrf), ("token", token)]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let login = h
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with("scriptorium_login="))
        .expect("a login cookie");
    assert!(login.contains("HttpOnly") && login.contains("SameSite=Strict"), "{login}");
    assert!(!login.contains(token), "the cookie is not the token itself");
    let (status, _, page) = browser.get(&console.url(&format!("/topics/{id}"))).await;
    assert_eq!(status, StatusCode::OK);
    let csrf = csrf_of(&page);
    let (status, _, _) =
        browser.post(&console.url(&format!("/topics/{id}/reject")), &[("csrf", &csrf), ("note", "Shorter")]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    console.stop().await;
}

#[tokio::test]
async fn non_loopback_without_token_refuses_to_start() {
    let err = scriptorium::web::bind_addr("0.0.0.0:0".parse().unwrap(), &Secret::default()).await.err().unwrap();
    assert!(err.to_string().contains("web_token"), "{err}");
    // With a token it binds (nothing connects to it from outside).
    let ok = scriptorium::web::bind_addr("0.0.0.0:0".parse().unwrap(), &Secret::new("a-long-enough-token-123")).await;
    assert!(ok.is_ok());

    // The daemon binary refuses to start, naming the key, before it opens anything.
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_scriptorium"))
            .arg("daemon")
            .env("SCRIPTORIUM_LLM__PROVIDER", "simulated")
            .env("SCRIPTORIUM_DAEMON__DATA_DIR", dir.path())
            .env("SCRIPTORIUM_DAEMON__METRICS_ADDR", "")
            .env("SCRIPTORIUM_DAEMON__WEB_ADDR", "0.0.0.0:0")
            .env_remove("SCRIPTORIUM_DAEMON__WEB_TOKEN")
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("web_token"), "{stderr}");
    assert!(!dir.path().join("scriptorium.sock").exists());
}

#[tokio::test]
async fn hostile_text_reaches_the_page_escaped_or_sanitised() {
    let cfg = config(0);
    let provider = HostileProvider::shared(&cfg);
    let console = Console::start(cfg, None, Some(provider)).await;
    let receipt =
        console.engine.submit(SubmitRequest { topic: HOSTILE_TOPIC.into(), ..Default::default() }).await.unwrap();
    let state = console.engine.wait(&receipt.id, Some(WAIT)).await.unwrap();
    assert_eq!(state.status, TopicStatus::Completed, "{:?}", state.error);
    let md = &state.final_draft.as_ref().unwrap().draft.markdown;
    assert!(md.contains("<script>") && md.contains("javascript:"), "the draft really carries the payload");

    let mut s = Session::default();
    for path in ["/".to_string(), format!("/topics/{}", receipt.id)] {
        let (status, _, html) = s.get(&console.url(&path)).await;
        assert_eq!(status, StatusCode::OK);
        let lower = html.to_ascii_lowercase();
        assert_eq!(lower.matches("<script").count(), 1, "{path}: only our own script tag");
        // Inside any real tag (text between `<` and `>`; escaped text has
        // no `<`), no handler attribute and no javascript: URL.
        for tag in lower.split('<').skip(1).map(|t| t.split('>').next().unwrap_or("")) {
            for bad in ["img", "svg"] {
                assert!(!tag.starts_with(bad), "{path}: a <{bad}> tag reached the page: <{tag}>");
            }
            for bad in ["onerror", "onclick", "onload", "javascript:"] {
                assert!(!tag.contains(bad), "{path}: `{bad}` in a tag: <{tag}>");
            }
        }
        // The topic is shown, as text.
        assert!(html.contains("Lighthouses &lt;img src=x"), "{path}");
    }
    console.stop().await;
}

#[tokio::test]
async fn bad_requests_are_answered_and_bounded() {
    let console = Console::start(config(0), None, None).await;
    let mut s = Session::default();
    let (_, _, page) = s.get(&console.url("/")).await;
    let csrf = csrf_of(&page);
    assert_eq!(s.get(&console.url("/?status=bogus")).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(s.get(&console.url("/topics/t0000")).await.0, StatusCode::NOT_FOUND);
    assert_eq!(s.get(&console.url("/topics/..%2f")).await.0, StatusCode::NOT_FOUND);
    let big = "x".repeat(100 * 1024);
    let (status, _, _) = s.post(&console.url("/submit"), &[("csrf", &csrf), ("topic", &big)]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _, body) = s.post(&console.url("/submit"), &[("csrf", &csrf), ("topic", "  ")]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _, _) =
        s.post(&console.url("/submit"), &[("csrf", &csrf), ("topic", "ok"), ("variants", "two")]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let r = client()
        .post(console.url("/submit"))
        .header("cookie", s.cookie_header())
        .header("content-type", "application/json")
        .body(format!("{{\"csrf\":\"{csrf}\",\"topic\":\"x\"}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(console.engine.list(Default::default()).await.unwrap().is_empty(), "nothing was submitted");
    console.stop().await;
}

#[tokio::test]
async fn connections_are_capped() {
    let console = Console::start(config(0), None, None).await;
    let addr = console.base.trim_start_matches("http://").to_string();
    // Fill every slot with a connection that sends nothing.
    let mut idle = Vec::new();
    for _ in 0..scriptorium::web::MAX_CONNECTIONS {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // One more is accepted by the kernel but not served while all are taken.
    let mut extra = tokio::net::TcpStream::connect(&addr).await.unwrap();
    extra.write_all(b"GET /static/console.css HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(500), extra.read(&mut buf)).await;
    assert!(early.is_err(), "served beyond the connection cap");
    // Freeing one slot lets it through.
    idle.pop();
    let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(idle);
    console.stop().await;
}

#[tokio::test]
async fn event_stream_reports_a_topics_moves() {
    let console = Console::start(config(20), None, None).await;
    let mut r = client().get(console.url("/events")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let first = tokio::time::timeout(WAIT, r.chunk()).await.unwrap().unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("retry:"));
    let receipt = console
        .engine
        .submit(SubmitRequest { topic: "Why is the sky blue?".into(), ..Default::default() })
        .await
        .unwrap();
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !seen.contains("\"status\":\"completed\"") {
        let chunk = tokio::time::timeout_at(deadline, r.chunk()).await.expect("no completed event").unwrap().unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains(&format!("\"topic_id\":\"{}\"", receipt.id)), "{seen}");
    assert!(!seen.contains("Why is the sky blue"), "events carry ids, not text");
    console.stop().await;
}

#[tokio::test]
async fn the_daemon_serves_the_console_and_stops_it_on_sigterm() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_scriptorium"))
        .arg("daemon")
        .env("SCRIPTORIUM_LLM__PROVIDER", "simulated")
        .env("SCRIPTORIUM_DAEMON__DATA_DIR", dir.path())
        .env("SCRIPTORIUM_DAEMON__METRICS_ADDR", "")
        .env("SCRIPTORIUM_DAEMON__WEB_ADDR", format!("127.0.0.1:{port}"))
        .env_remove("SCRIPTORIUM_DAEMON__WEB_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/");
    let deadline = tokio::time::Instant::now() + WAIT;
    let page = loop {
        if let Ok(r) = client().get(&url).send().await {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "the daemon's console never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(page.status(), StatusCode::OK);
    assert_security_headers("daemon GET /", page.headers());
    assert!(page.text().await.unwrap().contains("Submit a topic"));
    // An open live stream does not hold the daemon up.
    let mut events = client().get(format!("{url}events")).send().await.unwrap();
    let _ = events.chunk().await.unwrap();
    let pid = child.id().unwrap() as i32;
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = tokio::time::timeout(WAIT, child.wait()).await.expect("the daemon did not stop").unwrap();
    assert!(status.success(), "{status}");
    assert!(client().get(&url).send().await.is_err(), "the console stopped with the daemon");
}
