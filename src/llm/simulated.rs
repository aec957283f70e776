//! The offline simulated provider: deterministic for a seed, no network.
//!
//! Produces outputs that pass the gates (an outline within the schema's
//! bounds, a markdown draft of the right length with the contract's headings,
//! reviews with varied scores, some not approved) and injects faults at the
//! configured rates so users can rehearse failures. Every text it writes says
//! that it is simulated.
//!
//! Must not: sleep on a blocking call, touch the network, or read the topic
//! id; determinism comes from `LlmRequest::seed_key` and the seed.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::{BoxFuture, LlmError, LlmProvider, LlmReply, LlmRequest, Usage};
use crate::config::SimulatedConfig;
use crate::workflow::prompts::DraftContract;

pub struct SimulatedProvider {
    config: SimulatedConfig,
}

enum Fault {
    None,
    ServerError,
    RateLimited,
    Malformed,
    Hang,
}

const FILLER: &[&str] = &[
    "simulated",
    "text",
    "explains",
    "the",
    "idea",
    "with",
    "a",
    "clear",
    "example",
    "and",
    "notes",
    "why",
    "it",
    "matters",
    "for",
    "readers",
    "who",
    "want",
    "practical",
    "detail",
    "about",
    "this",
    "part",
];

impl SimulatedProvider {
    pub fn new(config: SimulatedConfig) -> Self {
        Self { config }
    }

    fn rng(&self, request: &LlmRequest) -> SmallRng {
        SmallRng::seed_from_u64(self.config.seed ^ request.seed_key.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    fn pick_fault(&self, rng: &mut SmallRng) -> Fault {
        let c = &self.config;
        let x: f64 = rng.random();
        let mut edge = c.error_rate;
        if x < edge {
            return Fault::ServerError;
        }
        edge += c.rate_limit_rate;
        if x < edge {
            return Fault::RateLimited;
        }
        edge += c.malformed_rate;
        if x < edge {
            return Fault::Malformed;
        }
        edge += c.hang_rate;
        if x < edge {
            return Fault::Hang;
        }
        Fault::None
    }

    fn latency(&self, rng: &mut SmallRng) -> Duration {
        let jitter = if self.config.jitter_ms > 0 { rng.random_range(0..=self.config.jitter_ms) } else { 0 };
        Duration::from_millis(self.config.latency_ms + jitter)
    }
}

/// Extracts the JSON string after "Topic (…): " in the input, for plausible text.
fn topic_of(input: &str) -> String {
    input
        .lines()
        .find_map(|l| l.split_once("): ").filter(|(head, _)| head.starts_with("Topic")).map(|(_, t)| t))
        .and_then(|t| serde_json::from_str::<String>(t).ok())
        .unwrap_or_else(|| "the topic".to_string())
}

fn outline_json(schema: &Value, rng: &mut SmallRng, topic: &str) -> Value {
    let sections = Some(&schema["properties"]["sections"]);
    let min = sections.and_then(|s| s["minItems"].as_u64()).unwrap_or(3);
    let max = sections.and_then(|s| s["maxItems"].as_u64()).unwrap_or(5).max(min);
    let n = rng.random_range(min..=max);
    const NAMES: &[&str] = &[
        "Background",
        "How It Works",
        "Key Trade-offs",
        "A Worked Example",
        "Common Pitfalls",
        "Where It Is Heading",
        "Getting Started",
        "Further Details",
        "Practical Advice",
        "Open Questions",
        "Measuring Results",
        "Alternatives",
    ];
    let start = rng.random_range(0..NAMES.len());
    let sections: Vec<&str> = (0..n as usize).map(|i| NAMES[(start + i) % NAMES.len()]).collect();
    let title: String = format!("[simulated] {topic}").chars().take(150).collect();
    json!({ "title": title, "sections": sections })
}

fn route_json(schema: &Value, rng: &mut SmallRng) -> Value {
    let kinds: Vec<String> = schema["properties"]["kind"]["enum"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let kind = if kinds.is_empty() { "article".to_string() } else { kinds[rng.random_range(0..kinds.len())].clone() };
    json!({ "kind": kind })
}

fn review_json(rng: &mut SmallRng) -> Value {
    let score: u8 = rng.random_range(4..=10);
    let approved = score >= 8;
    let issues: Vec<&str> =
        if approved { vec![] } else { vec!["[simulated] the second section needs a concrete example"] };
    json!({
        "approved": approved,
        "score": score,
        "issues": issues,
        "suggestions": ["[simulated] tighten the introduction"],
    })
}

/// Words of filler text, built once: drafts copy slices of it instead of
/// drawing every word from the RNG (the simulator should cost far less than
/// the orchestration it exercises).
struct FillerText {
    text: String,
    /// Byte offset where each word starts.
    starts: Vec<usize>,
}

const FILLER_WORDS: usize = 4096;

fn filler_text() -> &'static FillerText {
    static TEXT: std::sync::OnceLock<FillerText> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        let mut rng = SmallRng::seed_from_u64(0x5C21_9701);
        let mut text = String::with_capacity(FILLER_WORDS * 7);
        let mut starts = Vec::with_capacity(FILLER_WORDS);
        for _ in 0..FILLER_WORDS {
            starts.push(text.len());
            text.push_str(FILLER[rng.random_range(0..FILLER.len())]);
            text.push(' ');
        }
        FillerText { text, starts }
    })
}

/// Appends exactly `words` words ("This … .") of filler.
fn push_filler(out: &mut String, words: u32, rng: &mut impl Rng) {
    if words == 0 {
        return;
    }
    out.push_str("This");
    let filler = filler_text();
    let mut left = words as usize - 1;
    while left > 0 {
        let take = left.min(FILLER_WORDS / 2);
        let first = rng.random_range(0..FILLER_WORDS - take);
        let start = filler.starts[first];
        // The end is where word `first + take` starts, minus its separator.
        let end = filler.starts.get(first + take).copied().unwrap_or(filler.text.len()) - 1;
        out.push(' ');
        out.push_str(&filler.text[start..end]);
        left -= take;
    }
    out.push('.');
}

/// A markdown draft meeting the contract: title, every heading, word count
/// inside the range.
pub fn draft_markdown(contract: &DraftContract, rng: &mut impl Rng) -> String {
    let lo = contract.min_words.max(1);
    let hi = contract.max_words.max(lo);
    let target = lo + (hi - lo) / 4 + rng.random_range(0..=((hi - lo) / 2).max(1)).min(hi - lo);
    let title = if contract.title.is_empty() { "[simulated] draft".to_string() } else { contract.title.clone() };
    let mut out = String::with_capacity(target as usize * 7);
    out.push_str("# ");
    out.push_str(&title);
    out.push_str("\n\n");
    let fixed = title.split_whitespace().count() as u32
        + contract.headings.iter().map(|h| h.split_whitespace().count() as u32).sum::<u32>();
    let mut body_words = target.saturating_sub(fixed).max(contract.headings.len() as u32);
    let n = contract.headings.len().max(1) as u32;
    for (i, h) in contract.headings.iter().enumerate() {
        out.push_str("## ");
        out.push_str(h);
        out.push('\n');
        let share = if i as u32 == n - 1 { body_words } else { (body_words / (n - i as u32)).max(1) };
        body_words -= share.min(body_words);
        push_filler(&mut out, share, rng);
        out.push_str("\n\n");
    }
    out
}

/// A structured draft (one key per section, see `schema::draft_keys`)
/// meeting the contract: the section texts of a markdown draft under the
/// schema's keys, which sort in document order.
fn structured_draft_json(schema: &Value, instructions: &str, rng: &mut SmallRng) -> Value {
    let markdown = DraftContract::parse(instructions).map(|c| draft_markdown(&c, rng)).unwrap_or_default();
    let mut bodies: Vec<String> = Vec::new();
    for line in markdown.lines() {
        if line.starts_with("## ") {
            bodies.push(String::new());
        } else if let Some(body) = bodies.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    let keys = schema["properties"].as_object().map(|p| p.keys().cloned().collect::<Vec<_>>()).unwrap_or_default();
    let mut bodies = bodies.into_iter();
    let object: serde_json::Map<String, Value> = keys
        .into_iter()
        .map(|k| (k, Value::String(bodies.next().unwrap_or_else(|| "[simulated] text".to_string()))))
        .collect();
    Value::Object(object)
}

/// A plausible, gate-passing output for a request, from what a server sees:
/// the structured format's name and schema (if any), the instructions and
/// the input. Shared with the fake OpenAI server used by tests and benches.
pub fn fake_output(format: Option<(&str, &Value)>, instructions: &str, input: &str, rng: &mut SmallRng) -> String {
    match format {
        Some(("route", schema)) => route_json(schema, rng).to_string(),
        Some(("outline", schema)) => outline_json(schema, rng, &topic_of(input)).to_string(),
        Some(("draft", schema)) => structured_draft_json(schema, instructions, rng).to_string(),
        Some(_) => review_json(rng).to_string(),
        None => match DraftContract::parse(instructions) {
            Some(contract) => draft_markdown(&contract, rng),
            None => "[simulated] no writing rules found in the instructions".to_string(),
        },
    }
}

impl LlmProvider for SimulatedProvider {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn model(&self) -> &str {
        "simulated"
    }

    fn complete<'a>(&'a self, request: &'a LlmRequest) -> BoxFuture<'a, Result<LlmReply, LlmError>> {
        Box::pin(async move {
            let mut rng = self.rng(request);
            let fault = self.pick_fault(&mut rng);
            let delay = self.latency(&mut rng);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            match fault {
                Fault::None | Fault::Malformed => {}
                Fault::ServerError => {
                    return Err(LlmError::Server {
                        status: 503,
                        retry_after: None,
                        message: "simulated server error".into(),
                    })
                }
                Fault::RateLimited => {
                    return Err(LlmError::RateLimited {
                        retry_after: Some(Duration::from_millis(200)),
                        message: "simulated rate limit".into(),
                    })
                }
                Fault::Hang => std::future::pending::<()>().await,
            }
            let format = request.format.as_ref().map(|f| (f.name, &f.schema));
            let text = fake_output(format, &request.instructions, &request.input.to_string(), &mut rng);
            let text = if matches!(fault, Fault::Malformed) { text[..text.len() / 2].to_string() } else { text };
            let usage = Usage {
                input_tokens: ((request.instructions.len() + request.input.len()) / 4) as u64,
                output_tokens: (text.len() / 4) as u64,
                ..Usage::default()
            };
            Ok(LlmReply { text, usage, finish_reason: Some("stop".to_string()), meta: Default::default() })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KindConfig;
    use crate::workflow::{gates, prompts, Outline};

    #[test]
    fn drafts_pass_the_gate_for_many_seeds() {
        let config = crate::config::Config::from_toml_str("", &[]).unwrap();
        for (min, max, n) in [(250, 400, 3), (300, 500, 6), (40, 60, 2), (60, 80, 5)] {
            let kind = KindConfig { min_words: min, max_words: max, ..KindConfig::default() };
            let outline = Outline { title: "A title".into(), sections: (0..n).map(|i| format!("Part {i}")).collect() };
            let p = prompts::write(&config, &kind, "t", &outline, None);
            let contract = DraftContract::parse(&p.instructions).unwrap();
            for seed in 0..200 {
                let md = draft_markdown(&contract, &mut SmallRng::seed_from_u64(seed));
                gates::check_draft(&md, &outline, &kind)
                    .unwrap_or_else(|e| panic!("{min}-{max} seed {seed}: {e}\n{md}"));
            }
        }
    }

    #[test]
    fn structured_drafts_pass_the_gate_for_many_seeds() {
        let config = crate::config::Config::from_toml_str("", &[]).unwrap();
        for (min, max, n) in [(60, 150, 2), (60, 150, 3), (250, 400, 5), (40, 60, 2)] {
            let kind = KindConfig { min_words: min, max_words: max, structured_draft: true, ..KindConfig::default() };
            let outline = Outline { title: "A title".into(), sections: (0..n).map(|i| format!("Part {i}")).collect() };
            let p = prompts::write(&config, &kind, "t", &outline, None);
            let format = crate::workflow::schema::draft_format(&kind, &outline);
            for seed in 0..100 {
                let text = fake_output(
                    Some(("draft", &format.schema)),
                    &p.instructions,
                    &p.input.to_string(),
                    &mut SmallRng::seed_from_u64(seed),
                );
                gates::check_structured_draft(&text, &outline, &kind)
                    .unwrap_or_else(|e| panic!("{min}-{max} seed {seed}: {e}\n{text}"));
            }
        }
    }
}
