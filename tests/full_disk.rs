//! A full disk under a running daemon (issue 11, defects 1 and 2), on a
//! real 16 MB tmpfs: topics wait visibly while the store refuses writes, an
//! approval the store refused changes nothing, new submits answer
//! `store_unavailable`, and once space is back every topic goes on from its
//! last journaled step without a restart. Needs root (mount); skipped with a
//! message otherwise (`.ci/run` runs as root).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(dir: &Path) -> Option<Tmpfs> {
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs"])
        .arg(dir)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| Tmpfs(dir.to_path_buf()))
}

async fn call(socket: &Path, request: Value) -> Value {
    let stream = UnixStream::connect(socket).await.unwrap();
    let (r, mut w) = stream.into_split();
    w.write_all(format!("{request}\n").as_bytes()).await.unwrap();
    let mut line = String::new();
    let mut reader = BufReader::new(r);
    tokio::time::timeout(Duration::from_secs(30), reader.read_line(&mut line)).await.unwrap().unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad response {line:?}: {e}"))
}

async fn status(socket: &Path, id: &str) -> String {
    let r = call(socket, json!({"op": "status", "id": id})).await;
    r["topic"]["status"].as_str().unwrap_or("?").to_string()
}

async fn until(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes until the filesystem says it is full.
fn fill(path: &Path) -> std::fs::File {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.flush();
    f
}

#[tokio::test]
async fn a_full_disk_makes_topics_wait_and_they_go_on_when_space_is_back() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let Some(_mount) = mount_tmpfs(&data) else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let config = tmp.path().join("empty.toml");
    std::fs::write(&config, "").unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_scriptorium"))
        .arg("--config")
        .arg(&config)
        .arg("daemon")
        .env_remove("OPENAI_API_KEY")
        .env("SCRIPTORIUM_LLM__PROVIDER", "simulated")
        .env("SCRIPTORIUM_LLM__SIMULATED__LATENCY_MS", "300")
        .env("SCRIPTORIUM_LLM__SIMULATED__JITTER_MS", "0")
        .env("SCRIPTORIUM_DAEMON__DATA_DIR", &data)
        .env("SCRIPTORIUM_DAEMON__METRICS_ADDR", "")
        .env("SCRIPTORIUM_DAEMON__WEB_ADDR", "")
        .env("SCRIPTORIUM_LIMITS__REQUESTS_PER_MINUTE", "0")
        .env("SCRIPTORIUM_LIMITS__TOKENS_PER_MINUTE", "0")
        .env("SCRIPTORIUM_WORKFLOW__VARIANTS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let socket = data.join("scriptorium.sock");
    until("the daemon's socket", Duration::from_secs(30), async || UnixStream::connect(&socket).await.is_ok()).await;

    // One topic parked for a human, two running when the disk fills up.
    let parked = call(&socket, json!({"op": "submit", "topic": "Parked", "require_approval": true})).await;
    let parked = parked["id"].as_str().unwrap().to_string();
    until("the parked topic", Duration::from_secs(60), async || status(&socket, &parked).await == "awaiting_approval")
        .await;
    let mut running = Vec::new();
    for topic in ["Heat pumps", "Tides"] {
        let r = call(&socket, json!({"op": "submit", "topic": topic})).await;
        running.push(r["id"].as_str().unwrap().to_string());
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let filler_path = data.join("filler");
    let filler = fill(&filler_path);

    // The store refuses writes: the daemon says so and nothing is lost.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = call(&socket, json!({"op": "health"})).await;
        if last["store"].as_str().is_some_and(|s| s.starts_with("degraded")) {
            break;
        }
        assert!(Instant::now() < deadline, "the store never reported degraded: {last}; df: {:?}", {
            let out = std::process::Command::new("df").arg(&data).output().unwrap();
            String::from_utf8_lossy(&out.stdout).to_string()
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = call(&socket, json!({"op": "approve", "id": parked})).await;
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["error"]["code"], "store_unavailable", "{refused}");
    assert_eq!(status(&socket, &parked).await, "awaiting_approval", "a refused approval changes nothing");
    let submit = call(&socket, json!({"op": "submit", "topic": "While full"})).await;
    assert_eq!(submit["error"]["code"], "store_unavailable", "{submit}");
    for id in &running {
        assert_eq!(status(&socket, id).await, "running", "{id} waits, it is not dropped");
    }

    // Space again: every topic goes on, without a restart.
    drop(filler);
    std::fs::remove_file(&filler_path).unwrap();
    for id in &running {
        until("a waiting topic to complete", Duration::from_secs(90), async || {
            status(&socket, id).await == "completed"
        })
        .await;
    }
    let approved = call(&socket, json!({"op": "approve", "id": parked})).await;
    assert_eq!(approved["ok"], true, "{approved}");
    assert_eq!(status(&socket, &parked).await, "completed");
    let h = call(&socket, json!({"op": "health"})).await;
    let store = h["health"]["store"].as_str().or(h["store"].as_str()).unwrap_or_default().to_string();
    assert_eq!(store, "ok", "{h}");
    let _ = child.start_kill();
}
