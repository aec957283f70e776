//! `scriptorium run`: topics from arguments, `--file` or stdin, processed
//! in-process through the same engine handle the daemon uses; a progress
//! line on stderr when it is a terminal; a summary table or JSON states on
//! stdout. Exit 0 when every topic completed (approved or not).

use std::io::{BufRead, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use scriptorium::state::{TopicState, TopicStatus};
use scriptorium::store::files::FileMirror;
use scriptorium::store::sqlite::SqliteStore;
use scriptorium::store::TopicStore;
use scriptorium::telemetry::{self, LogFormat};
use scriptorium::{EngineError, EngineOptions, Scriptorium, SubmitRequest};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Topics to process (else --file, else stdin).
    pub topics: Vec<String>,
    /// A file with one topic per line; `#` starts a comment.
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Draft variants per topic (default: workflow.variants).
    #[arg(long)]
    pub variants: Option<u32>,
    /// Workflow kind for every topic (skips routing).
    #[arg(long)]
    pub kind: Option<String>,
    /// Write each topic's full state to DIR/<id>.json after every step, and
    /// journal it in DIR/scriptorium.db: the same command run again resumes
    /// unfinished topics from there without re-running finished steps;
    /// and write each final draft to DIR/<id>.md when it has one.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Token budget per topic (default: workflow.max_tokens).
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<u64>,
    /// Budget per topic in USD (default: workflow.max_cost_usd).
    #[arg(long, value_name = "USD")]
    pub max_cost_usd: Option<f64>,
    /// Print one JSON state per topic on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Serve Prometheus metrics at ADDR while running (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

/// Reads topics: one per line; blank lines and lines that start with `#`
/// are skipped. A `#` inside a topic is part of it (`Learning C# in 2025`).
pub fn parse_topic_lines(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect()
}

/// The idempotency key `run --out DIR` gives a topic, so running the same
/// command again finds the same topics in DIR (same ids, same files) and
/// resumes them instead of starting over. FNV-1a: stable across builds,
/// unlike std's hasher.
fn run_key(topic: &str, args: &RunArgs) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let options = format!("{:?}/{:?}/", args.kind, args.variants);
    for byte in options.bytes().chain(topic.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("run:{hash:016x}:{}", topic.len())
}

fn collect_topics(args: &RunArgs) -> anyhow::Result<Vec<String>> {
    let mut topics = args.topics.clone();
    if let Some(path) = &args.file {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        topics.extend(parse_topic_lines(&text));
    }
    if topics.is_empty() && args.file.is_none() {
        if std::io::stdin().is_terminal() {
            return Err(
                super::UsageError("no topics: pass them as arguments, with --file FILE, or on stdin".into()).into()
            );
        }
        let mut text = String::new();
        for line in std::io::stdin().lock().lines() {
            text.push_str(&line.context("cannot read stdin")?);
            text.push('\n');
        }
        topics.extend(parse_topic_lines(&text));
    }
    if topics.is_empty() {
        return Err(super::UsageError("no topics to process".into()).into());
    }
    Ok(topics)
}

pub async fn run(config_path: Option<PathBuf>, log_format: LogFormat, args: RunArgs) -> anyhow::Result<ExitCode> {
    let (config, _) = super::load_config(config_path.as_deref())?;
    let traces = telemetry::init(log_format, "warn", Some(&config.telemetry)).map_err(anyhow::Error::msg)?;
    let topics = collect_topics(&args)?;
    if args.metrics_addr.is_some() {
        telemetry::install_metrics(args.metrics_addr).map_err(anyhow::Error::msg)?;
        telemetry::describe_metrics();
        telemetry::spawn_process_metrics();
        if traces.is_some() {
            scriptorium::traces::describe_metrics();
        }
    }
    let (files, store) = match &args.out {
        Some(dir) => {
            let files = FileMirror::new(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            let db = dir.join("scriptorium.db");
            let store = SqliteStore::open(&db).with_context(|| format!("cannot open {}", db.display()))?;
            (Some(files), Some(Arc::new(store) as Arc<dyn TopicStore>))
        }
        None => (None, None),
    };
    let options = EngineOptions { files: files.clone(), store, ..EngineOptions::default() };
    let engine = Scriptorium::start(config, options).await?;
    if let Some(notice) = engine.provider_notice() {
        eprintln!("{notice}");
    }
    let started = Instant::now();
    let keyed = args.out.is_some();
    let ids = Arc::new(std::sync::Mutex::new(Vec::with_capacity(topics.len())));
    let work = async {
        submit_all(&engine, &topics, &args, keyed, &ids).await?;
        let ids = ids.lock().map(|g| g.clone()).unwrap_or_default();
        wait_all(&engine, &ids).await
    };
    let states = tokio::select! {
        states = work => states?,
        _ = tokio::signal::ctrl_c() => {
            return interrupted(&engine, &ids, files.as_ref(), &args, started).await;
        }
    };
    if let Some(dir) = &args.out {
        for s in &states {
            write_markdown(dir, s)?;
        }
    }
    print_states(&states, &args, started.elapsed())?;
    engine.shutdown(Duration::from_secs(1)).await;
    let all_completed = states.iter().all(|s| s.status == TopicStatus::Completed);
    Ok(if all_completed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn print_states(states: &[TopicState], args: &RunArgs, elapsed: Duration) -> anyhow::Result<()> {
    if args.json {
        let mut out = std::io::stdout().lock();
        for s in states {
            writeln!(out, "{}", serde_json::to_string(s)?)?;
        }
    } else {
        print_table(states, elapsed);
    }
    Ok(())
}

/// The first Ctrl-C: stop admitting, drop every in-flight call, write each
/// `--out` file from the journal, print the summary (unfinished topics
/// included) and exit 130. A second Ctrl-C exits at once.
async fn interrupted(
    engine: &Scriptorium,
    ids: &std::sync::Mutex<Vec<String>>,
    files: Option<&FileMirror>,
    args: &RunArgs,
    started: Instant,
) -> anyhow::Result<ExitCode> {
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(130);
        }
    });
    eprintln!("\ninterrupted: stopping (Ctrl-C again to quit at once)");
    engine.shutdown(Duration::ZERO).await;
    let ids = ids.lock().map(|g| g.clone()).unwrap_or_default();
    let mut states = Vec::with_capacity(ids.len());
    for id in &ids {
        if let Ok(state) = engine.get(id).await {
            if let Some(files) = files {
                if let Err(e) = files.write_state(&state).await {
                    eprintln!("warning: cannot write {}: {e}", files.path_for(id).display());
                }
            }
            states.push(state);
        }
    }
    print_states(&states, args, started.elapsed())?;
    let unfinished: Vec<&TopicState> = states.iter().filter(|s| !s.status.is_settled()).collect();
    if !unfinished.is_empty() {
        eprintln!("{} topics unfinished:", unfinished.len());
        for s in &unfinished {
            eprintln!("  {}  {}  (last step: {})", s.id, truncate(&s.topic, 60), s.step.as_deref().unwrap_or("-"));
        }
        if args.out.is_some() {
            eprintln!("run the same command again to resume them");
        }
    }
    Ok(ExitCode::from(130))
}

/// Submits every topic, waiting for room when the queue is full: `run`
/// bounds itself by `limits.max_in_flight_topics` like the daemon.
/// `keyed`: give each topic its `run_key` (with `--out`), so a second run
/// finds the first one's topics.
async fn submit_all(
    engine: &Scriptorium,
    topics: &[String],
    args: &RunArgs,
    keyed: bool,
    ids: &std::sync::Mutex<Vec<String>>,
) -> anyhow::Result<()> {
    for topic in topics {
        let request = SubmitRequest {
            topic: topic.clone(),
            kind: args.kind.clone(),
            variants: args.variants,
            idempotency_key: keyed.then(|| run_key(topic, args)),
            max_tokens: args.max_tokens,
            max_cost_usd: args.max_cost_usd,
            ..SubmitRequest::default()
        };
        loop {
            match engine.submit(request.clone()).await {
                Ok(receipt) => {
                    if let Ok(mut ids) = ids.lock() {
                        ids.push(receipt.id);
                    }
                    break;
                }
                Err(EngineError::Busy(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => bail!("topic {topic:?}: {e}"),
            }
        }
    }
    Ok(())
}

async fn wait_all(engine: &Scriptorium, ids: &[String]) -> anyhow::Result<Vec<TopicState>> {
    let progress = std::io::stderr().is_terminal().then(|| spawn_progress(engine.clone(), ids.len()));
    let mut escalation = engine.escalation();
    let mut states = Vec::with_capacity(ids.len());
    for id in ids {
        let state = tokio::select! {
            s = engine.wait(id, None) => s?,
            _ = escalation.wait_for(|e| e.is_some()) => {
                let reason = engine.escalation().borrow().clone().unwrap_or_default();
                bail!("stopped: {reason}");
            }
        };
        states.push(state);
    }
    if let Some(p) = progress {
        p.abort();
        eprint!("\r\x1b[2K");
    }
    Ok(states)
}

fn spawn_progress(engine: Scriptorium, total: usize) -> tokio::task::JoinHandle<()> {
    let spinner = Arc::new(["|", "/", "-", "\\"]);
    tokio::spawn(async move {
        let mut tick = 0usize;
        loop {
            if let Ok(h) = engine.health().await {
                let done = h.counts.get("completed").copied().unwrap_or(0);
                let failed = h.counts.get("failed").copied().unwrap_or(0);
                let width = 30usize;
                let filled = ((done + failed) as usize * width) / total.max(1);
                eprint!(
                    "\r\x1b[2K{} [{}{}] {}/{} done, {} failed, {} running, {} queued",
                    spinner[tick % 4],
                    "#".repeat(filled),
                    "-".repeat(width - filled.min(width)),
                    done + failed,
                    total,
                    failed,
                    h.in_flight,
                    h.queued
                );
            }
            tick += 1;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    })
}

/// `DIR/<id>.md`: the final draft as a writer uses it (mode 0600, like the
/// state files). Topics without a final draft get none.
fn write_markdown(dir: &std::path::Path, state: &TopicState) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let Some(f) = &state.final_draft else { return Ok(()) };
    let path = dir.join(format!("{}.md", state.id));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(file, "{}", f.draft.markdown.trim_end()).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// `$0.0123`, or `-` when a step's model has no price.
fn fmt_cost(cost: Option<f64>) -> String {
    cost.map(|c| format!("${c:.4}")).unwrap_or_else(|| "-".into())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

fn print_table(states: &[TopicState], elapsed: Duration) {
    println!(
        "{:<40}  {:<9}  {:>5}  {:<8}  {:>4}  {:>5}  {:>7}  {:>8}  {:>6}",
        "TOPIC", "ROUTE", "SCORE", "APPROVED", "REVS", "CALLS", "TOKENS", "COST", "TIME"
    );
    for s in states {
        let (score, approved) = match &s.final_draft {
            Some(f) => (f.review.score.to_string(), if f.review.approved { "yes" } else { "no" }.to_string()),
            None => ("-".into(), s.status.as_str().to_string()),
        };
        let secs = s.finished_at_ms.unwrap_or(s.updated_at_ms).saturating_sub(s.submitted_at_ms) as f64 / 1000.0;
        println!(
            "{:<40}  {:<9}  {:>5}  {:<8}  {:>4}  {:>5}  {:>7}  {:>8}  {:>5.1}s",
            truncate(&s.topic, 40),
            truncate(s.route.as_deref().unwrap_or("-"), 9),
            score,
            approved,
            s.revisions.len(),
            s.usage.llm_calls,
            s.usage.input_tokens + s.usage.output_tokens,
            fmt_cost(s.usage.cost_usd),
            secs
        );
        if let Some(e) = &s.error {
            println!("    error ({} step, {}): {}", e.step, e.kind.as_str(), truncate(&e.message, 160));
        }
    }
    let completed = states.iter().filter(|s| s.status == TopicStatus::Completed).count();
    let approved = states.iter().filter(|s| s.final_draft.as_ref().is_some_and(|f| f.review.approved)).count();
    // A total only when every topic has a cost: a partial sum would
    // understate.
    let total: Option<f64> = states.iter().map(|s| s.usage.cost_usd).sum();
    println!(
        "\n{} topics: {} completed ({} approved), {} failed, in {:.1}s, cost {}",
        states.len(),
        completed,
        approved,
        states.len() - completed,
        elapsed.as_secs_f64(),
        fmt_cost(total)
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn topic_lines_skip_comments_and_blanks() {
        let t = super::parse_topic_lines("# header\n\nfirst topic\n  second # not a comment\n  #only\n");
        assert_eq!(t, vec!["first topic", "second # not a comment"]);
    }

    #[test]
    fn a_hash_inside_a_topic_is_part_of_it() {
        let t = super::parse_topic_lines("Learning C# in 2025\nIssue #42 triage\n# a comment\n");
        assert_eq!(t, vec!["Learning C# in 2025", "Issue #42 triage"]);
    }
}
