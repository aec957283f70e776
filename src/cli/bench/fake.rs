//! Bench scenarios against the fake OpenAI server (`fake_openai`) over real
//! HTTP with the real `openai` provider: `ratelimit`, `tokens`, `chaos`
//! (in-process engine) and `crash` (the daemon as a child process, killed
//! with SIGKILL halfway). Each prints one row with its numbers next to their
//! targets and appends one JSON line; the checks that define "lost",
//! "duplicated" and "re-run" are here too, so the numbers mean the same
//! thing in every run.
//!
//! Must not: assert (a missed target is a printed number, not a panic), or
//! wait without a deadline.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use scriptorium::actors::pool::ACTOR_RESTARTS;
use scriptorium::actors::stage::INJECTED_PANICS;
use scriptorium::config::Config;
use scriptorium::fake_openai::{self, FakeConfig, FakeServer, FaultRates};
use scriptorium::llm::openai::OpenAiProvider;
use scriptorium::llm::{HttpSettings, LlmProvider};
use scriptorium::state::{TopicState, TopicStatus};
use scriptorium::store::sqlite::SqliteStore;
use scriptorium::store::TopicStore;
use scriptorium::{EngineError, EngineOptions, Scriptorium, SubmitRequest};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{cpu_time, row};

/// The latency every scenario here uses: 150 ms ± 50 ms.
const LATENCY: Duration = Duration::from_millis(150);
const JITTER: Duration = Duration::from_millis(50);
/// No scenario may run longer than this.
const RUN_DEADLINE: Duration = Duration::from_secs(1800);
const DUMMY_KEY: &str = "sk-fake-bench-not-a-key";

fn topic_text(i: usize) -> String {
    format!("benchmark topic number {i}")
}

/// Defaults plus the given limits; a queue deep enough for any run.
fn http_config(rpm: u32, tpm: u32) -> anyhow::Result<Config> {
    let mut c = Config::from_toml_str("", &[])?;
    c.limits.requests_per_minute = rpm;
    c.limits.tokens_per_minute = tpm;
    c.limits.max_queued_topics = 1_000_000;
    Ok(c)
}

/// The real Responses provider pointed at the fake.
fn provider_for(server: &FakeServer, config: &Config) -> anyhow::Result<Arc<dyn LlmProvider>> {
    let settings = HttpSettings {
        request_timeout: Duration::from_secs_f64(config.llm.request_timeout_s),
        connect_timeout: Duration::from_secs_f64(config.llm.connect_timeout_s),
        ..HttpSettings::new(server.base_url(), Some(DUMMY_KEY.to_string()), config.llm.model.clone())
    };
    Ok(Arc::new(OpenAiProvider::new(settings)?))
}

struct FakeRun {
    topics: usize,
    /// Final (or, for lost topics, last known) state of every topic.
    states: Vec<TopicState>,
    /// Topics not finished by the deadline.
    lost: usize,
    started: Instant,
    wall: Duration,
    cpu: Duration,
}

impl FakeRun {
    fn count(&self, status: TopicStatus) -> usize {
        self.states.iter().filter(|s| s.status == status).count()
    }

    fn calls(&self) -> u64 {
        self.states.iter().map(|s| s.usage.llm_calls).sum()
    }
}

/// Submits `topics` topics to an in-process engine using `provider` and
/// waits for all of them (bounded by `RUN_DEADLINE`).
async fn run_topics(config: Config, provider: Arc<dyn LlmProvider>, topics: usize) -> anyhow::Result<FakeRun> {
    let engine =
        Scriptorium::start(config, EngineOptions { provider: Some(provider), ..EngineOptions::default() }).await?;
    let cpu0 = cpu_time();
    let started = Instant::now();
    let mut ids = Vec::with_capacity(topics);
    for i in 0..topics {
        ids.push(engine.submit(SubmitRequest { topic: topic_text(i), ..SubmitRequest::default() }).await?.id);
    }
    let end_by = started + RUN_DEADLINE;
    let (mut states, mut lost) = (Vec::with_capacity(topics), 0);
    for id in &ids {
        let left = end_by.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        match engine.wait(id, Some(left)).await {
            Ok(s) => {
                if !s.status.is_terminal() {
                    lost += 1;
                }
                states.push(s);
            }
            Err(EngineError::Timeout(_)) => {
                lost += 1;
                states.push(engine.get(id).await?);
            }
            Err(e) => return Err(e.into()),
        }
    }
    let wall = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu0);
    engine.shutdown(Duration::from_secs(1)).await;
    Ok(FakeRun { topics, states, lost, started, wall, cpu })
}

/// Admitted requests and tokens per second from 2 s after the start (the
/// first burst spent) to the last request the server saw. `None` when the
/// run was too short for such a window.
fn steady_rates(server: &FakeServer, started: Instant) -> Option<(f64, f64, f64)> {
    let stats = server.stats();
    let from = started + Duration::from_secs(2);
    let to = stats.last_request()?;
    let window = to.checked_duration_since(from)?.as_secs_f64();
    if window < 1.0 {
        return None;
    }
    let (requests, tokens) = stats.admitted_between(from, to)?;
    Some((requests as f64 / window, tokens as f64 / window, window))
}

fn fmt_ratio(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "n/a".into())
}

async fn fake_server(rpm: u32, tpm: u32, faults: FaultRates) -> anyhow::Result<FakeServer> {
    let config = FakeConfig {
        latency: LATENCY,
        jitter: JITTER,
        requests_per_minute: rpm,
        tokens_per_minute: tpm,
        faults,
        ..FakeConfig::default()
    };
    fake_openai::start(config).await.context("cannot start the fake OpenAI server")
}

/// `ratelimit` (binding: requests per minute) and `tokens` (binding: tokens
/// per minute). Server and engine enforce the same limits.
pub async fn rate_bound(results: &Path, scenario: &str, topics: usize) -> anyhow::Result<()> {
    let (rpm, tpm) = match scenario {
        "ratelimit" => (6_000, 0),
        // Requests high enough never to bind; tokens such that ~2,400-token
        // requests (2,000 of them the output allowance) run at ~100/s.
        _ => (60_000, 15_000_000),
    };
    let server = fake_server(rpm, tpm, FaultRates::default()).await?;
    let config = http_config(rpm, tpm)?;
    let provider = provider_for(&server, &config)?;
    let run = run_topics(config, provider, topics).await?;
    let snap = server.stats().snapshot();
    let steady = steady_rates(&server, run.started);
    let completed = run.count(TopicStatus::Completed);
    let calls_per_topic = run.calls() as f64 / run.topics.max(1) as f64;
    let topics_per_s = completed as f64 / run.wall.as_secs_f64();
    let received_429 = snap.by_status.get("429").copied().unwrap_or(0);
    let label = format!("{} topics", run.topics);
    let (ratio, bound, text, extra) = if scenario == "ratelimit" {
        let limit_rate = f64::from(rpm) / 60.0;
        let ratio = steady.map(|(r, _, _)| r / limit_rate);
        let bound = limit_rate / calls_per_topic;
        let text = format!(
            "rpm={rpm} req/s={} ratio={} (target >= 0.95) 429s={received_429} (target 0)",
            steady.map(|(r, _, _)| format!("{r:.1}")).unwrap_or_else(|| "n/a".into()),
            fmt_ratio(ratio),
        );
        (ratio, bound, text, json!({"rpm": rpm, "steady_requests_per_s": steady.map(|s| s.0), "target_ratio": 0.95}))
    } else {
        let ratio = steady.map(|(_, t, _)| t * 60.0 / f64::from(tpm));
        let tokens_per_call = snap.tokens_admitted as f64 / snap.requests.max(1) as f64;
        let bound = f64::from(tpm) / 60.0 / tokens_per_call / calls_per_topic;
        let text = format!(
            "tpm={tpm} tokens/min={} ratio={} (target >= 0.90) 429s={received_429} (target 0)",
            steady.map(|(_, t, _)| format!("{:.0}", t * 60.0)).unwrap_or_else(|| "n/a".into()),
            fmt_ratio(ratio),
        );
        let extra = json!({
            "rpm": rpm, "tpm": tpm, "tokens_per_call": tokens_per_call,
            "steady_tokens_per_min": steady.map(|s| s.1 * 60.0), "target_ratio": 0.90,
        });
        (ratio, bound, text, extra)
    };
    let text = format!(
        "{text} topics/s={topics_per_s:.2} bound={bound:.2} ({:.3}) completed={completed}/{} wall={:.1}s calls/topic={calls_per_topic:.2} proc_cpu/call={:.0}µs",
        topics_per_s / bound,
        run.topics,
        run.wall.as_secs_f64(),
        run.cpu.as_secs_f64() * 1e6 / run.calls().max(1) as f64,
    );
    let mut line = json!({
        "topics": run.topics, "completed": completed, "lost": run.lost, "wall_s": run.wall.as_secs_f64(),
        "requests": snap.requests, "by_status": snap.by_status, "received_429": received_429, "target_429": 0,
        "rate_limited_at_s": snap.rate_limited_at_s,
        "ratio": ratio, "window_s": steady.map(|s| s.2), "calls_per_topic": calls_per_topic,
        "topics_per_s": topics_per_s, "topics_per_s_bound": bound, "cpu_s": run.cpu.as_secs_f64(),
        "latency_ms": LATENCY.as_millis() as u64, "jitter_ms": JITTER.as_millis() as u64,
    });
    merge(&mut line, extra);
    row(results, scenario, &label, &text, line)?;
    server.shutdown().await;
    Ok(())
}

/// `shipped`: the shipped config (limits 500 requests/min, 500k tokens/min)
/// against a fake enforcing the same limits and the reasoning-model rules
/// (hidden reasoning tokens drawn per request, billed as output, counted
/// against the cap). Prints tokens reserved (the requests' estimates,
/// which both our limiter and the server charge) ÷ tokens billed (the
/// usage the server reported), topics per minute, and the cost per topic
/// when the model has a price.
pub async fn shipped(results: &Path, topics: usize) -> anyhow::Result<()> {
    let config = http_config(500, 500_000)?;
    let server = fake_server(500, 500_000, FaultRates::default()).await?;
    let provider = provider_for(&server, &config)?;
    let run = run_topics(config, provider, topics).await?;
    let snap = server.stats().snapshot();
    let completed = run.count(TopicStatus::Completed);
    let topics_per_min = completed as f64 / run.wall.as_secs_f64() * 60.0;
    let reserved_per_billed = snap.tokens_admitted as f64 / snap.tokens_billed.max(1) as f64;
    let billed = serde_json::to_value(run.states.iter().map(|s| &s.usage).collect::<Vec<_>>())?;
    let costs: Vec<f64> =
        billed.as_array().into_iter().flatten().filter_map(|u| u.get("cost_usd").and_then(Value::as_f64)).collect();
    let cost_per_topic = (!costs.is_empty()).then(|| costs.iter().sum::<f64>() / costs.len() as f64);
    let received_429 = snap.by_status.get("429").copied().unwrap_or(0);
    let text = format!(
        "reserved/billed={reserved_per_billed:.2} topics/min={topics_per_min:.1} completed={completed}/{} wall={:.1}s \
         requests={} 429s={received_429} 400s={} truncated={} reasoning_tokens={} cost/topic={}",
        run.topics,
        run.wall.as_secs_f64(),
        snap.requests,
        snap.by_status.get("400").copied().unwrap_or(0),
        snap.truncated,
        snap.reasoning_tokens,
        cost_per_topic.map(|c| format!("${c:.5}")).unwrap_or_else(|| "n/a".into()),
    );
    let line = json!({
        "topics": run.topics, "completed": completed, "lost": run.lost, "wall_s": run.wall.as_secs_f64(),
        "requests": snap.requests, "by_status": snap.by_status, "tokens_reserved": snap.tokens_admitted,
        "tokens_billed": snap.tokens_billed, "reasoning_tokens": snap.reasoning_tokens, "truncated": snap.truncated,
        "reserved_per_billed": reserved_per_billed, "topics_per_min": topics_per_min,
        "cost_usd_per_topic": cost_per_topic, "rpm": 500, "tpm": 500_000,
    });
    row(results, "shipped", &format!("{} topics", run.topics), &text, line)?;
    server.shutdown().await;
    Ok(())
}

fn merge(into: &mut Value, more: Value) {
    if let (Some(obj), Value::Object(more)) = (into.as_object_mut(), more) {
        obj.extend(more);
    }
}

/// Model calls the journal holds per step name, summed over attempts.
fn journaled_attempts(state: &TopicState) -> HashMap<&'static str, u64> {
    let mut m = HashMap::new();
    for t in &state.timings {
        *m.entry(t.step.as_str()).or_default() += u64::from(t.attempts);
    }
    m
}

/// True when the topic's journal holds a failed step (whose calls are in
/// `usage.llm_calls` but not in `timings`).
fn has_failure_records(state: &TopicState) -> bool {
    state.error.is_some() || state.variants.iter().any(|v| v.error.is_some())
}

/// Steps the journal records (each with its attempts in `llm_calls`).
fn journaled_steps(state: &TopicState) -> u64 {
    state.timings.len() as u64
        + state.variants.iter().filter(|v| v.error.is_some()).count() as u64
        + u64::from(state.error.is_some())
}

/// Topics whose model requests (as the server counted them) differ from the
/// attempts their journal records, or whose journal holds one step position
/// twice: either means a step ran again after it was journaled.
fn rerun_topics(states: &[TopicState], server: &HashMap<(String, String), u64>) -> Vec<String> {
    let mut per_topic: HashMap<&str, HashMap<&str, u64>> = HashMap::new();
    for ((topic, step), n) in server {
        per_topic.entry(topic.as_str()).or_default().insert(step.as_str(), *n);
    }
    let empty = HashMap::new();
    let mut bad = Vec::new();
    for s in states {
        let seen = per_topic.get(s.topic.as_str()).unwrap_or(&empty);
        let mut positions = HashSet::new();
        let duplicate = s.timings.iter().any(|t| !positions.insert((t.step, t.variant, t.revision)));
        let consistent = if has_failure_records(s) {
            seen.values().sum::<u64>() == s.usage.llm_calls
        } else {
            let journal = journaled_attempts(s);
            seen.len() == journal.len() && journal.iter().all(|(step, n)| seen.get(step) == Some(n))
        };
        if duplicate || !consistent {
            bad.push(s.id.clone());
        }
    }
    bad
}

/// (topic, step)s where the server injected more faults than the journal
/// records failed attempts: a faulty answer the client took for a good one.
fn unretried_faults(states: &[TopicState], faults: &HashMap<(String, String), Vec<&'static str>>) -> Vec<Value> {
    let mut out = Vec::new();
    for s in states.iter().filter(|s| !has_failure_records(s)) {
        let mut failed: HashMap<&str, u64> = HashMap::new();
        for t in &s.timings {
            *failed.entry(t.step.as_str()).or_default() += u64::from(t.attempts.saturating_sub(1));
        }
        for step in ["route", "plan", "write", "review", "revise"] {
            let injected = faults.get(&(s.topic.clone(), step.to_string())).cloned().unwrap_or_default();
            let seen = failed.get(step).copied().unwrap_or(0);
            if injected.len() as u64 > seen {
                out.push(json!({"topic": s.topic, "step": step, "injected": injected, "failed_attempts": seen}));
            }
        }
    }
    out
}

/// `chaos`: the fault mix of issue 5 plus panicking stage actors.
pub async fn chaos(results: &Path, topics: usize) -> anyhow::Result<()> {
    let faults = FaultRates::chaos_mix();
    let server = fake_server(0, 0, faults.clone()).await?;
    let mut config = http_config(0, 0)?;
    // Hangs end at the request timeout: 3 s instead of the default 120 s,
    // so the run takes minutes, not hours. Retry settings stay default.
    config.llm.request_timeout_s = 3.0;
    config.chaos.actor_panic_rate = 0.01;
    let provider = provider_for(&server, &config)?;
    let (panics0, restarts0) = (INJECTED_PANICS.load(Ordering::Relaxed), ACTOR_RESTARTS.load(Ordering::Relaxed));
    let run = run_topics(config, provider, topics).await?;
    // The supervisor counts a restart after the replacement is up; give the
    // last one a moment.
    let settle = Instant::now() + Duration::from_secs(2);
    let (mut panics, mut restarts);
    loop {
        panics = INJECTED_PANICS.load(Ordering::Relaxed) - panics0;
        restarts = ACTOR_RESTARTS.load(Ordering::Relaxed) - restarts0;
        if panics == restarts || Instant::now() > settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let snap = server.stats().snapshot();
    let completed = run.count(TopicStatus::Completed);
    let failed = run.count(TopicStatus::Failed);
    let calls = run.calls();
    let steps: u64 = run.states.iter().map(journaled_steps).sum();
    let retries = calls.saturating_sub(steps);
    let retry_ratio = retries as f64 / snap.faults_total.max(1) as f64;
    let reruns = rerun_topics(&run.states, &server.stats().per_topic_step());
    let unretried = unretried_faults(&run.states, &server.stats().faults_per_topic_step());
    let accounted = run.states.len();
    // A variant whose step failed every attempt: its topic completes with
    // the other variants, and its last fault is (rightly) not retried.
    let variants_failed: usize =
        run.states.iter().map(|s| s.variants.iter().filter(|v| v.error.is_some()).count()).sum();
    let text = format!(
        "completed={completed}/{topics} failed={failed} lost={} (targets: all, 0, 0) retries={retries} faults={} ({retry_ratio:.2}x, target <= 1.5) reruns={} (target 0) restarts={restarts} panics={panics} (target equal) variants_failed={variants_failed} wall={:.1}s request_timeout=3s",
        run.lost,
        snap.faults_total,
        reruns.len(),
        run.wall.as_secs_f64(),
    );
    let failures: Vec<Value> = run
        .states
        .iter()
        .filter(|s| s.status != TopicStatus::Completed)
        .map(|s| json!({"id": s.id, "status": s.status.as_str(), "error": s.error}))
        .collect();
    let line = json!({
        "topics": topics, "accounted": accounted, "completed": completed, "failed": failed, "lost": run.lost,
        "not_completed": failures, "requests": snap.requests, "by_status": snap.by_status,
        "faults": snap.faults, "faults_total": snap.faults_total, "retries": retries,
        "retry_ratio": retry_ratio, "target_retry_ratio": 1.5, "reruns": reruns.len(),
        "rerun_topics": reruns.iter().take(20).collect::<Vec<_>>(), "actor_restarts": restarts,
        "faults_without_retry": unretried, "variants_failed": variants_failed,
        "injected_panics": panics, "actor_panic_rate": 0.01, "request_timeout_s": 3.0,
        "fault_rates": {"500": faults.server_error, "503": faults.unavailable, "429": faults.rate_limit,
            "malformed": faults.malformed, "wrong_schema": faults.wrong_schema, "hang": faults.hang,
            "reset": faults.reset},
        "wall_s": run.wall.as_secs_f64(), "cpu_s": run.cpu.as_secs_f64(),
    });
    row(results, "chaos", &format!("{topics} topics"), &text, line)?;
    server.shutdown().await;
    Ok(())
}

// ---- crash: the daemon as a child process ----------------------------------

/// The daemon child; killed if still running when dropped.
struct Daemon {
    child: tokio::process::Child,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

async fn start_daemon(dir: &Path, env: &[(String, String)], log: &Path) -> anyhow::Result<Daemon> {
    let config = dir.join("empty.toml");
    std::fs::write(&config, "")?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--config")
        .arg(&config)
        .arg("daemon")
        .envs(env.iter().cloned())
        .env_remove("SCRIPTORIUM_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the daemon")?;
    let mut daemon = Daemon { child, socket: dir.join("scriptorium.sock") };
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(&daemon.socket).await.is_err() {
        if let Some(status) = daemon.child.try_wait()? {
            bail!("the daemon exited during startup ({status}); see its log");
        }
        if Instant::now() > deadline {
            bail!("the daemon did not open its socket within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(daemon)
}

struct Client {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Client {
    async fn connect(socket: &Path) -> anyhow::Result<Client> {
        let (r, w) = UnixStream::connect(socket).await?.into_split();
        Ok(Client { reader: BufReader::new(r), writer: w })
    }

    async fn call(&mut self, request: Value) -> anyhow::Result<Value> {
        self.writer.write_all(format!("{request}\n").as_bytes()).await?;
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(60), self.reader.read_line(&mut line))
            .await
            .context("the daemon did not answer within 60 s")??;
        serde_json::from_str(&line).with_context(|| format!("bad response line {line:?}"))
    }

    async fn completed(&mut self) -> anyhow::Result<u64> {
        let h = self.call(json!({"op": "health"})).await?;
        Ok(h["counts"]["completed"].as_u64().unwrap_or(0))
    }
}

async fn load_all(db: &Path, ids: &[String]) -> anyhow::Result<HashMap<String, TopicState>> {
    let store = SqliteStore::open(db)?;
    let mut m = HashMap::with_capacity(ids.len());
    for id in ids {
        if let Some(s) = store.load(id).await? {
            m.insert(s.topic.clone(), s);
        }
    }
    Ok(m)
}

async fn wait_completed(client: &mut Client, at_least: u64, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while client.completed().await? < at_least {
        if Instant::now() > deadline {
            bail!("fewer than {at_least} topics completed within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// `crash`: 1,000 topics through the daemon, SIGKILL at 50% completed,
/// restart, everything completes exactly once without re-running a
/// journaled step.
pub async fn crash(results: &Path, topics: usize) -> anyhow::Result<()> {
    let server = fake_server(0, 0, FaultRates::default()).await?;
    let dir = std::env::temp_dir().join(format!("scriptorium-bench-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("daemon.log");
    let env: Vec<(String, String)> = [
        ("SCRIPTORIUM_LLM__PROVIDER", "openai".to_string()),
        ("OPENAI_API_KEY", DUMMY_KEY.to_string()),
        ("OPENAI_BASE_URL", server.base_url()),
        ("SCRIPTORIUM_DAEMON__DATA_DIR", dir.display().to_string()),
        ("SCRIPTORIUM_DAEMON__METRICS_ADDR", String::new()),
        ("SCRIPTORIUM_DAEMON__WEB_ADDR", String::new()),
        ("SCRIPTORIUM_LIMITS__REQUESTS_PER_MINUTE", "0".to_string()),
        ("SCRIPTORIUM_LIMITS__TOKENS_PER_MINUTE", "0".to_string()),
        ("RUST_LOG", "warn".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let outcome = crash_inner(results, topics, &server, &dir, &env, &log).await;
    if outcome.is_err() {
        eprintln!("crash: daemon log kept at {}", log.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    server.shutdown().await;
    outcome
}

async fn crash_inner(
    results: &Path,
    topics: usize,
    server: &FakeServer,
    dir: &Path,
    env: &[(String, String)],
    log: &Path,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut daemon = start_daemon(dir, env, log).await?;
    let mut client = Client::connect(&daemon.socket).await?;
    let mut ids = Vec::with_capacity(topics);
    for i in 0..topics {
        let r = client.call(json!({"op": "submit", "topic": topic_text(i)})).await?;
        match r["id"].as_str() {
            Some(id) if r["ok"] == true => ids.push(id.to_string()),
            _ => bail!("submit {i} was refused: {r}"),
        }
    }
    let half = (topics / 2) as u64;
    wait_completed(&mut client, half, RUN_DEADLINE).await?;
    daemon.child.kill().await.context("cannot kill the daemon")?;
    let killed_at = Instant::now();
    drop(client);
    // A request the daemon wrote just before dying may still be in the
    // server's socket buffer; let it arrive before taking the snapshot.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen_before = server.stats().per_topic_step();
    let db = dir.join("scriptorium.db");
    let before = load_all(&db, &ids).await?;
    let stored_before = before.len();
    let done_before = before.values().filter(|s| s.status == TopicStatus::Completed).count();

    server.stats().mark();
    let restarted_at = Instant::now();
    let mut daemon = start_daemon(dir, env, log).await?;
    let ready_after = restarted_at.elapsed();
    let mut client = Client::connect(&daemon.socket).await?;
    wait_completed(&mut client, topics as u64, RUN_DEADLINE).await?;
    let resumed_in = restarted_at.elapsed();
    let first_step_after = server.stats().first_since_mark().map(|t| t.saturating_duration_since(restarted_at));

    let list = client.call(json!({"op": "list", "limit": 10_000})).await?;
    let listed = list["topics"].as_array().cloned().unwrap_or_default();
    let unique: HashSet<&str> = listed.iter().filter_map(|t| t["topic"].as_str()).collect();
    let duplicates = listed.len().saturating_sub(unique.len());
    let listed_completed = listed.iter().filter(|t| t["status"] == "completed").count();
    // SIGTERM-free stop: the run is over and the journal is what we check.
    daemon.child.kill().await.context("cannot stop the daemon")?;
    drop(client);

    let after = load_all(&db, &ids).await?;
    let seen_after = server.stats().per_topic_step();
    // Per (topic, step): requests after the restart must equal the attempts
    // the journal gained after the restart. A journaled step that ran again
    // would add a request without adding a journaled attempt.
    // Requests the kill cut off: sent before the crash, never journaled.
    let cut_off: u64 = before
        .values()
        .map(|s| {
            let journal = journaled_attempts(s);
            ["route", "plan", "write", "review", "revise"]
                .iter()
                .map(|step| {
                    let sent = seen_before.get(&(s.topic.clone(), step.to_string())).copied().unwrap_or(0);
                    sent.saturating_sub(journal.get(step).copied().unwrap_or(0))
                })
                .sum::<u64>()
        })
        .sum();
    let mut reruns = 0;
    let mut rerun_examples = Vec::new();
    for (topic, final_state) in &after {
        let gained_journal: HashMap<&str, u64> = {
            let old = before.get(topic).map(journaled_attempts).unwrap_or_default();
            journaled_attempts(final_state)
                .into_iter()
                .map(|(step, n)| (step, n - old.get(step).copied().unwrap_or(0).min(n)))
                .collect()
        };
        let steps = ["route", "plan", "write", "review", "revise"];
        for step in steps {
            let key = (topic.clone(), step.to_string());
            let requested_after =
                seen_after.get(&key).copied().unwrap_or(0).saturating_sub(seen_before.get(&key).copied().unwrap_or(0));
            let journaled_after = gained_journal.get(step).copied().unwrap_or(0);
            if requested_after != journaled_after {
                reruns += 1;
                if rerun_examples.len() < 10 {
                    rerun_examples.push(json!({"topic": topic, "step": step,
                        "requests_after_restart": requested_after, "journaled_after_restart": journaled_after}));
                }
            }
        }
    }
    let completed = after.values().filter(|s| s.status == TopicStatus::Completed).count();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let text = format!(
        "killed at {done_before}/{topics} completed ({cut_off} requests cut off); after restart: completed={completed} listed={} duplicates={duplicates} reruns={reruns} (targets: all, 0, 0) restart->first step={} ms restart->socket={:.0} ms restart->all done={:.1}s",
        listed.len(),
        first_step_after.map(|d| format!("{:.0}", ms(d))).unwrap_or_else(|| "n/a".into()),
        ms(ready_after),
        resumed_in.as_secs_f64(),
    );
    let line = json!({
        "topics": topics, "stored_before_restart": stored_before, "completed_before_kill": done_before,
        "completed": completed, "listed": listed.len(), "listed_completed": listed_completed,
        "duplicates": duplicates, "reruns": reruns, "requests_cut_off_by_kill": cut_off, "rerun_examples": rerun_examples,
        "restart_to_first_step_ms": first_step_after.map(ms), "restart_to_socket_ms": ms(ready_after),
        "restart_to_all_completed_s": resumed_in.as_secs_f64(),
        "kill_after_s": killed_at.duration_since(started).as_secs_f64(),
        "requests": server.stats().snapshot().requests,
        "latency_ms": LATENCY.as_millis() as u64, "jitter_ms": JITTER.as_millis() as u64,
    });
    row(results, "crash", &format!("{topics} topics"), &text, line)?;
    Ok(())
}
