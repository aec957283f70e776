//! Embedding Scriptorium: start the engine in-process, submit topics over
//! the in-process handle (no socket), follow their events, print results.
//!
//! `cargo run --example embed -- "A topic" "Another topic"`

use std::time::Duration;

use scriptorium::config::Config;
use scriptorium::{EngineOptions, Scriptorium, SubmitRequest};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut topics: Vec<String> = std::env::args().skip(1).collect();
    if topics.is_empty() {
        topics = vec!["How tides work".into(), "Why sourdough needs a starter".into()];
    }
    // Offline and fast for the example; a real program would use Config::load.
    let mut config = Config::load(None)?;
    config.llm.provider = scriptorium::config::ProviderChoice::Simulated;
    config.llm.simulated.latency_ms = 20;
    let engine = Scriptorium::start(config, EngineOptions::default()).await?;

    let mut events = engine.events();
    tokio::spawn(async move {
        while let Ok(e) = events.recv().await {
            if e.step == "topic" || e.outcome == "attempt_failed" {
                println!("event: {} {} {}", e.topic_id, e.step, e.outcome);
            }
        }
    });

    let mut ids = Vec::new();
    for topic in topics {
        ids.push(engine.submit(SubmitRequest { topic, ..SubmitRequest::default() }).await?.id);
    }
    for id in ids {
        let state = engine.wait(&id, Some(Duration::from_secs(120))).await?;
        let score = state.final_draft.as_ref().map(|f| f.review.score);
        println!("{id}: {} (score {:?}, {} calls)", state.status.as_str(), score, state.usage.llm_calls);
    }
    engine.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
