//! Socket client commands: `submit`, `status`, `result`, `watch`,
//! `approve`, `reject`, `cancel`, `list`, `health`, talking to a running
//! daemon over its Unix socket with the version-1 protocol
//! (`docs/protocol.md`).
//!
//! Owns: finding the socket, one connection per command, human output (or
//! the raw response lines with `--json`), exit codes. Must not: touch the
//! store or the engine directly; everything goes through the socket.
//!
//! Exit codes: 0 success; 1 the daemon answered an error (printed as
//! `error: <code>: <message>`) or a topic ended failed/cancelled; 2 bad
//! arguments; 3 the config could not be loaded; 4 I/O during the exchange;
//! 5 no daemon answers at the socket (`ConnectError`).

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use scriptorium::events::TopicEvent;
use scriptorium::server::protocol::{
    ends_watch, ApproveParams, HealthBody, IdParams, ListBody, ListParams, RejectParams, Request, ResultBody,
    ResultParams, StatusBody, SubmitParams, Submitted, WatchParams, WireError, MAX_WAIT_S,
};
use scriptorium::state::{TopicState, TopicStatus, TopicSummary};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Environment variable naming the socket (same as the config override).
const SOCKET_ENV: &str = "SCRIPTORIUM_DAEMON__SOCKET";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Answers that do not wait for a topic come back well within this.
const READ_TIMEOUT: Duration = Duration::from_secs(90);
/// Slack on top of a `result --wait` timeout for the answer to arrive.
const WAIT_SLACK: Duration = Duration::from_secs(30);
/// A full `list` page of 10 000 summaries is a few MB; anything beyond
/// this is not a response of ours.
const MAX_RESPONSE_BYTES: u64 = 64 * 1024 * 1024;
/// How long `submit` keeps retrying while the daemon's queue is full.
const BUSY_RETRY_FOR: Duration = Duration::from_secs(120);

#[derive(clap::Args, Debug, Clone, Copy)]
pub struct OutputArgs {
    /// Print the daemon's raw response lines (JSON) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum ClientCommand {
    /// Submit topics to a running daemon; prints one id per topic.
    Submit(SubmitArgs),
    /// Show one topic's status, or list topics when no id is given.
    Status {
        id: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Show a topic's final draft (or where it stands).
    Result {
        id: String,
        /// Wait until the topic is finished or awaiting approval.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds (default 600, max 3600).
        #[arg(long, value_name = "S")]
        timeout: Option<f64>,
        /// Print only the final draft's markdown (fails when there is none).
        #[arg(long, conflicts_with = "json")]
        markdown: bool,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Stream step events: one topic until it settles, or all topics.
    Watch {
        id: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Approve a topic awaiting approval.
    Approve {
        id: String,
        #[arg(long)]
        note: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Send a topic awaiting approval back for a revision answering the note.
    Reject {
        id: String,
        #[arg(long, required = true)]
        note: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Cancel a queued, running or awaiting topic.
    Cancel {
        id: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// List topics (oldest first).
    List {
        /// Only topics with this status (queued, running, awaiting_approval,
        /// completed, failed, cancelled, dead_letter).
        #[arg(long, value_name = "S")]
        status: Option<String>,
        /// Page size (default 100, max 10000).
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
        /// Start after this id (the `next` of the previous page).
        #[arg(long, value_name = "ID")]
        after: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Ask a running daemon for its health.
    Health {
        #[command(flatten)]
        out: OutputArgs,
    },
}

impl ClientCommand {
    fn json(&self) -> bool {
        match self {
            ClientCommand::Submit(a) => a.out.json,
            ClientCommand::Status { out, .. }
            | ClientCommand::Result { out, .. }
            | ClientCommand::Watch { out, .. }
            | ClientCommand::Approve { out, .. }
            | ClientCommand::Reject { out, .. }
            | ClientCommand::Cancel { out, .. }
            | ClientCommand::List { out, .. }
            | ClientCommand::Health { out } => out.json,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    /// Topics (else --file, else stdin).
    pub topics: Vec<String>,
    /// A file with one topic per line; `#` starts a comment.
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Workflow kind (skips routing).
    #[arg(long)]
    pub kind: Option<String>,
    /// Draft variants per topic (default: the daemon's workflow.variants).
    #[arg(long)]
    pub variants: Option<u32>,
    /// Park the final draft for a human `approve`/`reject`.
    #[arg(long)]
    pub approval: bool,
    /// Resubmitting with the same key returns the first topic's id. With
    /// several topics, `-1`, `-2`, ... is appended per topic.
    #[arg(long, value_name = "K")]
    pub idempotency_key: Option<String>,
    /// Token budget per topic (default: the daemon's workflow.max_tokens).
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<u64>,
    /// Budget per topic in USD (default: the daemon's workflow.max_cost_usd).
    #[arg(long, value_name = "USD")]
    pub max_cost_usd: Option<f64>,
    /// Wait for every topic and print a summary.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// `println!` that returns an error when stdout is closed (`| head`)
/// instead of panicking.
macro_rules! outln {
    () => {
        writeln!(std::io::stdout().lock())
    };
    ($($arg:tt)*) => {
        writeln!(std::io::stdout().lock(), $($arg)*)
    };
}

/// The daemon answered `ok: false`.
#[derive(Debug, thiserror::Error)]
#[error("{}: {}", .0.code, .0.message)]
struct DaemonError(WireError);

pub async fn run(config: Option<PathBuf>, socket: Option<PathBuf>, cmd: ClientCommand) -> anyhow::Result<ExitCode> {
    let path = socket_path(config, socket)?;
    match execute(&path, cmd).await {
        Ok(code) => Ok(code),
        Err(e) => {
            if let Some(d) = e.downcast_ref::<DaemonError>() {
                eprintln!("error: {d}");
                return Ok(ExitCode::FAILURE);
            }
            // The reader went away (`scriptorium result ID | head`): not
            // an error worth a message.
            if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) {
                return Ok(ExitCode::SUCCESS);
            }
            Err(e)
        }
    }
}

/// `--socket`, else `SCRIPTORIUM_DAEMON__SOCKET`, else where the daemon
/// puts it with the same config and environment (`paths::Layout`).
fn socket_path(config: Option<PathBuf>, socket: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(s) = socket {
        return Ok(s);
    }
    if let Some(s) = std::env::var_os(SOCKET_ENV).filter(|s| !s.is_empty()) {
        return Ok(PathBuf::from(s));
    }
    let (config, _) = super::load_config(config.as_deref())
        .context("cannot load the config to find the daemon's socket (or pass --socket PATH)")?;
    let layout = scriptorium::paths::Layout::resolve(&config.daemon, &scriptorium::paths::PathEnv::from_process())
        .context("cannot find the daemon's socket (or pass --socket PATH)")?;
    Ok(layout.socket)
}

/// No daemon answered at the socket: exit code 5.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConnectError(String);

async fn execute(path: &Path, cmd: ClientCommand) -> anyhow::Result<ExitCode> {
    let mut client = Client::connect(path).await?;
    client.json = cmd.json();
    match cmd {
        ClientCommand::Submit(args) => submit(&mut client, args).await,
        ClientCommand::Status { id: Some(id), out } => {
            let (raw, body) = client.call::<StatusBody>(&Request::Status(IdParams { id }), READ_TIMEOUT).await?;
            if out.json {
                outln!("{raw}")?;
            } else {
                print_summary(&body.topic)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        ClientCommand::Status { id: None, out } => list(&mut client, ListParams::default(), out).await,
        ClientCommand::Result { id, wait, timeout, markdown, out } => {
            let timeout_s = timeout.map(|t| t.clamp(0.0, MAX_WAIT_S));
            let request = Request::Result(ResultParams { id, wait, timeout_s });
            let read_for = if wait {
                Duration::from_secs_f64(timeout_s.unwrap_or(scriptorium::server::protocol::DEFAULT_WAIT_S)) + WAIT_SLACK
            } else {
                READ_TIMEOUT
            };
            let (raw, body) = client.call::<ResultBody>(&request, read_for).await?;
            if markdown {
                let Some(f) = &body.state.final_draft else {
                    eprintln!(
                        "error: topic {} has no final draft (status {})",
                        body.state.id,
                        body.state.status.as_str()
                    );
                    return Ok(ExitCode::FAILURE);
                };
                outln!("{}", f.draft.markdown.trim_end())?;
                return Ok(exit_for(body.state.status));
            }
            if out.json {
                outln!("{raw}")?;
            } else {
                print_result(&body.state)?;
            }
            Ok(exit_for(body.state.status))
        }
        ClientCommand::Watch { id, out } => watch(&mut client, id, out).await,
        ClientCommand::Approve { id, note, out } => {
            let raw = client.call_empty(&Request::Approve(ApproveParams { id: id.clone(), note })).await?;
            done(out, &raw, &format!("approved {id}"))
        }
        ClientCommand::Reject { id, note, out } => {
            let raw = client.call_empty(&Request::Reject(RejectParams { id: id.clone(), note })).await?;
            done(out, &raw, &format!("rejected {id}; a revision answering the note is on its way"))
        }
        ClientCommand::Cancel { id, out } => {
            let raw = client.call_empty(&Request::Cancel(IdParams { id: id.clone() })).await?;
            done(out, &raw, &format!("cancelled {id}"))
        }
        ClientCommand::List { status, limit, after, out } => {
            list(&mut client, ListParams { status, limit, after }, out).await
        }
        ClientCommand::Health { out } => {
            let (raw, h) = client.call::<HealthBody>(&Request::Health, READ_TIMEOUT).await?;
            if out.json {
                outln!("{raw}")?;
            } else {
                print_health(&h)?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn done(out: OutputArgs, raw: &str, human: &str) -> anyhow::Result<ExitCode> {
    outln!("{}", if out.json { raw } else { human })?;
    Ok(ExitCode::SUCCESS)
}

/// Completed or parked for approval is success; failed or cancelled is not.
fn exit_for(status: TopicStatus) -> ExitCode {
    match status {
        TopicStatus::Failed | TopicStatus::Cancelled | TopicStatus::DeadLetter => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    }
}

// ---- connection --------------------------------------------------------------

struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    line: Vec<u8>,
    /// `--json`: error lines are printed raw on stdout too.
    json: bool,
}

impl Client {
    async fn connect(path: &Path) -> anyhow::Result<Client> {
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(path)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(ConnectError(format!(
                    "cannot connect to the daemon at {} (is `scriptorium daemon` running?): {e}",
                    path.display()
                ))
                .into())
            }
            Err(_) => {
                return Err(ConnectError(format!(
                    "cannot connect to the daemon at {}: no answer within {}s (is it overloaded?)",
                    path.display(),
                    CONNECT_TIMEOUT.as_secs()
                ))
                .into())
            }
        };
        let (rd, wr) = stream.into_split();
        Ok(Client { reader: BufReader::new(rd), writer: wr, line: Vec::new(), json: false })
    }

    async fn send(&mut self, request: &Request) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(&request.to_value())?;
        line.push(b'\n');
        let writer = &mut self.writer;
        tokio::time::timeout(WRITE_TIMEOUT, async move {
            writer.write_all(&line).await?;
            writer.flush().await
        })
        .await
        .context("the daemon did not take the request in time")?
        .context("cannot send the request to the daemon")?;
        Ok(())
    }

    /// Reads one response line; `None` waits without a bound (watch
    /// streams, where silence only means nothing happened).
    async fn read_line(&mut self, limit: Option<Duration>) -> anyhow::Result<String> {
        self.line.clear();
        let mut limited = (&mut self.reader).take(MAX_RESPONSE_BYTES);
        let read = limited.read_until(b'\n', &mut self.line);
        let n = match limit {
            Some(t) => tokio::time::timeout(t, read)
                .await
                .with_context(|| format!("no answer from the daemon within {}s", t.as_secs()))?,
            None => read.await,
        }
        .context("cannot read the daemon's answer")?;
        if n == 0 || self.line.last() != Some(&b'\n') {
            bail!("the daemon closed the connection");
        }
        self.line.pop();
        Ok(String::from_utf8_lossy(&self.line).into_owned())
    }

    /// Sends a request and decodes a success body, or fails with
    /// `DaemonError`. Returns the raw line too, for `--json`.
    async fn call<T: DeserializeOwned>(&mut self, request: &Request, limit: Duration) -> anyhow::Result<(String, T)> {
        self.send(request).await?;
        let raw = self.read_line(Some(limit)).await?;
        let body = self.decode(&raw)?;
        Ok((raw, body))
    }

    /// `decode`, echoing an error line on stdout with `--json` so scripts
    /// see the daemon's answer either way.
    fn decode<T: DeserializeOwned>(&self, raw: &str) -> anyhow::Result<T> {
        let decoded = decode(raw);
        if self.json && decoded.as_ref().is_err_and(|e| e.downcast_ref::<DaemonError>().is_some()) {
            outln!("{raw}")?;
        }
        decoded
    }

    async fn call_empty(&mut self, request: &Request) -> anyhow::Result<String> {
        let (raw, _) = self.call::<Value>(request, READ_TIMEOUT).await?;
        Ok(raw)
    }
}

/// Checks `ok` and decodes the rest of a response line.
fn decode<T: DeserializeOwned>(raw: &str) -> anyhow::Result<T> {
    let value: Value = serde_json::from_str(raw).context("the daemon sent a line that is not JSON")?;
    match value.get("ok") {
        Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => {
            let error = value.get("error").cloned().unwrap_or(Value::Null);
            let error: WireError = serde_json::from_value(error)
                .unwrap_or_else(|_| WireError::new("unknown", format!("unreadable error from the daemon: {raw}")));
            return Err(DaemonError(error).into());
        }
        _ => bail!("the daemon sent a response without `ok`: {raw}"),
    }
    serde_json::from_value(value).context("the daemon's answer does not have the expected fields")
}

// ---- commands ------------------------------------------------------------------

fn collect_topics(args: &SubmitArgs) -> anyhow::Result<Vec<String>> {
    let mut topics = args.topics.clone();
    if let Some(path) = &args.file {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        topics.extend(super::run::parse_topic_lines(&text));
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
        topics.extend(super::run::parse_topic_lines(&text));
    }
    if topics.is_empty() {
        return Err(super::UsageError("no topics to submit".into()).into());
    }
    Ok(topics)
}

async fn submit(client: &mut Client, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let topics = collect_topics(&args)?;
    let several = topics.len() > 1;
    let mut ids = Vec::with_capacity(topics.len());
    for (i, topic) in topics.iter().enumerate() {
        let idempotency_key =
            args.idempotency_key.as_ref().map(|k| if several { format!("{k}-{}", i + 1) } else { k.clone() });
        let request = Request::Submit(SubmitParams {
            topic: topic.clone(),
            kind: args.kind.clone(),
            variants: args.variants,
            require_approval: args.approval.then_some(true),
            idempotency_key,
            max_tokens: args.max_tokens,
            max_cost_usd: args.max_cost_usd,
        });
        let (raw, receipt) = submit_retrying(client, &request).await?;
        if args.out.json {
            outln!("{raw}")?;
        } else if receipt.existing {
            outln!("{}\t(existing: same idempotency key)", receipt.id)?;
        } else {
            outln!("{}", receipt.id)?;
        }
        ids.push(receipt.id);
    }
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let mut states = Vec::with_capacity(ids.len());
    for id in ids {
        let request = Request::Result(ResultParams { id, wait: true, timeout_s: Some(MAX_WAIT_S) });
        let (raw, body) = client.call::<ResultBody>(&request, Duration::from_secs_f64(MAX_WAIT_S) + WAIT_SLACK).await?;
        if args.out.json {
            outln!("{raw}")?;
        }
        states.push(body.state);
    }
    if !args.out.json {
        outln!()?;
        let summaries: Vec<TopicSummary> = states.iter().map(TopicSummary::from).collect();
        print_table(&summaries)?;
    }
    let failed = states
        .iter()
        .any(|s| matches!(s.status, TopicStatus::Failed | TopicStatus::Cancelled | TopicStatus::DeadLetter));
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// A full queue is a normal condition for a batch: wait and retry (with a
/// bound) instead of failing half-way through a file of topics.
async fn submit_retrying(client: &mut Client, request: &Request) -> anyhow::Result<(String, Submitted)> {
    let deadline = tokio::time::Instant::now() + BUSY_RETRY_FOR;
    let mut pause = Duration::from_millis(100);
    loop {
        match client.call::<Submitted>(request, READ_TIMEOUT).await {
            Err(e)
                if e.downcast_ref::<DaemonError>().is_some_and(|d| d.0.code == "busy")
                    && tokio::time::Instant::now() + pause < deadline =>
            {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

async fn list(client: &mut Client, params: ListParams, out: OutputArgs) -> anyhow::Result<ExitCode> {
    let (raw, body) = client.call::<ListBody>(&Request::List(params), READ_TIMEOUT).await?;
    if out.json {
        outln!("{raw}")?;
        return Ok(ExitCode::SUCCESS);
    }
    if body.topics.is_empty() {
        outln!("no topics")?;
    } else {
        print_table(&body.topics)?;
    }
    if let Some(next) = body.next {
        eprintln!("(more: scriptorium list --after {next})");
    }
    Ok(ExitCode::SUCCESS)
}

async fn watch(client: &mut Client, id: Option<String>, out: OutputArgs) -> anyhow::Result<ExitCode> {
    client.send(&Request::Watch(WatchParams { id: id.clone() })).await?;
    let first = client.read_line(Some(READ_TIMEOUT)).await?;
    let _: Value = client.decode(&first)?;
    if out.json {
        outln!("{first}")?;
    } else {
        match &id {
            Some(id) => eprintln!("watching {id}"),
            None => eprintln!("watching all topics (Ctrl-C to stop)"),
        }
    }
    loop {
        let raw = client.read_line(None).await?;
        if out.json {
            outln!("{raw}")?;
            // Keep the stream flowing into pipes line by line.
            let _ = std::io::stdout().flush();
        }
        let value: Value = serde_json::from_str(&raw).context("the daemon sent a line that is not JSON")?;
        if let Some(n) = value.get("lagged").and_then(Value::as_u64) {
            if !out.json {
                outln!("(fell behind: {n} events were dropped)")?;
            }
            continue;
        }
        let Some(event) = value.get("event") else { continue };
        let event: TopicEvent = serde_json::from_value(event.clone()).context("unreadable event from the daemon")?;
        if !out.json {
            outln!("{}", format_event(&event))?;
            let _ = std::io::stdout().flush();
        }
        if id.is_some() && ends_watch(&event) {
            return Ok(exit_for(event.status));
        }
    }
}

// ---- printing ------------------------------------------------------------------

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n.saturating_sub(1)).collect::<String>())
    }
}

/// `HH:MM:SS.mmm` (UTC) of a Unix-milliseconds timestamp.
fn clock(ms: u64) -> String {
    let day_ms = ms % 86_400_000;
    format!("{:02}:{:02}:{:02}.{:03}", day_ms / 3_600_000, (day_ms / 60_000) % 60, (day_ms / 1000) % 60, day_ms % 1000)
}

fn format_event(e: &TopicEvent) -> String {
    let mut s = format!("{} {} {:<8}", clock(e.at_ms), e.topic_id, e.step);
    if let Some(v) = e.variant {
        s.push_str(&format!(" v{v}"));
    }
    if let Some(r) = e.revision {
        s.push_str(&format!(" r{r}"));
    }
    if let Some(a) = e.attempt {
        s.push_str(&format!(" attempt {a}"));
    }
    s.push_str(&format!(" {} [{}]", e.outcome, e.status.as_str()));
    if let Some(ms) = e.elapsed_ms {
        s.push_str(&format!(" {ms}ms"));
    }
    if let Some(r) = &e.reason {
        s.push_str(&format!(" — {}", truncate(r, 120)));
    }
    s
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(T::to_string).unwrap_or_else(|| "-".into())
}

fn yes_no(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "yes",
        Some(false) => "no",
        None => "-",
    }
}

fn print_table(topics: &[TopicSummary]) -> std::io::Result<()> {
    outln!(
        "{:<24}  {:<17}  {:<8}  {:<9}  {:>5}  {:<8}  {:>4}  TOPIC",
        "ID",
        "STATUS",
        "STEP",
        "KIND",
        "SCORE",
        "APPROVED",
        "REVS"
    )?;
    for t in topics {
        outln!(
            "{:<24}  {:<17}  {:<8}  {:<9}  {:>5}  {:<8}  {:>4}  {}",
            t.id,
            t.status.as_str(),
            truncate(t.step.as_deref().unwrap_or("-"), 8),
            truncate(t.kind.as_deref().unwrap_or("-"), 9),
            opt(&t.best_score),
            yes_no(t.approved),
            t.revisions,
            truncate(&t.topic, 60)
        )?;
        if let Some(e) = &t.error {
            outln!("    error: {}", truncate(e, 160))?;
        }
    }
    Ok(())
}

fn print_summary(t: &TopicSummary) -> std::io::Result<()> {
    outln!("id:        {}", t.id)?;
    outln!("topic:     {}", t.topic)?;
    outln!("status:    {}", t.status.as_str())?;
    outln!("step:      {}", opt(&t.step))?;
    outln!("kind:      {}", opt(&t.kind))?;
    outln!("score:     {}", opt(&t.best_score))?;
    outln!("approved:  {}", yes_no(t.approved))?;
    outln!("revisions: {}", t.revisions)?;
    if let Some(e) = &t.error {
        outln!("error:     {e}")?;
    }
    Ok(())
}

fn print_result(s: &TopicState) -> std::io::Result<()> {
    outln!("id:       {}", s.id)?;
    outln!("topic:    {}", s.topic)?;
    outln!("status:   {}", s.status.as_str())?;
    outln!("route:    {}", opt(&s.route))?;
    outln!("usage:    {} calls, {} tokens in, {} out", s.usage.llm_calls, s.usage.input_tokens, s.usage.output_tokens)?;
    if let Some(e) = &s.error {
        outln!("error:    {} step, {}: {}", e.step, e.kind.as_str(), e.message)?;
    }
    let (draft, review, source) = match &s.final_draft {
        Some(f) => (&f.draft, Some(&f.review), f.source.clone()),
        None => match s.current() {
            Some((d, r, source)) => (d, r, source),
            None => {
                if !s.status.is_settled() {
                    outln!("(no draft yet; step: {})", opt(&s.step))?;
                }
                return Ok(());
            }
        },
    };
    match review {
        Some(r) => outln!(
            "score:    {} ({}approved by the reviewer), from {source}",
            r.score,
            if r.approved { "" } else { "not " }
        )?,
        None => outln!("from:     {source} (not reviewed yet)")?,
    }
    if s.status == TopicStatus::AwaitingApproval {
        outln!("awaiting: your decision (`scriptorium approve {0}` or `scriptorium reject {0} --note …`)", s.id)?;
    }
    outln!("words:    {}", draft.words)?;
    outln!()?;
    outln!("{}", draft.markdown.trim_end())?;
    Ok(())
}

fn print_health(h: &HealthBody) -> std::io::Result<()> {
    outln!("version:   {} (protocol {})", h.version, h.protocol)?;
    outln!("uptime:    {}s", h.uptime_s)?;
    outln!("provider:  {} ({})", h.provider, h.model)?;
    outln!("in flight: {}, queued: {}", h.in_flight, h.queued)?;
    let counts: Vec<String> = h.counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    outln!("topics:    {}", if counts.is_empty() { "none".to_string() } else { counts.join(", ") })?;
    outln!(
        "limiter:   {} rpm, {} tpm, {} waiting, paused {}ms",
        h.limiter.requests_per_minute,
        h.limiter.tokens_per_minute,
        h.limiter.waiting,
        h.limiter.paused_ms
    )?;
    if let Some(e) = &h.escalated {
        outln!("ESCALATED: {e}")?;
    }
    Ok(())
}
