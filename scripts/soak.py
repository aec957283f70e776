#!/usr/bin/env python3
"""Soak run: the daemon with the simulated provider at realistic latency under
a steady submit load, sampled every 10 s; then repeated floods of concurrent
metrics scrapes, with RSS after each, to tell retention from a leak.

    cargo build --release
    python3 scripts/soak.py --minutes 10 --rate 2 --out soak.csv

Prints one line per sample (elapsed s, RSS KiB, anonymous RSS KiB, open fds,
queued, running, completed, failed) and writes the same as CSV; then one line per flood round.
Standard library only. The daemon runs in a temporary data dir and is stopped
(SIGTERM) at the end; its exit code is reported.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_kib(pid):
    return status_kib(pid, "VmRSS")


def anon_kib(pid):
    """Heap and stacks: what a leak would grow (RssFile is mapped files:
    the binary's pages and SQLite's shared-memory index)."""
    return status_kib(pid, "RssAnon")


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


class Client:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")

    def call(self, request):
        self.file.write((json.dumps(request) + "\n").encode())
        self.file.flush()
        return json.loads(self.file.readline())


def scrape(port, results):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            results.append(data.startswith(b"HTTP/1.1 200"))
    except OSError:
        results.append(False)


def flood(port, n):
    results = []
    threads = [threading.Thread(target=scrape, args=(port, results)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(results)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="target/release/scriptorium")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--rate", type=float, default=2.0, help="submits per second")
    ap.add_argument("--latency-ms", type=int, default=1500)
    ap.add_argument("--jitter-ms", type=int, default=1000)
    ap.add_argument("--floods", type=int, default=6)
    ap.add_argument("--flood-size", type=int, default=1000)
    ap.add_argument("--port", type=int, default=19464)
    ap.add_argument("--out", default="soak.csv")
    args = ap.parse_args()

    data = tempfile.mkdtemp(prefix="scriptorium-soak-")
    env = dict(os.environ)
    env.pop("OPENAI_API_KEY", None)
    env.update({
        "SCRIPTORIUM_LLM__PROVIDER": "simulated",
        "SCRIPTORIUM_LLM__SIMULATED__LATENCY_MS": str(args.latency_ms),
        "SCRIPTORIUM_LLM__SIMULATED__JITTER_MS": str(args.jitter_ms),
        "SCRIPTORIUM_LIMITS__REQUESTS_PER_MINUTE": "0",
        "SCRIPTORIUM_LIMITS__TOKENS_PER_MINUTE": "0",
        "SCRIPTORIUM_DAEMON__DATA_DIR": data,
        "SCRIPTORIUM_DAEMON__METRICS_ADDR": f"127.0.0.1:{args.port}",
        # The default limit of 64 in-flight scrape connections; a flood of
        # 1000 queues in the backlog and is served 64 at a time.
        "RUST_LOG": "warn",
    })
    log = open(os.path.join(data, "daemon.log"), "wb")
    empty = os.path.join(data, "empty.toml")
    open(empty, "w").close()
    daemon = subprocess.Popen([args.binary, "--config", empty, "daemon"], env=env,
                              stdout=subprocess.DEVNULL, stderr=log)
    sock_path = os.path.join(data, "scriptorium.sock")
    for _ in range(500):
        if os.path.exists(sock_path):
            try:
                Client(sock_path)
                break
            except OSError:
                pass
        time.sleep(0.02)
    else:
        sys.exit("daemon did not come up")

    submit = Client(sock_path)
    health = Client(sock_path)
    out = open(args.out, "w")
    out.write("elapsed_s,rss_kib,anon_kib,fds,queued,running,completed,failed,submitted\n")
    print(f"# soak: {args.minutes} min, {args.rate} submits/s, latency {args.latency_ms}±{args.jitter_ms} ms, pid {daemon.pid}")
    print(f"{'t (s)':>6} {'RSS KiB':>8} {'anon KiB':>8} {'fds':>4} {'queued':>6} {'running':>7} {'done':>6} {'failed':>6}")
    start = time.monotonic()
    next_sample = start
    submitted = 0
    i = 0
    while time.monotonic() - start < args.minutes * 60:
        now = time.monotonic()
        due = int((now - start) * args.rate)
        while submitted < due:
            r = submit.call({"op": "submit", "topic": f"Soak topic {i}", "variants": 3})
            i += 1
            submitted += 1
            if not r.get("ok"):
                print("submit failed:", r)
        if now >= next_sample:
            h = health.call({"op": "health"})
            counts = h.get("counts", {})
            row = (int(now - start), rss_kib(daemon.pid), anon_kib(daemon.pid), open_fds(daemon.pid),
                   counts.get("queued", 0), counts.get("running", 0), counts.get("completed", 0),
                   counts.get("failed", 0), submitted)
            out.write(",".join(map(str, row)) + "\n")
            out.flush()
            print(f"{row[0]:>6} {row[1]:>8} {row[2]:>8} {row[3]:>4} {row[4]:>6} {row[5]:>7} {row[6]:>6} {row[7]:>6}",
                  flush=True)
            next_sample += 10
        time.sleep(0.02)

    # Let the last topics finish, then flood the metrics port.
    time.sleep(args.latency_ms / 1000 * 8)
    print(f"# after the load: RSS {rss_kib(daemon.pid)} KiB (anon {anon_kib(daemon.pid)}), fds {open_fds(daemon.pid)}")
    for round_ in range(1, args.floods + 1):
        before, anon_before = rss_kib(daemon.pid), anon_kib(daemon.pid)
        t0 = time.monotonic()
        ok = flood(args.port, args.flood_size)
        took = time.monotonic() - t0
        time.sleep(6)  # one upkeep interval
        print(f"flood {round_}: {ok}/{args.flood_size} scrapes ok in {took:.1f} s; "
              f"RSS {before} -> {rss_kib(daemon.pid)} KiB (anon {anon_before} -> {anon_kib(daemon.pid)}), "
              f"fds {open_fds(daemon.pid)}", flush=True)

    daemon.send_signal(signal.SIGTERM)
    code = daemon.wait(timeout=60)
    size = os.path.getsize(os.path.join(data, "daemon.log"))
    print(f"# daemon exit {code}; log {size} bytes; data in {data}")


if __name__ == "__main__":
    main()
