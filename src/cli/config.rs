//! `scriptorium config init` (writes the documented default config) and
//! `scriptorium config show` (the effective config, each value annotated
//! with where it came from: `default`, the file, or the environment
//! variable that overrode it).
//!
//! Must not: print a secret. The API key never enters `Config`; `show`
//! says only whether it is set, and strips credentials from URLs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use scriptorium::config::{self, Config, DEFAULT_CONFIG_TOML};
use scriptorium::paths::{self, ConfigSource, Layout, PathEnv};

#[derive(clap::Subcommand, Debug)]
pub enum ConfigCommand {
    /// Write the documented default config (to PATH, else --config, else
    /// $XDG_CONFIG_HOME/scriptorium/scriptorium.toml).
    Init {
        path: Option<PathBuf>,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Print the effective config with where each value came from.
    Show,
}

pub fn run(flag: Option<PathBuf>, cmd: ConfigCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ConfigCommand::Init { path, force } => {
            let target = match path.or(flag) {
                Some(p) => p,
                None => paths::user_config_path(&PathEnv::from_process())
                    .context("neither XDG_CONFIG_HOME nor HOME is set: pass a PATH")?,
            };
            init(&target, force)?;
            println!("wrote {}", target.display());
            Ok(ExitCode::SUCCESS)
        }
        ConfigCommand::Show => {
            let mut out = std::io::stdout().lock();
            out.write_all(show(flag.as_deref())?.as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn init(target: &Path, force: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
        paths::create_private_dir(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(0o600);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = match options.open(target) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!("{} exists; pass --force to replace it", target.display())
        }
        Err(e) => return Err(e).with_context(|| format!("cannot write {}", target.display())),
    };
    file.write_all(DEFAULT_CONFIG_TOML.as_bytes()).with_context(|| format!("cannot write {}", target.display()))?;
    Ok(())
}

/// The effective config as TOML, one `# from` comment per value.
fn show(flag: Option<&Path>) -> anyhow::Result<String> {
    let path_env = PathEnv::from_process();
    let source = paths::find_config(flag, &path_env, |p| p.is_file());
    let env: Vec<(String, String)> = std::env::vars().collect();
    let (file, file_label) = match source.path() {
        Some(p) => (config::read_table(p)?, p.display().to_string()),
        None => (toml::Table::new(), String::new()),
    };
    let effective = Config::from_table(file.clone(), &env, source.path().unwrap_or(Path::new("<defaults>")))?;
    let overrides = config::override_keys(&env);
    let origin = |key: &str| -> String {
        if let Some((_, var)) = overrides.iter().find(|(k, _)| k == key) {
            format!("env {var}")
        } else if lookup(&file, key).is_some() {
            format!("file {file_label}")
        } else {
            "default".into()
        }
    };

    let mut out = String::new();
    out.push_str(&format!("# config file: {}\n", source.describe()));
    match Layout::resolve(&effective.daemon, &path_env) {
        Ok(layout) => {
            out.push_str(&format!("# state dir:   {}\n", layout.state_dir.display()));
            out.push_str(&format!("# socket:      {}\n", layout.socket.display()));
        }
        Err(e) => out.push_str(&format!("# state dir:   unresolved: {e}\n")),
    }
    let key_set = std::env::var_os("OPENAI_API_KEY").is_some_and(|k| !k.is_empty());
    out.push_str(&format!("# OPENAI_API_KEY: {}\n", if key_set { "set (redacted)" } else { "not set" }));
    if let Ok(url) = std::env::var("OPENAI_BASE_URL") {
        out.push_str(&format!("# OPENAI_BASE_URL: {} (overrides llm.base_url)\n", redact_url(&url)));
    }
    let otel_env = std::env::var(scriptorium::traces::OTEL_ENDPOINT_ENV).ok();
    match scriptorium::traces::traces_url(&effective.telemetry, otel_env.as_deref()) {
        Some(url) => out.push_str(&format!("# traces: exported to {}\n", redact_url(&url))),
        None => out.push_str("# traces: off\n"),
    }
    if matches!(source, ConfigSource::Defaults) {
        out.push_str("# (no file: every value below is a built-in default or an override)\n");
    }
    let value = toml::Value::try_from(&effective).context("cannot render the config")?;
    if let toml::Value::Table(t) = value {
        render(&t, "", &origin, &mut out);
    }
    Ok(out)
}

fn lookup<'a>(table: &'a toml::Table, dotted: &str) -> Option<&'a toml::Value> {
    let mut parts = dotted.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    Some(value)
}

/// Leaves first, then sub-tables under `[a.b]` headers: valid TOML.
fn render(table: &toml::Table, prefix: &str, origin: &dyn Fn(&str) -> String, out: &mut String) {
    for (key, value) in table {
        if value.is_table() {
            continue;
        }
        let dotted = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        let shown = redact_value(key, value);
        out.push_str(&format!("{} = {}  # {}\n", toml_key(key), shown, origin(&dotted)));
    }
    for (key, value) in table {
        if let toml::Value::Table(sub) = value {
            let dotted = if prefix.is_empty() { toml_key(key) } else { format!("{prefix}.{}", toml_key(key)) };
            if sub.values().any(|v| !v.is_table()) {
                out.push_str(&format!("\n[{dotted}]\n"));
            }
            render(sub, &dotted, origin, out);
        }
    }
}

fn toml_key(key: &str) -> String {
    if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        key.to_string()
    } else {
        toml::Value::String(key.to_string()).to_string()
    }
}

/// Keys that would hold a secret (none do today; a future one is caught
/// here), and credentials inside URL values.
fn redact_value(key: &str, value: &toml::Value) -> String {
    let k = key.to_ascii_lowercase();
    if ["key", "token", "secret", "password"].iter().any(|s| k.contains(s)) && !k.ends_with("_tokens") {
        return "\"<redacted>\"".into();
    }
    match value {
        toml::Value::String(s) if s.contains("://") => toml::Value::String(redact_url(s)).to_string(),
        other => other.to_string(),
    }
}

/// `https://user:pass@host/x` → `https://<redacted>@host/x`.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://<redacted>@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(redact_url("https://u:p@host:1/v1"), "https://<redacted>@host:1/v1");
        assert_eq!(redact_url("http://host/a@b"), "http://host/a@b");
        assert_eq!(redact_value("api_key", &toml::Value::String("sk-1".into())), "\"<redacted>\"");
        assert_eq!(redact_value("max_output_tokens", &toml::Value::Integer(5)), "5");
    }
}
