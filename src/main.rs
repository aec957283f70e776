//! The `scriptorium` command line: `run` (in-process), `daemon`, the
//! socket client commands, `config`, `completions` and `man`. Parsing and
//! printing only; the work is in the library.
//!
//! Exit codes (README "Exit codes"): 0 success; 1 a topic failed or the
//! daemon answered an error; 2 usage (clap's, or no topics); 3 config
//! (bad file, key or value; no state directory); 4 runtime (I/O, store,
//! engine, supervision); 5 cannot connect to the daemon.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use scriptorium::telemetry::LogFormat;

/// Exit codes: see the module doc.
pub mod exit {
    pub const USAGE: u8 = 2;
    pub const CONFIG: u8 = 3;
    pub const RUNTIME: u8 = 4;
    pub const CONNECT: u8 = 5;
}

#[derive(Parser, Debug)]
#[command(name = "scriptorium", version, about = "Turns topics into reviewed drafts with LLMs")]
pub struct Cli {
    /// Config file (else SCRIPTORIUM_CONFIG, ./config/scriptorium.toml,
    /// $XDG_CONFIG_HOME/scriptorium/scriptorium.toml,
    /// /etc/scriptorium/scriptorium.toml, built-in defaults).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Daemon socket (else SCRIPTORIUM_DAEMON__SOCKET, else from the config:
    /// $XDG_RUNTIME_DIR/scriptorium/scriptorium.sock by default).
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
    /// Write the default config, or show the effective one.
    #[command(subcommand)]
    Config(cli::config::ConfigCommand),
    /// Print a shell completion script (e.g. `scriptorium completions bash
    /// > /usr/share/bash-completion/completions/scriptorium`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) generated from these definitions.
    Man,
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
    match cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "scriptorium", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Man => {
            return match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: cannot write the man page: {e}");
                    ExitCode::from(exit::RUNTIME)
                }
            };
        }
        _ => {}
    }
    quiet_injected_panics();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::RUNTIME);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => cli::run::run(cli.config, cli.log_format, args).await,
            Command::Daemon(args) => cli::daemon::run(cli.config, cli.socket, cli.log_format, args).await,
            Command::Bench(args) => cli::bench::run(args).await,
            Command::FakeOpenai(args) => cli::fake::run(args).await,
            Command::Config(cmd) => cli::config::run(cli.config, cmd),
            Command::Client(cmd) => cli::client::run(cli.config, cli.socket, cmd).await,
            Command::Completions { .. } | Command::Man => Ok(ExitCode::SUCCESS),
        }
    });
    // Drivers still parked in the runtime must not delay exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    // Outside the runtime: the exporter thread sends what is queued.
    scriptorium::traces::shutdown();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&format!("{e:#}")));
            ExitCode::from(exit_code_for(&e))
        }
    }
}

/// The documented exit code for an error, by the typed error in its chain.
fn exit_code_for(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if cause.is::<scriptorium::config::ConfigError>() || cause.is::<scriptorium::paths::NoStateDir>() {
            return exit::CONFIG;
        }
        if cause.is::<cli::client::ConnectError>() {
            return exit::CONNECT;
        }
        if cause.is::<cli::UsageError>() {
            return exit::USAGE;
        }
    }
    exit::RUNTIME
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
