//! The `scriptorium` command line: `run` (in-process), `daemon`, and the
//! socket client commands. Parsing and printing only; the work is in the
//! library.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use scriptorium::telemetry::LogFormat;

#[derive(Parser, Debug)]
#[command(name = "scriptorium", version, about = "Turns topics into reviewed drafts with LLMs")]
pub struct Cli {
    /// Config file (default: config/scriptorium.toml, or SCRIPTORIUM_CONFIG).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Daemon socket (default: SCRIPTORIUM_DAEMON__SOCKET, else the config's).
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Process topics in-process (no daemon) and print a summary.
    Run(cli::run::RunArgs),
    /// Run the long-lived daemon serving the socket protocol.
    Daemon(cli::daemon::DaemonArgs),
    /// Run benchmark scenarios and print their numbers.
    Bench(cli::bench::BenchArgs),
    /// Run the fake OpenAI server (loopback) for rehearsals and benchmarks.
    FakeOpenai(cli::fake::FakeArgs),
    #[command(flatten)]
    Client(cli::client::ClientCommand),
}

/// `[chaos]` panics are rehearsals, counted in metrics and followed by a
/// logged restart; printing each with a backtrace buried the real output.
/// Every other panic goes to the default hook.
fn quiet_injected_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload.downcast_ref::<String>().map(String::as_str).or(payload.downcast_ref::<&str>().copied());
        if !message.is_some_and(|m| m.starts_with(scriptorium::actors::stage::CHAOS_PANIC)) {
            default(info);
        }
    }));
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    quiet_injected_panics();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => cli::run::run(cli.config, cli.log_format, args).await,
            Command::Daemon(args) => cli::daemon::run(cli.config, cli.socket, cli.log_format, args).await,
            Command::Bench(args) => cli::bench::run(args).await,
            Command::FakeOpenai(args) => cli::fake::run(args).await,
            Command::Client(cmd) => cli::client::run(cli.config, cli.socket, cmd).await,
        }
    });
    // Drivers still parked in the runtime must not delay exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&format!("{e:#}")));
            ExitCode::from(2)
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
