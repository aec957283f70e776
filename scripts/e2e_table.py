#!/usr/bin/env python3
"""Summarises an end-to-end run of scripts/e2e-local-model.sh.

Reads, from the run directory, each provider's `PROVIDER.states.jsonl` (the
`scriptorium run --json` states, one per line), `PROVIDER.log.jsonl` (its
`--log-format json` stderr) and `server.log` (llama-server's log). Prints a
Markdown table: topic, provider, outcome, attempts per step, gate failures by
reason, tokens, seconds; then the checks. Exits 1 when a check fails: a topic
without a final state, a `fatal` error, or any request answered HTTP 400.

Usage: e2e_table.py RUN_DIR TOPICS_FILE PROVIDER...
Standard library only.
"""

import json
import re
import sys
from collections import Counter
from pathlib import Path


def read_jsonl(path):
    """JSON objects, one per line; other lines (a panic message) skipped."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_topics(path):
    topics = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            topics.append(line)
    return topics


# Gate and parse messages (src/workflow/gates.rs, src/llm/*.rs) by cause.
CATEGORIES = [
    ("cut_off", ("cut off at max_tokens", "response incomplete")),
    ("json", ("is not a valid", "expected a JSON", "is not a chat completion", "is not a Responses object")),
    ("words", ("words; it must have between",)),
    ("headings", ("missing `## ` headings", "the last `## ` heading")),
    ("keys", ("unexpected key", "missing key", "must be a string", "is empty")),
    ("fields", ("`sections`", "`title`", "`kind`", "`score`", "`issues`", "`suggestions`", "must be a single line")),
    ("empty", ("empty output", "empty draft")),
]


def category(reason, message):
    if reason != "invalid_output":
        return reason
    for name, needles in CATEGORIES:
        if any(n in message for n in needles):
            return name
    return "other"


def timing_label(t):
    label = t["step"]
    if t.get("revision") is not None:
        label += f"(r{t['revision']})"
    return label


def attempts_cell(state):
    """`step a/b/c` per step in order; `x` marks a step that failed."""
    failed = set()
    for v in state.get("variants", []):
        if v.get("error"):
            failed.add((v["error"]["step"], v["index"], None))
    error = state.get("error")
    groups = {}
    timings = sorted(state.get("timings", []), key=lambda t: (t["started_ms"], t["finished_ms"]))
    for i, t in enumerate(timings):
        key = (t["step"], t.get("variant"), t.get("revision"))
        is_last_of_step = not any(u["step"] == t["step"] for u in timings[i + 1 :])
        bad = key in failed or (error and error["step"] == t["step"] and is_last_of_step)
        groups.setdefault(timing_label(t), []).append(f"{t['attempts']}{'x' if bad else ''}")
    return " ".join(f"{k} {'/'.join(v)}" for k, v in groups.items()) or "-"


def outcome_cell(state):
    status = state["status"]
    if status == "completed":
        final = state.get("final") or {}
        review = final.get("review") or {}
        approved = "approved" if review.get("approved") else "not approved"
        return f"completed ({approved}, score {review.get('score', '-')}, {final.get('draft', {}).get('words', '-')} words)"
    error = state.get("error")
    if error:
        return f"{status}: {error['step']} {error['kind']}"
    return status


def server_400s(path):
    """Requests llama-server answered with 400, from its log."""
    if not path.exists():
        return 0
    n = 0
    for line in path.read_text(errors="replace").splitlines():
        # llama-server logs every error answer as
        # `srv operator(): got exception: {"error":{"code":400,...}}`;
        # with request logging on (-lv), also `request: POST /v1/... 400`.
        if '"code":400' in line or re.search(r"request: \w+ \S+ \S+ 400\b", line):
            n += 1
    return n


def main(argv):
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    run_dir, topics = Path(argv[1]), read_topics(argv[2])
    providers = argv[3:]
    rows, problems = [], []
    ours_400 = 0
    for provider in providers:
        states = read_jsonl(run_dir / f"{provider}.states.jsonl")
        logs = read_jsonl(run_dir / f"{provider}.log.jsonl")
        failures = {}
        for entry in logs:
            if entry.get("message") != "step attempt failed":
                continue
            error = str(entry.get("error", ""))
            if "HTTP 400" in error:
                ours_400 += 1
            cause = category(entry.get("reason", ""), error)
            failures.setdefault(entry.get("topic_id"), Counter())[cause] += 1
        by_topic = {s["topic"]: s for s in states}
        for topic in topics:
            state = by_topic.get(topic)
            if state is None:
                problems.append(f"{provider}: no final state for {topic!r}")
                rows.append([topic, provider, "missing", "-", "-", "-", "-"])
                continue
            if state["status"] not in ("completed", "failed"):
                problems.append(f"{provider}: {topic!r} ended as {state['status']}")
            error = state.get("error") or {}
            if error.get("kind") == "fatal":
                problems.append(f"{provider}: {topic!r} failed fatally: {error.get('message')}")
            if "HTTP 400" in error.get("message", ""):
                ours_400 += 1
            counts = failures.get(state["id"], Counter())
            gate = ", ".join(f"{k} {n}" for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"
            usage = state.get("usage", {})
            tokens = f"{usage.get('input_tokens', 0)}+{usage.get('output_tokens', 0)} ({usage.get('llm_calls', 0)} calls)"
            # From the first step's start: time queued behind other topics
            # is not this topic's.
            starts = [t["started_ms"] for t in state.get("timings", [])]
            start = min(starts) if starts else state["submitted_at_ms"]
            end = state.get("finished_at_ms") or state.get("updated_at_ms") or start
            seconds = f"{(end - start) / 1000:.1f}"
            rows.append([topic, provider, outcome_cell(state), attempts_cell(state), gate, tokens, seconds])

    header = ["topic", "provider", "outcome", "attempts per step", "gate failures by reason", "tokens in+out", "seconds"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")

    server = server_400s(run_dir / "server.log")
    print()
    print("attempts: `x` marks a step that failed after its attempts; review(rN) reviews revision N;")
    print("seconds: from the topic's first step to its end (not counting time queued behind other topics)")
    print(f"HTTP 400 answers: {server} in the server log, {ours_400} in our errors")
    if server or ours_400:
        problems.append("the server answered HTTP 400 to requests of ours")
    for p in problems:
        print(f"CHECK FAILED: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
