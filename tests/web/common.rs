//! Shared by the web console tests: an engine on the simulated provider with
//! the console in front of it on a loopback port, and a provider whose
//! drafts carry hostile markup.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use scriptorium::config::{Config, Secret};
use scriptorium::llm::simulated::SimulatedProvider;
use scriptorium::llm::{BoxFuture, LlmError, LlmProvider, LlmReply, LlmRequest};
use scriptorium::web::{self, WebServer};
use scriptorium::workflow::Step;
use scriptorium::{EngineOptions, Scriptorium};
use tokio::sync::oneshot;

pub fn config(latency_ms: u64) -> Config {
    let text = format!(
        r#"
[llm]
provider = "simulated"
[llm.simulated]
latency_ms = {latency_ms}
jitter_ms = 0
[limits]
requests_per_minute = 0
tokens_per_minute = 0
[workflow]
variants = 2
route = false
"#
    );
    Config::from_toml_str(&text, &[]).unwrap()
}

pub struct Console {
    pub engine: Scriptorium,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    server: Option<WebServer>,
    stop: Option<oneshot::Sender<()>>,
}

impl Console {
    pub async fn start(config: Config, token: Option<&str>, provider: Option<Arc<dyn LlmProvider>>) -> Console {
        let engine = Scriptorium::start(config, EngineOptions { provider, ..EngineOptions::default() }).await.unwrap();
        let token = Secret::new(token.unwrap_or(""));
        let listener = web::bind_addr("127.0.0.1:0".parse().unwrap(), &token).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let server = listener.serve(engine.clone(), async move {
            let _ = rx.await;
        });
        Console { engine, base: format!("http://{addr}"), server: Some(server), stop: Some(tx) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(10), server.join(Duration::from_secs(5))).await.unwrap();
        }
        self.engine.shutdown(Duration::from_millis(200)).await;
    }
}

/// What a hostile model slips into every draft: each line would change the
/// page's title or set `window.pwned` if it ran.
pub const HOSTILE_MARKUP: &str = "<script>document.title='pwned';window.pwned='script'</script>\n\n\
<img src=x onerror=\"document.title='pwned';window.pwned='img'\">\n\n\
Read [the guide](javascript:window.pwned='link') or <a href=\"javascript:window.pwned='raw'\" \
onclick=\"window.pwned='click'\">this</a>.\n\n\
<svg onload=\"window.pwned='svg'\"></svg>\n\n";

/// A topic that is itself hostile.
pub const HOSTILE_TOPIC: &str =
    "Lighthouses <img src=x onerror=\"window.pwned='topic'\"> <script>window.pwned='topic-script'</script>";

/// The simulated provider, with `HOSTILE_MARKUP` inserted after the title of
/// every markdown draft (writer and reviser), where the draft gate still
/// passes it (words stay in range, headings untouched).
pub struct HostileProvider {
    inner: SimulatedProvider,
}

impl HostileProvider {
    pub fn shared(config: &Config) -> Arc<dyn LlmProvider> {
        Arc::new(HostileProvider { inner: SimulatedProvider::new(config.llm.simulated.clone()) })
    }
}

impl LlmProvider for HostileProvider {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn model(&self) -> &str {
        self.inner.model()
    }

    fn complete<'a>(&'a self, request: &'a LlmRequest) -> BoxFuture<'a, Result<LlmReply, LlmError>> {
        Box::pin(async move {
            let mut reply = self.inner.complete(request).await?;
            if matches!(request.step, Step::Write | Step::Revise) && request.format.is_none() {
                if let Some(end) = reply.text.find("\n\n") {
                    reply.text.insert_str(end + 2, HOSTILE_MARKUP);
                }
            }
            Ok(reply)
        })
    }
}
