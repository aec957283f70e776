//! Operations, through the real binary: XDG paths with a clean working
//! directory, systemd readiness over a real `NOTIFY_SOCKET` datagram
//! socket, `systemd-analyze verify` on the shipped unit, exit codes,
//! `config init`/`show`, shell completions sourced by a real bash, the man
//! page rendered by groff, `process_*` metrics in a scrape, and traces
//! received by an OTLP/HTTP (JSON) server in this test from both
//! `scriptorium run` and the daemon.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_scriptorium");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A command with an empty environment except PATH: what the test sets is
/// all the binary sees.
fn bare(cwd: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default()).current_dir(cwd);
    // Daemons run in parallel here: each console on a port of its own.
    c.env("SCRIPTORIUM_DAEMON__WEB_ADDR", "127.0.0.1:0");
    c
}

fn output(mut c: Command) -> Output {
    c.stdin(Stdio::null()).output().expect("run scriptorium")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o777
}

/// The XDG layout of one test: base dirs, a HOME, and an empty working dir.
struct Xdg {
    _root: tempfile::TempDir,
    state: PathBuf,
    runtime: PathBuf,
    config: PathBuf,
    home: PathBuf,
    cwd: PathBuf,
}

impl Xdg {
    fn new() -> Xdg {
        let root = tempfile::tempdir().unwrap();
        let make = |name: &str| {
            let p = root.path().join(name);
            std::fs::create_dir(&p).unwrap();
            p
        };
        let (state, runtime, config, home, cwd) =
            (make("state"), make("run"), make("config"), make("home"), make("cwd"));
        std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
        Xdg { state, runtime, config, home, cwd, _root: root }
    }

    fn command(&self) -> Command {
        let mut c = bare(&self.cwd);
        c.env("XDG_STATE_HOME", &self.state)
            .env("XDG_RUNTIME_DIR", &self.runtime)
            .env("XDG_CONFIG_HOME", &self.config)
            .env("HOME", &self.home);
        c
    }

    fn socket(&self) -> PathBuf {
        self.runtime.join("scriptorium/scriptorium.sock")
    }

    fn cwd_entries(&self) -> Vec<String> {
        std::fs::read_dir(&self.cwd).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
    }
}

/// A `NOTIFY_SOCKET` like systemd's: a datagram socket we read from.
struct Notify {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Notify {
    fn new() -> Notify {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        Notify { socket, path, _dir: dir }
    }

    /// The next datagram, or panic after `within`.
    fn next(&self, within: Duration) -> String {
        self.socket.set_read_timeout(Some(within)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).unwrap_or_else(|e| panic!("no notification within {within:?}: {e}"));
        text(&buf[..n])
    }
}

struct Daemon {
    child: std::process::Child,
    stderr: PathBuf,
}

impl Daemon {
    fn spawn(mut c: Command, args: &[&str], stderr: PathBuf) -> Daemon {
        let log = std::fs::File::create(&stderr).unwrap();
        let child = c.arg("daemon").args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        Daemon { child, stderr }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "daemon did not stop:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- an OTLP/HTTP JSON receiver ---------------------------------------------

#[derive(Clone, Default)]
struct Received {
    requests: Arc<Mutex<Vec<(String, String, Value)>>>,
}

/// A span flattened from an export request.
#[derive(Debug, Clone)]
struct SpanView {
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attrs: BTreeMap<String, Value>,
    service: String,
}

impl SpanView {
    fn str(&self, key: &str) -> Option<&str> {
        self.attrs.get(key)?.get("stringValue")?.as_str()
    }
    fn int(&self, key: &str) -> Option<i64> {
        let v = self.attrs.get(key)?.get("intValue")?;
        v.as_i64().or_else(|| v.as_str()?.parse().ok())
    }
}

impl Received {
    fn spans(&self) -> Vec<SpanView> {
        let mut out = Vec::new();
        for (_, _, body) in self.requests.lock().unwrap().iter() {
            for rs in body["resourceSpans"].as_array().into_iter().flatten() {
                let service = rs["resource"]["attributes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|a| a["key"] == "service.name")
                    .and_then(|a| a["value"]["stringValue"].as_str())
                    .unwrap_or("")
                    .to_string();
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    for s in ss["spans"].as_array().into_iter().flatten() {
                        let attrs = s["attributes"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|a| (a["key"].as_str().unwrap_or("").to_string(), a["value"].clone()))
                            .collect();
                        let id = |k: &str| s[k].as_str().unwrap_or("").to_string();
                        out.push(SpanView {
                            name: id("name"),
                            trace_id: id("traceId"),
                            span_id: id("spanId"),
                            parent: id("parentSpanId"),
                            attrs,
                            service: service.clone(),
                        });
                    }
                }
            }
        }
        out
    }

    fn raw(&self) -> String {
        self.requests.lock().unwrap().iter().map(|(_, _, b)| b.to_string()).collect::<Vec<_>>().join("\n")
    }
}

/// Serves POST /v1/traces on a free port: each body decoded as JSON and
/// kept with its path and content type; answers `{}` like a collector.
async fn otlp_receiver() -> (SocketAddr, Received) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Received::default();
    let store = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let store = store.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let store = store.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let ctype =
                            req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        store.requests.lock().unwrap().push((path, ctype, value));
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .header("content-type", "application/json")
                                .body(http_body_util::Full::new(hyper::body::Bytes::from_static(b"{}")))
                                .unwrap(),
                        )
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    (addr, received)
}

/// Checks the span tree of one run: every model call is a `chat <model>`
/// span under an `attempt` span under a `step` span, with the GenAI
/// attributes; topics have their own span.
fn check_spans(spans: &[SpanView], topic_text: &str, raw: &str, capture: bool) {
    let by_id: BTreeMap<&str, &SpanView> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let named = |n: &str| spans.iter().filter(|s| s.name == n).count();
    assert!(named("topic") >= 1, "no topic span: {:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>());
    let steps: std::collections::BTreeSet<&str> =
        spans.iter().filter(|s| s.name == "step").filter_map(|s| s.str("step")).collect();
    for step in ["plan", "write", "review"] {
        assert!(steps.contains(step), "no {step} step span: {steps:?}");
    }
    let chats: Vec<&SpanView> = spans.iter().filter(|s| s.str("gen_ai.operation.name") == Some("chat")).collect();
    assert!(!chats.is_empty(), "no model-call spans");
    for c in &chats {
        assert_eq!(c.name, "chat simulated", "span name is `{{operation}} {{model}}`");
        assert_eq!(c.str("gen_ai.provider.name"), Some("simulated"));
        assert_eq!(c.str("gen_ai.request.model"), Some("simulated"));
        assert!(c.int("gen_ai.request.max_tokens").is_some_and(|n| n > 0), "{c:?}");
        assert!(c.int("gen_ai.usage.input_tokens").is_some_and(|n| n > 0), "{c:?}");
        assert!(c.int("gen_ai.usage.output_tokens").is_some_and(|n| n > 0), "{c:?}");
        let reasons = &c.attrs["gen_ai.response.finish_reasons"]["arrayValue"]["values"];
        assert_eq!(reasons[0]["stringValue"], "stop", "{c:?}");
        assert_eq!(c.service, "scriptorium");
        let attempt = by_id.get(c.parent.as_str()).unwrap_or_else(|| panic!("chat span without parent: {c:?}"));
        assert_eq!(attempt.name, "attempt");
        assert_eq!(attempt.trace_id, c.trace_id);
        let step = by_id.get(attempt.parent.as_str()).expect("attempt under a step");
        assert_eq!(step.name, "step");
        assert!(step.str("step").is_some() && step.str("topic_id").is_some(), "{step:?}");
        assert_eq!(c.attrs.contains_key("gen_ai.input.messages"), capture, "{c:?}");
        assert_eq!(c.attrs.contains_key("gen_ai.output.messages"), capture, "{c:?}");
    }
    assert_eq!(raw.contains(topic_text), capture, "topic text exported only with capture_content");
}

/// Waits until a finished topic's spans (the topic span ends last) arrived.
fn wait_for_topic(received: &Received, within: Duration) {
    let deadline = Instant::now() + within;
    while !received.spans().iter().any(|s| s.name == "topic") {
        assert!(Instant::now() < deadline, "no topic span; {} spans received", received.spans().len());
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---- the tests ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_with_only_xdg_variables_notifies_systemd_and_leaves_the_working_directory_alone() {
    let xdg = Xdg::new();
    let notify = Notify::new();
    let metrics_port = free_port();
    let mut c = xdg.command();
    c.env("NOTIFY_SOCKET", &notify.path);
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut daemon = Daemon::spawn(c, &["--metrics-addr", &metrics_addr], xdg.home.join("daemon.log"));

    // READY=1 only once the socket accepts: connect right after it.
    let ready = tokio::task::spawn_blocking({
        let socket = notify.socket.try_clone().unwrap();
        move || {
            socket.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut buf = [0u8; 4096];
            let n = socket.recv(&mut buf).expect("READY=1 within 60 s");
            text(&buf[..n])
        }
    })
    .await
    .unwrap();
    assert_eq!(ready, "READY=1", "{}", daemon.log());
    UnixStream::connect(xdg.socket())
        .unwrap_or_else(|e| panic!("socket not accepting at READY: {e}\n{}", daemon.log()));

    // Where things are, and their modes.
    let state = xdg.state.join("scriptorium");
    assert!(state.join("scriptorium.db").is_file(), "database in $XDG_STATE_HOME/scriptorium");
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&xdg.runtime.join("scriptorium")), 0o700);
    assert_eq!(mode(&xdg.socket()), 0o600);

    // A client with the same environment, from another directory, finds it.
    let mut submit = xdg.command();
    submit.current_dir(&xdg.home).args([
        "submit",
        "--wait",
        "--kind",
        "brief",
        "--variants",
        "1",
        "How do tides work?",
    ]);
    let out = output(submit);
    assert!(out.status.success(), "submit: {}\n{}\n{}", text(&out.stdout), text(&out.stderr), daemon.log());
    let mut health = xdg.command();
    health.args(["health", "--json"]);
    let out = output(health);
    assert!(out.status.success(), "health: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("\"ok\":true"));
    assert!(std::fs::read_dir(state.join("topics")).unwrap().count() >= 1, "topic files in the state dir");

    // process_* metrics in a scrape of the daemon.
    let body = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics")).await.unwrap().text().await.unwrap();
    for family in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(body.contains(&format!("# TYPE {family} ")), "no {family} in the scrape");
    }
    let rss: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .expect("an RSS sample");
    assert!(rss > 1e6, "RSS {rss}");

    // SIGTERM: STOPPING=1, clean exit, socket gone.
    let status = daemon.terminate();
    assert_eq!(notify.next(Duration::from_secs(5)), "STOPPING=1");
    assert!(status.success(), "exit {status:?}\n{}", daemon.log());
    assert!(!xdg.socket().exists(), "socket removed");
    assert_eq!(xdg.cwd_entries(), Vec::<String>::new(), "nothing created in the working directory");
    let log = daemon.log();
    assert!(log.contains("scriptorium daemon ready"), "{log}");
    assert!(!log.contains('\x1b'), "colour codes in a log that is not a terminal:\n{log}");
}

#[test]
fn exit_codes_are_distinct_and_documented() {
    let xdg = Xdg::new();
    let quick = |c: &mut Command| {
        c.env("SCRIPTORIUM_LLM__SIMULATED__LATENCY_MS", "0").env("SCRIPTORIUM_LLM__SIMULATED__JITTER_MS", "0");
    };
    let code = |mut c: Command| {
        c.stdout(Stdio::null());
        let out = output(c);
        (out.status.code(), text(&out.stderr))
    };

    let mut c = xdg.command();
    quick(&mut c);
    c.args(["run", "--kind", "brief", "--variants", "1", "A topic that completes"]);
    assert_eq!(code(c).0, Some(0));

    let mut c = xdg.command();
    quick(&mut c);
    c.env("SCRIPTORIUM_LLM__SIMULATED__ERROR_RATE", "1").env("SCRIPTORIUM_RETRY__MAX_ATTEMPTS", "1");
    c.args(["run", "--kind", "brief", "A topic that fails"]);
    assert_eq!(code(c).0, Some(1), "a failed topic");

    let mut c = xdg.command();
    c.arg("--no-such-flag");
    assert_eq!(code(c).0, Some(2), "clap usage error");
    let mut c = xdg.command();
    c.arg("run"); // stdin is empty: no topics
    let (rc, err) = code(c);
    assert_eq!(rc, Some(2), "no topics is a usage error: {err}");

    let mut c = xdg.command();
    c.args(["--config", "/nonexistent/scriptorium.toml", "run", "x"]);
    let (rc, err) = code(c);
    assert_eq!(rc, Some(3), "{err}");
    assert!(err.starts_with("error: config:") && err.lines().count() == 1, "{err}");
    let mut c = xdg.command();
    c.env("SCRIPTORIUM_WORKFLOW__VARIANTS", "0").args(["run", "x"]);
    let (rc, err) = code(c);
    assert_eq!(rc, Some(3), "{err}");
    assert!(err.contains("workflow.variants"), "{err}");
    let mut c = bare(&xdg.cwd); // no HOME, no XDG: no state directory
    c.arg("daemon");
    let (rc, err) = code(c);
    assert_eq!(rc, Some(3), "{err}");
    assert!(err.contains("XDG_STATE_HOME"), "{err}");

    let file = xdg.home.join("a-file");
    std::fs::write(&file, "").unwrap();
    let mut c = xdg.command();
    c.env("SCRIPTORIUM_DAEMON__DATA_DIR", file.join("sub")).args(["daemon", "--metrics-addr", ""]);
    let (rc, err) = code(c);
    assert_eq!(rc, Some(4), "runtime error: {err}");

    let mut c = xdg.command();
    c.arg("health");
    let (rc, err) = code(c);
    assert_eq!(rc, Some(5), "no daemon: {err}");
    assert!(err.contains(&xdg.socket().display().to_string()), "names the socket it tried: {err}");
    assert_eq!(xdg.cwd_entries(), Vec::<String>::new());
}

#[test]
fn config_init_writes_the_documented_defaults_and_show_says_where_values_come_from() {
    let xdg = Xdg::new();
    let mut c = xdg.command();
    c.args(["config", "init"]);
    let out = output(c);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let path = xdg.config.join("scriptorium/scriptorium.toml");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        std::fs::read_to_string(repo_path("config/scriptorium.toml")).unwrap()
    );
    assert_eq!(mode(&path), 0o600);
    let mut again = xdg.command();
    again.args(["config", "init"]);
    let out = output(again);
    assert!(!out.status.success() && text(&out.stderr).contains("--force"), "no silent overwrite");

    let mut c = xdg.command();
    c.env("SCRIPTORIUM_LLM__MODEL", "my-model")
        .env("OPENAI_API_KEY", "sk-test-do-not-print")
        .env("OPENAI_BASE_URL", "http://user:hunter2@127.0.0.1:9/v1")
        .args(["config", "show"]);
    let out = output(c);
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(shown.contains(&format!("# config file: {} (user config)", path.display())), "{shown}");
    assert!(shown.contains("model = \"my-model\"  # env SCRIPTORIUM_LLM__MODEL"), "{shown}");
    assert!(shown.contains(&format!("provider = \"auto\"  # file {}", path.display())), "{shown}");
    assert!(shown.contains(&format!("# socket:      {}", xdg.socket().display())), "{shown}");
    assert!(shown.contains("OPENAI_API_KEY: set (redacted)"), "{shown}");
    assert!(!shown.contains("sk-test-do-not-print") && !shown.contains("hunter2"), "a secret leaked:\n{shown}");
    // It is TOML, and it is the effective config.
    let table: toml::Table = shown.parse().unwrap_or_else(|e| panic!("not TOML: {e}\n{shown}"));
    assert_eq!(table["llm"]["model"].as_str(), Some("my-model"));
    assert_eq!(table["workflow"]["variants"].as_integer(), Some(3));

    // Without a file, everything is a default.
    std::fs::remove_file(&path).unwrap();
    let mut c = xdg.command();
    c.args(["config", "show"]);
    let shown = text(&output(c).stdout);
    assert!(shown.contains("# config file: no config file: built-in defaults"), "{shown}");
    assert!(shown.contains("variants = 3  # default"), "{shown}");
    assert_eq!(xdg.cwd_entries(), Vec::<String>::new());
}

#[test]
fn completions_load_in_bash_and_the_man_page_renders() {
    let xdg = Xdg::new();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let mut c = xdg.command();
        c.args(["completions", shell]);
        let out = output(c);
        assert!(out.status.success(), "{shell}");
        let script = text(&out.stdout);
        for word in ["daemon", "submit", "completions"] {
            assert!(script.contains(word), "{shell}: no `{word}`");
        }
    }
    let mut c = xdg.command();
    c.args(["completions", "bash"]);
    let script = xdg.home.join("scriptorium.bash");
    std::fs::write(&script, output(c).stdout).unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(". {} && complete -p scriptorium", script.display()))
        .output()
        .expect("bash");
    assert!(out.status.success(), "bash could not load the completions: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("scriptorium"), "{}", text(&out.stdout));

    let mut c = xdg.command();
    c.arg("man");
    let out = output(c);
    assert!(out.status.success());
    let roff = text(&out.stdout);
    assert!(roff.contains(".TH scriptorium 1"), "{}", &roff[..roff.len().min(300)]);
    if Command::new("groff").arg("--version").output().is_err() {
        eprintln!("SKIPPED: rendering the man page: groff is not installed");
        return;
    }
    let mut groff = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    groff.stdin.take().unwrap().write_all(roff.as_bytes()).unwrap();
    let out = groff.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).trim().is_empty(), "groff warnings: {}", text(&out.stderr));
    let page = text(&out.stdout);
    assert!(page.contains("daemon") && page.contains("completions"), "{page}");
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(repo_path("dist/scriptorium.service")).unwrap();
    for line in [
        "Type=notify",
        "ProtectSystem=strict",
        "StateDirectory=scriptorium",
        "RuntimeDirectory=scriptorium",
        "NoNewPrivileges=yes",
        "ExecStart=/usr/local/bin/scriptorium daemon",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks `{line}`");
    }
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("SKIPPED: systemd-analyze is not installed (.ci/run installs Debian's systemd)");
        return;
    }
    // The unit as installed, pointing at this build; the man page it
    // documents is the one `scriptorium man` generates.
    let dir = tempfile::tempdir().unwrap();
    let man1 = dir.path().join("man/man1");
    std::fs::create_dir_all(&man1).unwrap();
    let roff = Command::new(BIN).arg("man").output().unwrap().stdout;
    std::fs::write(man1.join("scriptorium.1"), roff).unwrap();
    let path = dir.path().join("scriptorium.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/scriptorium", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .env("MANPATH", dir.path().join("man"))
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    if !out.status.success() && stderr.contains("Failed to") && stderr.contains("bus") {
        eprintln!("SKIPPED: systemd-analyze cannot run here: {stderr}");
        return;
    }
    assert!(out.status.success(), "systemd-analyze verify failed:\n{stdout}{stderr}");
    // verify exits 0 on unknown or misspelt settings too: any output is a finding.
    assert!(stdout.trim().is_empty() && stderr.trim().is_empty(), "systemd-analyze verify:\n{stdout}{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_reach_an_otlp_receiver_from_run_and_from_the_daemon() {
    let (addr, received) = otlp_receiver().await;
    let xdg = Xdg::new();
    let endpoint = format!("http://{addr}");
    let quick = |c: &mut Command| {
        c.env("SCRIPTORIUM_LLM__SIMULATED__LATENCY_MS", "1").env("SCRIPTORIUM_LLM__SIMULATED__JITTER_MS", "0");
    };

    // `run`, traces off: nothing is sent.
    let mut c = xdg.command();
    quick(&mut c);
    c.args(["run", "--kind", "brief", "--variants", "1", "Traces are off by default"]);
    let out = tokio::task::spawn_blocking(move || output(c)).await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(received.requests.lock().unwrap().is_empty(), "spans sent without an endpoint");

    // `run` with the standard variable; content not captured.
    let topic = "How do lighthouses keep their light steady?";
    let mut c = xdg.command();
    quick(&mut c);
    c.env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint).args(["run", "--kind", "brief", "--variants", "2", topic]);
    let out = tokio::task::spawn_blocking(move || output(c)).await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Flushed at exit: everything is there once the process is gone.
    let spans = received.spans();
    {
        let requests = received.requests.lock().unwrap();
        assert!(!requests.is_empty(), "no export request");
        for (path, ctype, body) in requests.iter() {
            assert_eq!(path, "/v1/traces");
            assert!(ctype.starts_with("application/json"), "{ctype}");
            assert!(body.is_object(), "body is not JSON");
        }
    }
    check_spans(&spans, topic, &received.raw(), false);
    println!("run: {} spans in {} requests", spans.len(), received.requests.lock().unwrap().len());

    // The daemon, configured by SCRIPTORIUM_TELEMETRY__*, with content
    // capture on: the prompt (holding the topic) is on the model-call spans.
    received.requests.lock().unwrap().clear();
    let notify = Notify::new();
    let mut c = xdg.command();
    quick(&mut c);
    c.env("SCRIPTORIUM_TELEMETRY__OTLP_ENDPOINT", &endpoint)
        .env("SCRIPTORIUM_TELEMETRY__CAPTURE_CONTENT", "true")
        .env("SCRIPTORIUM_TELEMETRY__SERVICE_NAME", "scriptorium")
        .env("NOTIFY_SOCKET", &notify.path);
    let mut daemon = Daemon::spawn(c, &["--metrics-addr", ""], xdg.home.join("daemon.log"));
    let notified = tokio::task::spawn_blocking(move || (notify.next(Duration::from_secs(60)), notify)).await.unwrap();
    assert_eq!(notified.0, "READY=1", "{}", daemon.log());
    let topic = "Why do cats purr?";
    let mut c = xdg.command();
    c.args(["submit", "--wait", "--kind", "brief", "--variants", "1", topic]);
    let out = tokio::task::spawn_blocking(move || output(c)).await.unwrap();
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    // Exported while running (batches leave within a second), not only at exit.
    wait_for_topic(&received, Duration::from_secs(10));
    let status = daemon.terminate();
    assert!(status.success(), "{}", daemon.log());
    let spans = received.spans();
    check_spans(&spans, topic, &received.raw(), true);
    println!("daemon: {} spans", spans.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_receiver_never_slows_or_fails_a_topic() {
    // A port nobody listens on: every export fails, topics do not care.
    let xdg = Xdg::new();
    let mut c = xdg.command();
    c.env("SCRIPTORIUM_LLM__SIMULATED__LATENCY_MS", "0")
        .env("SCRIPTORIUM_TELEMETRY__OTLP_ENDPOINT", format!("http://127.0.0.1:{}", free_port()))
        .env("SCRIPTORIUM_TELEMETRY__EXPORT_TIMEOUT_S", "1")
        .env("SCRIPTORIUM_TELEMETRY__MAX_QUEUED_SPANS", "4")
        .args(["run", "--kind", "brief", "--variants", "3", "One", "Two", "Three"]);
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || output(c)).await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let took = started.elapsed();
    println!("3 topics with a dead trace receiver: {took:?}");
    // The flush at exit is bounded (5 s); the run itself is not held up.
    assert!(took < Duration::from_secs(20), "{took:?}");
}

#[test]
fn logs_are_coloured_on_a_terminal_only_without_no_color() {
    // `script` (util-linux) runs the command on a pseudo-terminal.
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("SKIPPED: `script` is not installed, no pseudo-terminal to test colour on");
        return;
    }
    let xdg = Xdg::new();
    let run = |no_color: &str| {
        let cmd = format!(
            "env RUST_LOG=info NO_COLOR={no_color} SCRIPTORIUM_LLM__SIMULATED__LATENCY_MS=0 {BIN} run --kind brief --variants 1 'A topic'"
        );
        let mut c = xdg.command();
        c.env("PATH", std::env::var_os("PATH").unwrap_or_default());
        let mut script = Command::new("script");
        script
            .args(["-qec", &cmd, "/dev/null"])
            .current_dir(&xdg.cwd)
            .envs(c.get_envs().filter_map(|(k, v)| Some((k, v?))));
        text(&output(script).stdout)
    };
    // The green INFO level and the dim timestamp are colour; the progress
    // line's erase-line (ESC [2K) is not.
    let coloured = run("");
    assert!(coloured.contains("\x1b[32m INFO"), "no colour on a terminal: {coloured:?}");
    let plain = run("1");
    assert!(plain.contains(" INFO "), "no log line: {plain:?}");
    assert!(!plain.contains("\x1b[32m") && !plain.contains("\x1b[2m"), "colour despite NO_COLOR: {plain:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_receiver_fills_the_queue_and_dropped_spans_are_counted() {
    // A receiver that takes 3 s per request: with room for 2 queued spans,
    // most of a topic's spans find the queue full. The topic finishes as
    // fast as without traces, and the drops show in the metrics.
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                        hyper::body::Bytes::from_static(b"{}"),
                    )))
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    let xdg = Xdg::new();
    let notify = Notify::new();
    let port = free_port();
    let mut c = xdg.command();
    c.env("SCRIPTORIUM_LLM__SIMULATED__LATENCY_MS", "1")
        .env("SCRIPTORIUM_LLM__SIMULATED__JITTER_MS", "0")
        .env("SCRIPTORIUM_TELEMETRY__OTLP_ENDPOINT", format!("http://{addr}"))
        .env("SCRIPTORIUM_TELEMETRY__MAX_QUEUED_SPANS", "2")
        .env("NOTIFY_SOCKET", &notify.path);
    let metrics_addr = format!("127.0.0.1:{port}");
    let mut daemon = Daemon::spawn(c, &["--metrics-addr", &metrics_addr], xdg.home.join("daemon.log"));
    let notified = tokio::task::spawn_blocking(move || (notify.next(Duration::from_secs(60)), notify)).await.unwrap();
    assert_eq!(notified.0, "READY=1", "{}", daemon.log());
    let mut c = xdg.command();
    c.args(["submit", "--wait", "--kind", "brief", "--variants", "4", "Many spans at once"]);
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || output(c)).await.unwrap();
    let took = started.elapsed();
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    let body = reqwest::get(format!("http://{metrics_addr}/metrics")).await.unwrap().text().await.unwrap();
    let value = |name: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the scrape"))
    };
    let dropped = value("scriptorium_trace_spans_dropped_total");
    println!("topic took {took:?} with a 3 s receiver; {dropped} spans dropped");
    assert!(dropped > 0.0, "a full queue drops spans, and they are counted");
    // The topic did not wait for the receiver's 3 s per request.
    assert!(took < Duration::from_secs(3), "{took:?}");
    let status = daemon.terminate();
    assert!(status.success(), "{}", daemon.log());
}
