"""What the cascade's streaming rule costs: time to the first streamed byte of a call the student keeps (decided
after the student's whole answer) and of one it forwards (the student's whole answer, then the upstream's first
token), against the plain student and the teacher streaming straight away.

    python benchmarks/cascade_latency.py [--recipe recipes/default.yaml] [--runs runs] [--prompts 24]

Starts the teacher twice (``distillery serve --model teacher``: one asked directly, one the cascades' upstream, so
neither has seen a prompt before — llama.cpp reuses a prompt's cache), a plain student server and two cascading ones
(fixed threshold 0: every call kept; threshold 1: every call forwarded) on the recipe's exported student, then sends
each held-out prompt streamed to the four paths in turn (one call at a time, so they see the same machine). Prints the
median and p90 time to first content byte and to the last byte per path, and the ratios to the plain student.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from toolchain.recipe import load
from toolchain.serve.targets import start_child_server, stop_child_server

ROOT = Path(__file__).resolve().parents[1]


def _stream(port: int, prompt: str, task: str, max_tokens: int) -> tuple[float, float]:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": True}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "X-Distillery-Task": task})
    start = time.perf_counter()
    first = None
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            if first is None and line.startswith(b"data: {") and b'"content": "' in line and \
                    b'"content": ""' not in line:
                first = time.perf_counter() - start
    return first if first is not None else time.perf_counter() - start, time.perf_counter() - start


def _q(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "default.yaml"))
    ap.add_argument("--runs", default=str(ROOT / "runs"))
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    cfg = load(args.recipe)
    rows = [json.loads(line) for p in cfg.data.heldout for line in cfg.data_path(p).read_text().splitlines()]
    rows = rows[: args.prompts]
    work = Path(tempfile.mkdtemp())

    def server(*argv, what):
        return start_child_server(lambda port: [sys.executable, "-m", "toolchain.cli", "serve", *map(str, argv),
                                                "--port", str(port)], "/health", what, 600)

    procs = []
    try:
        teacher, direct = server(args.recipe, "--model", "teacher", what="the teacher")
        procs.append(teacher)
        upstream, t_port = server(args.recipe, "--model", "teacher", what="the cascades' teacher")
        procs.append(upstream)
        ports = {"teacher": direct}
        student, ports["student"] = server(args.recipe, "--runs", args.runs, what="the student")
        procs.append(student)
        for name, threshold in (("cascade, kept", 0.0), ("cascade, forwarded", 1.0)):
            data = yaml.safe_load(Path(args.recipe).read_text())
            data["data"] = {**data["data"], **{k: [str(cfg.data_path(p).resolve()) for p in data["data"][k]]
                                               for k in ("train", "heldout") if k in data["data"]}}
            data["serve"] = {"route": "cascade", "upstream": f"openai:http://127.0.0.1:{t_port}/v1",
                             "cascade": {"score": "mean_prob", "threshold": threshold}}
            path = work / f"{cfg.name}.yaml"
            path.write_text(yaml.safe_dump(data))
            proc, ports[name] = server(path, "--runs", args.runs, what=name)
            procs.append(proc)
            path.unlink()
        times = {name: [] for name in ports}
        for row in rows:
            for name, port in ports.items():
                times[name].append(_stream(port, row["prompt"], row.get("task", "default"), args.max_tokens))
    finally:
        for proc in procs:
            stop_child_server(proc)
    base = statistics.median(t[0] for t in times["student"])
    print(f"{len(rows)} held-out prompts, streamed, max_tokens {args.max_tokens}, one call at a time")
    print("| path | first byte p50 (s) | p90 | last byte p50 (s) | first byte / plain student's |")
    print("|---|---:|---:|---:|---:|")
    for name, t in times.items():
        first = [x[0] for x in t]
        print(f"| {name} | {statistics.median(first):.3f} | {_q(first, 0.9):.3f} | "
              f"{statistics.median(x[1] for x in t):.3f} | {statistics.median(first) / base:.1f}x |")


if __name__ == "__main__":
    main()
