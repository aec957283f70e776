//! `scriptorium fake-openai`: runs the fake OpenAI server (`fake_openai`)
//! standalone on loopback, for rehearsing rate limits and faults against a
//! daemon (`OPENAI_BASE_URL=http://127.0.0.1:PORT/v1`). Prints one line when
//! ready and the counters as JSON on SIGINT/SIGTERM (and every
//! `--stats-every-s`, when set). Parsing and printing only.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use scriptorium::fake_openai::{self, FakeConfig, FaultRates};
use tokio::signal::unix::{signal, SignalKind};

#[derive(clap::Args, Debug)]
pub struct FakeArgs {
    /// Port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 8089)]
    pub port: u16,
    /// Requests per minute the server enforces (0 = no limit).
    #[arg(long, default_value_t = 0)]
    pub rpm: u32,
    /// Tokens per minute the server enforces (0 = no limit); a request costs
    /// prompt characters / 4 + its max output tokens.
    #[arg(long, default_value_t = 0)]
    pub tpm: u32,
    /// Latency of every answer.
    #[arg(long, default_value_t = 150)]
    pub latency_ms: u64,
    /// Latency is uniform in latency ± jitter.
    #[arg(long, default_value_t = 50)]
    pub jitter_ms: u64,
    /// Share of requests answered 500.
    #[arg(long, default_value_t = 0.0)]
    pub rate_500: f64,
    /// Share of requests answered 503.
    #[arg(long, default_value_t = 0.0)]
    pub rate_503: f64,
    /// Share of requests answered 429 (besides the real limits).
    #[arg(long, default_value_t = 0.0)]
    pub rate_429: f64,
    /// Share of 200s whose body is not valid JSON.
    #[arg(long, default_value_t = 0.0)]
    pub rate_malformed: f64,
    /// Share of 200s whose output misses the schema / the draft rules.
    #[arg(long, default_value_t = 0.0)]
    pub rate_wrong_schema: f64,
    /// Share of requests never answered.
    #[arg(long, default_value_t = 0.0)]
    pub rate_hang: f64,
    /// Share of requests whose connection is reset.
    #[arg(long, default_value_t = 0.0)]
    pub rate_reset: f64,
    /// `retry-after-ms` on injected 429s.
    #[arg(long, default_value_t = 100)]
    pub retry_after_ms: u64,
    /// How long a hung request holds its connection before it is dropped.
    #[arg(long, default_value_t = 300.0)]
    pub hang_s: f64,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Also print the counters every N seconds (0 = only at exit).
    #[arg(long, default_value_t = 0)]
    pub stats_every_s: u64,
}

pub async fn run(args: FakeArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.hang_s.is_finite() && args.hang_s > 0.0, "--hang-s must be a positive number");
    let config = FakeConfig {
        port: args.port,
        latency: Duration::from_millis(args.latency_ms),
        jitter: Duration::from_millis(args.jitter_ms),
        requests_per_minute: args.rpm,
        tokens_per_minute: args.tpm,
        faults: FaultRates {
            server_error: args.rate_500,
            unavailable: args.rate_503,
            rate_limit: args.rate_429,
            malformed: args.rate_malformed,
            wrong_schema: args.rate_wrong_schema,
            hang: args.rate_hang,
            reset: args.rate_reset,
        },
        injected_retry_after: Duration::from_millis(args.retry_after_ms),
        hang_for: Duration::from_secs_f64(args.hang_s),
        seed: args.seed,
    };
    let server = fake_openai::start(config).await.context("cannot start the fake OpenAI server")?;
    println!(
        "fake-openai listening on {} (set OPENAI_BASE_URL to it); rpm={} tpm={} latency={}±{}ms",
        server.base_url(),
        args.rpm,
        args.tpm,
        args.latency_ms,
        args.jitter_ms
    );
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let every = (args.stats_every_s > 0).then(|| Duration::from_secs(args.stats_every_s));
    loop {
        let tick = async {
            match every {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick => println!("{}", serde_json::to_string(&server.stats().snapshot())?),
        }
    }
    println!("{}", serde_json::to_string(&server.stats().snapshot())?);
    server.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
