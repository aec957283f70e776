//! `scriptorium run` as a user runs it: the real binary, real files.
//! Ctrl-C mid-run (a real SIGINT) prints the summary, leaves every `--out`
//! file consistent with the journal and exits 130; the same command run
//! again resumes from DIR: same ids, same files, no finished step re-run.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use scriptorium::state::{TopicState, TopicStatus};

fn run_cmd(dir: &Path, topics: &Path, latency_ms: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_scriptorium"));
    cmd.arg("run")
        .arg("--out")
        .arg(dir)
        .arg("--file")
        .arg(topics)
        .env_remove("OPENAI_API_KEY")
        .env("SCRIPTORIUM_LLM__PROVIDER", "simulated")
        .env("SCRIPTORIUM_LLM__SIMULATED__LATENCY_MS", latency_ms)
        .env("SCRIPTORIUM_LLM__SIMULATED__JITTER_MS", "0")
        .env("SCRIPTORIUM_LIMITS__REQUESTS_PER_MINUTE", "0")
        .env("SCRIPTORIUM_LIMITS__TOKENS_PER_MINUTE", "0")
        .env("SCRIPTORIUM_WORKFLOW__VARIANTS", "2")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn states_in(dir: &Path) -> HashMap<String, TopicState> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let state: TopicState = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            out.insert(state.id.clone(), state);
        }
    }
    out
}

/// Each (step, variant, revision) appears once in a topic's timings: a
/// finished step that ran again would appear twice.
fn steps_run_once(state: &TopicState) {
    let mut seen = BTreeSet::new();
    for t in &state.timings {
        assert!(seen.insert((t.step, t.variant, t.revision)), "{} ran {:?} twice: {:?}", state.id, t, state.timings);
    }
}

#[test]
fn ctrl_c_summarises_and_exits_130_and_the_same_command_resumes_from_out() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let topics = tmp.path().join("topics.txt");
    std::fs::write(
        &topics,
        "# eight topics\nLearning C# in 2025\nIssue #42 triage\nHeat pumps\nTides\nBread\nRust\nSQLite\nVaccines\n",
    )
    .unwrap();
    let child = run_cmd(&out, &topics, "400").spawn().unwrap();
    // Wait until some steps are journaled, then interrupt.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let progressed = out.exists() && states_in(&out).values().any(|s| s.outline.is_some());
        if progressed || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY-free: kill(2) with SIGINT on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let first = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert_eq!(first.status.code(), Some(130), "stderr: {stderr}");
    assert!(stderr.contains("unfinished"), "{stderr}");
    assert!(!stderr.contains("could not write"), "{stderr}");
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(stdout.contains("Learning C# in 2025"), "a '#' inside a topic is kept: {stdout}");
    let before = states_in(&out);
    assert_eq!(before.len(), 8, "one file per topic");
    assert!(before.values().any(|s| !s.status.is_settled()), "interrupted mid-run");

    let second = run_cmd(&out, &topics, "0").output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(0), "stderr: {stderr}");
    let after = states_in(&out);
    assert_eq!(after.keys().collect::<BTreeSet<_>>(), before.keys().collect::<BTreeSet<_>>(), "same ids, same files");
    for (id, state) in &after {
        assert_eq!(state.status, TopicStatus::Completed, "{id}: {:?}", state.error);
        steps_run_once(state);
        // What the first run had finished is still there, unchanged.
        let old = &before[id];
        if let Some(outline) = &old.outline {
            assert_eq!(state.outline.as_ref(), Some(outline));
        }
        for t in &old.timings {
            assert!(state.timings.contains(t), "{id}: step {:?} was run again", t);
        }
    }
}
