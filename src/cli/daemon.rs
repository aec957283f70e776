//! `scriptorium daemon` (being written).
use std::path::PathBuf;
use std::process::ExitCode;

use scriptorium::telemetry::LogFormat;

#[derive(clap::Args, Debug)]
pub struct DaemonArgs {}

pub async fn run(
    _config: Option<PathBuf>,
    _socket: Option<PathBuf>,
    _log: LogFormat,
    _args: DaemonArgs,
) -> anyhow::Result<ExitCode> {
    anyhow::bail!("the daemon is not implemented yet")
}
