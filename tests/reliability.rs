//! Reliability defects of issue 11, each through the surface a user meets:
//! the `scriptorium daemon` binary as a child process, its real Unix socket,
//! its real metrics port, real files under a umask, and a real local HTTP
//! server that echoes the API key back.
//!
//! - a flood of idle TCP connections to the metrics port (with the process
//!   limited to 1024 open files) cannot starve the socket or flood the log;
//! - the API key never leaks, whether the server echoes it plainly, cut
//!   short or `\u`-escaped in JSON;
//! - topic files converge on the database (ordered writes, repaired at
//!   start);
//! - absurd config values and incomplete settings stop the daemon with a
//!   one-line error naming the key, before anything is written to disk;
//! - the data dir is 0700 and its files 0600 under umask 022;
//! - topics are kept as sent, control characters refused.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio::process::{Child, Command};

/// A long key shaped like a real project key.
const KEY: &str = "sk-proj-Rel1abilityKey0123456789abcdefghijXYZuvw";

struct Daemon {
    child: Child,
    socket: PathBuf,
    stderr: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Daemon {
    fn pid(&self) -> i32 {
        self.child.id().map(|p| p as i32).unwrap_or(0)
    }

    async fn stop(mut self) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await.unwrap().unwrap();
        assert!(status.success(), "daemon exit: {status:?}");
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

/// The base environment: simulated provider without latency, no metrics
/// port, data under `dir/data`.
fn base_env(dir: &Path) -> Vec<(String, String)> {
    [
        ("SCRIPTORIUM_LLM__PROVIDER", "simulated".to_string()),
        ("SCRIPTORIUM_LLM__SIMULATED__LATENCY_MS", "0".into()),
        ("SCRIPTORIUM_LLM__SIMULATED__JITTER_MS", "0".into()),
        ("SCRIPTORIUM_LIMITS__REQUESTS_PER_MINUTE", "0".into()),
        ("SCRIPTORIUM_LIMITS__TOKENS_PER_MINUTE", "0".into()),
        ("SCRIPTORIUM_DAEMON__DATA_DIR", dir.join("data").display().to_string()),
        ("SCRIPTORIUM_DAEMON__METRICS_ADDR", "".into()),
        ("RUST_LOG", "info".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn with(mut env: Vec<(String, String)>, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    for (k, v) in extra {
        env.retain(|(name, _)| name != k);
        env.push((k.to_string(), v.to_string()));
    }
    env
}

#[derive(Clone, Copy, Default)]
struct Limits {
    umask: Option<libc::mode_t>,
    /// (soft, hard) RLIMIT_NOFILE.
    nofile: Option<(libc::rlim_t, libc::rlim_t)>,
}

fn command(dir: &Path, env: &[(String, String)], limits: Limits, stderr: &Path) -> Command {
    let config = dir.join("empty.toml");
    std::fs::write(&config, "").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_scriptorium"));
    cmd.arg("--config")
        .arg(&config)
        .arg("daemon")
        .env_remove("SCRIPTORIUM_CONFIG")
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env("SCRIPTORIUM_DAEMON__WEB_ADDR", "127.0.0.1:0")
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).unwrap())
        .kill_on_drop(true);
    // SAFETY: only async-signal-safe calls (umask, setrlimit) between fork
    // and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(mask) = limits.umask {
                libc::umask(mask);
            }
            if let Some((soft, hard)) = limits.nofile {
                let lim = libc::rlimit { rlim_cur: soft, rlim_max: hard };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

async fn start(dir: &Path, env: &[(String, String)], limits: Limits) -> Daemon {
    let stderr = dir.join(format!("daemon-{}.log", rand_suffix()));
    let child = command(dir, env, limits, &stderr).spawn().unwrap();
    let socket = dir.join("data/scriptorium.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(&socket).await.is_err() {
        if Instant::now() > deadline {
            panic!("daemon did not come up: {}", std::fs::read_to_string(&stderr).unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The socket is bound before the store is opened and the topic files
    // are repaired: ready means answering, not just accepting.
    let h = Client::connect(&socket).await.call(json!({"op": "health"})).await;
    assert_eq!(h["ok"], true, "{h}");
    Daemon { child, socket, stderr }
}

/// Log text without terminal colour codes.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

struct Client {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Client {
    async fn connect(socket: &Path) -> Client {
        let (r, w) = UnixStream::connect(socket).await.unwrap().into_split();
        Client { reader: BufReader::new(r), writer: w }
    }

    async fn call(&mut self, request: Value) -> Value {
        self.writer.write_all(format!("{request}\n").as_bytes()).await.unwrap();
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(60), self.reader.read_line(&mut line)).await.unwrap().unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad response {line:?}: {e}"))
    }

    async fn submit(&mut self, topic: &str) -> String {
        let r = self.call(json!({"op": "submit", "topic": topic, "variants": 1})).await;
        assert_eq!(r["ok"], true, "{r}");
        r["id"].as_str().unwrap().to_string()
    }

    async fn finished(&mut self, id: &str) -> Value {
        let r = self.call(json!({"op": "result", "id": id, "wait": true, "timeout_s": 60})).await;
        assert_eq!(r["ok"], true, "{r}");
        r["state"].clone()
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

// ---------------------------------------------------------------- defect 3

/// Open file descriptors of a process.
fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn scrape(port: u16) -> Result<String, String> {
    let fut = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.map_err(|e| e.to_string())?;
        Ok(body)
    };
    tokio::time::timeout(Duration::from_secs(3), fut).await.map_err(|_| "scrape timed out".to_string())?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_metrics_connections_cannot_starve_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let env = with(
        base_env(dir.path()),
        &[
            ("SCRIPTORIUM_DAEMON__METRICS_ADDR", &format!("127.0.0.1:{port}")),
            ("SCRIPTORIUM_DAEMON__METRICS_MAX_CONNECTIONS", "128"),
            ("SCRIPTORIUM_DAEMON__METRICS_HEADER_TIMEOUT_S", "1"),
        ],
    );
    // Soft = hard = 1024: raising the soft limit cannot help, so only the
    // endpoint's own bounds stand between the flood and the socket.
    let d = start(dir.path(), &env, Limits { nofile: Some((1024, 1024)), ..Limits::default() }).await;
    assert!(scrape(port).await.unwrap().contains("scriptorium_build_info"));

    let mut idle = Vec::new();
    for _ in 0..1100 {
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(("127.0.0.1", port))).await {
            Ok(Ok(s)) => idle.push(s),
            _ => break,
        }
    }
    assert!(idle.len() >= 1100, "only {} connections opened", idle.len());

    let fds = open_fds(d.pid());
    assert!(fds < 400, "daemon holds {fds} fds with 1100 idle metrics connections");
    let mut c = tokio::time::timeout(Duration::from_secs(2), Client::connect(&d.socket)).await.unwrap();
    let h = tokio::time::timeout(Duration::from_secs(2), c.call(json!({"op": "health"}))).await.unwrap();
    assert_eq!(h["ok"], true, "{h}");
    let id = c.submit("Flooded metrics port").await;
    assert_eq!(c.finished(&id).await["status"], "completed");

    // The idle connections are closed by the server as their header
    // timeout runs out, slot by slot; then scrapes work again.
    let deadline = Instant::now() + Duration::from_secs(90);
    let body = loop {
        if let Ok(body) = scrape(port).await {
            break body;
        }
        assert!(Instant::now() < deadline, "no scrape got through after the idle connections");
    };
    assert!(body.contains("scriptorium_topics_submitted_total 1"), "{body}");
    let mut closed = 0;
    for s in idle.iter_mut().take(50) {
        let mut buf = [0u8; 64];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 50, "the server closes idle connections");
    drop(idle);
    let log = d.stderr_text();
    assert!(log.len() < 64 * 1024, "log grew to {} bytes:\n{}", log.len(), &log[..4096.min(log.len())]);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_open_files_limit_is_raised_to_the_hard_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), &base_env(dir.path()), Limits { nofile: Some((512, 2048)), ..Limits::default() }).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let numbers: Vec<&str> = line.split_whitespace().filter(|w| w.parse::<u64>().is_ok()).collect();
    assert_eq!(numbers, ["2048", "2048"], "{line}");
    let log = plain(&d.stderr_text());
    assert!(log.contains("open files limit") && log.contains("before=512") && log.contains("after=2048"), "{log}");
    d.stop().await;
}

// ---------------------------------------------------------------- defect 4

/// Every stretch of the key long enough to count as a leak.
fn leaks(text: &[u8]) -> Vec<String> {
    let w = scriptorium::llm::MIN_LEAK;
    KEY.as_bytes()
        .windows(w)
        .filter(|k| text.windows(w).any(|t| t == *k))
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect()
}

/// `s` with every character written as a JSON `\u` escape.
fn u_escaped(s: &str) -> String {
    s.chars().map(|c| format!("\\u{:04x}", c as u32)).collect()
}

/// Answers every request by the echo mode named in its topic.
struct EchoKey;

impl wiremock::Respond for EchoKey {
    fn respond(&self, request: &wiremock::Request) -> wiremock::ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let topic = support::topic_of(body["input"].as_str().unwrap_or(""));
        let auth = request.headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        assert_eq!(auth, format!("Bearer {KEY}"));
        let error = |status: u16, message_json: String| {
            let raw = format!(
                r#"{{"error":{{"message":{message_json},"type":"invalid_request_error","param":null,"code":"invalid_api_key"}}}}"#
            );
            wiremock::ResponseTemplate::new(status).set_body_raw(raw.into_bytes(), "application/json")
        };
        match topic.as_str() {
            // The key hidden from a raw-text search by JSON escapes.
            "escaped" => error(401, format!("\"Incorrect API key provided: {}.\"", u_escaped(&auth))),
            "plain" => error(401, serde_json::to_string(&format!("Incorrect API key provided: {auth}.")).unwrap()),
            // Masked in the middle, as OpenAI does, but with long ends.
            "partial" => {
                let masked = format!("{}{}{}", &KEY[..14], "*".repeat(20), &KEY[KEY.len() - 10..]);
                error(401, serde_json::to_string(&format!("Incorrect API key provided: {masked}.")).unwrap())
            }
            // The tail of an escaped key, the head plain.
            "mixed" => error(403, format!("\"key {}{} denied\"", &KEY[..20], u_escaped(&KEY[20..]))),
            // A 200 whose refusal quotes the key.
            _ => {
                let reply = json!({
                    "id": "resp_1", "object": "response", "status": "completed",
                    "output": [{"type": "message", "role": "assistant",
                                "content": [{"type": "refusal", "refusal": format!("I will not use {auth}")}]}],
                    "usage": {"input_tokens": 1, "output_tokens": 1}
                });
                wiremock::ResponseTemplate::new(200).set_body_json(reply)
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echoed_api_key_never_leaks() {
    let server = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::path("/v1/responses"))
        .respond_with(EchoKey)
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let env = with(
        base_env(dir.path()),
        &[
            ("SCRIPTORIUM_LLM__PROVIDER", "openai"),
            ("OPENAI_API_KEY", KEY),
            ("OPENAI_BASE_URL", &format!("{}/v1", server.uri())),
            ("SCRIPTORIUM_RETRY__MAX_ATTEMPTS", "2"),
            ("SCRIPTORIUM_RETRY__INITIAL_BACKOFF_MS", "10"),
            ("SCRIPTORIUM_RETRY__MAX_BACKOFF_MS", "20"),
            ("RUST_LOG", "debug"),
        ],
    );
    let d = start(dir.path(), &env, Limits::default()).await;
    let mut c = Client::connect(&d.socket).await;
    let mut answers = String::new();
    for topic in ["escaped", "plain", "partial", "mixed", "refusal"] {
        let id = c.submit(topic).await;
        let state = c.finished(&id).await;
        assert_eq!(state["status"], "failed", "{topic}: {state}");
        let message = state["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains("<redacted>"), "{topic}: {message}");
        assert!(leaks(message.as_bytes()).is_empty(), "{topic}: {message}");
        answers.push_str(&state.to_string());
        answers.push_str(&c.call(json!({"op": "status", "id": id})).await.to_string());
    }
    answers.push_str(&c.call(json!({"op": "list"})).await.to_string());
    assert!(leaks(answers.as_bytes()).is_empty(), "socket answers leak: {:?}", leaks(answers.as_bytes()));
    let stderr = d.stderr.clone();
    d.stop().await;

    let mut places: Vec<(PathBuf, Vec<u8>)> = vec![(stderr.clone(), std::fs::read(&stderr).unwrap())];
    for entry in walk(&dir.path().join("data")) {
        let bytes = std::fs::read(&entry).unwrap();
        places.push((entry, bytes));
    }
    assert!(places.iter().any(|(p, _)| p.ends_with("scriptorium.db")));
    assert!(places.iter().filter(|(p, _)| p.extension().is_some_and(|e| e == "json")).count() >= 5);
    for (path, bytes) in &places {
        assert!(leaks(bytes).is_empty(), "{} holds {:?}", path.display(), leaks(bytes));
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.is_file() {
            out.push(p);
        }
    }
    out
}

// ------------------------------------------------------------- defects 5, 8

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_private_and_converge_on_the_database_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let env = base_env(dir.path());
    let limits = Limits { umask: Some(0o022), ..Limits::default() };
    let d = start(dir.path(), &env, limits).await;
    let mut c = Client::connect(&d.socket).await;
    let done = c.submit("Private files").await;
    let gone = c.submit("Deleted file").await;
    for id in [&done, &gone] {
        assert_eq!(c.finished(id).await["status"], "completed");
    }
    d.stop().await;

    let data = dir.path().join("data");
    let topics = data.join("topics");
    assert_eq!(mode(&data), 0o700, "data dir");
    assert_eq!(mode(&topics), 0o700, "topics dir");
    for name in ["scriptorium.db", "scriptorium.db-wal", "scriptorium.db-shm"] {
        if data.join(name).exists() {
            assert_eq!(mode(&data.join(name)), 0o600, "{name}");
        }
    }
    assert_eq!(mode(&data.join("scriptorium.db")), 0o600);
    let file = topics.join(format!("{done}.json"));
    assert_eq!(mode(&file), 0o600, "topic file");

    // What kill -9 between a commit and its mirror write leaves: a file one
    // step behind, a missing file and a half-written temp file.
    let mut stale: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    stale["status"] = json!("running");
    stale["final"] = Value::Null;
    std::fs::write(&file, serde_json::to_vec_pretty(&stale).unwrap()).unwrap();
    std::fs::remove_file(topics.join(format!("{gone}.json"))).unwrap();
    std::fs::write(topics.join(format!(".{done}.17.tmp")), b"{\"half").unwrap();

    let d = start(dir.path(), &env, limits).await;
    let repaired: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(repaired["status"], "completed");
    assert!(repaired["final"].is_object());
    let mut c = Client::connect(&d.socket).await;
    let from_db = c.call(json!({"op": "result", "id": done})).await;
    assert_eq!(repaired, from_db["state"]);
    assert!(topics.join(format!("{gone}.json")).exists(), "missing file rewritten");
    assert!(!topics.join(format!(".{done}.17.tmp")).exists(), "temp file removed");
    assert_eq!(mode(&file), 0o600);
    assert!(plain(&d.stderr_text()).contains("topic files brought up to date"), "{}", d.stderr_text());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_of_one_topic_keep_the_newest() {
    use scriptorium::state::{Submission, TopicState, TopicStatus};
    use scriptorium::store::files::{FileMirror, Written};
    let dir = tempfile::tempdir().unwrap();
    let mirror = FileMirror::new(dir.path().join("topics")).unwrap();
    let mut state = TopicState::new(&Submission {
        id: "t1".into(),
        topic: "order".into(),
        kind: None,
        variants: 1,
        require_approval: false,
        idempotency_key: None,
        submitted_ms: 1,
        budget: Default::default(),
    });
    // 200 snapshots taken in order, written concurrently, newest first, so
    // the oldest writes finish last.
    let mut snapshots = Vec::new();
    for i in 0..200u64 {
        state.updated_at_ms = i;
        state.status = if i == 199 { TopicStatus::Cancelled } else { TopicStatus::Running };
        snapshots.push(mirror.snapshot(&state));
    }
    let mut tasks = Vec::new();
    for snapshot in snapshots.into_iter().rev() {
        let mirror = mirror.clone();
        tasks.push(tokio::spawn(async move { mirror.write(snapshot).await }));
    }
    let mut current = 0;
    for t in tasks {
        if t.await.unwrap().unwrap() == Written::Current {
            current += 1;
        }
    }
    assert!(current >= 1);
    let file: TopicState = serde_json::from_slice(&std::fs::read(mirror.path_for("t1")).unwrap()).unwrap();
    assert_eq!((file.status, file.updated_at_ms), (TopicStatus::Cancelled, 199));
    let left: Vec<_> = std::fs::read_dir(mirror.dir()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("t1.json")], "no temp files left");
}

// ------------------------------------------------------------- defects 6, 7

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_stops_with_one_line_naming_the_key_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let huge = "4611686018427387904";
    // (variable, value, text the error must contain)
    let cases: &[(&str, &str, &str)] = &[
        ("SCRIPTORIUM_DAEMON__SHUTDOWN_GRACE_S", "1e300", "daemon.shutdown_grace_s"),
        ("SCRIPTORIUM_LLM__REQUEST_TIMEOUT_S", "1e300", "llm.request_timeout_s"),
        ("SCRIPTORIUM_LLM__CONNECT_TIMEOUT_S", "nan", "llm.connect_timeout_s"),
        ("SCRIPTORIUM_SUPERVISION__STEP_TIMEOUT_S", "1e300", "supervision.step_timeout_s"),
        ("SCRIPTORIUM_SUPERVISION__WINDOW_S", "-1", "supervision.window_s"),
        ("SCRIPTORIUM_DAEMON__MAX_CONNECTIONS", huge, "daemon.max_connections"),
        ("SCRIPTORIUM_DAEMON__METRICS_MAX_CONNECTIONS", huge, "daemon.metrics_max_connections"),
        ("SCRIPTORIUM_DAEMON__METRICS_HEADER_TIMEOUT_S", "inf", "daemon.metrics_header_timeout_s"),
        ("SCRIPTORIUM_LIMITS__MAX_IN_FLIGHT_TOPICS", huge, "limits.max_in_flight_topics"),
        ("SCRIPTORIUM_LIMITS__MAX_QUEUED_TOPICS", "-5", "limits.max_queued_topics"),
        ("SCRIPTORIUM_LIMITS__MAX_TOPIC_CHARS", huge, "limits.max_topic_chars"),
        ("SCRIPTORIUM_LIMITS__REQUESTS_PER_MINUTE", huge, "limits.requests_per_minute"),
        ("SCRIPTORIUM_RETRY__MAX_BACKOFF_MS", "1e300", "retry.max_backoff_ms"),
        ("SCRIPTORIUM_RETRY__MAX_ATTEMPTS", "1000000", "retry.max_attempts"),
        ("SCRIPTORIUM_LLM__SIMULATED__LATENCY_MS", huge, "llm.simulated.latency_ms"),
        ("SCRIPTORIUM_LLM__TEMPERATURE", "nan", "llm.temperature"),
        ("SCRIPTORIUM_LLM__MAX_OUTPUT_TOKENS", huge, "llm.max_output_tokens"),
        ("SCRIPTORIUM_WORKFLOW__MAX_REVISIONS", huge, "workflow.max_revisions"),
        ("SCRIPTORIUM_CHAOS__ACTOR_PANIC_RATE", "nan", "chaos.actor_panic_rate"),
        ("SCRIPTORIUM_DAEMON__METRICS_ADDR", "localhost:port", "daemon.metrics_addr"),
        ("SCRIPTORIUM_DAEMON__TCP", "127.0.0.1:99999", "daemon.tcp"),
        ("SCRIPTORIUM_STORE__DURABILITY", "disk", "store.durability"),
        // openai without a key: says what to set.
        ("SCRIPTORIUM_LLM__PROVIDER", "openai", "set the OPENAI_API_KEY environment variable"),
    ];
    for (var, value, expect) in cases {
        let env = with(base_env(dir.path()), &[(var, value)]);
        let stderr = dir.path().join("stderr.log");
        let status = tokio::time::timeout(
            Duration::from_secs(30),
            command(dir.path(), &env, Limits::default(), &stderr).status(),
        )
        .await
        .unwrap()
        .unwrap();
        let text = std::fs::read_to_string(&stderr).unwrap();
        assert!(!status.success(), "{var}={value} started");
        assert_ne!(status.code(), Some(101), "{var}={value} panicked: {text}");
        assert!(!text.contains("panicked"), "{var}={value}: {text}");
        let error: Vec<&str> = text.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(error.len(), 1, "{var}={value}: one error line: {text}");
        assert!(error[0].contains(expect), "{var}={value}: {text}");
        assert!(!error[0].contains("internal error"), "{var}={value}: {text}");
        assert!(!dir.path().join("data").exists(), "{var}={value} created the data dir");
    }
}

// ---------------------------------------------------------------- defect 9

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_are_kept_as_sent_and_control_characters_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), &base_env(dir.path()), Limits::default()).await;
    let mut c = Client::connect(&d.socket).await;
    for topic in ["  padded  ", "two  spaces", "ünïcödé — dash"] {
        let id = c.submit(topic).await;
        assert_eq!(c.finished(&id).await["topic"], topic);
    }
    for topic in ["tab\there", "new\nline", "nul\u{0}byte", "bell\u{7}", "del\u{7f}", "c1\u{85}next"] {
        let r = c.call(json!({"op": "submit", "topic": topic})).await;
        assert_eq!(r["ok"], false, "{topic:?}: {r}");
        assert_eq!(r["error"]["code"], "bad_request", "{topic:?}: {r}");
        assert!(r["error"]["message"].as_str().unwrap().contains("control character"), "{r}");
    }
    let r = c.call(json!({"op": "submit", "topic": "   "})).await;
    assert_eq!(r["error"]["code"], "bad_request", "{r}");
    d.stop().await;
}
