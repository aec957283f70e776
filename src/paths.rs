//! Where things live: the config file lookup and the state and runtime
//! directories, after the XDG base-directory conventions.
//!
//! Owns: the lookup order (documented in README "Where things live") as
//! plain functions over a snapshot of the environment (`PathEnv`), so tests
//! resolve paths without touching the process environment. Must not: create
//! or read anything (callers do, with private modes), or fall back to the
//! working directory for state: a daemon started anywhere writes nothing
//! there.

use std::path::{Path, PathBuf};

use crate::config::DaemonConfig;

/// The application's directory name under each base directory.
pub const APP: &str = "scriptorium";
/// The config file's name in `$XDG_CONFIG_HOME/scriptorium/` and `/etc/scriptorium/`.
pub const CONFIG_FILE: &str = "scriptorium.toml";
/// Relative to the working directory: the repository's own config, so the
/// commands in README work from a checkout.
pub const WORKING_DIR_CONFIG: &str = "config/scriptorium.toml";
/// The system-wide config.
pub const SYSTEM_CONFIG: &str = "/etc/scriptorium/scriptorium.toml";
/// The socket's file name inside its directory.
pub const SOCKET_FILE: &str = "scriptorium.sock";

/// The environment variables path resolution reads, captured once.
#[derive(Debug, Clone, Default)]
pub struct PathEnv {
    pub scriptorium_config: Option<PathBuf>,
    pub xdg_config_home: Option<PathBuf>,
    pub xdg_state_home: Option<PathBuf>,
    pub xdg_runtime_dir: Option<PathBuf>,
    pub home: Option<PathBuf>,
}

impl PathEnv {
    pub fn from_process() -> PathEnv {
        // The XDG spec: an empty or relative value is to be ignored.
        let abs = |name: &str| std::env::var_os(name).map(PathBuf::from).filter(|p| p.is_absolute());
        PathEnv {
            scriptorium_config: std::env::var_os("SCRIPTORIUM_CONFIG").filter(|v| !v.is_empty()).map(PathBuf::from),
            xdg_config_home: abs("XDG_CONFIG_HOME"),
            xdg_state_home: abs("XDG_STATE_HOME"),
            xdg_runtime_dir: abs("XDG_RUNTIME_DIR"),
            home: abs("HOME"),
        }
    }

    /// `$XDG_CONFIG_HOME`, else `~/.config`.
    fn config_home(&self) -> Option<PathBuf> {
        self.xdg_config_home.clone().or_else(|| self.home.as_ref().map(|h| h.join(".config")))
    }
}

/// Where the config came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// `--config PATH`.
    Flag(PathBuf),
    /// `SCRIPTORIUM_CONFIG`.
    EnvVar(PathBuf),
    /// `./config/scriptorium.toml`.
    WorkingDir(PathBuf),
    /// `$XDG_CONFIG_HOME/scriptorium/scriptorium.toml` (or `~/.config/…`).
    User(PathBuf),
    /// `/etc/scriptorium/scriptorium.toml`.
    System(PathBuf),
    /// No file: built-in defaults.
    Defaults,
}

impl ConfigSource {
    pub fn path(&self) -> Option<&Path> {
        match self {
            ConfigSource::Flag(p)
            | ConfigSource::EnvVar(p)
            | ConfigSource::WorkingDir(p)
            | ConfigSource::User(p)
            | ConfigSource::System(p) => Some(p),
            ConfigSource::Defaults => None,
        }
    }

    /// Short description for `config show`.
    pub fn describe(&self) -> String {
        match self {
            ConfigSource::Flag(p) => format!("{} (--config)", p.display()),
            ConfigSource::EnvVar(p) => format!("{} (SCRIPTORIUM_CONFIG)", p.display()),
            ConfigSource::WorkingDir(p) => format!("{} (working directory)", p.display()),
            ConfigSource::User(p) => format!("{} (user config)", p.display()),
            ConfigSource::System(p) => format!("{} (system config)", p.display()),
            ConfigSource::Defaults => "no config file: built-in defaults".into(),
        }
    }
}

/// The user's config file path (`config init` writes here by default).
pub fn user_config_path(env: &PathEnv) -> Option<PathBuf> {
    env.config_home().map(|c| c.join(APP).join(CONFIG_FILE))
}

/// The lookup: `--config`, `SCRIPTORIUM_CONFIG`, `./config/scriptorium.toml`,
/// `$XDG_CONFIG_HOME/scriptorium/scriptorium.toml`,
/// `/etc/scriptorium/scriptorium.toml`, built-in defaults. An explicit path
/// is returned even when missing (reading it then fails loudly); the others
/// are taken only when `exists` says so.
pub fn find_config(flag: Option<&Path>, env: &PathEnv, exists: impl Fn(&Path) -> bool) -> ConfigSource {
    if let Some(p) = flag {
        return ConfigSource::Flag(p.to_path_buf());
    }
    if let Some(p) = &env.scriptorium_config {
        return ConfigSource::EnvVar(p.clone());
    }
    let local = PathBuf::from(WORKING_DIR_CONFIG);
    if exists(&local) {
        return ConfigSource::WorkingDir(local);
    }
    if let Some(user) = user_config_path(env).filter(|p| exists(p)) {
        return ConfigSource::User(user);
    }
    let system = PathBuf::from(SYSTEM_CONFIG);
    if exists(&system) {
        return ConfigSource::System(system);
    }
    ConfigSource::Defaults
}

/// Why no state directory could be chosen.
#[derive(Debug, thiserror::Error)]
#[error(
    "config: `daemon.data_dir`: not set, and neither XDG_STATE_HOME nor HOME is set to an absolute path; set one of them"
)]
pub struct NoStateDir;

/// `$XDG_STATE_HOME/scriptorium`, else `~/.local/state/scriptorium`.
pub fn default_state_dir(env: &PathEnv) -> Result<PathBuf, NoStateDir> {
    env.xdg_state_home
        .clone()
        .or_else(|| env.home.as_ref().map(|h| h.join(".local/state")))
        .map(|base| base.join(APP))
        .ok_or(NoStateDir)
}

/// The daemon's resolved locations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Database, topic files (and the socket when there is no runtime dir).
    pub state_dir: PathBuf,
    pub socket: PathBuf,
}

impl Layout {
    /// `daemon.data_dir` when set, else the XDG state dir. `daemon.socket`
    /// when set; else, with an explicit `data_dir`, `<data_dir>/scriptorium.sock`
    /// (each data dir is its own daemon); else
    /// `$XDG_RUNTIME_DIR/scriptorium/scriptorium.sock`, else the state dir's.
    pub fn resolve(daemon: &DaemonConfig, env: &PathEnv) -> Result<Layout, NoStateDir> {
        let explicit_dir = !daemon.data_dir.as_os_str().is_empty();
        let state_dir = if explicit_dir { daemon.data_dir.clone() } else { default_state_dir(env)? };
        let socket = if !daemon.socket.as_os_str().is_empty() {
            daemon.socket.clone()
        } else if explicit_dir {
            state_dir.join(SOCKET_FILE)
        } else if let Some(run) = &env.xdg_runtime_dir {
            run.join(APP).join(SOCKET_FILE)
        } else {
            state_dir.join(SOCKET_FILE)
        };
        Ok(Layout { state_dir, socket })
    }

    pub fn database(&self) -> PathBuf {
        self.state_dir.join("scriptorium.db")
    }

    pub fn topics_dir(&self) -> PathBuf {
        self.state_dir.join("topics")
    }
}

/// Creates `dir` and its missing parents with mode 0700 (existing ones are
/// left as they are: the operator's choice).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> PathEnv {
        PathEnv { home: Some("/home/u".into()), ..PathEnv::default() }
    }

    #[test]
    fn config_lookup_order() {
        let all = |_: &Path| true;
        let none = |_: &Path| false;
        let e = PathEnv { scriptorium_config: Some("/x.toml".into()), ..env() };
        assert_eq!(find_config(Some(Path::new("/f.toml")), &e, none), ConfigSource::Flag("/f.toml".into()));
        assert_eq!(find_config(None, &e, none), ConfigSource::EnvVar("/x.toml".into()));
        assert_eq!(find_config(None, &env(), all), ConfigSource::WorkingDir(WORKING_DIR_CONFIG.into()));
        let user = |p: &Path| p.starts_with("/home");
        assert_eq!(
            find_config(None, &env(), user),
            ConfigSource::User("/home/u/.config/scriptorium/scriptorium.toml".into())
        );
        let e = PathEnv { xdg_config_home: Some("/cfg".into()), ..env() };
        assert_eq!(
            find_config(None, &e, |p| p.starts_with("/cfg")),
            ConfigSource::User("/cfg/scriptorium/scriptorium.toml".into())
        );
        assert_eq!(find_config(None, &env(), |p| p.starts_with("/etc")), ConfigSource::System(SYSTEM_CONFIG.into()));
        assert_eq!(find_config(None, &env(), none), ConfigSource::Defaults);
    }

    #[test]
    fn state_and_socket_follow_xdg() {
        let d = DaemonConfig::default();
        let l = Layout::resolve(&d, &env()).unwrap();
        assert_eq!(l.state_dir, PathBuf::from("/home/u/.local/state/scriptorium"));
        assert_eq!(l.socket, PathBuf::from("/home/u/.local/state/scriptorium/scriptorium.sock"));
        let e = PathEnv { xdg_state_home: Some("/s".into()), xdg_runtime_dir: Some("/run/user/1".into()), ..env() };
        let l = Layout::resolve(&d, &e).unwrap();
        assert_eq!(l.state_dir, PathBuf::from("/s/scriptorium"));
        assert_eq!(l.socket, PathBuf::from("/run/user/1/scriptorium/scriptorium.sock"));
        assert_eq!(l.database(), PathBuf::from("/s/scriptorium/scriptorium.db"));
        // An explicit data dir keeps its own socket.
        let d2 = DaemonConfig { data_dir: "/data".into(), ..DaemonConfig::default() };
        assert_eq!(Layout::resolve(&d2, &e).unwrap().socket, PathBuf::from("/data/scriptorium.sock"));
        let d3 = DaemonConfig { socket: "/tmp/s.sock".into(), ..DaemonConfig::default() };
        assert_eq!(Layout::resolve(&d3, &e).unwrap().socket, PathBuf::from("/tmp/s.sock"));
        assert!(Layout::resolve(&d, &PathEnv::default()).is_err());
    }
}
