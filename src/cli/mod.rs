//! Command implementations for the binary.

pub mod bench;
pub mod client;
pub mod config;
pub mod daemon;
pub mod fake;
pub mod run;
pub mod sd_notify;

/// A command line that clap accepted but that cannot run (no topics
/// given): exit code 2, like clap's own usage errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Loads the config the documented way (`paths::find_config`) and says
/// where it came from.
pub fn load_config(
    flag: Option<&std::path::Path>,
) -> Result<(scriptorium::config::Config, scriptorium::paths::ConfigSource), scriptorium::config::ConfigError> {
    use scriptorium::paths::{find_config, PathEnv};
    let source = find_config(flag, &PathEnv::from_process(), |p| p.is_file());
    let config = scriptorium::config::Config::load(source.path())?;
    Ok((config, source))
}
