"""The gateway under load: what it adds to each call, and that it loses none.

    python benchmarks/gateway_load.py [--recipe recipes/ci.yaml] [--concurrency 64] [--seconds 60]

Starts ``distillery serve --model teacher`` (the upstream) and ``distillery gateway`` in front of it, then keeps
``concurrency`` calls in flight for ``seconds``: each worker alternates a call straight to the upstream and one
through the gateway, so both see the same load at the same moments (half the workers start with each). Prints
p50/p99 latency of both and their difference, the gateway's own added time (its /metrics: its answer's time minus
the upstream's, per call), 5xx counts on each path, and the calls answered through the gateway against the calls
in its store.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from toolchain.serve.targets import start_child_server, stop_child_server

ROOT = Path(__file__).resolve().parents[1]


def _post(url: str, body: dict) -> tuple[int, float, str | None]:
    req = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            answer = json.loads(r.read())
            return r.status, time.perf_counter() - start, answer.get("id")
    except urllib.error.HTTPError as e:
        e.read()
        return e.code, time.perf_counter() - start, None
    except OSError:
        return 599, time.perf_counter() - start, None


def _q(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "ci.yaml"))
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--max-tokens", type=int, default=4)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    store = work / "traffic.db"
    up, up_port = start_child_server(
        lambda port: [sys.executable, "-m", "toolchain.cli", "serve", a.recipe, "--model", "teacher", "--port",
                      str(port)], "/health", "the teacher server", 300)
    gw, gw_port = start_child_server(
        lambda port: [sys.executable, "-m", "toolchain.cli", "gateway", "--upstream",
                      f"openai:http://127.0.0.1:{up_port}/v1", "--store", str(store), "--port", str(port)],
        "/health", "the gateway", 60)
    direct, via = f"http://127.0.0.1:{up_port}/v1", f"http://127.0.0.1:{gw_port}/v1"
    results: dict[str, list] = {"direct": [], "gateway": []}
    lock, stop = threading.Lock(), threading.Event()

    def worker(k: int) -> None:
        i = 0
        while not stop.is_set():
            for path in (("direct", "gateway") if k % 2 == 0 else ("gateway", "direct")):
                body = {"messages": [{"role": "system", "content": "Answer in one word."},
                                     {"role": "user", "content": f"Name a colour ({k}-{i})."}],
                        "max_tokens": a.max_tokens}
                got = _post(direct if path == "direct" else via, body)
                with lock:
                    results[path].append(got)
            i += 1

    try:
        with concurrent.futures.ThreadPoolExecutor(a.concurrency) as pool:
            for k in range(a.concurrency):
                pool.submit(worker, k)
            time.sleep(a.seconds)
            stop.set()
        with urllib.request.urlopen(f"http://127.0.0.1:{gw_port}/metrics") as r:
            metrics = r.read().decode()
    finally:
        stop_child_server(gw)
        stop_child_server(up)
    print(f"{a.concurrency} concurrent callers for {a.seconds:.0f} s, {a.max_tokens} answer tokens, upstream: "
          f"distillery serve --model teacher ({Path(a.recipe).name})")
    print("| path | calls | 200 | 5xx | p50 s | p99 s |")
    print("|---|---:|---:|---:|---:|---:|")
    lat = {}
    for path, rows in results.items():
        ok = [t for s, t, _ in rows if s == 200]
        lat[path] = ok
        print(f"| {path} | {len(rows)} | {len(ok)} | {sum(1 for s, _, _ in rows if s >= 500)} | {_q(ok, 0.5):.3f} "
              f"| {_q(ok, 0.99):.3f} |")
    print(f"gateway minus direct: p50 {_q(lat['gateway'], 0.5) - _q(lat['direct'], 0.5):+.4f} s, "
          f"p99 {_q(lat['gateway'], 0.99) - _q(lat['direct'], 0.99):+.4f} s (same load, same moments)")
    added_sum = float(re.search(r"distillery_gateway_added_seconds_sum\{[^}]*\} (\S+)", metrics).group(1))
    added_n = int(re.search(r"distillery_gateway_added_seconds_count\{[^}]*\} (\S+)", metrics).group(1))
    buckets = [(float(m.group(1)), int(m.group(2))) for m in re.finditer(
        r'distillery_gateway_added_seconds_bucket\{[^}]*le="([\d.]+)"\} (\d+)', metrics)]
    p50 = next((b for b, n in buckets if n >= 0.5 * added_n), float("inf"))
    p99 = next((b for b, n in buckets if n >= 0.99 * added_n), float("inf"))
    print(f"gateway's own added time per call (its answer minus the upstream's): mean {added_sum / max(added_n, 1):.4f}"
          f" s, p50 ≤ {p50} s, p99 ≤ {p99} s over {added_n} calls")
    answered = {cid for s, _, cid in results["gateway"] if s == 200}
    db = sqlite3.connect(store)
    stored = {json.loads(r[0])["id"] for r in db.execute("SELECT response FROM calls WHERE status = 200")}
    print(f"answered through the gateway: {len(answered)}; in the store: {len(stored & answered)}; "
          f"lost: {len(answered - stored)}; rows in the store: {db.execute('SELECT COUNT(*) FROM calls').fetchone()[0]}")
    print(f"median answer: direct {statistics.median(lat['direct']):.3f} s" if lat["direct"] else "")


if __name__ == "__main__":
    main()
