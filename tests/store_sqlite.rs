//! Integration tests for `SqliteStore` against a real database file in a
//! temporary directory: round trips through the journal, idempotency,
//! durability across reopen, queries, concurrency, corruption handling and
//! schema-version refusal. No timing assertions.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use scriptorium::llm::{FailureReason, Usage};
use scriptorium::state::{
    JournalRecord, StepCost, StepError, StepTiming, Submission, TopicState, TopicStatus, TopicSummary,
};
use scriptorium::store::sqlite::SqliteStore;
use scriptorium::store::{Inserted, ListQuery, StoreError, TopicStore};
use scriptorium::workflow::{Draft, Outline, Review, Step};

fn submission(id: &str, key: Option<&str>, submitted_ms: u64) -> Submission {
    Submission {
        id: id.to_string(),
        topic: format!("Why \"{id}\" matters — a short explainer"),
        kind: None,
        variants: 2,
        require_approval: false,
        idempotency_key: key.map(str::to_string),
        submitted_ms,
        budget: Default::default(),
    }
}

fn cost(calls: u32, input: u64, output: u64) -> StepCost {
    StepCost { calls, attempts: calls, usage: Usage { input_tokens: input, output_tokens: output, ..Usage::default() } }
}

fn timing(step: Step, variant: Option<u32>, started_ms: u64) -> StepTiming {
    StepTiming { step, variant, revision: None, attempts: 1, started_ms, finished_ms: started_ms + 40 }
}

fn draft(n: u32) -> Draft {
    Draft {
        markdown: format!("# Title {n}\n\n## Background\n\nSome text with ünïcödé, \"quotes\" and a\nnewline.\n")
            .into(),
        words: 120 + n,
    }
}

fn review(score: u8) -> Review {
    Review {
        approved: score >= 7,
        score,
        issues: vec!["intro is long".into()],
        suggestions: vec!["cut the first paragraph".into()],
    }
}

/// A complete two-variant run, each record with the time it happened.
fn completed_run(t0: u64) -> Vec<(JournalRecord, u64)> {
    vec![
        (JournalRecord::Started, t0 + 1),
        (
            JournalRecord::Routed {
                kind: "explainer".into(),
                cost: cost(1, 200, 10),
                timing: Some(timing(Step::Route, None, t0 + 2)),
            },
            t0 + 50,
        ),
        (
            JournalRecord::Planned {
                outline: Outline { title: "A title".into(), sections: vec!["Background".into(), "Details".into()] },
                cost: cost(1, 300, 80),
                timing: timing(Step::Plan, None, t0 + 60),
            },
            t0 + 100,
        ),
        (
            JournalRecord::Drafted {
                variant: 0,
                draft: draft(0),
                cost: cost(1, 500, 900),
                timing: timing(Step::Write, Some(0), t0 + 110),
            },
            t0 + 150,
        ),
        (
            JournalRecord::Drafted {
                variant: 1,
                draft: draft(1),
                cost: cost(2, 1000, 1800),
                timing: timing(Step::Write, Some(1), t0 + 110),
            },
            t0 + 160,
        ),
        (
            JournalRecord::Reviewed {
                variant: 0,
                review: review(6),
                cost: cost(1, 1200, 150),
                timing: timing(Step::Review, Some(0), t0 + 170),
            },
            t0 + 210,
        ),
        (
            JournalRecord::Reviewed {
                variant: 1,
                review: review(8),
                cost: cost(1, 1200, 160),
                timing: timing(Step::Review, Some(1), t0 + 170),
            },
            t0 + 215,
        ),
        (JournalRecord::Chosen { variant: 1, reason: "higher score".into() }, t0 + 216),
        (JournalRecord::Completed, t0 + 217),
    ]
}

/// Applies `record` to `state` (as the topic actor does) and appends it.
async fn step(store: &SqliteStore, state: &mut TopicState, record: JournalRecord, at_ms: u64) {
    state.apply(&record, at_ms);
    store.append(state, &record).await.unwrap();
}

/// Inserts a topic and drives it to `status` with realistic records;
/// returns the in-memory state.
async fn topic_in(store: &SqliteStore, id: &str, status: TopicStatus, t0: u64) -> TopicState {
    let mut state = TopicState::new(&submission(id, None, t0));
    assert_eq!(store.insert(&state).await.unwrap(), Inserted::New);
    let records: Vec<(JournalRecord, u64)> = match status {
        TopicStatus::Queued => vec![],
        TopicStatus::Running => completed_run(t0).into_iter().take(4).collect(),
        TopicStatus::AwaitingApproval => {
            let mut r: Vec<_> = completed_run(t0).into_iter().take(8).collect();
            r.push((JournalRecord::AwaitingApproval, t0 + 300));
            r
        }
        TopicStatus::Completed => completed_run(t0),
        TopicStatus::Failed => vec![
            (JournalRecord::Started, t0 + 1),
            (
                JournalRecord::Failed {
                    error: StepError {
                        step: Step::Route,
                        kind: FailureReason::RateLimited,
                        message: "retry budget exhausted".into(),
                    },
                    cost: cost(3, 600, 0),
                    timing: None,
                },
                t0 + 90,
            ),
        ],
        TopicStatus::Cancelled => vec![(JournalRecord::Started, t0 + 1), (JournalRecord::Cancelled, t0 + 5)],
        TopicStatus::DeadLetter => {
            vec![(JournalRecord::Started, t0 + 1), (JournalRecord::DeadLettered { deliveries: 6 }, t0 + 5)]
        }
    };
    for (record, at) in records {
        step(store, &mut state, record, at).await;
    }
    assert_eq!(state.status, status);
    state
}

fn raw(path: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    conn
}

fn journal_seqs(path: &Path, id: &str) -> Vec<i64> {
    let conn = raw(path);
    let mut stmt = conn.prepare("SELECT seq FROM journal WHERE topic_id = ?1 ORDER BY seq").unwrap();
    stmt.query_map([id], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
}

fn ids<T>(items: &[T], id: impl Fn(&T) -> &str) -> Vec<String> {
    items.iter().map(|t| id(t).to_string()).collect()
}

#[tokio::test]
async fn roundtrip_through_journal_equals_in_memory_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("nested/dir/store.db")).unwrap();

    let expected = topic_in(&store, "t001", TopicStatus::Completed, 1_000).await;
    assert!(expected.final_draft.is_some(), "test data should produce a final draft");

    let loaded = store.load("t001").await.unwrap().unwrap();
    assert_eq!(loaded, expected);
    assert_eq!(store.load("missing").await.unwrap(), None);

    let listed = store.list(ListQuery::default()).await.unwrap();
    assert_eq!(listed, vec![TopicSummary::from(&expected)]);
}

#[tokio::test]
async fn approval_loop_roundtrips() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("store.db")).unwrap();
    let mut state = topic_in(&store, "t001", TopicStatus::AwaitingApproval, 1_000).await;
    let more = vec![
        (JournalRecord::Rejected { note: "more examples".into(), at_ms: 2_000 }, 2_000),
        (
            JournalRecord::Revised {
                number: 1,
                draft: draft(9),
                human_note: Some("more examples".into()),
                cost: cost(1, 900, 1000),
                timing: timing(Step::Revise, None, 2_010),
            },
            2_050,
        ),
        (
            JournalRecord::RevisionReviewed {
                number: 1,
                review: review(9),
                cost: cost(1, 900, 100),
                timing: timing(Step::Review, None, 2_060),
            },
            2_100,
        ),
        (JournalRecord::AwaitingApproval, 2_101),
        (JournalRecord::Approved { note: None, at_ms: 3_000 }, 3_000),
        (JournalRecord::Completed, 3_001),
    ];
    for (record, at) in more {
        step(&store, &mut state, record, at).await;
    }
    assert_eq!(store.load("t001").await.unwrap().unwrap(), state);
}

#[tokio::test]
async fn queued_topic_without_journal_loads_as_queued() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("store.db")).unwrap();
    let expected = topic_in(&store, "t001", TopicStatus::Queued, 1_000).await;
    let loaded = store.load("t001").await.unwrap().unwrap();
    assert_eq!(loaded.status, TopicStatus::Queued);
    assert_eq!(loaded, expected);
}

#[tokio::test]
async fn idempotency_key_returns_the_first_topic() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("store.db")).unwrap();

    let first = TopicState::new(&submission("t001", Some("key-1"), 1_000));
    let second = TopicState::new(&submission("t002", Some("key-1"), 2_000));
    let other = TopicState::new(&submission("t003", Some("key-2"), 3_000));
    assert_eq!(store.insert(&first).await.unwrap(), Inserted::New);
    assert_eq!(store.insert(&second).await.unwrap(), Inserted::Existing("t001".into()));
    assert_eq!(store.insert(&other).await.unwrap(), Inserted::New);
    // Retrying the very same submit is also answered with the first id.
    assert_eq!(store.insert(&first).await.unwrap(), Inserted::Existing("t001".into()));

    assert_eq!(store.load("t002").await.unwrap(), None);
    let listed = store.list(ListQuery::default()).await.unwrap();
    assert_eq!(ids(&listed, |s| &s.id), ["t001", "t003"]);
}

#[tokio::test]
async fn same_idempotency_key_in_one_batch_yields_one_topic() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("store.db")).unwrap();
    // Both ops are sent before either is awaited, so they usually share a
    // batch; the outcome must be the same either way.
    let a = store.insert(&TopicState::new(&submission("t001", Some("k"), 1)));
    let b = store.insert(&TopicState::new(&submission("t002", Some("k"), 2)));
    assert_eq!(a.await.unwrap(), Inserted::New);
    assert_eq!(b.await.unwrap(), Inserted::Existing("t001".into()));
}

#[tokio::test]
async fn data_survives_reopen_and_journal_continues() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let (mut running, done) = {
        let store = SqliteStore::open(&path).unwrap();
        let running = topic_in(&store, "t001", TopicStatus::Running, 1_000).await;
        let done = topic_in(&store, "t002", TopicStatus::Completed, 2_000).await;
        (running, done)
    };

    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.load("t001").await.unwrap().unwrap(), running);
    assert_eq!(store.load("t002").await.unwrap().unwrap(), done);
    let listed = store.list(ListQuery::default()).await.unwrap();
    assert_eq!(listed, vec![TopicSummary::from(&running), TopicSummary::from(&done)]);

    // Appending after a reopen continues the journal sequence (the writer's
    // seq cache starts from MAX(seq) on disk).
    for (record, at) in completed_run(1_000).into_iter().skip(4) {
        step(&store, &mut running, record, at).await;
    }
    assert_eq!(store.load("t001").await.unwrap().unwrap(), running);
    assert_eq!(journal_seqs(&path, "t001"), (1..=9).collect::<Vec<i64>>());
    // And a new insert after reopen keeps insertion order.
    let third = topic_in(&store, "t000", TopicStatus::Queued, 500).await;
    let listed = store.list(ListQuery::default()).await.unwrap();
    assert_eq!(ids(&listed, |s| &s.id), ["t001", "t002", "t000"]);
    assert_eq!(listed[2], TopicSummary::from(&third));
}

#[tokio::test]
async fn ops_sent_before_drop_are_committed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let mut state = TopicState::new(&submission("t001", None, 1_000));
    {
        let store = SqliteStore::open(&path).unwrap();
        store.insert(&state).await.unwrap();
        // Futures are created (which sends the ops) and dropped unawaited.
        for i in 0..50 {
            let record = JournalRecord::Chosen { variant: i, reason: format!("reason {i}") };
            state.apply(&record, 2_000 + i as u64);
            drop(store.append(&state, &record));
        }
    }
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.load("t001").await.unwrap().unwrap(), state);
    assert_eq!(journal_seqs(&path, "t001").len(), 50);
}

#[tokio::test]
async fn unfinished_returns_resumable_topics_in_insertion_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("store.db")).unwrap();
    // Ids deliberately not in insertion order: order is by insertion (seq).
    let plan = [
        ("t9", TopicStatus::Completed),
        ("t8", TopicStatus::AwaitingApproval),
        ("t7", TopicStatus::Failed),
        ("t6", TopicStatus::Queued),
        ("t5", TopicStatus::Cancelled),
        ("t4", TopicStatus::Running),
        ("t3", TopicStatus::Queued),
    ];
    let mut expected = Vec::new();
    for (i, (id, status)) in plan.iter().enumerate() {
        let state = topic_in(&store, id, *status, 1_000 * (i as u64 + 1)).await;
        if !status.is_terminal() {
            expected.push(state);
        }
    }
    let unfinished = store.unfinished().await.unwrap();
    assert_eq!(ids(&unfinished, |s| &s.id), ["t8", "t6", "t4", "t3"]);
    assert_eq!(unfinished, expected);
}

#[tokio::test]
async fn list_paginates_by_insertion_order_with_status_filter() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("store.db")).unwrap();
    let mut all = Vec::new();
    for i in 0..10u64 {
        let status = if i % 3 == 0 { TopicStatus::Completed } else { TopicStatus::Running };
        all.push(topic_in(&store, &format!("t{i:02}"), status, 1_000 * (i + 1)).await);
    }
    let page = |after: Option<&str>, limit: usize, status: Option<TopicStatus>| ListQuery {
        status,
        after: after.map(str::to_string),
        limit,
    };

    // Pages of 4 cover everything once, in order.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let got = store.list(page(after.as_deref(), 4, None)).await.unwrap();
        if got.is_empty() {
            break;
        }
        assert!(got.len() <= 4);
        after = got.last().map(|s| s.id.clone());
        seen.extend(got);
    }
    assert_eq!(seen, all.iter().map(TopicSummary::from).collect::<Vec<_>>());

    let got = store.list(page(Some("t02"), 3, None)).await.unwrap();
    assert_eq!(ids(&got, |s| &s.id), ["t03", "t04", "t05"]);

    let completed = store.list(page(None, 0, Some(TopicStatus::Completed))).await.unwrap();
    assert_eq!(ids(&completed, |s| &s.id), ["t00", "t03", "t06", "t09"]);
    assert!(completed.iter().all(|s| s.status == TopicStatus::Completed));
    let got = store.list(page(Some("t03"), 2, Some(TopicStatus::Completed))).await.unwrap();
    assert_eq!(ids(&got, |s| &s.id), ["t06", "t09"]);
    // The cursor need not match the filter.
    let got = store.list(page(Some("t04"), 1, Some(TopicStatus::Completed))).await.unwrap();
    assert_eq!(ids(&got, |s| &s.id), ["t06"]);

    // limit 0 (the Default) means no limit.
    assert_eq!(store.list(ListQuery::default()).await.unwrap().len(), 10);
    assert!(store.list(page(Some("t09"), 5, None)).await.unwrap().is_empty());
    // An unknown cursor falls back to id order instead of restarting.
    let got = store.list(page(Some("t045"), 2, None)).await.unwrap();
    assert_eq!(ids(&got, |s| &s.id), ["t05", "t06"]);
}

#[tokio::test]
async fn list_after_uses_insertion_order_not_id_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("store.db")).unwrap();
    for (i, id) in ["b", "a", "c"].iter().enumerate() {
        topic_in(&store, id, TopicStatus::Queued, i as u64).await;
    }
    let all = store.list(ListQuery::default()).await.unwrap();
    assert_eq!(ids(&all, |s| &s.id), ["b", "a", "c"]);
    let after_b = store.list(ListQuery { after: Some("b".into()), ..ListQuery::default() }).await.unwrap();
    assert_eq!(ids(&after_b, |s| &s.id), ["a", "c"]);
}

#[tokio::test]
async fn counts_by_status() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("store.db")).unwrap();
    let empty = store.counts().await.unwrap();
    assert_eq!(empty.len(), TopicStatus::ALL.len());
    assert!(empty.values().all(|&n| n == 0));

    let plan = [
        TopicStatus::Queued,
        TopicStatus::Queued,
        TopicStatus::Running,
        TopicStatus::Completed,
        TopicStatus::Completed,
        TopicStatus::Completed,
        TopicStatus::Failed,
    ];
    for (i, status) in plan.iter().enumerate() {
        topic_in(&store, &format!("t{i}"), *status, i as u64).await;
    }
    let expected: BTreeMap<String, u64> = [
        ("queued", 2),
        ("running", 1),
        ("awaiting_approval", 0),
        ("completed", 3),
        ("failed", 1),
        ("cancelled", 0),
        ("dead_letter", 0),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(store.counts().await.unwrap(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_from_many_tasks_all_land() {
    const TOPICS: u64 = 100;
    const PER_TOPIC: u32 = 20; // 2,000 appends in all
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = Arc::new(SqliteStore::open(&path).unwrap());

    let mut tasks = Vec::new();
    for t in 0..TOPICS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut state = TopicState::new(&submission(&format!("t{t:03}"), None, t));
            store.insert(&state).await.unwrap();
            step(&store, &mut state, JournalRecord::Started, 1).await;
            for i in 1..PER_TOPIC {
                let record = JournalRecord::Drafted {
                    variant: i % 3,
                    draft: draft(i),
                    cost: cost(1, 10, 20),
                    timing: timing(Step::Write, Some(i % 3), 1_000 + i as u64),
                };
                step(&store, &mut state, record, 1_000 + i as u64).await;
            }
            state
        }));
    }
    let mut expected = Vec::new();
    for task in tasks {
        expected.push(task.await.unwrap());
    }

    for state in &expected {
        assert_eq!(store.load(&state.id).await.unwrap().as_ref(), Some(state));
    }
    let total: i64 = raw(&path).query_row("SELECT COUNT(*) FROM journal", [], |r| r.get(0)).unwrap();
    assert_eq!(total, (TOPICS * PER_TOPIC as u64) as i64);
    assert_eq!(journal_seqs(&path, "t042"), (1..=PER_TOPIC as i64).collect::<Vec<_>>());
    assert_eq!(store.counts().await.unwrap()["running"], TOPICS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_to_one_topic_get_distinct_seqs() {
    const APPENDS: u32 = 500;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = Arc::new(SqliteStore::open(&path).unwrap());
    let state = TopicState::new(&submission("t001", None, 1));
    store.insert(&state).await.unwrap();

    let mut tasks = Vec::new();
    for i in 0..APPENDS {
        let store = Arc::clone(&store);
        let state = state.clone();
        tasks.push(tokio::spawn(async move {
            let record = JournalRecord::Chosen { variant: i, reason: "race".into() };
            store.append(&state, &record).await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(journal_seqs(&path, "t001"), (1..=APPENDS as i64).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_failing_op_does_not_fail_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("store.db")).unwrap();
    let mut state = TopicState::new(&submission("t001", None, 1));
    store.insert(&state).await.unwrap();

    // All sent before any is awaited, so they normally share one batch.
    let started = JournalRecord::Started;
    state.apply(&started, 2);
    let ok1 = store.append(&state, &started);
    let unknown = TopicState::new(&submission("nope", None, 1));
    let bad_append = store.append(&unknown, &JournalRecord::Started);
    let bad_insert = store.insert(&TopicState::new(&submission("t001", None, 5))); // duplicate id
    let chosen = JournalRecord::Chosen { variant: 0, reason: "only one".into() };
    state.apply(&chosen, 3);
    let ok2 = store.append(&state, &chosen);

    ok1.await.unwrap();
    assert!(matches!(bad_append.await, Err(StoreError::Database(m)) if m.contains("unknown topic")));
    assert!(matches!(bad_insert.await, Err(StoreError::Database(_))));
    ok2.await.unwrap();
    assert_eq!(store.load("t001").await.unwrap().unwrap(), state);
    assert_eq!(store.load("nope").await.unwrap(), None);
}

#[tokio::test]
async fn corrupt_journal_row_is_reported_not_panicked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = SqliteStore::open(&path).unwrap();
    topic_in(&store, "t001", TopicStatus::Running, 1_000).await;
    topic_in(&store, "t002", TopicStatus::Running, 2_000).await;
    topic_in(&store, "t003", TopicStatus::Queued, 3_000).await;

    let conn = raw(&path);
    conn.execute(
        "INSERT INTO journal (topic_id, seq, kind, at_ms, record_json) VALUES ('t001', 99, 'planned', 5, '{\"type\": \"planned\", ')",
        [],
    )
    .unwrap();
    // Valid JSON, but not a journal record.
    conn.execute(
        "INSERT INTO journal (topic_id, seq, kind, at_ms, record_json) VALUES ('t002', 99, 'bogus', 5, '{\"type\": \"bogus\"}')",
        [],
    )
    .unwrap();
    conn.execute("UPDATE topics SET submission_json = 'null' WHERE id = 't003'", []).unwrap();

    for id in ["t001", "t002", "t003"] {
        match store.load(id).await {
            Err(StoreError::Corrupt(msg)) => assert!(msg.contains(id), "{msg}"),
            other => panic!("expected Corrupt for {id}, got {other:?}"),
        }
    }
    assert!(matches!(store.unfinished().await, Err(StoreError::Corrupt(_))));
}

#[tokio::test]
async fn newer_schema_version_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    {
        let conn = raw(&path);
        conn.execute_batch("CREATE TABLE future (x); PRAGMA user_version = 2;").unwrap();
    }
    match SqliteStore::open(&path) {
        Err(StoreError::Database(msg)) => {
            assert!(msg.contains("schema version 2"), "{msg}");
            assert!(msg.contains("newer"), "{msg}");
        }
        other => panic!("expected a schema version error, got {other:?}"),
    }
    let conn = raw(&path);
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(version, 2);
    assert_eq!(mode, "delete", "a refused database must not be switched to WAL");
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    std::fs::write(&path, b"this is not an sqlite file, not even close, padded to be long enough").unwrap();
    assert!(matches!(SqliteStore::open(&path), Err(StoreError::Database(_))));
}

#[test]
fn schema_version_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    drop(SqliteStore::open(&path).unwrap());
    let conn = raw(&path);
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, scriptorium::store::sqlite::SCHEMA_VERSION);
    // Reopening an existing current-version file works.
    drop(SqliteStore::open(&path).unwrap());
}

/// Env var that turns `kill9_child_writer` into the child of
/// `acknowledged_appends_survive_kill_9`; unset, that test does nothing.
const CHILD_DB_ENV: &str = "SCRIPTORIUM_STORE_TEST_CHILD_DB";

#[tokio::test]
async fn kill9_child_writer() {
    let Some(path) = std::env::var_os(CHILD_DB_ENV) else { return };
    let store = SqliteStore::open(Path::new(&path)).unwrap();
    let mut state = TopicState::new(&submission("t001", None, 1));
    store.insert(&state).await.unwrap();
    // Bounded so an orphaned child cannot run forever.
    for i in 1..=200_000u32 {
        let record = JournalRecord::Chosen { variant: i, reason: "kill me".into() };
        state.apply(&record, u64::from(i));
        store.append(&state, &record).await.unwrap();
        // Printed only after the append resolved, i.e. after COMMIT.
        println!("ACKED {i}");
    }
}

#[test]
fn acknowledged_appends_survive_kill_9() {
    use std::io::BufRead;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["kill9_child_writer", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DB_ENV, &path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kept open until after the kill, so the child never sees a closed pipe.
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked = 0u32;
    for line in lines.by_ref() {
        if let Some(n) = line.unwrap().strip_prefix("ACKED ") {
            acked = n.parse().unwrap();
            if acked >= 500 {
                break;
            }
        }
    }
    // SIGKILL on Unix: no destructors, no writer-thread shutdown.
    child.kill().unwrap();
    child.wait().unwrap();
    drop(lines);
    assert!(acked >= 500, "child stopped early after {acked} appends");

    let on_disk = journal_seqs(&path, "t001");
    assert!(on_disk.len() as u32 >= acked, "{} rows on disk, {acked} acknowledged", on_disk.len());
    assert_eq!(on_disk, (1..=on_disk.len() as i64).collect::<Vec<_>>());
    // And the store opens and replays the killed database.
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let store = SqliteStore::open(&path).unwrap();
    let loaded = rt.block_on(store.load("t001")).unwrap().unwrap();
    assert_eq!(loaded.chosen_variant, Some(on_disk.len() as u32));
}
