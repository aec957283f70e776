//! Socket client commands (being written).
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Subcommand, Debug)]
pub enum ClientCommand {
    /// Ask a running daemon for its health.
    Health,
}

pub async fn run(_config: Option<PathBuf>, _socket: Option<PathBuf>, _cmd: ClientCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("the socket client is not implemented yet")
}
