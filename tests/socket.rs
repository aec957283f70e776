//! The daemon's socket protocol end to end: a real Unix socket in a temp
//! dir, the engine in-process with the simulated provider.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use scriptorium::config::Config;
use scriptorium::server::{self, ServerError, ServerOptions};
use scriptorium::{EngineOptions, Scriptorium};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const STEP: Duration = Duration::from_secs(30);

fn config(latency_ms: u64, extra: &str) -> Config {
    let text = format!(
        r#"
[llm]
provider = "simulated"
[llm.simulated]
latency_ms = {latency_ms}
jitter_ms = 5
[limits]
requests_per_minute = 0
tokens_per_minute = 0
max_in_flight_topics = 256
max_queued_topics = 10000
max_topic_chars = 200
[workflow]
variants = 2
route = false
{extra}
"#
    );
    Config::from_toml_str(&text, &[]).unwrap()
}

struct Daemon {
    engine: Scriptorium,
    path: PathBuf,
    _dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl Daemon {
    async fn start() -> Daemon {
        Daemon::with(config(5, ""), ServerOptions::new(64)).await
    }

    async fn with(config: Config, options: ServerOptions) -> Daemon {
        let engine = Scriptorium::start(config, EngineOptions::default()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("scriptorium.sock");
        let listener = server::bind_unix(&path).await.unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server::serve_unix_listener(engine.clone(), listener, options, async move {
            let _ = rx.await;
        }));
        Daemon { engine, path, _dir: dir, stop: Some(tx), task }
    }

    async fn conn(&self) -> Conn {
        Conn::open(&self.path).await
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), &mut self.task).await.unwrap().unwrap().unwrap();
        self.engine.shutdown(Duration::from_millis(100)).await;
    }
}

struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Conn {
    async fn open(path: &Path) -> Conn {
        let stream = UnixStream::connect(path).await.unwrap();
        let (r, w) = stream.into_split();
        Conn { reader: BufReader::new(r), writer: w }
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    async fn send(&mut self, v: &Value) {
        let mut line = serde_json::to_vec(v).unwrap();
        line.push(b'\n');
        self.send_raw(&line).await;
    }

    /// The next line as text, or None at EOF / reset.
    async fn raw_line(&mut self) -> Option<String> {
        let mut line = String::new();
        match tokio::time::timeout(STEP, self.reader.read_line(&mut line)).await.expect("no answer in time") {
            Ok(0) | Err(_) => None,
            Ok(_) => {
                assert!(line.ends_with('\n'), "line without newline: {line:?}");
                line.pop();
                Some(line)
            }
        }
    }

    async fn line(&mut self) -> Value {
        let line = self.raw_line().await.expect("connection closed");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    async fn req(&mut self, v: Value) -> Value {
        self.send(&v).await;
        self.line().await
    }

    /// True when the server closed the connection (EOF or reset).
    async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 64];
        matches!(tokio::time::timeout(STEP, self.reader.read(&mut buf)).await, Ok(Ok(0)) | Ok(Err(_)))
    }
}

fn code(v: &Value) -> &str {
    assert_eq!(v["ok"], false, "expected an error: {v}");
    v["error"]["code"].as_str().unwrap()
}

fn ok(v: &Value) -> &Value {
    assert_eq!(v["ok"], true, "expected success: {v}");
    v
}

async fn submit(c: &mut Conn, body: Value) -> String {
    let mut req = json!({"op": "submit"});
    req.as_object_mut().unwrap().extend(body.as_object().unwrap().clone());
    let r = c.req(req).await;
    ok(&r)["id"].as_str().unwrap().to_string()
}

async fn wait_state(c: &mut Conn, id: &str) -> Value {
    let r = c.req(json!({"op": "result", "id": id, "wait": true, "timeout_s": 60})).await;
    ok(&r)["state"].clone()
}

/// A fresh connection still gets served.
async fn assert_healthy(d: &Daemon) {
    let mut c = d.conn().await;
    let r = c.req(json!({"op": "health"})).await;
    assert_eq!(ok(&r)["protocol"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submit_then_result_with_wait() {
    let d = Daemon::start().await;
    let mut c = d.conn().await;
    let id = submit(&mut c, json!({"topic": "Why the sky is blue"})).await;
    let state = wait_state(&mut c, &id).await;
    assert_eq!(state["id"], id.as_str());
    assert_eq!(state["status"], "completed");
    assert!(state["final"]["draft"]["markdown"].as_str().unwrap().contains('\n'));
    let r = c.req(json!({"op": "status", "id": id})).await;
    assert_eq!(ok(&r)["topic"]["status"], "completed");
    let r = c.req(json!({"op": "result", "id": id})).await;
    assert_eq!(ok(&r)["state"]["status"], "completed");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_pipelined_requests_are_answered_in_order() {
    let d = Daemon::start().await;
    let mut c = d.conn().await;
    let mut batch = Vec::new();
    for i in 0..50 {
        batch.extend(serde_json::to_vec(&json!({"op": "status", "id": format!("missing-{i}")})).unwrap());
        batch.push(b'\n');
        batch.extend(b"{\"op\":\"health\"}\n");
    }
    c.send_raw(&batch).await;
    for i in 0..50 {
        let r = c.line().await;
        assert_eq!(code(&r), "not_found");
        assert!(r["error"]["message"].as_str().unwrap().contains(&format!("missing-{i}`")), "{r}");
        let r = c.line().await;
        assert_eq!(ok(&r)["protocol"], 1);
    }
    // And the connection keeps going after the burst.
    let id = submit(&mut c, json!({"topic": "pipelining"})).await;
    assert_eq!(wait_state(&mut c, &id).await["status"], "completed");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_clients() {
    let d = Daemon::start().await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let path = d.path.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(&path).await;
            let id = submit(&mut c, json!({"topic": format!("concurrent topic {i}"), "variants": 1})).await;
            let state = wait_state(&mut c, &id).await;
            assert_eq!(state["topic"], format!("concurrent topic {i}"));
            assert_eq!(state["status"], "completed");
            id
        }));
    }
    let mut ids = BTreeSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap());
    }
    assert_eq!(ids.len(), 50);
    let mut c = d.conn().await;
    let r = c.req(json!({"op": "list", "status": "completed", "limit": 10000})).await;
    assert_eq!(ok(&r)["topics"].as_array().unwrap().len(), 50);
    assert!(r.get("next").is_none());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_inputs_get_errors_and_the_daemon_keeps_serving() {
    let d = Daemon::start().await;
    let long_topic = "x".repeat(201);
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (b"{not json\n".to_vec(), "bad_request", "invalid JSON"),
        (b"[1,2,3]\n".to_vec(), "bad_request", "JSON object"),
        (b"\"health\"\n".to_vec(), "bad_request", "JSON object"),
        (b"{\"op\":\"fly\"}\n".to_vec(), "unknown_op", "fly"),
        (b"{\"id\":\"x\"}\n".to_vec(), "bad_request", "`op`"),
        (b"{\"op\":7}\n".to_vec(), "bad_request", "`op`"),
        (b"{\"op\":\"submit\"}\n".to_vec(), "bad_request", "`topic`"),
        (b"{\"op\":\"status\"}\n".to_vec(), "bad_request", "`id`"),
        (b"{\"op\":\"submit\",\"topic\":42}\n".to_vec(), "bad_request", "`topic`"),
        (b"{\"op\":\"submit\",\"topic\":\"t\",\"variants\":-1}\n".to_vec(), "bad_request", "`variants`"),
        (b"{\"op\":\"submit\",\"topic\":\"t\",\"variants\":99}\n".to_vec(), "bad_request", "variants"),
        (b"{\"op\":\"result\",\"id\":\"x\",\"wait\":\"yes\"}\n".to_vec(), "bad_request", "`wait`"),
        (b"{\"op\":\"result\",\"id\":\"x\",\"wait\":true,\"timeout_s\":-3}\n".to_vec(), "bad_request", "timeout_s"),
        (b"{\"op\":\"status\",\"id\":\"x\",\"idd\":1}\n".to_vec(), "bad_request", "idd"),
        (b"{\"op\":\"list\",\"limit\":0}\n".to_vec(), "bad_request", "`limit`"),
        (b"{\"op\":\"list\",\"status\":\"sleeping\"}\n".to_vec(), "bad_request", "`status`"),
        (b"{\"op\":\"reject\",\"id\":\"x\"}\n".to_vec(), "bad_request", "`note`"),
        (b"{\"op\":\"submit\",\"topic\":\"\"}\n".to_vec(), "bad_request", "empty"),
        (b"{\"op\":\"submit\",\"topic\":\"   \"}\n".to_vec(), "bad_request", "empty"),
        (b"{\"op\":\"submit\",\"topic\":\"  \\n\\t \"}\n".to_vec(), "bad_request", "control characters"),
        (format!("{{\"op\":\"submit\",\"topic\":\"{long_topic}\"}}\n").into_bytes(), "too_large", "max_topic_chars"),
        (b"{\"op\":\"submit\",\"topic\":\"caf\xc3\x28\"}\n".to_vec(), "bad_request", "UTF-8"),
        (b"{\"op\":\"status\",\"id\":\"t-nope\"}\n".to_vec(), "not_found", "t-nope"),
        (b"{\"op\":\"cancel\",\"id\":\"t-nope\"}\n".to_vec(), "not_found", "t-nope"),
        (b"{\"op\":\"approve\",\"id\":\"t-nope\"}\n".to_vec(), "not_found", "t-nope"),
        (b"{\"op\":\"watch\",\"id\":\"t-nope\"}\n".to_vec(), "not_found", "t-nope"),
        (b"{\"op\":\"result\",\"id\":\"t-nope\",\"wait\":true}\n".to_vec(), "not_found", "t-nope"),
    ];
    for (input, want_code, want_text) in cases {
        let mut c = d.conn().await;
        c.send_raw(&input).await;
        let r = c.line().await;
        let shown = String::from_utf8_lossy(&input).into_owned();
        assert_eq!(code(&r), want_code, "input {shown}: {r}");
        let message = r["error"]["message"].as_str().unwrap();
        assert!(message.contains(want_text), "input {shown}: message {message:?} lacks {want_text:?}");
        assert!(!message.contains('\n'));
        // The same connection still works after an error.
        let r = c.req(json!({"op": "health"})).await;
        ok(&r);
        drop(c);
        assert_healthy(&d).await;
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn line_over_64_kib_is_too_large_and_closes() {
    let d = Daemon::start().await;
    let mut c = d.conn().await;
    let mut line = format!("{{\"op\":\"submit\",\"topic\":\"{}\"}}", "y".repeat(70 * 1024)).into_bytes();
    line.push(b'\n');
    c.send_raw(&line).await;
    let r = c.line().await;
    assert_eq!(code(&r), "too_large");
    assert!(c.closed().await);
    assert_healthy(&d).await;

    // A line without any newline at all is cut off the same way, without
    // the daemon buffering it.
    let mut c = d.conn().await;
    let blob = vec![b'z'; 200 * 1024];
    let writer = tokio::spawn(async move {
        let _ = c.writer.write_all(&blob).await;
        c
    });
    let mut c = writer.await.unwrap();
    let r = c.line().await;
    assert_eq!(code(&r), "too_large");
    assert!(c.closed().await);

    // Exactly 64 KiB (plus the newline) is still accepted.
    let mut c = d.conn().await;
    let prefix = "{\"op\":\"health\",\"pad\":\"";
    let pad = "p".repeat(64 * 1024 - prefix.len() - 2);
    let exact = format!("{prefix}{pad}\"}}");
    assert_eq!(exact.len(), 64 * 1024);
    c.send_raw(format!("{exact}\n").as_bytes()).await;
    let r = c.line().await;
    assert_eq!(code(&r), "bad_request", "unknown field `pad`, but parsed: {r}");
    ok(&c.req(json!({"op": "health"})).await);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_disconnecting_mid_line_is_harmless() {
    let d = Daemon::start().await;
    for _ in 0..5 {
        let mut c = d.conn().await;
        c.send_raw(b"{\"op\":\"submit\",\"topic\":\"half a req").await;
        drop(c);
    }
    // A complete request followed by a partial one: the first is answered.
    let mut c = d.conn().await;
    c.send_raw(b"{\"op\":\"health\"}\n{\"op\":\"hea").await;
    ok(&c.line().await);
    c.writer.shutdown().await.unwrap();
    assert!(c.closed().await, "a partial last line is discarded, then the connection closes");
    assert_healthy(&d).await;
    // Nothing was submitted by the partial lines.
    let mut c = d.conn().await;
    let r = c.req(json!({"op": "list"})).await;
    assert_eq!(ok(&r)["topics"].as_array().unwrap().len(), 0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_never_reads_is_dropped_without_blocking_others() {
    let options = ServerOptions { write_timeout: Duration::from_millis(500), ..ServerOptions::new(2) };
    let d = Daemon::with(config(5, ""), options).await;
    let stream = UnixStream::connect(&d.path).await.unwrap();
    let (_reader, mut writer) = stream.into_split();
    // Keeps sending requests and never reads an answer. Once the daemon
    // drops it, the writes fail.
    let spammer = tokio::spawn(async move {
        let line = b"{\"op\":\"status\",\"id\":\"nobody-reads-this-answer\"}\n".repeat(100);
        for _ in 0..100_000 {
            if writer.write_all(&line).await.is_err() {
                return true;
            }
        }
        false
    });
    // Meanwhile another client is served normally.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c = d.conn().await;
    let id = submit(&mut c, json!({"topic": "not blocked"})).await;
    assert_eq!(wait_state(&mut c, &id).await["status"], "completed");
    drop(c);
    let dropped = tokio::time::timeout(Duration::from_secs(20), spammer).await.expect("spammer never dropped").unwrap();
    assert!(dropped, "the daemon should have dropped the non-reading client");
    // Its connection slot was given back: two new clients at once work.
    let mut a = d.conn().await;
    let mut b = d.conn().await;
    ok(&a.req(json!({"op": "health"})).await);
    ok(&b.req(json!({"op": "health"})).await);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_are_closed() {
    let options = ServerOptions { idle_timeout: Duration::from_millis(300), ..ServerOptions::new(8) };
    let d = Daemon::with(config(5, ""), options).await;
    let mut c = d.conn().await;
    ok(&c.req(json!({"op": "health"})).await);
    let t0 = std::time::Instant::now();
    assert!(c.closed().await);
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_healthy(&d).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn socket_is_private_and_binding_is_careful() {
    let d = Daemon::start().await;
    let mode = std::fs::metadata(&d.path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    let dir_mode = std::fs::metadata(d.path.parent().unwrap()).unwrap().permissions().mode();
    assert_eq!(dir_mode & 0o777, 0o700, "created parent dir mode {dir_mode:o}");

    // A live daemon on the path: refused, and its socket is left alone.
    let err = server::bind_unix(&d.path).await.unwrap_err();
    assert!(matches!(err, ServerError::AlreadyRunning(_)), "{err}");
    assert!(err.to_string().contains("another daemon is listening on"), "{err}");
    assert_healthy(&d).await;

    // A stale socket file from a dead daemon is replaced.
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let listener = server::bind_unix(&stale).await.unwrap();
    assert_eq!(std::fs::metadata(&stale).unwrap().permissions().mode() & 0o777, 0o600);
    drop(listener);

    // Anything that is not a socket is never deleted.
    let file = dir.path().join("precious.txt");
    std::fs::write(&file, "keep me").unwrap();
    let err = server::bind_unix(&file).await.unwrap_err();
    assert!(matches!(err, ServerError::NotASocket(_)), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_unix_removes_its_socket_and_shutdown_ends_open_connections() {
    let engine = Scriptorium::start(config(5, ""), EngineOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let (tx, rx) = oneshot::channel::<()>();
    let p = path.clone();
    let task = tokio::spawn(async move {
        server::serve_unix(engine, &p, 4, async move {
            let _ = rx.await;
        })
        .await
    });
    let mut c = loop {
        if let Ok(s) = UnixStream::connect(&path).await {
            let (r, w) = s.into_split();
            break Conn { reader: BufReader::new(r), writer: w };
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    ok(&c.req(json!({"op": "health"})).await);
    // An idle open connection and one parked in a long wait.
    let mut waiting = Conn::open(&path).await;
    let id = submit(&mut waiting, json!({"topic": "parked", "require_approval": true})).await;
    wait_state(&mut waiting, &id).await;
    waiting.send(&json!({"op": "watch"})).await;
    ok(&waiting.line().await);
    tx.send(()).unwrap();
    let t0 = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(c.closed().await);
    assert!(waiting.closed().await);
    assert!(!path.exists(), "socket file removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tcp_listener_speaks_the_same_protocol() {
    let engine = Scriptorium::start(config(5, ""), EngineOptions::default()).await.unwrap();
    let listener = server::bind_tcp("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server::serve_tcp_listener(engine, listener, ServerOptions::new(4), async move {
        let _ = rx.await;
    }));
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"{\"op\":\"submit\",\"topic\":\"over tcp\"}\n").await.unwrap();
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["ok"], true);
    w.write_all(b"{\"op\":\"fly\"}\n").await.unwrap();
    line.clear();
    r.read_line(&mut line).await.unwrap();
    assert!(line.contains("unknown_op"));
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotent_submit_returns_the_same_id() {
    let d = Daemon::start().await;
    let mut c = d.conn().await;
    let r1 = c.req(json!({"op": "submit", "topic": "once", "idempotency_key": "k-1"})).await;
    assert!(ok(&r1).get("existing").is_none(), "{r1}");
    let mut other = d.conn().await;
    let r2 = other.req(json!({"op": "submit", "topic": "once", "idempotency_key": "k-1"})).await;
    assert_eq!(ok(&r2)["id"], r1["id"]);
    assert_eq!(r2["existing"], true);
    let r3 = c.req(json!({"op": "submit", "topic": "once", "idempotency_key": "k-2"})).await;
    assert_ne!(ok(&r3)["id"], r1["id"]);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_running_and_awaiting_topics() {
    // Slow steps, so the topic is still running when cancel arrives.
    let d = Daemon::with(config(2000, ""), ServerOptions::new(8)).await;
    let mut c = d.conn().await;
    let id = submit(&mut c, json!({"topic": "to be cancelled"})).await;
    ok(&c.req(json!({"op": "cancel", "id": id})).await);
    let state = wait_state(&mut c, &id).await;
    assert_eq!(state["status"], "cancelled");
    let r = c.req(json!({"op": "status", "id": id})).await;
    assert_eq!(ok(&r)["topic"]["status"], "cancelled");
    let r = c.req(json!({"op": "cancel", "id": id})).await;
    assert_eq!(code(&r), "invalid_state");
    d.stop().await;

    let d = Daemon::start().await;
    let mut c = d.conn().await;
    let id = submit(&mut c, json!({"topic": "parked then cancelled", "require_approval": true})).await;
    assert_eq!(wait_state(&mut c, &id).await["status"], "awaiting_approval");
    ok(&c.req(json!({"op": "cancel", "id": id})).await);
    let r = c.req(json!({"op": "status", "id": id})).await;
    assert_eq!(ok(&r)["topic"]["status"], "cancelled");
    let r = c.req(json!({"op": "approve", "id": id})).await;
    assert_eq!(code(&r), "invalid_state");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn approval_flow_over_the_socket() {
    let d = Daemon::start().await;
    let mut c = d.conn().await;
    let id = submit(&mut c, json!({"topic": "Needs a human", "require_approval": true})).await;
    let state = wait_state(&mut c, &id).await;
    assert_eq!(state["status"], "awaiting_approval");
    let r = c.req(json!({"op": "status", "id": id})).await;
    assert_eq!(ok(&r)["topic"]["status"], "awaiting_approval");
    let revisions_before = state["revisions"].as_array().unwrap().len();

    let r = c.req(json!({"op": "reject", "id": id, "note": "  "})).await;
    assert_eq!(code(&r), "bad_request");
    ok(&c.req(json!({"op": "reject", "id": id, "note": "Add a section on sunsets."})).await);
    let state = wait_state(&mut c, &id).await;
    assert_eq!(state["status"], "awaiting_approval");
    let revisions = state["revisions"].as_array().unwrap();
    // The note is answered by the first new revision; the automatic review
    // loop may add more after it.
    assert!(revisions.len() > revisions_before, "{state}");
    assert_eq!(revisions[revisions_before]["human_note"], "Add a section on sunsets.");
    assert_eq!(state["pending_human_note"], Value::Null);

    ok(&c.req(json!({"op": "approve", "id": id, "note": "good now"})).await);
    let state = wait_state(&mut c, &id).await;
    assert_eq!(state["status"], "completed");
    assert_eq!(state["approvals"].as_array().unwrap().len(), 2);
    let r = c.req(json!({"op": "approve", "id": id})).await;
    assert_eq!(code(&r), "invalid_state");
    let r = c.req(json!({"op": "reject", "id": id, "note": "too late"})).await;
    assert_eq!(code(&r), "invalid_state");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn approve_on_a_completed_topic_is_invalid_state() {
    let d = Daemon::start().await;
    let mut c = d.conn().await;
    let id = submit(&mut c, json!({"topic": "no approval needed"})).await;
    assert_eq!(wait_state(&mut c, &id).await["status"], "completed");
    let r = c.req(json!({"op": "approve", "id": id})).await;
    assert_eq!(code(&r), "invalid_state");
    assert!(r["error"]["message"].as_str().unwrap().contains("completed"));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_connections_bounds_concurrent_clients() {
    let d = Daemon::with(config(5, ""), ServerOptions::new(2)).await;
    let mut a = d.conn().await;
    let mut b = d.conn().await;
    ok(&a.req(json!({"op": "health"})).await);
    ok(&b.req(json!({"op": "health"})).await);
    // The third connects (the kernel's backlog) but is not served yet.
    let mut third = d.conn().await;
    third.send(&json!({"op": "health"})).await;
    let mut line = String::new();
    let early = tokio::time::timeout(Duration::from_millis(500), third.reader.read_line(&mut line)).await;
    assert!(early.is_err(), "the third client was served while two were open: {line}");
    drop(a);
    let r = tokio::time::timeout(Duration::from_secs(5), third.line()).await.expect("not served after a close");
    ok(&r);
    ok(&b.req(json!({"op": "health"})).await);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_streams_until_settled_then_the_connection_goes_on() {
    let d = Daemon::start().await;
    let mut all = d.conn().await;
    let r = all.req(json!({"op": "watch"})).await;
    assert_eq!(ok(&r)["watching"], Value::Null);

    let mut c = d.conn().await;
    let id = submit(&mut c, json!({"topic": "watched topic"})).await;
    let r = c.req(json!({"op": "watch", "id": id})).await;
    assert_eq!(ok(&r)["watching"], id.as_str());
    let mut steps = Vec::new();
    loop {
        let line = c.line().await;
        assert!(line.get("lagged").is_none());
        let event = &line["event"];
        assert_eq!(event["topic_id"], id.as_str());
        steps.push(event["step"].as_str().unwrap().to_string());
        if event["step"] == "topic" && event["status"] == "completed" {
            break;
        }
    }
    assert!(steps.iter().any(|s| s == "write"), "{steps:?}");
    // The connection takes requests again after the stream.
    let state = ok(&c.req(json!({"op": "result", "id": id})).await)["state"].clone();
    assert_eq!(state["topic"], "watched topic");

    // Watching a settled topic: its final event, then done.
    let r = c.req(json!({"op": "watch", "id": id})).await;
    ok(&r);
    let last = c.line().await;
    assert_eq!(last["event"]["status"], "completed");
    assert_eq!(last["event"]["step"], "topic");
    ok(&c.req(json!({"op": "health"})).await);

    // The unfiltered watcher saw the same topic's events.
    let first = all.line().await;
    assert_eq!(first["event"]["topic_id"], id.as_str());
    d.stop().await;
}

// ---- docs/protocol.md -----------------------------------------------------------

/// `> ` request lines and the `< ` lines that follow each, from the fenced
/// code blocks of the protocol document.
fn documented_exchanges() -> Vec<(String, Vec<String>)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md")).unwrap();
    let mut exchanges: Vec<(String, Vec<String>)> = Vec::new();
    let mut in_fence = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if !in_fence {
            continue;
        }
        if let Some(req) = line.strip_prefix("> ") {
            exchanges.push((req.to_string(), Vec::new()));
        } else if let Some(resp) = line.strip_prefix("< ") {
            exchanges.last_mut().expect("a `< ` line before any `> ` line").1.push(resp.to_string());
        }
    }
    exchanges
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn documented_examples_match_the_server() {
    let exchanges = documented_exchanges();
    let ops: BTreeSet<String> = exchanges
        .iter()
        .filter_map(|(req, _)| serde_json::from_str::<Value>(req).ok())
        .filter_map(|v| v["op"].as_str().map(str::to_string))
        .collect();
    for op in ["submit", "status", "result", "watch", "approve", "reject", "cancel", "list", "health"] {
        assert!(ops.contains(op), "docs/protocol.md has no example for `{op}`");
    }
    let d = Daemon::start().await;
    let mut setup = d.conn().await;
    // `ID` stands for a finished topic; approve, reject and cancel each get
    // a fresh one parked for approval.
    let done = submit(&mut setup, json!({"topic": "Why the sky is blue"})).await;
    wait_state(&mut setup, &done).await;
    let mut c = d.conn().await;
    for (request, documented) in &exchanges {
        assert!(!documented.is_empty(), "no `< ` line documented for {request}");
        let op = serde_json::from_str::<Value>(request).ok().and_then(|v| v["op"].as_str().map(str::to_string));
        let id = match op.as_deref() {
            Some("approve" | "reject" | "cancel") => {
                let id = submit(&mut setup, json!({"topic": "parked", "require_approval": true})).await;
                wait_state(&mut setup, &id).await;
                id
            }
            _ => done.clone(),
        };
        let sent = request.replace("\"ID\"", &format!("\"{id}\""));
        c.send_raw(format!("{sent}\n").as_bytes()).await;
        for doc_line in documented {
            let want: Value = serde_json::from_str(doc_line)
                .unwrap_or_else(|e| panic!("documented response is not JSON ({e}): {doc_line}"));
            let got = c.line().await;
            assert_eq!(got.get("ok"), want.get("ok"), "request {request}\n got {got}\nwant {want}");
            assert_eq!(keys(&got), keys(&want), "request {request}\n got {got}\nwant {want}");
            if let (Some(g), Some(w)) = (got.get("error"), want.get("error")) {
                assert_eq!(g["code"], w["code"], "request {request}");
            }
        }
    }
    d.stop().await;
}

// ---- the CLI client against a live socket ----------------------------------------

async fn cli(socket: &Path, args: &[&str]) -> (i32, String, String) {
    let out = tokio::time::timeout(
        STEP,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_scriptorium"))
            .args(args)
            .arg("--socket")
            .arg(socket)
            .env_remove("SCRIPTORIUM_DAEMON__SOCKET")
            .output(),
    )
    .await
    .expect("the client hung")
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cli_client_commands() {
    let d = Daemon::start().await;
    let (code, out, err) = cli(&d.path, &["submit", "First topic", "Second topic"]).await;
    assert_eq!(code, 0, "{err}");
    let ids: Vec<&str> = out.lines().collect();
    assert_eq!(ids.len(), 2, "{out}");

    let (code, out, err) = cli(&d.path, &["result", ids[0], "--wait"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("status:   completed"), "{out}");
    assert!(out.contains("# "), "the final markdown: {out}");

    let (code, out, _) = cli(&d.path, &["result", ids[1], "--wait", "--json"]).await;
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["state"]["status"], "completed");

    let (code, out, _) = cli(&d.path, &["status"]).await;
    assert_eq!(code, 0);
    assert!(out.contains(ids[0]) && out.contains(ids[1]), "{out}");

    let (code, out, err) = cli(&d.path, &["submit", "--approval", "--wait", "Parked"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("awaiting_approval"), "{out}");
    let parked = out.lines().next().unwrap().to_string();
    let (code, out, _) = cli(&d.path, &["approve", &parked, "--note", "fine"]).await;
    assert_eq!((code, out.trim()), (0, format!("approved {parked}").as_str()));

    let (code, _, err) = cli(&d.path, &["approve", &parked]).await;
    assert_eq!(code, 1);
    assert!(err.starts_with("error: invalid_state: "), "{err}");
    let (code, out, err) = cli(&d.path, &["cancel", "t-nope", "--json"]).await;
    assert_eq!(code, 1);
    assert!(err.starts_with("error: not_found: "), "{err}");
    assert_eq!(serde_json::from_str::<Value>(out.trim()).unwrap()["error"]["code"], "not_found");

    let (code, out, _) = cli(&d.path, &["watch", ids[0]]).await;
    assert_eq!(code, 0);
    assert!(out.contains("completed"), "{out}");
    let (code, out, _) = cli(&d.path, &["health", "--json"]).await;
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<Value>(out.trim()).unwrap()["protocol"], 1);
    let (code, out, _) = cli(&d.path, &["list", "--status", "completed", "--limit", "1", "--json"]).await;
    assert_eq!(code, 0);
    assert!(serde_json::from_str::<Value>(out.trim()).unwrap()["next"].is_string());

    let missing = d.path.with_file_name("nobody.sock");
    let (code, _, err) = cli(&missing, &["health"]).await;
    assert_eq!(code, 5, "cannot connect: exit 5 (README, Exit codes)");
    assert!(
        err.contains("cannot connect to the daemon at") && err.contains("is `scriptorium daemon` running?"),
        "{err}"
    );
    d.stop().await;
}
