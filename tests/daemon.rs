//! The daemon as users run it: a child process (`scriptorium daemon`) with a
//! real SQLite file and a real socket, talking to a fake OpenAI server.
//! Crash safety (kill -9 mid-run, restart, every topic exactly once, no
//! completed step re-run), graceful SIGTERM, approval across a restart, and
//! `busy` when the queue is full.

mod support;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use scriptorium::state::{TopicState, TopicStatus};
use scriptorium::store::sqlite::SqliteStore;
use scriptorium::store::{ListQuery, TopicStore};
use serde_json::{json, Value};
use support::{FakeModel, Wire};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use wiremock::MockServer;

struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn daemon_env(dir: &Path, server: &MockServer, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("SCRIPTORIUM_LLM__PROVIDER".into(), "openai".into()),
        ("OPENAI_API_KEY".into(), support::KEY.into()),
        ("OPENAI_BASE_URL".into(), format!("{}/v1", server.uri())),
        ("SCRIPTORIUM_DAEMON__DATA_DIR".into(), dir.display().to_string()),
        ("SCRIPTORIUM_DAEMON__METRICS_ADDR".into(), "".into()),
        ("SCRIPTORIUM_DAEMON__WEB_ADDR".into(), "".into()),
        ("SCRIPTORIUM_LIMITS__REQUESTS_PER_MINUTE".into(), "0".into()),
        ("SCRIPTORIUM_LIMITS__TOKENS_PER_MINUTE".into(), "0".into()),
        ("SCRIPTORIUM_RETRY__INITIAL_BACKOFF_MS".into(), "10".into()),
        ("SCRIPTORIUM_RETRY__MAX_BACKOFF_MS".into(), "50".into()),
        ("RUST_LOG".into(), "warn".into()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

async fn start_daemon(dir: &Path, env: &[(String, String)]) -> Daemon {
    // An empty config file: built-in defaults plus the environment.
    let config = dir.join("empty.toml");
    std::fs::write(&config, "").unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_scriptorium"))
        .arg("--config")
        .arg(&config)
        .arg("daemon")
        .envs(env.iter().cloned())
        .env_remove("SCRIPTORIUM_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let socket = dir.join("scriptorium.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&socket).await.is_err() {
        assert!(Instant::now() < deadline, "daemon did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Daemon { child, socket }
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
}

async fn count(client: &mut Client, status: &str) -> u64 {
    let h = client.call(json!({"op": "health"})).await;
    h["counts"][status].as_u64().unwrap_or(0)
}

/// Which steps a topic's journal already holds, by step name.
fn completed_steps(state: &TopicState) -> HashMap<&'static str, usize> {
    let mut m = HashMap::new();
    m.insert("route", usize::from(state.route.is_some() && state.requested_kind.is_none()));
    m.insert("plan", usize::from(state.outline.is_some()));
    m.insert("write", state.variants.iter().filter(|v| v.draft.is_some()).count());
    m.insert(
        "review",
        state.variants.iter().filter(|v| v.review.is_some()).count()
            + state.revisions.iter().filter(|r| r.review.is_some()).count(),
    );
    m.insert("revise", state.revisions.len());
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_loses_nothing_and_reruns_no_completed_step() {
    let dir = tempfile::tempdir().unwrap();
    let server = MockServer::start().await;
    let fake = FakeModel::new(Wire::Responses).with_delay(Duration::from_millis(20));
    fake.mount(&server).await;
    let env = daemon_env(dir.path(), &server, &[("SCRIPTORIUM_LIMITS__MAX_IN_FLIGHT_TOPICS", "40")]);
    let mut daemon = start_daemon(dir.path(), &env).await;
    let mut client = Client::connect(&daemon.socket).await;
    let total = 200;
    let mut ids = Vec::new();
    for i in 0..total {
        let r = client.call(json!({"op": "submit", "topic": format!("crash topic {i}")})).await;
        assert_eq!(r["ok"], true, "{r}");
        ids.push(r["id"].as_str().unwrap().to_string());
    }
    // Kill -9 once about half are done.
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&mut client, "completed").await < total / 2 {
        assert!(Instant::now() < deadline, "too slow before the crash");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    daemon.child.kill().await.unwrap();
    let requests_before_restart = fake.seen().len();

    // What the store holds right after the crash (the real file).
    let db = dir.path().join("scriptorium.db");
    let before: HashMap<String, TopicState> = {
        let store = SqliteStore::open(&db).unwrap();
        let mut m = HashMap::new();
        for id in &ids {
            let s = store.load(id).await.unwrap().expect("every acknowledged submit is stored");
            m.insert(s.topic.clone(), s);
        }
        m
    };
    let done_before = before.values().filter(|s| s.status == TopicStatus::Completed).count();
    assert!(done_before >= (total / 2) as usize && done_before < total as usize, "{done_before}");

    let daemon = start_daemon(dir.path(), &env).await;
    let resumed_at = Instant::now();
    let mut client = Client::connect(&daemon.socket).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while count(&mut client, "completed").await < total {
        assert!(Instant::now() < deadline, "topics did not all complete after the restart");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("resumed {} topics in {:?}", total as usize - done_before, resumed_at.elapsed());

    // Every topic exactly once.
    let list = client.call(json!({"op": "list", "limit": 10000})).await;
    let topics = list["topics"].as_array().unwrap();
    assert_eq!(topics.len(), total as usize);
    let unique: HashSet<&str> = topics.iter().map(|t| t["topic"].as_str().unwrap()).collect();
    assert_eq!(unique.len(), total as usize);
    assert!(topics.iter().all(|t| t["status"] == "completed"));

    // No step that was journaled before the crash went to the model again.
    let mut after: HashMap<(String, String), usize> = HashMap::new();
    for s in &fake.seen()[requests_before_restart..] {
        *after.entry((s.topic.clone(), s.step.clone())).or_default() += 1;
    }
    for ((topic, step), n) in &after {
        let state = &before[topic];
        assert_ne!(
            state.status,
            TopicStatus::Completed,
            "completed topic {topic:?} got {n} {step} requests after the restart"
        );
        let done = completed_steps(state);
        let finished_final = match step.as_str() {
            "route" | "plan" => done[step.as_str()] == 1,
            _ => false,
        };
        assert!(!finished_final, "{topic:?}: {step} was journaled before the crash but re-ran");
        if step == "write" {
            let missing = state.variants_requested as usize - done["write"];
            assert!(*n <= missing * 6, "{topic:?}: {n} writes for {missing} missing drafts");
        }
    }
    // The journals after the restart have each step once.
    let store = SqliteStore::open(&db).unwrap();
    for id in &ids {
        let s = store.load(id).await.unwrap().unwrap();
        assert_eq!(s.status, TopicStatus::Completed);
        let writes = s.timings.iter().filter(|t| t.step == scriptorium::workflow::Step::Write).count();
        assert_eq!(writes, s.variants_requested as usize, "{id}: one journaled write per variant");
    }
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero_and_unfinished_topics_resume() {
    let dir = tempfile::tempdir().unwrap();
    let server = MockServer::start().await;
    let fake = FakeModel::new(Wire::Responses).with_delay(Duration::from_millis(50));
    fake.mount(&server).await;
    let env = daemon_env(
        dir.path(),
        &server,
        &[("SCRIPTORIUM_DAEMON__SHUTDOWN_GRACE_S", "0.3"), ("SCRIPTORIUM_LIMITS__MAX_IN_FLIGHT_TOPICS", "5")],
    );
    let mut daemon = start_daemon(dir.path(), &env).await;
    let mut client = Client::connect(&daemon.socket).await;
    for i in 0..20 {
        let r = client.call(json!({"op": "submit", "topic": format!("drain topic {i}")})).await;
        assert_eq!(r["ok"], true);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = daemon.child.id().unwrap() as i32;
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(15), daemon.child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(!daemon.socket.exists(), "socket removed on the way out");

    let store = SqliteStore::open(&dir.path().join("scriptorium.db")).unwrap();
    let unfinished = store.unfinished().await.unwrap();
    assert!(!unfinished.is_empty(), "20 slow topics cannot all finish in 0.3 s");
    drop(store);
    let daemon = start_daemon(dir.path(), &env).await;
    let mut client = Client::connect(&daemon.socket).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&mut client, "completed").await < 20 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_survives_a_restart_and_a_full_queue_answers_busy() {
    let dir = tempfile::tempdir().unwrap();
    let server = MockServer::start().await;
    let fake = FakeModel::new(Wire::Responses);
    fake.mount(&server).await;
    let env = daemon_env(dir.path(), &server, &[]);
    let mut daemon = start_daemon(dir.path(), &env).await;
    let mut client = Client::connect(&daemon.socket).await;
    let r = client.call(json!({"op": "submit", "topic": "Needs a human", "require_approval": true})).await;
    let id = r["id"].as_str().unwrap().to_string();
    let r = client.call(json!({"op": "result", "id": id, "wait": true, "timeout_s": 30})).await;
    assert_eq!(r["state"]["status"], "awaiting_approval", "{r}");
    daemon.child.kill().await.unwrap();
    drop(daemon);

    let daemon = start_daemon(dir.path(), &env).await;
    let mut client = Client::connect(&daemon.socket).await;
    let r = client.call(json!({"op": "reject", "id": id, "note": "Add a section on costs"})).await;
    assert_eq!(r["ok"], true, "{r}");
    let r = client.call(json!({"op": "result", "id": id, "wait": true, "timeout_s": 30})).await;
    let state = &r["state"];
    assert_eq!(state["status"], "awaiting_approval");
    let last = state["revisions"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["human_note"], "Add a section on costs");
    let revise = fake.seen().into_iter().rfind(|s| s.step == "revise").unwrap();
    assert!(revise.body["input"].as_str().unwrap().starts_with("Most important: a human editor rejected"));
    let r = client.call(json!({"op": "approve", "id": id})).await;
    assert_eq!(r["ok"], true);
    let r = client.call(json!({"op": "status", "id": id})).await;
    assert_eq!(r["topic"]["status"], "completed");
    drop(daemon);

    // Queue full: one in flight, one queued, the next is busy.
    let dir2 = tempfile::tempdir().unwrap();
    let slow = MockServer::start().await;
    FakeModel::new(Wire::Responses).with_delay(Duration::from_secs(2)).mount(&slow).await;
    let env = daemon_env(
        dir2.path(),
        &slow,
        &[("SCRIPTORIUM_LIMITS__MAX_IN_FLIGHT_TOPICS", "1"), ("SCRIPTORIUM_LIMITS__MAX_QUEUED_TOPICS", "1")],
    );
    let daemon = start_daemon(dir2.path(), &env).await;
    let mut client = Client::connect(&daemon.socket).await;
    let codes: Vec<Value> = {
        let mut v = vec![];
        for i in 0..3 {
            v.push(client.call(json!({"op": "submit", "topic": format!("q{i}")})).await);
        }
        v
    };
    assert_eq!(codes[0]["ok"], true);
    assert_eq!(codes[1]["ok"], true);
    assert_eq!(codes[2]["error"]["code"], "busy", "{}", codes[2]);
    let listed =
        SqliteStore::open(&dir2.path().join("scriptorium.db")).unwrap().list(ListQuery::default()).await.unwrap();
    assert_eq!(listed.len(), 2, "a busy submit stores nothing");
}
