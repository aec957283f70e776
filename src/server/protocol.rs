//! Wire types of the daemon's socket protocol, version 1 (see
//! `docs/protocol.md`): request parsing and the response envelopes.
//!
//! Owns: the JSON shape of every request and response line, and the
//! conversions from engine types into it. The nested `topic` (a
//! `TopicSummary`), `state` (a `TopicState`) and `event` (a `TopicEvent`)
//! objects are already versioned wire types of their own modules and are
//! embedded as they are. Must not: do I/O, call the engine, or know about
//! framing (that is `connection.rs`).
//!
//! Requests are parsed in two stages (a JSON object, then `op`, then the
//! op's fields) so that an unknown op is told apart from a malformed one and
//! every error message names the field at fault. Unknown fields are
//! rejected: a typo such as `"wiat": true` must not silently mean "don't".

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::engine::{EngineError, Health, SubmitReceipt, SubmitRequest};
use crate::events::TopicEvent;
use crate::llm::limiter::LimiterSnapshot;
use crate::state::{TopicState, TopicStatus, TopicSummary};
use crate::store::ListQuery;

/// The protocol version this module speaks; reported by `health`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest request line accepted, in bytes, excluding the newline.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// `result` with `wait` and no `timeout_s` waits this long.
pub const DEFAULT_WAIT_S: f64 = 600.0;

/// Upper bound on `timeout_s`: a connection must not be parked for days.
pub const MAX_WAIT_S: f64 = 3600.0;

/// `list` page size when `limit` is absent, and the largest allowed.
pub const DEFAULT_LIST_LIMIT: usize = 100;
pub const MAX_LIST_LIMIT: usize = 10_000;

/// Every op a version-1 server knows, for error messages.
pub const OPS: [&str; 9] = ["submit", "status", "result", "watch", "approve", "reject", "cancel", "list", "health"];

/// Stable error codes. The engine's codes (`EngineError::code`) plus the
/// protocol's own.
pub mod codes {
    pub const BAD_REQUEST: &str = "bad_request";
    pub const TOO_LARGE: &str = "too_large";
    pub const UNKNOWN_OP: &str = "unknown_op";
    pub const SHUTTING_DOWN: &str = "shutting_down";
    /// Also an engine code; the protocol uses it when the engine does not
    /// answer in time.
    pub const TIMEOUT: &str = "timeout";
    pub const INTERNAL: &str = "internal";
}

/// A failed request: the `error` object of an `ok: false` line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub code: String,
    pub message: String,
}

impl WireError {
    pub fn new(code: &str, message: impl Into<String>) -> WireError {
        WireError { code: code.to_string(), message: one_line(&message.into()) }
    }

    pub fn bad_request(message: impl Into<String>) -> WireError {
        WireError::new(codes::BAD_REQUEST, message)
    }
}

impl From<EngineError> for WireError {
    fn from(e: EngineError) -> Self {
        WireError::new(e.code(), e.to_string())
    }
}

/// Messages are one line so a human reading the socket sees one error per
/// line (serde_json would escape newlines anyway).
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

// ---- requests --------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitParams {
    pub topic: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variants: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_approval: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// This topic's token budget (overrides `workflow.max_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// This topic's budget in USD (overrides `workflow.max_cost_usd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
}

impl From<SubmitParams> for SubmitRequest {
    fn from(p: SubmitParams) -> Self {
        SubmitRequest {
            topic: p.topic,
            kind: p.kind,
            variants: p.variants,
            require_approval: p.require_approval,
            idempotency_key: p.idempotency_key,
            max_tokens: p.max_tokens,
            max_cost_usd: p.max_cost_usd,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdParams {
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResultParams {
    pub id: String,
    #[serde(default)]
    pub wait: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
}

impl ResultParams {
    /// The wait bound: `timeout_s` (validated, capped at `MAX_WAIT_S`) or
    /// `DEFAULT_WAIT_S`.
    pub fn timeout(&self) -> Result<std::time::Duration, WireError> {
        let secs = match self.timeout_s {
            None => DEFAULT_WAIT_S,
            Some(t) if t.is_finite() && t >= 0.0 => t.min(MAX_WAIT_S),
            Some(_) => return Err(WireError::bad_request("field `timeout_s` must be a non-negative number")),
        };
        Ok(std::time::Duration::from_secs_f64(secs))
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct WatchParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApproveParams {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RejectParams {
    pub id: String,
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

impl ListParams {
    pub fn to_query(&self) -> Result<ListQuery, WireError> {
        let status = match &self.status {
            None => None,
            Some(s) => Some(TopicStatus::parse(s).ok_or_else(|| {
                let names: Vec<&str> = TopicStatus::ALL.iter().map(|s| s.as_str()).collect();
                WireError::bad_request(format!("field `status`: unknown status `{s}` (one of: {})", names.join(", ")))
            })?),
        };
        let limit = match self.limit {
            None => DEFAULT_LIST_LIMIT,
            Some(n) if (1..=MAX_LIST_LIMIT as u64).contains(&n) => n as usize,
            Some(_) => {
                return Err(WireError::bad_request(format!("field `limit` must be between 1 and {MAX_LIST_LIMIT}")))
            }
        };
        Ok(ListQuery { status, after: self.after.clone(), limit })
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// One parsed request line.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Submit(SubmitParams),
    Status(IdParams),
    Result(ResultParams),
    Watch(WatchParams),
    Approve(ApproveParams),
    Reject(RejectParams),
    Cancel(IdParams),
    List(ListParams),
    Health,
}

impl Request {
    pub fn op(&self) -> &'static str {
        match self {
            Request::Submit(_) => "submit",
            Request::Status(_) => "status",
            Request::Result(_) => "result",
            Request::Watch(_) => "watch",
            Request::Approve(_) => "approve",
            Request::Reject(_) => "reject",
            Request::Cancel(_) => "cancel",
            Request::List(_) => "list",
            Request::Health => "health",
        }
    }

    /// Parses one request line (without its newline). The error is the
    /// `bad_request` or `unknown_op` to answer with.
    pub fn parse(line: &[u8]) -> Result<Request, WireError> {
        let text = std::str::from_utf8(line)
            .map_err(|e| WireError::bad_request(format!("request is not valid UTF-8 (at byte {})", e.valid_up_to())))?;
        let value: Value =
            serde_json::from_str(text).map_err(|e| WireError::bad_request(format!("invalid JSON: {e}")))?;
        let Value::Object(mut map) = value else {
            return Err(WireError::bad_request("request must be a JSON object with an `op` field"));
        };
        let op = match map.remove("op") {
            None => return Err(WireError::bad_request("missing field `op`")),
            Some(Value::String(op)) => op,
            Some(_) => return Err(WireError::bad_request("field `op` must be a string")),
        };
        Ok(match op.as_str() {
            "submit" => Request::Submit(fields(map)?),
            "status" => Request::Status(fields(map)?),
            "result" => Request::Result(fields(map)?),
            "watch" => Request::Watch(fields(map)?),
            "approve" => Request::Approve(fields(map)?),
            "reject" => Request::Reject(fields(map)?),
            "cancel" => Request::Cancel(fields(map)?),
            "list" => Request::List(fields(map)?),
            "health" => {
                let NoParams {} = fields(map)?;
                Request::Health
            }
            other => {
                return Err(WireError::new(
                    codes::UNKNOWN_OP,
                    format!("unknown op `{}` (known: {})", truncate(other, 64), OPS.join(", ")),
                ))
            }
        })
    }

    /// The request as a JSON line body (what the CLI client sends).
    pub fn to_value(&self) -> Value {
        let fields = match self {
            Request::Submit(p) => serde_json::to_value(p),
            Request::Status(p) | Request::Cancel(p) => serde_json::to_value(p),
            Request::Result(p) => serde_json::to_value(p),
            Request::Watch(p) => serde_json::to_value(p),
            Request::Approve(p) => serde_json::to_value(p),
            Request::Reject(p) => serde_json::to_value(p),
            Request::List(p) => serde_json::to_value(p),
            Request::Health => Ok(Value::Object(Map::new())),
        };
        // Plain structs of strings, numbers and bools always serialize.
        let mut map = match fields {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        map.insert("op".into(), Value::String(self.op().into()));
        Value::Object(map)
    }
}

/// Deserializes an op's fields, naming the field at fault on error.
fn fields<T: DeserializeOwned>(map: Map<String, Value>) -> Result<T, WireError> {
    serde_path_to_error::deserialize(Value::Object(map)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // Missing and unknown fields already name themselves at path ".".
        if path == "." || path.is_empty() {
            WireError::bad_request(inner)
        } else {
            WireError::bad_request(format!("field `{path}`: {inner}"))
        }
    })
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

// ---- responses -------------------------------------------------------------

/// `{"ok": true, ...body}`: success bodies are flattened next to `ok`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Success<T> {
    pub ok: bool,
    #[serde(flatten)]
    pub body: T,
}

impl<T> Success<T> {
    pub fn new(body: T) -> Success<T> {
        Success { ok: true, body }
    }
}

/// `{"ok": false, "error": {"code", "message"}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    pub ok: bool,
    pub error: WireError,
}

impl Failure {
    pub fn new(error: WireError) -> Failure {
        Failure { ok: false, error }
    }
}

/// `submit`: the topic id; `existing` only when an idempotency key matched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Submitted {
    pub id: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub existing: bool,
}

impl From<SubmitReceipt> for Submitted {
    fn from(r: SubmitReceipt) -> Self {
        Submitted { id: r.id, existing: r.existing }
    }
}

/// `approve`, `reject`, `cancel`: nothing besides `ok`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Empty {}

/// `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusBody {
    pub topic: TopicSummary,
}

/// `result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultBody {
    pub state: TopicState,
}

/// `list`: `next` is the last id when the page is full (pass it as
/// `after` for the next page).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListBody {
    pub topics: Vec<TopicSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

impl ListBody {
    pub fn new(topics: Vec<TopicSummary>, limit: usize) -> ListBody {
        let next = if topics.len() >= limit { topics.last().map(|t| t.id.clone()) } else { None };
        ListBody { topics, next }
    }
}

/// First line of a `watch` stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Watching {
    pub watching: Option<String>,
}

/// One event line of a `watch` stream (no `ok` field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventLine {
    pub event: TopicEvent,
}

/// The subscriber fell behind and `lagged` events were dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaggedLine {
    pub lagged: u64,
}

/// Whether a watch on one topic ends with this event: the topic reached a
/// terminal status or is parked for approval.
pub fn ends_watch(event: &TopicEvent) -> bool {
    event.step == "topic" && event.status.is_settled()
}

/// The event a watch on an already settled topic sends.
pub fn settled_event(state: &TopicState) -> TopicEvent {
    TopicEvent {
        topic_id: state.id.clone(),
        step: "topic".into(),
        variant: None,
        revision: None,
        attempt: None,
        outcome: state.status.as_str().into(),
        reason: state.error.as_ref().map(|e| e.message.clone()),
        elapsed_ms: None,
        waited_ms: None,
        status: state.status,
        at_ms: state.finished_at_ms.unwrap_or(state.updated_at_ms),
    }
}

/// The rate limiter as `health` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LimiterBody {
    pub requests_per_minute: u32,
    pub tokens_per_minute: u32,
    /// How long every caller is still held back by a provider's 429.
    pub paused_ms: u64,
    /// Calls waiting for the limiter now.
    pub waiting: usize,
}

impl From<LimiterSnapshot> for LimiterBody {
    fn from(s: LimiterSnapshot) -> Self {
        LimiterBody {
            requests_per_minute: s.requests_per_minute,
            tokens_per_minute: s.tokens_per_minute,
            paused_ms: s.paused_ms,
            waiting: s.waiting,
        }
    }
}

/// `health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthBody {
    pub protocol: u32,
    pub version: String,
    pub uptime_s: u64,
    pub provider: String,
    pub model: String,
    pub counts: BTreeMap<String, u64>,
    pub in_flight: usize,
    pub queued: usize,
    pub limiter: LimiterBody,
    /// Present only when supervision gave up (the engine accepts no more
    /// topics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalated: Option<String>,
    /// `ok`, or `degraded: <error>` while the store refuses writes (topics
    /// wait and retry; submits answer `store_unavailable`).
    #[serde(default = "store_ok")]
    pub store: String,
}

fn store_ok() -> String {
    "ok".to_string()
}

impl From<Health> for HealthBody {
    fn from(h: Health) -> Self {
        HealthBody {
            protocol: PROTOCOL_VERSION,
            version: h.version.to_string(),
            uptime_s: h.uptime_s,
            provider: h.provider.to_string(),
            model: h.model,
            counts: h.counts,
            in_flight: h.in_flight,
            queued: h.queued,
            limiter: h.limiter.into(),
            escalated: h.escalated,
            store: h.store,
        }
    }
}

/// Serializes one response line, newline included. serde_json escapes
/// control characters inside strings, so a topic's text can never break
/// the framing.
pub fn to_line<T: Serialize>(value: &T) -> Vec<u8> {
    match serde_json::to_vec(value) {
        Ok(mut v) => {
            v.push(b'\n');
            v
        }
        // Only maps with non-string keys or failing Serialize impls end up
        // here; none of the wire types has either. Answer something valid.
        Err(e) => {
            let fallback = Failure::new(WireError::new(codes::INTERNAL, format!("cannot encode the response: {e}")));
            let mut v = serde_json::to_vec(&fallback).unwrap_or_else(|_| {
                br#"{"ok":false,"error":{"code":"internal","message":"cannot encode the response"}}"#.to_vec()
            });
            v.push(b'\n');
            v
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(line: &str) -> WireError {
        Request::parse(line.as_bytes()).unwrap_err()
    }

    #[test]
    fn parses_every_op() {
        assert!(matches!(Request::parse(br#"{"op":"health"}"#), Ok(Request::Health)));
        let r = Request::parse(br#"{"op":"submit","topic":"x","variants":2,"require_approval":true}"#).unwrap();
        let Request::Submit(p) = r else { panic!() };
        assert_eq!(p.variants, Some(2));
        assert!(matches!(Request::parse(br#"{"op":"watch"}"#), Ok(Request::Watch(WatchParams { id: None }))));
        assert!(matches!(Request::parse(br#"{"op":"list","limit":5}"#), Ok(Request::List(_))));
    }

    #[test]
    fn errors_name_the_field() {
        let e = err(r#"{"op":"submit"}"#);
        assert_eq!(e.code, "bad_request");
        assert!(e.message.contains("topic"), "{}", e.message);
        let e = err(r#"{"op":"submit","topic":5}"#);
        assert!(e.message.contains("`topic`"), "{}", e.message);
        let e = err(r#"{"op":"result","id":"x","wait":"yes"}"#);
        assert!(e.message.contains("`wait`"), "{}", e.message);
        let e = err(r#"{"op":"status","id":"x","idd":1}"#);
        assert!(e.message.contains("idd"), "{}", e.message);
        assert_eq!(err(r#"{"op":"fly"}"#).code, "unknown_op");
        assert_eq!(err(r#"{"id":"x"}"#).message, "missing field `op`");
        assert_eq!(err(r#"{"op":1}"#).message, "field `op` must be a string");
        assert_eq!(err("[1]").code, "bad_request");
        assert!(err("{").message.starts_with("invalid JSON"));
        assert!(Request::parse(b"{\"op\":\"health\xff\"}").unwrap_err().message.contains("UTF-8"));
    }

    #[test]
    fn request_round_trips() {
        let r = Request::Result(ResultParams { id: "t1".into(), wait: true, timeout_s: Some(5.0) });
        let line = serde_json::to_vec(&r.to_value()).unwrap();
        assert_eq!(Request::parse(&line).unwrap(), r);
        let line = serde_json::to_vec(&Request::Health.to_value()).unwrap();
        assert_eq!(Request::parse(&line).unwrap(), Request::Health);
    }

    #[test]
    fn list_limits_and_next() {
        assert_eq!(ListParams::default().to_query().unwrap().limit, DEFAULT_LIST_LIMIT);
        assert!(ListParams { limit: Some(0), ..Default::default() }.to_query().is_err());
        assert!(ListParams { limit: Some(10_001), ..Default::default() }.to_query().is_err());
        assert!(ListParams { status: Some("nope".into()), ..Default::default() }.to_query().is_err());
        assert_eq!(ListBody::new(vec![], 1).next, None);
    }

    #[test]
    fn timeout_is_capped_and_checked() {
        let p = |t| ResultParams { id: "x".into(), wait: true, timeout_s: t };
        assert_eq!(p(None).timeout().unwrap().as_secs(), 600);
        assert_eq!(p(Some(1e9)).timeout().unwrap().as_secs(), 3600);
        assert!(p(Some(-1.0)).timeout().is_err());
    }

    #[test]
    fn lines_escape_newlines() {
        let line = to_line(&Success::new(Submitted { id: "a\nb".into(), existing: false }));
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        assert_eq!(String::from_utf8(line).unwrap(), "{\"ok\":true,\"id\":\"a\\nb\"}\n");
    }
}
