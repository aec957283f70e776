//! Engines sharing one real `redis-server` (`store.backend = "redis"`):
//! two engines take topics from one queue and each topic completes once;
//! a daemon killed with -9 mid-run has its topics taken over after
//! `lease_s`; two engines' shared limiter against the fake OpenAI server's
//! own limit gets no 429.

mod redis_support;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis_support::RedisServer;
use scriptorium::config::Config;
use scriptorium::fake_openai::{self, FakeConfig};
use scriptorium::llm::openai::OpenAiProvider;
use scriptorium::llm::{HttpSettings, LlmProvider};
use scriptorium::scaleout;
use scriptorium::state::TopicStatus;
use scriptorium::{EngineOptions, Scriptorium, SubmitRequest};

fn env(r: &RedisServer, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = [
        ("STORE__BACKEND", "redis"),
        ("STORE__URL", r.url().as_str()),
        ("STORE__LEASE_S", "2"),
        ("LLM__PROVIDER", "simulated"),
        ("LLM__SIMULATED__LATENCY_MS", "20"),
        ("LLM__SIMULATED__JITTER_MS", "10"),
        ("WORKFLOW__VARIANTS", "1"),
        ("LIMITS__REQUESTS_PER_MINUTE", "0"),
        ("LIMITS__TOKENS_PER_MINUTE", "0"),
    ]
    .iter()
    .map(|(k, v)| (format!("SCRIPTORIUM_{k}"), v.to_string()))
    .collect();
    for (k, val) in extra {
        v.retain(|(name, _)| name != &format!("SCRIPTORIUM_{k}"));
        v.push((format!("SCRIPTORIUM_{k}"), val.to_string()));
    }
    v
}

async fn engine(config: Config, consumer: &str, provider: Option<Arc<dyn LlmProvider>>) -> Scriptorium {
    let largest = config.llm.max_output_tokens.saturating_add(16_000);
    let backend = scaleout::connect(&config, consumer.into(), largest).await.unwrap();
    let renew = Duration::from_secs_f64(config.store.lease_s / 3.0);
    let options = EngineOptions {
        store: Some(backend.store),
        queue: Some(backend.queue),
        limiter: Some(backend.limiter),
        lease_renew_every: Some(renew),
        provider,
        ..EngineOptions::default()
    };
    Scriptorium::start(config, options).await.unwrap()
}

/// Every step record of a topic's journal, by (type, variant, number):
/// a duplicate means a finished step was run and recorded twice.
fn duplicate_records(r: &RedisServer, id: &str) -> Vec<String> {
    let raw = r.cli(&["LRANGE", &format!("scriptorium:{{t:{id}}}:journal"), "0", "-1"]);
    let mut seen: HashMap<String, u32> = HashMap::new();
    for line in raw.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let rec = &v["record"];
        // `started` marks each run (a takeover starts a run too), not a step.
        if rec["type"] == "started" {
            continue;
        }
        let key = format!("{} {} {}", rec["type"], rec["variant"], rec["number"]);
        *seen.entry(key).or_default() += 1;
    }
    seen.into_iter().filter(|(_, n)| *n > 1).map(|(k, n)| format!("{k} x{n}")).collect()
}

async fn count_completed(rx: &mut tokio::sync::broadcast::Receiver<Arc<scriptorium::events::TopicEvent>>) -> usize {
    let mut n = 0;
    while let Ok(e) = rx.try_recv() {
        if e.step == "topic" && e.outcome == "completed" {
            n += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_share_one_queue_and_each_topic_completes_once() {
    let r = RedisServer::start();
    let config = Config::from_toml_str("", &env(&r, &[])).unwrap();
    let a = engine(config.clone(), "a", None).await;
    let b = engine(config, "b", None).await;
    let (mut ea, mut eb) = (a.events(), b.events());
    let n = 24;
    let mut ids = Vec::new();
    for i in 0..n {
        let on = if i % 2 == 0 { &a } else { &b };
        ids.push(
            on.submit(SubmitRequest { topic: format!("shared topic {i}"), ..Default::default() }).await.unwrap().id,
        );
    }
    for (i, id) in ids.iter().enumerate() {
        // Waited for on the engine that did not take the submit.
        let other = if i % 2 == 0 { &b } else { &a };
        let state = other.wait(id, Some(Duration::from_secs(60))).await.unwrap();
        assert_eq!(state.status, TopicStatus::Completed, "{id}");
        assert!(duplicate_records(&r, id).is_empty(), "{id}: {:?}", duplicate_records(&r, id));
    }
    for id in &ids {
        // Both engines answer for every topic, whoever ran it.
        for e in [&a, &b] {
            assert_eq!(e.get(id).await.unwrap().status, TopicStatus::Completed, "{id}: a stale copy");
        }
    }
    let (ca, cb) = (count_completed(&mut ea).await, count_completed(&mut eb).await);
    println!("two engines: a completed {ca}, b completed {cb} of {n}");
    assert_eq!(ca + cb, n, "each topic completed exactly once");
    assert!(ca > 0 && cb > 0, "both engines took topics from the queue: {ca} / {cb}");
    assert_eq!(a.health().await.unwrap().counts["completed"], n as u64);
    assert_eq!(r.cli(&["XLEN", "scriptorium:{q}:stream"]), "0");
    a.shutdown(Duration::from_secs(2)).await;
    b.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemons_topics_are_taken_over_after_the_lease() {
    let r = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    // Slow calls: the daemon holds topics mid-run when it is killed.
    let slow = [("LLM__SIMULATED__LATENCY_MS", "400"), ("LLM__SIMULATED__JITTER_MS", "0")];
    let mut child = Command::new(env!("CARGO_BIN_EXE_scriptorium"))
        .arg("daemon")
        .envs(env(&r, &slow))
        .env("SCRIPTORIUM_DAEMON__DATA_DIR", dir.path())
        .env("SCRIPTORIUM_DAEMON__METRICS_ADDR", "")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let socket = dir.path().join("scriptorium.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "daemon did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let daemon_consumer = scaleout::default_consumer(dir.path());
    // The in-process engine only submits until the daemon holds work.
    let config = Config::from_toml_str("", &env(&r, &slow)).unwrap();
    let b = engine(config, "b", None).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(
            b.submit(SubmitRequest { topic: format!("takeover topic {i}"), ..Default::default() }).await.unwrap().id,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let held = loop {
        let pending = r.cli(&["XPENDING", "scriptorium:{q}:stream", "workers"]);
        let lines: Vec<&str> = pending.lines().collect();
        let n = lines
            .iter()
            .position(|l| *l == daemon_consumer)
            .and_then(|i| lines.get(i + 1))
            .map(|c| c.parse::<u32>().unwrap_or(0));
        if let Some(n) = n.filter(|n| *n > 0) {
            break n;
        }
        assert!(Instant::now() < deadline, "the daemon never claimed a topic: {pending}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await; // mid-step
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let killed = Instant::now();
    for id in &ids {
        let state = b.wait(id, Some(Duration::from_secs(60))).await.unwrap();
        assert_eq!(state.status, TopicStatus::Completed, "{id}");
        assert!(duplicate_records(&r, id).is_empty(), "{id}: {:?}", duplicate_records(&r, id));
    }
    println!(
        "kill -9: the daemon held {held} topic(s); all {} completed {:?} after the kill",
        ids.len(),
        killed.elapsed()
    );
    assert!(killed.elapsed() >= Duration::from_millis(1500), "taken over before the lease ran out");
    b.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_hold_the_servers_rate_limit_with_no_429() {
    let r = RedisServer::start();
    let rpm = 1200;
    let server = fake_openai::start(FakeConfig {
        requests_per_minute: rpm,
        latency: Duration::from_millis(20),
        jitter: Duration::from_millis(10),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let settings = HttpSettings {
        base_url: server.base_url(),
        api_key: Some("sk-fake-test".into()),
        model: "gpt-5.4-mini".into(),
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(2),
        temperature: None,
        seed: None,
        ..HttpSettings::new("", None, "")
    };
    // Each engine is given the server's full limit: the limit is shared.
    let config = Config::from_toml_str("", &env(&r, &[("LIMITS__REQUESTS_PER_MINUTE", "1200")])).unwrap();
    let provider =
        || -> Option<Arc<dyn LlmProvider>> { Some(Arc::new(OpenAiProvider::new(settings.clone()).unwrap())) };
    let a = engine(config.clone(), "a", provider()).await;
    let b = engine(config, "b", provider()).await;
    let started = Instant::now();
    let mut ids = Vec::new();
    for i in 0..30 {
        let on = if i % 2 == 0 { &a } else { &b };
        ids.push(on.submit(SubmitRequest { topic: format!("rate topic {i}"), ..Default::default() }).await.unwrap().id);
    }
    for id in &ids {
        assert_eq!(a.wait(id, Some(Duration::from_secs(120))).await.unwrap().status, TopicStatus::Completed);
    }
    let took = started.elapsed().as_secs_f64();
    let stats = server.stats().snapshot();
    let rate = stats.requests as f64 / took * 60.0;
    println!(
        "two engines: {} requests in {took:.1} s = {rate:.0}/min against the server's {rpm}/min, {} x 429",
        stats.requests, stats.rate_limited
    );
    assert_eq!(stats.rate_limited, 0, "the server refused calls");
    // The server's own bound over the run: its one-second burst plus the rate.
    let bound = f64::from(rpm) / 60.0 * (took + 1.0);
    println!("ratio to the server's bound: {:.2}", stats.requests as f64 / bound);
    assert!(stats.requests as f64 <= bound, "{} requests, over the server's bound {bound:.0}", stats.requests);
    a.shutdown(Duration::from_secs(2)).await;
    b.shutdown(Duration::from_secs(2)).await;
    server.shutdown().await;
}
