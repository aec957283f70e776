//! Observability end to end: the Prometheus endpoint of a live engine, the
//! Grafana dashboard and the alert rules against a real Prometheus server.
//!
//! One test, because the metrics recorder is process-global: it installs
//! the recorder on a free loopback port, runs the simulated provider with
//! injected faults (5xx, 429, malformed output), scrapes `/metrics` over
//! HTTP and checks every documented family, its type, its label values and
//! the counts against what the engine did; then runs `promtool` on the
//! scrape and on `dashboards/alerts.yml`, starts `prometheus` scraping the
//! engine every second, and evaluates every PromQL expression of
//! `dashboards/scriptorium.json` and of the alert rules through the HTTP
//! API. `promtool` and `prometheus` must be installed (`.ci/run` installs
//! them); the test fails, never skips, when they are missing.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use scriptorium::config::Config;
use scriptorium::state::TopicStatus;
use scriptorium::{EngineOptions, Scriptorium, SubmitRequest};
use serde_json::Value;

const TOPICS: usize = 30;
const STEPS: [&str; 5] = ["route", "plan", "write", "review", "revise"];
const OUTCOMES: [&str; 4] = ["approved", "not_approved", "failed", "cancelled"];
const REASONS: [&str; 10] = [
    "rate_limited",
    "server_error",
    "timeout",
    "connection",
    "invalid_output",
    "refused",
    "fatal",
    "actor_restart",
    "output_truncated",
    "budget_exceeded",
];
const ACTORS: [&str; 5] = ["router", "planner", "writer", "reviewer", "reviser"];
const PROVIDERS: [&str; 3] = ["openai", "chat", "simulated"];

const CONFIG: &str = r#"
[llm]
provider = "simulated"
[llm.simulated]
latency_ms = 5
jitter_ms = 5
error_rate = 0.1
malformed_rate = 0.05
rate_limit_rate = 0.05
[retry]
initial_backoff_ms = 10
max_backoff_ms = 50
budget_percent = 100
budget_min_per_s = 1000
[limits]
requests_per_minute = 600000
tokens_per_minute = 100000000
"#;

/// A label name and the check its values must pass.
type LabelRule = (&'static str, fn(&str) -> bool);

/// What a family may carry: its Prometheus type and its labels.
struct Family {
    name: &'static str,
    kind: &'static str,
    labels: &'static [LabelRule],
}

fn any_of(allowed: &'static [&'static str]) -> impl Fn(&str) -> bool {
    move |v| allowed.contains(&v)
}

fn is_step(v: &str) -> bool {
    any_of(&STEPS)(v)
}
fn is_outcome(v: &str) -> bool {
    any_of(&OUTCOMES)(v)
}
fn is_reason(v: &str) -> bool {
    any_of(&REASONS)(v)
}
fn is_actor(v: &str) -> bool {
    any_of(&ACTORS)(v)
}
fn is_provider(v: &str) -> bool {
    any_of(&PROVIDERS)(v)
}
fn is_direction(v: &str) -> bool {
    ["input", "output", "cached_input", "reasoning"].contains(&v)
}
fn is_status(v: &str) -> bool {
    (v.len() == 3 && v.bytes().all(|b| b.is_ascii_digit())) || ["4xx", "5xx", "other", "error"].contains(&v)
}
fn is_version(v: &str) -> bool {
    v == env!("CARGO_PKG_VERSION")
}
/// The model name comes from the config: one value per process.
fn is_model(v: &str) -> bool {
    v == "simulated"
}
fn is_operation(v: &str) -> bool {
    v == "chat"
}

/// Labels a family carries only on some series: (family, label, check).
/// The GenAI conventions put `error.type` on failed calls only.
const OPTIONAL_LABELS: &[(&str, LabelRule)] =
    &[("gen_ai_client_operation_duration_seconds", ("error_type", is_reason))];

const FAMILIES: &[Family] = &[
    Family { name: "scriptorium_topics_submitted_total", kind: "counter", labels: &[] },
    Family { name: "scriptorium_topics_finished_total", kind: "counter", labels: &[("outcome", is_outcome)] },
    Family { name: "scriptorium_topics_in_flight", kind: "gauge", labels: &[] },
    Family { name: "scriptorium_topics_queued", kind: "gauge", labels: &[] },
    Family { name: "scriptorium_topics_awaiting_approval", kind: "gauge", labels: &[] },
    Family { name: "scriptorium_topic_duration_seconds", kind: "histogram", labels: &[] },
    Family { name: "scriptorium_step_duration_seconds", kind: "histogram", labels: &[("step", is_step)] },
    Family {
        name: "scriptorium_step_failures_total",
        kind: "counter",
        labels: &[("step", is_step), ("reason", is_reason)],
    },
    Family {
        name: "scriptorium_llm_requests_total",
        kind: "counter",
        labels: &[("provider", is_provider), ("status", is_status)],
    },
    Family {
        name: "scriptorium_llm_request_duration_seconds",
        kind: "histogram",
        labels: &[("provider", is_provider)],
    },
    Family { name: "scriptorium_llm_tokens_total", kind: "counter", labels: &[("direction", is_direction)] },
    Family { name: "scriptorium_retries_total", kind: "counter", labels: &[("step", is_step)] },
    Family { name: "scriptorium_rate_limiter_wait_seconds", kind: "histogram", labels: &[] },
    Family { name: "scriptorium_rate_limiter_paused", kind: "gauge", labels: &[] },
    Family { name: "scriptorium_rate_limit_requests_per_minute", kind: "gauge", labels: &[] },
    Family { name: "scriptorium_rate_limit_tokens_per_minute", kind: "gauge", labels: &[] },
    Family { name: "scriptorium_review_score", kind: "histogram", labels: &[] },
    Family { name: "scriptorium_variants_per_topic", kind: "histogram", labels: &[] },
    Family { name: "scriptorium_revisions_total", kind: "counter", labels: &[] },
    Family { name: "scriptorium_actor_restarts_total", kind: "counter", labels: &[("actor", is_actor)] },
    Family { name: "scriptorium_stage_queue_depth", kind: "gauge", labels: &[("stage", is_actor)] },
    Family { name: "scriptorium_stage_busy_workers", kind: "gauge", labels: &[("stage", is_actor)] },
    Family { name: "scriptorium_stage_workers", kind: "gauge", labels: &[("stage", is_actor)] },
    Family { name: "scriptorium_store_degraded", kind: "gauge", labels: &[] },
    Family { name: "scriptorium_build_info", kind: "gauge", labels: &[("version", is_version)] },
    Family {
        name: "gen_ai_client_token_usage",
        kind: "histogram",
        labels: &[
            ("gen_ai_provider_name", is_provider),
            ("gen_ai_operation_name", is_operation),
            ("gen_ai_token_type", is_direction),
            ("gen_ai_request_model", is_model),
        ],
    },
    Family {
        name: "gen_ai_client_operation_duration_seconds",
        kind: "histogram",
        labels: &[
            ("gen_ai_provider_name", is_provider),
            ("gen_ai_request_model", is_model),
            ("gen_ai_operation_name", is_operation),
        ],
    },
    // `telemetry::spawn_process_metrics` (metrics-process).
    Family { name: "process_cpu_seconds_total", kind: "counter", labels: &[] },
    Family { name: "process_open_fds", kind: "gauge", labels: &[] },
    Family { name: "process_max_fds", kind: "gauge", labels: &[] },
    Family { name: "process_virtual_memory_bytes", kind: "gauge", labels: &[] },
    Family { name: "process_virtual_memory_max_bytes", kind: "gauge", labels: &[] },
    Family { name: "process_resident_memory_bytes", kind: "gauge", labels: &[] },
    Family { name: "process_start_time_seconds", kind: "gauge", labels: &[] },
    Family { name: "process_threads", kind: "gauge", labels: &[] },
];

// ---- the exposition format ------------------------------------------------

#[derive(Debug, Clone)]
struct Sample {
    /// The series name as written (`…_bucket`, `…_sum`, `…_count` included).
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

struct Scrape {
    text: String,
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_string();
        let after = &rest[eq + 1..];
        assert!(after.starts_with('"'), "label value not quoted in `{s}`");
        let mut value = String::new();
        let mut escaped = false;
        let mut end = None;
        for (i, c) in after[1..].char_indices() {
            match (escaped, c) {
                (true, 'n') => {
                    value.push('\n');
                    escaped = false;
                }
                (true, c) => {
                    value.push(c);
                    escaped = false;
                }
                (false, '\\') => escaped = true,
                (false, '"') => {
                    end = Some(i + 2);
                    break;
                }
                (false, c) => value.push(c),
            }
        }
        let end = end.unwrap_or_else(|| panic!("unterminated label value in `{s}`"));
        out.insert(key, value);
        rest = &after[end..];
    }
    out
}

fn parse_scrape(text: String) -> Scrape {
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(types.insert(name.to_string(), kind.to_string()).is_none(), "two TYPE lines for {name}");
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line `{line}`"));
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in `{line}`")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, parse_labels(labels.trim_end_matches('}'))),
            None => (series, BTreeMap::new()),
        };
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    Scrape { text, types, samples }
}

impl Scrape {
    /// The family a sample belongs to (histogram suffixes stripped).
    fn family_of(&self, sample: &Sample) -> String {
        if self.types.contains_key(&sample.name) {
            return sample.name.clone();
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = sample.name.strip_suffix(suffix) {
                if self.types.get(base).map(String::as_str) == Some("histogram") {
                    return base.to_string();
                }
            }
        }
        panic!("sample {} has no TYPE line", sample.name)
    }

    fn series<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a Sample> + 'a {
        let name = name.to_string();
        self.samples.iter().filter(move |s| s.name == name)
    }

    fn sum(&self, name: &str) -> f64 {
        self.series(name).map(|s| s.value).sum()
    }

    fn sum_where(&self, name: &str, key: &str, value: &str) -> f64 {
        self.series(name).filter(|s| s.labels.get(key).map(String::as_str) == Some(value)).map(|s| s.value).sum()
    }

    fn values_of(&self, name: &str, key: &str) -> BTreeSet<String> {
        self.series(name).filter(|s| s.value > 0.0).filter_map(|s| s.labels.get(key).cloned()).collect()
    }

    fn single(&self, name: &str) -> f64 {
        let all: Vec<&Sample> = self.series(name).collect();
        assert_eq!(all.len(), 1, "{name}: expected one series, got {all:?}");
        all[0].value
    }
}

// ---- processes and ports ---------------------------------------------------

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn require_tool(name: &str) {
    let ok = Command::new(name).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    assert!(
        matches!(ok, Ok(s) if s.success()),
        "`{name}` is not installed: the observability tests need promtool and prometheus \
         (Debian package `prometheus`); `bash .ci/run` installs them"
    );
}

/// Kills the child (and reaps it) when dropped, panics included.
struct ChildGuard {
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    {
        let mut pipe = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            pipe.write_all(text.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

// ---- the engine -----------------------------------------------------------

async fn scrape(client: &reqwest::Client, addr: SocketAddr) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.get(format!("http://{addr}/metrics")).send().await {
            Ok(r) if r.status().is_success() => {
                let kind = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                assert!(kind.starts_with("text/plain"), "content-type {kind}");
                return parse_scrape(r.text().await.unwrap());
            }
            other if Instant::now() > deadline => panic!("no scrape from {addr}: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn submit(engine: &Scriptorium, topic: String, variants: Option<u32>, approval: bool) -> String {
    let req = SubmitRequest { topic, variants, require_approval: Some(approval), ..SubmitRequest::default() };
    engine.submit(req).await.expect("submit").id
}

/// Checks every family's presence, type, label names and values; returns
/// nothing, panics with the offending line.
fn check_families(scrape: &Scrape) {
    for family in FAMILIES {
        assert_eq!(
            scrape.types.get(family.name).map(String::as_str),
            Some(family.kind),
            "{}: missing or of the wrong type in the scrape:\n{}",
            family.name,
            scrape.text
        );
    }
    let known: BTreeSet<&str> = FAMILIES.iter().map(|f| f.name).collect();
    for name in scrape.types.keys() {
        assert!(known.contains(name.as_str()), "undocumented family `{name}` (add it to docs/metrics.md and here)");
    }
    for sample in &scrape.samples {
        let family_name = scrape.family_of(sample);
        let family = FAMILIES.iter().find(|f| f.name == family_name).unwrap();
        let histogram_part = sample.name.strip_prefix(family.name).unwrap_or("");
        for (key, value) in &sample.labels {
            if key == "le" && histogram_part == "_bucket" {
                continue;
            }
            let optional = OPTIONAL_LABELS.iter().filter(|(f, _)| *f == family.name).map(|(_, rule)| rule);
            let check = family.labels.iter().chain(optional).find(|(k, _)| k == key).unwrap_or_else(|| {
                panic!("{}: unexpected label `{key}` (value `{value}`)", sample.name);
            });
            assert!((check.1)(value), "{}: label {key}=\"{value}\" is not a documented value", sample.name);
        }
        for (key, _) in family.labels {
            assert!(sample.labels.contains_key(*key), "{}: missing label `{key}` in {:?}", sample.name, sample.labels);
        }
        assert!(!sample.labels.contains_key("quantile"), "{}: summaries are not allowed", sample.name);
    }
    // Real histograms: explicit buckets, +Inf last, cumulative, _count = +Inf.
    for family in FAMILIES.iter().filter(|f| f.kind == "histogram") {
        let buckets: Vec<&Sample> = scrape.series(&format!("{}_bucket", family.name)).collect();
        assert!(!buckets.is_empty(), "{}: no _bucket lines (nothing observed?)", family.name);
        // (labels without le) -> [(le, cumulative count)]
        let mut by_series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
        for b in &buckets {
            let le = b.labels.get("le").unwrap_or_else(|| panic!("{}: bucket without le", family.name));
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse::<f64>().unwrap() };
            let mut key = b.labels.clone();
            key.remove("le");
            by_series.entry(key).or_default().push((le, b.value));
        }
        for (labels, mut points) in by_series {
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert!(points.len() >= 5, "{} {labels:?}: only {} buckets", family.name, points.len());
            assert_eq!(points.last().unwrap().0, f64::INFINITY, "{} {labels:?}: no +Inf bucket", family.name);
            assert!(points.windows(2).all(|w| w[0].1 <= w[1].1), "{} {labels:?}: buckets not cumulative", family.name);
            let count = scrape
                .series(&format!("{}_count", family.name))
                .find(|s| s.labels == labels)
                .unwrap_or_else(|| panic!("{} {labels:?}: no _count", family.name));
            assert_eq!(count.value, points.last().unwrap().1, "{} {labels:?}: _count != +Inf bucket", family.name);
            assert!(
                scrape.series(&format!("{}_sum", family.name)).any(|s| s.labels == labels),
                "{} {labels:?}: no _sum",
                family.name
            );
        }
    }
}

// ---- Prometheus -------------------------------------------------------------

async fn prom_get(client: &reqwest::Client, url: &str, query: &[(&str, &str)]) -> Value {
    let r = client.get(url).query(query).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    r.json().await.unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

async fn prom_query(client: &reqwest::Client, base: &str, expr: &str) -> Value {
    let v = prom_get(client, &format!("{base}/api/v1/query"), &[("query", expr)]).await;
    assert_eq!(v["status"], "success", "query failed: {expr}\n{v}");
    v["data"]["result"].clone()
}

/// Every panel target of the dashboard: (panel title, expression with the
/// Grafana variables replaced).
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            walk(&panel["panels"], out);
            let title = panel["title"].as_str().unwrap_or("").to_string();
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap_or_else(|| panic!("{title}: a target without expr"));
                assert_eq!(
                    target["datasource"]["uid"], "${datasource}",
                    "{title}: targets must use the `datasource` template variable"
                );
                let expr = expr
                    .replace("$__rate_interval", "1m")
                    .replace("$__interval", "15s")
                    .replace("$__range", "1h")
                    .replace("$instance", ".+");
                assert!(!expr.contains('$'), "{title}: unreplaced Grafana variable in {expr}");
                out.push((title.clone(), expr));
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn check_dashboard_shape(dashboard: &Value) {
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    // File provisioning leaves `__inputs` unresolved: the data source is a
    // template variable instead, and every panel and variable uses it.
    assert!(dashboard.get("__inputs").is_none(), "__inputs only works for a UI import");
    let vars = dashboard["templating"]["list"].as_array().expect("templating");
    assert!(
        vars.iter().any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"),
        "no `datasource` template variable of type prometheus"
    );
    let text = dashboard.to_string();
    assert!(!text.contains("DS_PROMETHEUS"), "a leftover ${{DS_PROMETHEUS}}");
    assert!(!text.contains("\"uid\":\"prometheus\""), "hard-coded datasource uid");
    fn uses_variable(v: &Value, path: &str) {
        match v {
            Value::Object(map) => {
                if let Some(ds) = map.get("datasource").filter(|d| d.is_object()) {
                    let builtin = ds["uid"] == "-- Grafana --";
                    assert!(builtin || ds["uid"] == "${datasource}", "{path}: datasource {ds} is not ${{datasource}}");
                }
                for (k, child) in map {
                    uses_variable(child, &format!("{path}.{k}"));
                }
            }
            Value::Array(items) => {
                items.iter().enumerate().for_each(|(i, c)| uses_variable(c, &format!("{path}[{i}]")))
            }
            _ => {}
        }
    }
    uses_variable(dashboard, "dashboard");
    let rows: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| p["title"].as_str().unwrap().to_string())
        .collect();
    for row in ["Throughput", "Backlog", "Latency", "LLM traffic", "Tokens and limits", "Quality", "Health"] {
        assert!(rows.iter().any(|r| r == row), "dashboard has no `{row}` row: {rows:?}");
    }
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for p in dashboard["panels"].as_array().unwrap() {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id {}", p["id"]);
        let g = &p["gridPos"];
        let [x, y, w, h] =
            ["x", "y", "w", "h"].map(|k| g[k].as_u64().unwrap_or_else(|| panic!("{}: gridPos", p["title"])));
        assert!(x + w <= 24, "{}: wider than the grid", p["title"]);
        for cell in (x..x + w).flat_map(|cx| (y..y + h).map(move |cy| (cx, cy))) {
            assert!(cells.insert(cell), "{}: overlaps another panel at {cell:?}", p["title"]);
        }
    }
}

/// Number of `- alert:` rules in the file (to compare with what Prometheus loaded).
fn alert_rule_count(text: &str) -> usize {
    text.lines().filter(|l| l.trim_start().starts_with("- alert:")).count()
}

/// Synthetic series, one instance per situation (`ok` is healthy), and
/// for each rule the instances its expression must select at minute 30.
/// `for:` durations are Prometheus' business; this checks the expressions.
fn alert_unit_tests(alerts: &Path, exprs: &BTreeMap<String, String>) -> String {
    let series = [
        // healthy: work queued and finishing, a few errors, no pauses
        (r#"scriptorium_build_info{instance="ok",job="scriptorium",version="0.1.0"}"#, "1x60"),
        (r#"scriptorium_topics_queued{instance="ok",job="scriptorium"}"#, "3x60"),
        (r#"scriptorium_topics_awaiting_approval{instance="ok",job="scriptorium"}"#, "0x60"),
        (r#"scriptorium_topics_finished_total{instance="ok",job="scriptorium",outcome="approved"}"#, "0+10x60"),
        (r#"scriptorium_topics_finished_total{instance="ok",job="scriptorium",outcome="failed"}"#, "0+1x60"),
        (
            r#"scriptorium_llm_requests_total{instance="ok",job="scriptorium",provider="openai",status="200"}"#,
            "0+100x60",
        ),
        (r#"scriptorium_llm_requests_total{instance="ok",job="scriptorium",provider="openai",status="429"}"#, "0+5x60"),
        (r#"scriptorium_rate_limiter_paused{instance="ok",job="scriptorium"}"#, "0x60"),
        (r#"scriptorium_actor_restarts_total{instance="ok",job="scriptorium",actor="writer"}"#, "0+1x60"),
        // queued work, nothing finishing
        (r#"scriptorium_topics_queued{instance="stalled",job="scriptorium"}"#, "5x60"),
        (r#"scriptorium_topics_finished_total{instance="stalled",job="scriptorium",outcome="approved"}"#, "100x60"),
        // most topics fail
        (r#"scriptorium_topics_finished_total{instance="failing",job="scriptorium",outcome="approved"}"#, "0+1x60"),
        (r#"scriptorium_topics_finished_total{instance="failing",job="scriptorium",outcome="failed"}"#, "0+3x60"),
        // half the model calls fail
        (
            r#"scriptorium_llm_requests_total{instance="erroring",job="scriptorium",provider="openai",status="200"}"#,
            "0+50x60",
        ),
        (
            r#"scriptorium_llm_requests_total{instance="erroring",job="scriptorium",provider="openai",status="503"}"#,
            "0+50x60",
        ),
        (r#"scriptorium_rate_limiter_paused{instance="paused",job="scriptorium"}"#, "1x60"),
        (r#"scriptorium_actor_restarts_total{instance="restarting",job="scriptorium",actor="writer"}"#, "0+5x60"),
        (r#"scriptorium_topics_awaiting_approval{instance="waiting",job="scriptorium"}"#, "2x60"),
        // shared limiter cut off from Redis; a healthy Redis-backed daemon
        (r#"scriptorium_rate_limiter_redis_unavailable{instance="redis_down",job="scriptorium"}"#, "0x20 1x40"),
        (r#"scriptorium_rate_limiter_redis_unavailable{instance="ok",job="scriptorium"}"#, "0x60"),
        // a topic dead-lettered at minute 25
        (r#"scriptorium_topics_dead_lettered_total{instance="dead",job="scriptorium"}"#, "0x25 1x35"),
        (r#"scriptorium_topics_dead_lettered_total{instance="ok",job="scriptorium"}"#, "0x60"),
        (r#"scriptorium_store_degraded{instance="ok",job="scriptorium"}"#, "0x60"),
        (r#"scriptorium_store_degraded{instance="diskfull",job="scriptorium"}"#, "1x60"),
        // scrapes: one target answering, one not
        (r#"up{instance="ok",job="scriptorium"}"#, "1x60"),
        (r#"up{instance="unreachable",job="scriptorium"}"#, "0x60"),
        (r#"up{instance="other",job="node"}"#, "0x60"),
    ];
    let expected: &[(&str, &[&str])] = &[
        ("ScriptoriumDown", &[]),
        ("ScriptoriumTargetDown", &["unreachable"]),
        ("ScriptoriumTopicFailureRatioHigh", &["failing"]),
        ("ScriptoriumTopicsStuckAwaitingApproval", &["waiting"]),
        ("ScriptoriumRateLimiterPausedLong", &["paused"]),
        ("ScriptoriumActorRestartStorm", &["restarting"]),
        ("ScriptoriumNoProgress", &["stalled"]),
        ("ScriptoriumLlmErrorRateHigh", &["erroring"]),
        ("ScriptoriumStoreDegraded", &["diskfull"]),
        ("ScriptoriumRedisUnavailable", &["redis_down"]),
        ("ScriptoriumTopicsDeadLettered", &["dead"]),
    ];
    assert_eq!(exprs.len(), expected.len(), "a rule without a unit test here: {:?}", exprs.keys());
    let q = |s: &str| serde_json::to_string(s).unwrap();
    let mut y = format!("rule_files: []\nevaluation_interval: 1m\n# rules from {}\ntests:\n", alerts.display());
    y.push_str("  - interval: 1m\n    input_series:\n");
    for (name, values) in series {
        y.push_str(&format!("      - series: {}\n        values: {}\n", q(name), q(values)));
    }
    y.push_str("    promql_expr_test:\n");
    for (alert, instances) in expected {
        let expr = exprs.get(*alert).unwrap_or_else(|| panic!("no rule {alert} loaded"));
        y.push_str(&format!(
            "      # {alert}\n      - expr: {}\n        eval_time: 30m\n        exp_samples:{}\n",
            q(&format!("count by (instance) ({expr})")),
            if instances.is_empty() { " []" } else { "" }
        ));
        for instance in *instances {
            y.push_str(&format!(
                "          - labels: {}\n            value: 1\n",
                q(&format!("{{instance=\"{instance}\"}}"))
            ));
        }
    }
    // With no daemon reporting at all, the "down" expression fires.
    let down = exprs.get("ScriptoriumDown").expect("ScriptoriumDown rule");
    y.push_str("  - interval: 1m\n    input_series:\n");
    y.push_str(&format!(
        "      - series: {}\n        values: \"0x60\"\n",
        q(r#"up{instance="gone",job="scriptorium"}"#)
    ));
    y.push_str(&format!(
        "    promql_expr_test:\n      - expr: {}\n        eval_time: 30m\n        exp_samples:\n          - labels: \"{{}}\"\n            value: 1\n",
        q(&format!("count({down})"))
    ));
    y
}

// ---- the test ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_dashboard_and_alerts_against_a_live_engine_and_prometheus() {
    let t0 = Instant::now();
    require_tool("promtool");
    require_tool("prometheus");

    // a. The recorder and an engine with injected faults.
    let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    scriptorium::telemetry::install_metrics(Some(metrics_addr)).expect("install the recorder");
    scriptorium::telemetry::describe_metrics();
    let _process = scriptorium::telemetry::spawn_process_metrics();
    let config = Config::from_toml_str(CONFIG, &[]).expect("config");
    let engine = Scriptorium::start(config, EngineOptions::default()).await.expect("engine");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();

    let early = scrape(&client, metrics_addr).await;
    assert_eq!(early.single("scriptorium_build_info"), 1.0);
    assert_eq!(early.single("scriptorium_topics_submitted_total"), 0.0);

    let mut ids = Vec::new();
    for i in 0..TOPICS {
        ids.push(submit(&engine, format!("Topic {i}: how do heat pumps move heat uphill?"), None, false).await);
    }
    let awaiting = submit(&engine, "A topic a human must approve".into(), Some(1), true).await;
    let cancelled = submit(&engine, "A topic cancelled at once".into(), Some(16), false).await;
    engine.cancel(&cancelled).await.expect("cancel");
    for id in &ids {
        let state = engine.wait(id, Some(Duration::from_secs(30))).await.expect("topic settles");
        assert!(
            matches!(state.status, TopicStatus::Completed | TopicStatus::Failed),
            "{id}: {:?} {:?}",
            state.status,
            state.error
        );
    }
    let state = engine.wait(&awaiting, Some(Duration::from_secs(30))).await.expect("approval topic settles");
    assert_eq!(state.status, TopicStatus::AwaitingApproval, "{:?}", state.error);
    assert_eq!(engine.get(&cancelled).await.unwrap().status, TopicStatus::Cancelled);
    let engine_done = t0.elapsed();

    // b. One scrape over HTTP, checked family by family.
    let s = scrape(&client, metrics_addr).await;
    check_families(&s);
    let submitted = s.single("scriptorium_topics_submitted_total");
    let awaiting_now = s.single("scriptorium_topics_awaiting_approval");
    let finished = s.sum("scriptorium_topics_finished_total");
    assert_eq!(submitted, (TOPICS + 2) as f64);
    assert_eq!(awaiting_now, 1.0);
    assert_eq!(finished, submitted - awaiting_now, "finished over all outcomes == submitted - awaiting");
    assert_eq!(s.sum_where("scriptorium_topics_finished_total", "outcome", "cancelled"), 1.0);
    assert_eq!(
        s.sum_where("scriptorium_topics_finished_total", "outcome", "approved")
            + s.sum_where("scriptorium_topics_finished_total", "outcome", "not_approved")
            + s.sum_where("scriptorium_topics_finished_total", "outcome", "failed"),
        TOPICS as f64
    );
    assert_eq!(s.single("scriptorium_topic_duration_seconds_count"), finished, "one duration per finished topic");
    assert!(s.sum("scriptorium_retries_total") > 0.0, "faults were injected, so steps were retried");
    let reasons = s.values_of("scriptorium_step_failures_total", "reason");
    for reason in ["server_error", "rate_limited", "invalid_output"] {
        assert!(reasons.contains(reason), "no step failure with reason {reason}: {reasons:?}");
    }
    let statuses = s.values_of("scriptorium_llm_requests_total", "status");
    for status in ["200", "503", "429"] {
        assert!(statuses.contains(status), "no model call answered {status}: {statuses:?}");
    }
    assert_eq!(s.values_of("scriptorium_llm_requests_total", "provider"), BTreeSet::from(["simulated".to_string()]));
    let calls = s.sum("scriptorium_llm_requests_total");
    assert_eq!(s.sum("scriptorium_llm_request_duration_seconds_count"), calls, "one duration per model call");
    assert_eq!(s.sum("gen_ai_client_operation_duration_seconds_count"), calls);
    // Failed calls carry error_type (the classified reason), answered ones do not.
    let failed_calls = calls - s.sum_where("scriptorium_llm_requests_total", "status", "200");
    let with_error: f64 = s
        .series("gen_ai_client_operation_duration_seconds_count")
        .filter(|x| x.labels.contains_key("error_type"))
        .map(|x| x.value)
        .sum();
    assert!(failed_calls > 0.0);
    assert_eq!(with_error, failed_calls, "one error_type observation per failed call");
    assert_eq!(
        s.values_of("gen_ai_client_operation_duration_seconds_count", "gen_ai_provider_name"),
        BTreeSet::from(["simulated".to_string()])
    );
    // process_* from the collector: this process, plausibly.
    assert!(s.single("process_resident_memory_bytes") > 1e6, "RSS");
    assert!(s.single("process_open_fds") >= 3.0, "open fds");
    let start = s.single("process_start_time_seconds");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(start > now - 3600.0 && start <= now + 1.0, "start time {start} vs now {now}");
    let ok_calls = s.sum_where("scriptorium_llm_requests_total", "status", "200");
    assert_eq!(s.sum("gen_ai_client_token_usage_count"), 2.0 * ok_calls, "input and output per answered call");
    assert!(s.sum_where("scriptorium_llm_tokens_total", "direction", "input") > 0.0);
    assert!(s.sum_where("scriptorium_llm_tokens_total", "direction", "output") > 0.0);
    assert_eq!(s.single("scriptorium_rate_limiter_wait_seconds_count"), calls, "every call passes the limiter");
    let paused = s.single("scriptorium_rate_limiter_paused");
    assert!(paused == 0.0 || paused == 1.0);
    assert_eq!(s.single("scriptorium_rate_limit_requests_per_minute"), 600_000.0);
    assert_eq!(s.single("scriptorium_rate_limit_tokens_per_minute"), 100_000_000.0);
    assert!(s.single("scriptorium_review_score_count") >= TOPICS as f64);
    let score_le: Vec<&str> = s.series("scriptorium_review_score_bucket").map(|b| b.labels["le"].as_str()).collect();
    assert_eq!(score_le, ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "+Inf"], "explicit score buckets");
    let score_sum = s.single("scriptorium_review_score_sum");
    assert!((0.0..=10.0 * s.single("scriptorium_review_score_count")).contains(&score_sum));
    assert!(s.single("scriptorium_variants_per_topic_count") >= 1.0);
    let steps_timed = s.values_of("scriptorium_step_duration_seconds_count", "step");
    for step in ["route", "plan", "write", "review"] {
        assert!(steps_timed.contains(step), "no duration for step {step}: {steps_timed:?}");
    }
    assert_eq!(s.single("scriptorium_build_info"), 1.0);
    assert_eq!(s.sum("scriptorium_actor_restarts_total"), 0.0, "no chaos configured");

    // c. promtool on the scrape and on the rules.
    let (ok, out) = promtool(&["check", "metrics"], Some(&s.text));
    println!("promtool check metrics:\n{out}");
    assert!(ok, "promtool check metrics failed:\n{out}");
    let alerts = repo_path("dashboards/alerts.yml");
    let (ok, out) = promtool(&["check", "rules", alerts.to_str().unwrap()], None);
    assert!(ok, "promtool check rules failed:\n{out}");
    let example = repo_path("dashboards/prometheus.yml");
    let (ok, out) = promtool(&["check", "config", example.to_str().unwrap()], None);
    assert!(ok, "promtool check config dashboards/prometheus.yml failed:\n{out}");

    // d. A real Prometheus scraping the engine every second.
    let dir = tempfile::tempdir().unwrap();
    let prom_port = free_port();
    let config_path = dir.path().join("prometheus.yml");
    std::fs::write(
        &config_path,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {alerts:?}\n\
             scrape_configs:\n  - job_name: scriptorium\n    static_configs:\n      - targets: [\"{metrics_addr}\"]\n"
        ),
    )
    .unwrap();
    let log = dir.path().join("prometheus.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config_path.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("start prometheus");
    let prom = ChildGuard { child, log };
    let base = format!("http://127.0.0.1:{prom_port}");

    // Keep topics flowing so rate() sees increases between samples.
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (engine, stop) = (engine.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let _ = submit(&engine, format!("Background topic {i}"), Some(2), false).await;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client.get(format!("{base}/-/ready")).send().await {
            Ok(r) if r.status().is_success() => break,
            _ if Instant::now() > deadline => panic!("prometheus not ready:\n{}", prom.log_tail()),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    // At least four scrapes, so every rate() over 1m has samples to compare.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = prom_query(&client, &base, "count_over_time(scriptorium_build_info[1m])").await;
        let n = r[0]["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        if n >= 4.0 {
            break;
        }
        assert!(Instant::now() < deadline, "prometheus did not scrape the engine:\n{}", prom.log_tail());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let up = prom_query(&client, &base, "up{job=\"scriptorium\"}").await;
    assert_eq!(up[0]["value"][1], "1", "target down: {up}");

    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(repo_path("dashboards/scriptorium.json")).unwrap()).unwrap();
    check_dashboard_shape(&dashboard);
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 20, "only {} dashboard queries", queries.len());
    let core = [
        "Topics submitted and finished per second",
        "Topics in flight, queued, awaiting approval",
        "Step duration p50 by step",
        "Step duration p95 by step",
        "Step duration p99 by step",
        "Model calls per second by HTTP status",
        "Tokens per minute vs configured limit",
    ];
    for title in core {
        assert!(queries.iter().any(|(t, _)| t == title), "no panel titled `{title}`");
    }
    let mut empty = Vec::new();
    for (title, expr) in &queries {
        let result = prom_query(&client, &base, expr).await;
        if result.as_array().is_none_or(|r| r.is_empty()) {
            empty.push(format!("{title}: {expr}"));
        }
        if title.starts_with("Step duration p") {
            let steps: BTreeSet<&str> =
                result.as_array().unwrap().iter().filter_map(|r| r["metric"]["step"].as_str()).collect();
            for step in ["route", "plan", "write", "review"] {
                assert!(steps.contains(step), "{title}: no {step} series: {result}");
            }
        }
        if title == "Model calls per second by HTTP status" {
            let statuses: BTreeSet<&str> =
                result.as_array().unwrap().iter().filter_map(|r| r["metric"]["status"].as_str()).collect();
            assert!(["200", "429", "503"].iter().all(|s| statuses.contains(s)), "{title}: {statuses:?}");
        }
    }
    // Template variables: `label_values(metric, label)` must find values.
    for var in dashboard["templating"]["list"].as_array().into_iter().flatten().filter(|v| v["type"] != "datasource") {
        let query = var["query"].as_str().unwrap_or_else(|| panic!("variable {}: query", var["name"]));
        let inner = query.strip_prefix("label_values(").and_then(|q| q.strip_suffix(')')).expect("label_values");
        let (metric, label) = inner.split_once(',').expect("label_values(metric, label)");
        let expr = format!("count by ({}) ({})", label.trim(), metric.trim());
        let result = prom_query(&client, &base, &expr).await;
        assert!(result.as_array().is_some_and(|r| !r.is_empty()), "variable {}: no values", var["name"]);
    }
    let flowing = prom_query(&client, &base, "sum(rate(scriptorium_topics_submitted_total[1m])) > 0").await;
    assert_eq!(flowing.as_array().map(Vec::len), Some(1), "rate() saw no submits: {flowing}");
    let core_empty: Vec<&String> = empty.iter().filter(|e| core.iter().any(|c| e.starts_with(c))).collect();
    assert!(core_empty.is_empty(), "core panels without data: {core_empty:#?}");
    assert!(empty.is_empty(), "panels without data against a live engine: {empty:#?}");

    // Every alert rule: loaded, healthy, and its expression evaluates.
    let rules = prom_get(&client, &format!("{base}/api/v1/rules"), &[]).await;
    let loaded: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .collect();
    let alerts_text = std::fs::read_to_string(&alerts).unwrap();
    assert_eq!(loaded.len(), alert_rule_count(&alerts_text), "prometheus loaded a different number of rules");
    for rule in &loaded {
        let name = rule["name"].as_str().unwrap();
        assert_ne!(rule["health"], "err", "{name}: {}", rule["lastError"]);
        assert!(rule["labels"]["severity"].is_string(), "{name}: no severity label");
        assert!(rule["annotations"]["summary"].is_string(), "{name}: no summary");
        assert!(rule["annotations"]["description"].is_string(), "{name}: no description");
        prom_query(&client, &base, rule["query"].as_str().unwrap()).await;
    }
    // The daemon is up, so the "down" alerts' expressions are empty.
    for name in ["ScriptoriumDown", "ScriptoriumTargetDown"] {
        let down = loaded.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("no {name} rule"));
        assert_eq!(prom_query(&client, &base, down["query"].as_str().unwrap()).await, Value::Array(vec![]), "{name}");
    }
    // And each rule's expression fires on the situation it is named after,
    // and only there (promtool's rule unit tests over synthetic series).
    let exprs: BTreeMap<String, String> = loaded
        .iter()
        .map(|r| (r["name"].as_str().unwrap().to_string(), r["query"].as_str().unwrap().to_string()))
        .collect();
    let unit = dir.path().join("alerts-test.yml");
    std::fs::write(&unit, alert_unit_tests(&alerts, &exprs)).unwrap();
    let (ok, out) = promtool(&["test", "rules", unit.to_str().unwrap()], None);
    assert!(ok, "alert expressions do not fire as intended:\n{out}");

    stop.store(true, Ordering::Relaxed);
    let _ = feeder.await;
    drop(prom);
    engine.shutdown(Duration::from_secs(2)).await;
    println!(
        "engine phase {:.1}s, total {:.1}s, {} dashboard queries, {} rules",
        engine_done.as_secs_f64(),
        t0.elapsed().as_secs_f64(),
        queries.len(),
        loaded.len()
    );
}
