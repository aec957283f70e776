//! The web console in a real browser: Debian's headless Chromium driven
//! over WebDriver (chromedriver, fantoccini). `.ci/run` installs both.
//!
//! 1. An editor submits a topic needing approval through the form, watches
//!    it reach `awaiting_approval` without reloading, reads the variants,
//!    rejects with a note, sees the revision and its diff arrive, approves,
//!    and sees `completed`. The test saves a screenshot of the topic page
//!    (`$CARGO_TARGET_TMPDIR/web-console.png`; `SCRIPTORIUM_WEB_SCREENSHOT`
//!    names another path — `docs/console.png` was made that way).
//! 2. A model whose drafts carry `<script>`, `onerror=` and `javascript:`
//!    links, on a hostile topic: the page renders, and nothing ran.

#[path = "web/common.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{config, Console, HostileProvider, HOSTILE_TOPIC};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

/// chromedriver on a free loopback port, and a browser session through it.
struct Browser {
    client: Option<Client>,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let mut driver =
            Command::new("chromedriver").arg("--port=0").stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect(
                "chromedriver is not installed (Debian: apt-get install chromium chromium-driver; .ci/run does)",
            );
        let stdout = driver.stdout.take().unwrap();
        // "ChromeDriver was started successfully on port 38789."
        let port = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| {
                l.split("started successfully on port ").nth(1).map(|p| p.trim_end_matches('.').trim().to_string())
            })
            .expect("chromedriver did not say its port");
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,3300",
            &format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": chromium_binary(), "args": args },
        });
        let Value::Object(caps) = caps else { unreachable!() };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = tokio::time::timeout(
            Duration::from_secs(60),
            ClientBuilder::new(connector).capabilities(caps).connect(&format!("http://127.0.0.1:{port}")),
        )
        .await
        .expect("chromium did not start within 60 s")
        .expect("a WebDriver session");
        Browser { client: Some(client), driver, _profile: profile }
    }

    fn c(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    async fn js(&self, script: &str) -> Value {
        self.c().execute(script, vec![]).await.unwrap_or_else(|e| panic!("script {script:?}: {e}"))
    }

    /// Polls `script` (which returns a value) until `ok` holds.
    async fn until(&self, what: &str, script: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            // A navigation in progress answers with an error: not yet.
            let v = self.c().execute(script, vec![]).await.unwrap_or(Value::Null);
            if ok(&v) {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                let page = self
                    .c()
                    .execute(
                        "return [location.href, document.getElementById('live-status').textContent, \
                         (document.getElementById('topic-status') || {}).textContent, \
                         document.querySelectorAll('article.revision').length, \
                         document.querySelectorAll('.human-note').length, \
                         document.querySelectorAll('.diffstat').length, \
                         (document.getElementById('approvals') || {}).textContent]",
                        vec![],
                    )
                    .await;
                panic!("timed out waiting for {what}; last value {v}; page {page:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn status(&self) -> String {
        let v = self
            .js("var e = document.querySelector('#topic-status [data-status]'); return e ? e.dataset.status : null")
            .await;
        v.as_str().unwrap_or("").to_string()
    }

    async fn until_status(&self, want: &str) {
        let script =
            "var e = document.querySelector('#topic-status [data-status]'); return e ? e.dataset.status : null";
        self.until(&format!("status {want}"), script, |v| v.as_str() == Some(want)).await;
    }

    /// A live update may swap the element between finding and using it
    /// (a stale element): find it again, a few times.
    async fn click(&self, css: &str) {
        for attempt in 1.. {
            let r = match self.c().find(Locator::Css(css)).await {
                Ok(e) => e.click().await,
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => return,
                Err(e) if attempt >= 5 => panic!("click {css}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    async fn type_into(&self, css: &str, text: &str) {
        for attempt in 1.. {
            let r = match self.c().find(Locator::Css(css)).await {
                Ok(e) => e.send_keys(text).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => return,
                Err(e) if attempt >= 5 => panic!("type into {css}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Ends the session (the browser quits); `Drop` stops chromedriver.
    async fn close(mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.close().await;
        }
    }
}

/// A failed assertion skips `close`: still end what we started — the
/// browser chromedriver launched for us (its child), then chromedriver.
impl Drop for Browser {
    fn drop(&mut self) {
        let driver = self.driver.id();
        if let Ok(children) = std::fs::read_to_string(format!("/proc/{driver}/task/{driver}/children")) {
            for pid in children.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                // SAFETY: signalling a process we started (chromedriver's child).
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn chromium_binary() -> String {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/chromium-headless-shell"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("chromium is not installed (Debian: apt-get install chromium chromium-driver; .ci/run does)")
        .to_string()
}

/// Marks the current document; the mark survives only if the page is not
/// reloaded.
async fn mark(b: &Browser, value: &str) {
    b.js(&format!("window.__mark = '{value}'; return true")).await;
}

async fn marked(b: &Browser) -> Value {
    b.js("return window.__mark || null").await
}

#[tokio::test]
async fn editor_submits_reads_rejects_and_approves_in_the_browser() {
    // 250 ms per model call: slow enough to watch the topic move.
    let console = Console::start(config(250), None, None).await;
    let b = Browser::start().await;
    b.c().goto(&console.url("/")).await.unwrap();
    assert!(b.c().title().await.unwrap().contains("Topics"));

    // Submit through the form.
    b.type_into("#topic", "How do lighthouses guide ships at night?").await;
    b.click("#require_approval").await;
    b.click("#submit-topic").await;
    b.until("the topic page", "return location.pathname", |v| v.as_str().is_some_and(|p| p.starts_with("/topics/")))
        .await;
    let path = b.js("return location.pathname").await.as_str().unwrap().to_string();
    let id = path.trim_start_matches("/topics/").to_string();
    let first = b.status().await;
    assert!(["queued", "running"].contains(&first.as_str()), "the page loaded while the topic runs: {first}");

    // It reaches awaiting_approval live, without a reload.
    mark(&b, "first").await;
    b.until("live indicator", "return document.getElementById('live-status').className", |v| v == "on").await;
    b.until_status("awaiting_approval").await;
    assert_eq!(marked(&b).await, "first", "the page was reloaded instead of updated live");

    // Read the variants: two, each with a review; the reason for the choice.
    let variants = b
        .js("return Array.from(document.querySelectorAll('article.variant')).map(v => ({ \
               score: v.querySelector('.scorenum') && v.querySelector('.scorenum').textContent, \
               chosen: v.classList.contains('chosen'), \
               draft: v.querySelector('article.markdown') && v.querySelector('article.markdown').textContent.length }))")
        .await;
    let variants = variants.as_array().unwrap();
    assert_eq!(variants.len(), 2, "{variants:?}");
    assert!(variants.iter().all(|v| v["score"].as_str().is_some_and(|s| s.ends_with("/10"))), "{variants:?}");
    assert!(variants.iter().all(|v| v["draft"].as_u64().unwrap_or(0) > 100), "{variants:?}");
    assert_eq!(variants.iter().filter(|v| v["chosen"] == true).count(), 1);
    let reason = b
        .js("var r = document.getElementById('chosen-reason'); \
             return r ? r.textContent : document.querySelector('main').innerHTML")
        .await;
    assert!(reason.as_str().unwrap().starts_with("Chose variant"), "{reason}");

    // Reject with a note: a POST, then the revision and its diff arrive live.
    let note = "Open with a concrete example of a ship at night.";
    b.type_into("#reject-note", note).await;
    b.click("#reject").await;
    b.until("back on the topic page", "return document.readyState === 'complete' && !window.__mark", |v| v == true)
        .await;
    mark(&b, "after-reject").await;
    // The last revision answers the note (the reviser may have run once
    // already, before approval, when the reviewer did not approve). Polled
    // as one script: a live update swaps the page between calls.
    let rev = b
        .until(
            "the revision with its diff, awaiting approval again",
            "var all = document.querySelectorAll('article.revision'), r = all[all.length - 1]; \
             var s = document.querySelector('#topic-status [data-status]'); \
             var n = r && r.querySelector('.human-note'), d = r && r.querySelector('.diffstat'); \
             return (r && n && d && s && s.dataset.status === 'awaiting_approval') ? \
               [n.textContent, !!r.querySelector('pre.diff'), d.textContent, r.querySelectorAll('pre.diff .add').length] : null",
            |v| v.is_array(),
        )
        .await;
    assert!(rev[0].as_str().unwrap().contains(note), "{rev}");
    assert_eq!(rev[1], true, "{rev}");
    assert!(rev[2].as_str().unwrap().starts_with('+'), "{rev}");
    assert!(rev[3].as_u64().unwrap() > 0, "the diff shows added lines: {rev}");
    assert_eq!(marked(&b).await, "after-reject", "the revision arrived without a reload");

    // The screenshot of the topic page (awaiting approval, with the revision).
    let png = b.c().screenshot().await.unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let out = std::env::var_os("SCRIPTORIUM_WEB_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("web-console.png"));
    std::fs::write(&out, &png).unwrap();

    // Approve: completed, with the final draft.
    b.click("#approve").await;
    b.until_status("completed").await;
    let final_len = b.js("var f = document.getElementById('final-draft'); return f ? f.textContent.length : 0").await;
    assert!(final_len.as_u64().unwrap() > 100);
    let st = console.engine.get(&id).await.unwrap();
    assert_eq!(st.status, scriptorium::state::TopicStatus::Completed);
    assert_eq!(st.revisions.last().unwrap().human_note.as_deref(), Some(note));

    // The list shows it, with tokens, and filters by status.
    b.c().goto(&console.url("/?status=completed")).await.unwrap();
    let row = b
        .js(&format!("var r = document.querySelector('tr[data-topic=\"{id}\"]'); return r ? r.textContent : null"))
        .await;
    assert!(row.as_str().unwrap().contains("completed"), "{row}");
    b.c().goto(&console.url("/?status=failed")).await.unwrap();
    assert_eq!(b.js("return document.querySelectorAll('tbody tr').length").await, 0);

    b.close().await;
    console.stop().await;
}

#[tokio::test]
async fn hostile_model_output_does_not_run_in_the_browser() {
    let cfg = config(150);
    let provider = HostileProvider::shared(&cfg);
    let console = Console::start(cfg, None, Some(provider)).await;
    let b = Browser::start().await;
    b.c().goto(&console.url("/")).await.unwrap();
    // The topic itself is hostile too, typed into the form.
    b.type_into("#topic", HOSTILE_TOPIC).await;
    b.click("#submit-topic").await;
    b.until("the topic page", "return location.pathname", |v| v.as_str().is_some_and(|p| p.starts_with("/topics/")))
        .await;
    // Completed arrives through the live update (the page re-renders the
    // hostile drafts through the same sanitiser).
    b.until_status("completed").await;
    // Open every draft, click every link: still nothing may run.
    b.js("document.querySelectorAll('details').forEach(d => d.open = true); \
          document.querySelectorAll('article.markdown a').forEach(a => a.click()); return true")
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let verdict = b
        .js("return { pwned: window.pwned === undefined ? null : String(window.pwned), title: document.title, \
                     scripts: Array.from(document.scripts).map(s => s.getAttribute('src')), \
                     handlers: document.querySelectorAll('[onerror],[onload],[onclick]').length, \
                     jslinks: Array.from(document.querySelectorAll('a')).filter(a => /^javascript:/i.test(a.getAttribute('href') || '')).length, \
                     imgs: document.querySelectorAll('img').length, \
                     heading: document.querySelector('h1.topic-title').textContent, \
                     guide: document.querySelector('#final-draft').textContent.includes('the guide') }")
        .await;
    assert_eq!(verdict["pwned"], Value::Null, "hostile script ran: {verdict}");
    // The title is the topic's text (which mentions pwned), never the payload's.
    let title = verdict["title"].as_str().unwrap();
    assert!(title != "pwned" && title.ends_with(" · Scriptorium"), "{verdict}");
    assert_eq!(verdict["scripts"], json!(["/static/console.js"]), "{verdict}");
    assert_eq!(verdict["handlers"], 0, "{verdict}");
    assert_eq!(verdict["jslinks"], 0, "{verdict}");
    assert_eq!(verdict["imgs"], 0, "{verdict}");
    // The text itself is shown (escaped), and the link's words survive.
    assert!(verdict["heading"].as_str().unwrap().contains("<img src=x onerror="), "{verdict}");
    assert_eq!(verdict["guide"], true, "{verdict}");
    // Still on our page (no navigation by a link).
    let path = b.js("return location.pathname").await;
    assert!(path.as_str().unwrap().starts_with("/topics/"), "{path}");
    b.close().await;
    console.stop().await;
}
