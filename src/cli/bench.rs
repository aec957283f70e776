//! `scriptorium bench`: benchmark scenarios that print one table row each
//! and append a JSON line to a results file. Targets live here, in printed
//! numbers, never in tests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use scriptorium::config::{Config, Durability};
use scriptorium::state::TopicStatus;
use scriptorium::store::sqlite::SqliteStore;
use scriptorium::store::TopicStore;
use scriptorium::{EngineOptions, Scriptorium, SubmitRequest};
use serde_json::json;

mod fake;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Scenario: overhead, scale, ratelimit, tokens, shipped, chaos, crash (see README
    /// "Performance").
    #[arg(long, default_value = "overhead")]
    pub scenario: String,
    /// Topics per run (overhead: default 2000 and 10000; ratelimit, tokens,
    /// chaos, crash: default 1000, first value used).
    #[arg(long)]
    pub topics: Vec<usize>,
    /// overhead: which store settings to run (both, none, sqlite).
    #[arg(long, default_value = "both")]
    pub store: String,
    /// overhead with a store: SQLite durability to run (process, power, or
    /// both side by side).
    #[arg(long, default_value = "process")]
    pub durability: String,
    /// overhead, scale: runs per row; the row shows the run with the median
    /// CPU per step (a shared machine's noise moves single runs by ±30 %).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Internal: run one scale measurement in this (fresh) process and
    /// print its numbers as JSON; the parent runs one child per run, so no
    /// run inherits the heap an earlier one grew.
    #[arg(long, hide = true)]
    pub child: bool,
    /// JSON lines are appended here.
    #[arg(long, default_value = "bench-results.jsonl")]
    pub results: PathBuf,
}

/// Process CPU time (user + system).
fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes into the provided struct; RUSAGE_SELF is valid.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return Duration::ZERO;
    }
    // SAFETY: rc == 0 means the struct was filled in.
    let u = unsafe { usage.assume_init() };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Resident set size in KiB, from /proc/self/status.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// One scale run in a fresh child process (see `BenchArgs::child`).
async fn scale_child(topics: usize) -> anyhow::Result<RunStats> {
    let exe = std::env::current_exe()?;
    let out = tokio::process::Command::new(exe)
        .args(["bench", "--scenario", "scale", "--child", "--topics", &topics.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "scale child for {topics} topics failed: {}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.starts_with('{')).unwrap_or_default();
    let value: serde_json::Value = serde_json::from_str(line)?;
    RunStats::from_json(&value).ok_or_else(|| anyhow::anyhow!("scale child printed no stats: {text}"))
}

/// Runs `run` `times` times (at least once) and keeps the run with the
/// median CPU per step.
async fn median_of<F, Fut>(times: usize, mut run: F) -> anyhow::Result<RunStats>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<RunStats>>,
{
    let mut runs = Vec::new();
    for _ in 0..times.max(1) {
        runs.push(run().await?);
    }
    runs.sort_by(|a, b| a.cpu_per_step().total_cmp(&b.cpu_per_step()));
    let middle = runs.len() / 2;
    Ok(runs.swap_remove(middle))
}

fn bench_config(latency_ms: u64, in_flight: usize) -> anyhow::Result<Config> {
    let mut c = Config::from_toml_str("", &[])?;
    c.llm.provider = scriptorium::config::ProviderChoice::Simulated;
    c.llm.simulated.latency_ms = latency_ms;
    c.llm.simulated.jitter_ms = 0;
    c.limits.requests_per_minute = 0;
    c.limits.tokens_per_minute = 0;
    c.limits.max_in_flight_topics = in_flight;
    c.limits.max_queued_topics = 1_000_000;
    c.workflow.variants = 3;
    Ok(c)
}

struct RunStats {
    topics: usize,
    steps: u64,
    wall: Duration,
    cpu: Duration,
    peak_rss_delta_kib: u64,
    /// Process CPU seconds per wall second with the engine started and
    /// idle (timers, metrics upkeep, the RSS sampler), measured before the
    /// run; 0 when not measured.
    idle_cpu_rate: f64,
}

impl RunStats {
    /// CPU seconds per step, less what the idle process would have used
    /// over the run's wall time (matters when steps are sparse: 100 topics
    /// at 2 s per call).
    fn cpu_per_step(&self) -> f64 {
        let idle = self.idle_cpu_rate * self.wall.as_secs_f64();
        (self.cpu.as_secs_f64() - idle).max(0.0) / self.steps.max(1) as f64
    }

    fn to_json(&self) -> serde_json::Value {
        json!({
            "topics": self.topics, "steps": self.steps, "wall_s": self.wall.as_secs_f64(),
            "cpu_s": self.cpu.as_secs_f64(), "peak_rss_delta_kib": self.peak_rss_delta_kib,
            "idle_cpu_rate": self.idle_cpu_rate,
        })
    }

    fn from_json(v: &serde_json::Value) -> Option<RunStats> {
        Some(RunStats {
            topics: v["topics"].as_u64()? as usize,
            steps: v["steps"].as_u64()?,
            wall: Duration::from_secs_f64(v["wall_s"].as_f64()?),
            cpu: Duration::from_secs_f64(v["cpu_s"].as_f64()?),
            peak_rss_delta_kib: v["peak_rss_delta_kib"].as_u64()?,
            idle_cpu_rate: v["idle_cpu_rate"].as_f64()?,
        })
    }
}

/// What `run_topics` measures besides the run itself.
#[derive(Clone, Copy)]
struct Measure {
    /// Measure the idle CPU rate for this long before the run.
    idle_baseline: Duration,
}

const NO_BASELINE: Measure = Measure { idle_baseline: Duration::ZERO };

async fn run_topics(
    config: anyhow::Result<Config>,
    store: Option<Arc<dyn TopicStore>>,
    topics: usize,
    measure: Measure,
) -> anyhow::Result<RunStats> {
    let config = config?;
    let engine = Scriptorium::start(config, EngineOptions { store, ..EngineOptions::default() }).await?;
    let rss_before = rss_kib();
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(rss_before));
    let sampler = {
        let peak = Arc::clone(&peak);
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let idle_cpu_rate = if measure.idle_baseline.is_zero() {
        0.0
    } else {
        let (c, t) = (cpu_time(), Instant::now());
        tokio::time::sleep(measure.idle_baseline).await;
        (cpu_time() - c).as_secs_f64() / t.elapsed().as_secs_f64()
    };
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    // Many clients at once, as on the socket: each submits and waits for
    // its topic. (Submitting one by one would make the benchmark measure a
    // single client's round trips, not the engine.)
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..topics {
        let engine = engine.clone();
        clients.spawn(async move {
            let topic = format!("benchmark topic number {i}");
            let r = engine.submit(SubmitRequest { topic, ..SubmitRequest::default() }).await?;
            let s = engine.wait(&r.id, None).await?;
            anyhow::ensure!(s.status == TopicStatus::Completed, "topic {} ended {:?}: {:?}", r.id, s.status, s.error);
            Ok(s.usage.llm_calls)
        });
    }
    let mut steps = 0u64;
    while let Some(joined) = clients.join_next().await {
        steps += joined??;
    }
    let wall = t0.elapsed();
    let cpu = cpu_time() - cpu0;
    sampler.abort();
    engine.shutdown(Duration::from_secs(1)).await;
    let peak_rss_delta_kib = peak.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(rss_before);
    Ok(RunStats { topics, steps, wall, cpu, peak_rss_delta_kib, idle_cpu_rate })
}

fn report(
    results: &PathBuf,
    scenario: &str,
    label: &str,
    s: &RunStats,
    extra: serde_json::Value,
) -> anyhow::Result<()> {
    let steps_per_s = s.steps as f64 / s.wall.as_secs_f64();
    let cpu_us = s.cpu_per_step() * 1e6;
    println!(
        "{scenario:<10} {label:<22} topics={:<6} steps={:<7} wall={:>7.2}s steps/s={:>9.0} cpu/step={:>6.1}µs peak_rss_delta={}KiB",
        s.topics,
        s.steps,
        s.wall.as_secs_f64(),
        steps_per_s,
        cpu_us,
        s.peak_rss_delta_kib
    );
    let mut line = json!({
        "scenario": scenario, "label": label, "topics": s.topics, "steps": s.steps,
        "wall_s": s.wall.as_secs_f64(), "steps_per_s": steps_per_s, "cpu_us_per_step": cpu_us,
        "peak_rss_delta_kib": s.peak_rss_delta_kib, "idle_cpu_rate": s.idle_cpu_rate, "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    });
    if let (Some(obj), Some(more)) = (line.as_object_mut(), extra.as_object()) {
        obj.extend(more.clone());
    }
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(results)?;
    writeln!(f, "{line}")?;
    Ok(())
}

/// Prints one table row (`scenario label text`) and appends `line` plus
/// the scenario, label and core count as one JSON line to `results`.
fn row(results: &Path, scenario: &str, label: &str, text: &str, line: serde_json::Value) -> anyhow::Result<()> {
    println!("{scenario:<10} {label:<22} {text}");
    let mut out = json!({
        "scenario": scenario, "label": label,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    });
    if let (Some(obj), serde_json::Value::Object(more)) = (out.as_object_mut(), line) {
        obj.extend(more);
    }
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(results)?;
    writeln!(f, "{out}")?;
    Ok(())
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!("# scriptorium bench, {cores} cores; results appended to {}", args.results.display());
    // The Prometheus recorder a daemon runs with, so its cost is counted
    // (logs stay off: no subscriber, as with the default `warn` filter).
    scriptorium::telemetry::install_metrics(None).map_err(|e| anyhow::anyhow!("metrics recorder: {e}"))?;
    match args.scenario.as_str() {
        "overhead" => {
            let sizes = if args.topics.is_empty() { vec![2000, 10_000] } else { args.topics.clone() };
            for n in sizes {
                if args.store != "sqlite" {
                    let s =
                        median_of(args.repeat, || run_topics(bench_config(0, 100_000), None, n, NO_BASELINE)).await?;
                    let targets = json!({"target_steps_per_s": 100000, "target_cpu_us": 15});
                    report(&args.results, "overhead", "no store", &s, targets)?;
                }
                if args.store == "none" {
                    continue;
                }
                let durabilities: &[Durability] = match args.durability.as_str() {
                    "process" => &[Durability::Process],
                    "power" => &[Durability::Power],
                    "both" => &[Durability::Process, Durability::Power],
                    other => anyhow::bail!("unknown durability `{other}` (have: process, power, both)"),
                };
                for &durability in durabilities {
                    let s = median_of(args.repeat, || async move {
                        // A fresh database file per run.
                        let dir = tempfile_dir()?;
                        let store: Arc<dyn TopicStore> =
                            Arc::new(SqliteStore::open_with(&dir.join("bench.db"), durability)?);
                        let s = run_topics(bench_config(0, 100_000), Some(store), n, NO_BASELINE).await;
                        let _ = std::fs::remove_dir_all(&dir);
                        s
                    })
                    .await?;
                    let label = match durability {
                        Durability::Process => "sqlite store",
                        Durability::Power => "sqlite store, power",
                    };
                    report(&args.results, "overhead", label, &s, json!({"target_steps_per_s": 30000}))?;
                }
            }
        }
        "scale" => {
            let sizes = if args.topics.is_empty() { vec![100, 1000, 10_000] } else { args.topics.clone() };
            if args.child {
                let n = sizes.first().copied().unwrap_or(100);
                let measure = Measure { idle_baseline: Duration::from_secs(2) };
                let s = run_topics(bench_config(2000, n), None, n, measure).await?;
                println!("{}", s.to_json());
                return Ok(ExitCode::SUCCESS);
            }
            for n in sizes {
                let s = median_of(args.repeat, || scale_child(n)).await?;
                let per_topic = s.peak_rss_delta_kib as f64 / n as f64;
                report(
                    &args.results,
                    "scale",
                    &format!("{n} in flight"),
                    &s,
                    json!({"rss_kib_per_topic": per_topic, "target_rss_kib_per_topic": 16}),
                )?;
                println!("{:<10} {:<22} rss/topic={per_topic:.1}KiB (target <= 16)", "scale", format!("{n} in flight"));
            }
        }
        "ratelimit" | "tokens" => {
            let n = args.topics.first().copied().unwrap_or(1000);
            fake::rate_bound(&args.results, &args.scenario, n).await?;
        }
        "shipped" => fake::shipped(&args.results, args.topics.first().copied().unwrap_or(100)).await?,
        "chaos" => fake::chaos(&args.results, args.topics.first().copied().unwrap_or(1000)).await?,
        "crash" => fake::crash(&args.results, args.topics.first().copied().unwrap_or(1000)).await?,
        other => anyhow::bail!(
            "unknown scenario `{other}` (have: overhead, scale, ratelimit, tokens, shipped, chaos, crash)"
        ),
    }
    Ok(ExitCode::SUCCESS)
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("scriptorium-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
