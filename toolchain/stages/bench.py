"""bench: teacher and student side by side on this machine, same prompts, same runtime, same quantization.

Inputs: export (the student's files and their held-out scores), eval (the teacher's), generate (the held-out
prompts), distill/generate manifests (what distillation cost, for the break-even).
Outputs: bench.json (every run), bench.md (medians, spread, ratios, $/1M tokens, break-even).

Each model runs in its own child process (so peak RSS is that model's), teacher and student alternating over
``bench.repeats`` runs: load, one warm-up prompt, then ``bench.prompts`` chat prompts, greedy, up to
``bench.max_new_tokens`` tokens each. Per prompt: time to first token, prompt tokens/s, decode tokens/s. With
``bench.served`` the student is also asked through ``distillery serve`` (streamed, one request at a time, read
by a minimal HTTP client) to show what the HTTP layer costs against the raw runtime.

Cost: $/1M output tokens = hardware $/hour × the seconds this machine spends per output token (prompt
processing included) at one request at a time. Break-even: the one-time cost of distillation (generate +
distill + eval + export wall time at ``cost.distill_hardware_usd_per_hour``) divided by what each 1M output
tokens saves against the reference API.
"""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import sys
import time
from pathlib import Path

from toolchain.artifacts.files import ExportError, run_tool
from toolchain.backends.llama_batch import BatchDecoder
from toolchain.models.chat import context, flat_prompt, messages_for
from toolchain.pipeline.runs import Manifest
from toolchain.quality.cost import Price, local_per_call
from toolchain.quality.heldout import heldout_rows
from toolchain.recipe import Recipe
from toolchain.render.markdown import bench_markdown
from toolchain.serve import targets as served
from toolchain.ui import console, progress

HOURS_PER_MONTH = 730


def child() -> None:
    """Entry point of a measuring process: JSON settings on stdin, JSON results on stdout."""
    args = json.loads(sys.stdin.read())
    target = served.Served(Path(args["path"]), args["backend"], "bench", args["role"], args["quant"])
    t0 = time.perf_counter()
    engine = served.open_engine(target, n_ctx=4096)
    load_s = time.perf_counter() - t0
    prompts = [engine.tokenize(engine.chat_text(m["messages"]) if "messages" in m else m["text"]) for m in args["asks"]]
    list(engine.stream(prompts[0], 8))  # warm-up: first-call allocations are not the model's speed
    rows = []
    for ids in prompts:
        start = time.perf_counter()
        first, n = None, 0
        for _ in engine.stream(ids, args["max_new_tokens"]):
            n += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        rows.append(_timing(len(ids), n, start, first, end))
    out = {"load_s": load_s, "requests": rows}
    if args.get("slots"):
        out["loaded"] = loaded(engine, prompts[1:], args["max_new_tokens"], args["slots"])
    engine.close()
    print(json.dumps({**out, "peak_rss_bytes": _peak_rss()}))


def loaded(engine, prompts: list[list[int]], max_new_tokens: int, slots: int) -> dict:
    """Throughput of a busy server: ``slots`` requests always in flight (continuous batching, as `distillery
    serve` with serve.batch), greedy, until every prompt is answered. Output tokens over wall time."""
    import numpy as np


    decoder = BatchDecoder(engine, slots, max(len(p) for p in prompts) + max_new_tokens + 8)
    queue, live, tokens = list(prompts), [], 0
    start = time.perf_counter()
    while queue or live:
        while queue and len(live) < slots:
            ids = queue.pop(0)
            slot = decoder.acquire()
            first = int(np.argmax(decoder.prefill(slot, ids)))
            if first in engine.eos_ids:
                decoder.release(slot)
                continue
            live.append([slot, first, len(ids), 1])
            tokens += 1
        if not live:
            continue
        rows = decoder.step([(slot, tok, pos) for slot, tok, pos, _ in live])
        still = []
        for entry, logits in zip(live, rows):
            entry[1], entry[2] = int(np.argmax(logits)), entry[2] + 1
            if entry[1] not in engine.eos_ids:
                tokens, entry[3] = tokens + 1, entry[3] + 1
            if entry[1] in engine.eos_ids or entry[3] >= max_new_tokens:
                decoder.release(entry[0])
            else:
                still.append(entry)
        live = still
    wall = time.perf_counter() - start
    decoder.close()
    return {"slots": slots, "output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def _peak_rss() -> int:
    """This process's high-water resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that over from
    the parent across fork + exec, so a child of a large process would report the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timing(prompt_tokens: int, n: int, start: float, first: float | None, end: float) -> dict:
    first = first or end
    return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "ttft_s": first - start, "wall_s": end - start,
            "prompt_tps": prompt_tokens / (first - start) if first > start else None,
            "decode_tps": (n - 1) / (end - first) if n > 1 and end > first else None}


def _asks(cfg: Recipe, role: str, rows: list[dict]) -> list[dict]:
    """What each model is asked: the held-out row's chat (its own system message and earlier turns), or for a
    base teacher its plain-text prompt template (as generate)."""
    if role == "teacher" and cfg.generate.prompt_template:
        return [{"text": cfg.generate.prompt_template.replace("{prompt}", flat_prompt(r["prompt"], context(r)))}
                for r in rows]
    if role == "student" and cfg.data.strip_instructions:  # context distillation: the bare input
        return [{"messages": messages_for(r["prompt"], None)} for r in rows]
    return [{"messages": messages_for(r["prompt"], cfg.generate.system_prompt, context(r))} for r in rows]


def _measure(target: served.Served, asks: list[dict], max_new_tokens: int, slots: int = 0) -> dict:
    payload = json.dumps({"path": str(target.path), "backend": target.backend, "role": target.role,
                          "quant": target.quant, "asks": asks, "max_new_tokens": max_new_tokens,
                          "slots": slots if target.backend == "llama_cpp" else 0})
    done = run_tool([sys.executable, "-m", "toolchain.stages.bench"], f"the bench of {target.path}", 3600,
                    input=payload, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        tail = [ln for ln in done.stderr.splitlines() if ln.strip()][-1:] or ["no output"]
        raise ExportError(f"bench of {target.path} failed: {tail[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict]) -> dict:
    """Per-run aggregates (tokens over time, not a mean of ratios), then median and spread over runs."""
    per_run = []
    for r in runs:
        reqs = r["requests"]
        decode_tokens = sum(q["completion_tokens"] - 1 for q in reqs if q["completion_tokens"] > 1)
        decode_time = sum(q["wall_s"] - q["ttft_s"] for q in reqs if q["completion_tokens"] > 1)
        per_run.append(
            {
                "decode_tps": decode_tokens / decode_time if decode_time else None,
                "prompt_tps": sum(q["prompt_tokens"] for q in reqs) / sum(q["ttft_s"] for q in reqs),
                "ttft_ms": 1000 * statistics.median(q["ttft_s"] for q in reqs),
                "seconds_per_output_token": sum(q["wall_s"] for q in reqs)
                / max(1, sum(q["completion_tokens"] for q in reqs)),
                "output_tokens": sum(q["completion_tokens"] for q in reqs),
                "peak_rss_bytes": r.get("peak_rss_bytes"),
                "load_s": r.get("load_s"),
                "loaded_tps": r["loaded"]["tokens_per_s"] if r.get("loaded") else None,
            }
        )
    out = {}
    for key in per_run[0]:
        values = [p[key] for p in per_run if p[key] is not None]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}
    return out


class _Served:
    """The student behind the real server (a child process), asked streamed, one request at a time.

    Read by a minimal HTTP client (``_stream_once``): the server's speed is what is measured, and on a small
    machine a client SDK that parses every event into objects (about 0.5 ms of CPU per token for the openai
    package, measured) takes that CPU from the engine it is measuring. The tests talk to the server with the
    official openai client."""

    def __init__(self, target: served.Served, max_new_tokens: int, stream_interval_ms: float):
        self.max_new_tokens = max_new_tokens

        def argv(port: int) -> list[str]:
            return [sys.executable, "-m", "toolchain.serve", "--file", str(target.path), "--backend", target.backend,
                    "--model-id", "bench", "--max-new-tokens", str(max_new_tokens),
                    "--stream-interval-ms", str(stream_interval_ms), "--n-ctx", "4096", "--port", str(port)]

        self.proc, self.port = served.start_child_server(argv, "/health", "bench server")

    def run(self, messages: list) -> dict:
        """One run: the first request warms up (as in the raw runs), the others are timed."""
        rows = []
        for i, m in enumerate([messages[0]] + messages):
            body = {"model": "bench", "messages": m, "max_tokens": self.max_new_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            start = time.perf_counter()
            first, n = _stream_once(self.port, body)
            if i:
                rows.append(_timing(0, n, start, first, time.perf_counter()))
        return {"requests": rows}

    def close(self) -> None:
        served.stop_child_server(self.proc)


_CONTENT = re.compile(rb'"content": "[^"]')  # a text delta that is not empty (the role chunk's is)
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens": (\d+)')


def _stream_once(port: int, body: dict) -> tuple[float | None, int]:
    """POST one streamed chat request over a plain socket: (time the first text arrived, completion tokens)."""
    data = json.dumps(body).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
    first, got = None, []
    with socket.create_connection(("127.0.0.1", port), timeout=600) as sock:
        sock.sendall(head + data)
        while True:
            part = sock.recv(65536)
            if not part:
                break
            if first is None and _CONTENT.search(part):
                first = time.perf_counter()
            got.append(part)
    raw = b"".join(got)
    if not raw.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"bench server answered {raw[:120]!r}")
    usage = raw.rfind(b'"usage": {')
    found = _COMPLETION_TOKENS.search(raw, usage) if usage >= 0 else None
    if found is None:
        raise RuntimeError("bench server's stream ended without usage")
    return first, int(found.group(1))


def _per_call(cfg: Recipe, rows: list[dict], runs: dict[str, list]) -> dict:
    """$ per 1,000 calls at each task's median prompt and answer lengths: the reference API's (input and output
    tokens each at their price; the teacher's prompt and answer token counts stand in for the API model's, no
    cached input) against the student's (its measured wall time per call, one call at a time, at
    cost.usd_per_hour). At load (a busy server answering every prompt with bench.concurrency in flight) the
    calls share the machine, so only the whole mix has a time per call: the loaded run's wall time over its calls."""
    c = cfg.cost
    api = Price(c.reference_api_usd_per_1m_input, c.reference_api_usd_per_1m_input, c.reference_api_usd_per_1m_output)
    by_task: dict[str, list] = {}
    for i, row in enumerate(rows, 1):  # requests[0] is the warm-up row
        teacher = [run["requests"][i] for run in runs["teacher"]]
        student = [run["requests"][i] for run in runs["student"]]
        by_task.setdefault(row.get("task") or cfg.data.task, []).append(
            (statistics.median(q["prompt_tokens"] for q in teacher), statistics.median(q["completion_tokens"]
                                                                                     for q in teacher),
             statistics.median(q["wall_s"] for q in student), statistics.median(q["prompt_tokens"] for q in student)))
    loaded = [run["loaded"]["wall_s"] / len(rows) for run in runs["student"] if run.get("loaded")]
    out = {}
    for task, items in sorted({**by_task, "all": [x for v in by_task.values() for x in v]}.items()):
        prompt, answer, wall, own_prompt = (statistics.median(x[k] for x in items) for k in range(4))
        api_1k = api.per_call(prompt, answer) * 1000
        one = local_per_call(wall, c.usd_per_hour) * 1000
        busy = local_per_call(statistics.median(loaded), c.usd_per_hour) * 1000 if loaded and task == "all" else None
        out[task] = {"calls": len(items), "prompt_tokens": prompt, "student_prompt_tokens": own_prompt,
                     "answer_tokens": answer, "student_wall_s": wall,
                     "api_usd_per_1k": api_1k, "student_usd_per_1k": one, "student_usd_per_1k_loaded": busy,
                     "ratio": api_1k / one if one else None,
                     "ratio_loaded": api_1k / busy if busy else None}
    return out


def _quality(export_report: dict, eval_report: dict, backend: str, quant: str) -> tuple[float | None, float | None]:
    fmt = "gguf" if backend == "llama_cpp" else "onnx"
    row = next((r for r in export_report["files"] if r["format"] == fmt and r["variant"] == quant), None)
    student = row.get("gold") if row and row.get("gold") is not None else eval_report["retention"]["overall"]["student"]
    return eval_report["retention"]["overall"]["teacher"], student


def _distill_cost_s(inputs: dict[str, Path]) -> float:
    """Wall seconds the distillation itself took: generate, distill, eval and export, from their manifests."""
    total = 0.0
    for stage in ("generate", "distill", "merge", "eval", "export"):
        if stage in inputs and (inputs[stage] / "manifest.json").is_file():
            total += json.loads((inputs[stage] / "manifest.json").read_text())["timings"]["wall_s"]
    return total


def run(cfg: Recipe, inputs: dict[str, Path], out_dir: Path) -> Manifest:
    b = cfg.bench
    quant = b.quant or served.default_quant(cfg, b.backend)
    export_report = json.loads((inputs["export"] / "export.json").read_text(encoding="utf-8"))
    eval_report = json.loads((inputs["eval"] / "eval.json").read_text(encoding="utf-8"))
    folder = "gguf" if b.backend == "llama_cpp" else "onnx"
    path = inputs["export"] / folder / (f"{cfg.name}-{quant}.gguf" if folder == "gguf" else quant)
    if not path.exists():
        raise ValueError(
            f"bench: the student was not exported as {quant} for {b.backend} (see export.quants / export.onnx)"
        )
    student = served.Served(path, b.backend, f"{cfg.name}-student-{quant}", "student", quant)
    console.print(f"  bench: teacher at {quant} ({b.backend})")
    teacher = served.teacher(cfg, b.backend, quant)
    rows = heldout_rows(cfg, inputs["generate"])[: b.prompts]
    asks = {role: _asks(cfg, role, [rows[0]] + rows) for role in ("teacher", "student")}  # the first: warm-up

    runs: dict[str, list] = {"teacher": [], "student": []}
    served_runs: list[dict] = []
    with progress() as bar:
        task = bar.add_task("bench", total=b.repeats * (2 + int(b.served)), info="")
        server = _Served(student, b.max_new_tokens, cfg.serve.stream_interval_ms) if b.served else None
        try:
            for rep in range(b.repeats):
                order = (teacher, student) if rep % 2 == 0 else (student, teacher)
                for target in order:
                    bar.update(task, info=f"{target.role} run {rep + 1}")
                    runs[target.role].append(_measure(target, asks[target.role], b.max_new_tokens, b.concurrency))
                    bar.update(task, advance=1)
                    if server is not None and target is student:  # served right after raw: a paired ratio
                        bar.update(task, info=f"student served {rep + 1}")
                        served_runs.append(server.run([a["messages"] for a in asks["student"][1:]]))
                        bar.update(task, advance=1)
        finally:
            if server is not None:
                server.close()
        files = _exported(inputs["export"], export_report) if b.each_file else []
        bar.update(task, total=b.repeats * (2 + int(b.served)) + len(files))
        per_file = []
        for target, row in files:
            bar.update(task, info=f"{row['format']} {row['variant']}")
            # the file the student ran as above: its raw runs already are this measurement
            same = target.path == student.path and target.backend == student.backend
            speed = _summary(runs["student"] if same else [_measure(target, asks["student"], b.max_new_tokens)])
            per_file.append({"format": row["format"], "variant": row["variant"], "bytes": row["bytes"],
                             "gold": row.get("gold"), "retention": row.get("retention"),
                             "decode_tps": speed["decode_tps"]["median"] if "decode_tps" in speed else None,
                             "seconds_per_output_token": speed["seconds_per_output_token"]["median"]})
            bar.update(task, advance=1)

    sizes = {"teacher": _size(teacher.path), "student": _size(student.path)}
    summary = {role: _summary(r) for role, r in runs.items()}
    teacher_gold, student_gold = _quality(export_report, eval_report, b.backend, quant)
    c = cfg.cost
    usd = {role: c.usd_per_hour / 3600 * summary[role]["seconds_per_output_token"]["median"] * 1e6 for role in runs}
    one_time_s = _distill_cost_s(inputs)
    one_time_usd = one_time_s / 3600 * c.distill_hardware_usd_per_hour
    saving = c.reference_api_usd_per_1m_output - usd["student"]
    if all("loaded_tps" in summary[role] for role in runs):  # a busy server: requests decoding together
        busy = {role: c.usd_per_hour / 3600 / summary[role]["loaded_tps"]["median"] * 1e6 for role in runs}
        loaded_report = {
            "concurrency": b.concurrency,
            "usd_per_1m_output_tokens": busy,
            "tps_ratio": summary["student"]["loaded_tps"]["median"] / summary["teacher"]["loaded_tps"]["median"],
            "student_cost_vs_api": busy["student"] / c.reference_api_usd_per_1m_output
            if c.reference_api_usd_per_1m_output
            else None,
        }
    else:
        loaded_report = None
    report = {
        "recipe": cfg.name,
        "backend": b.backend,
        "quant": quant,
        "prompts": len(rows),
        "repeats": b.repeats,
        "max_new_tokens": b.max_new_tokens,
        "threads": os.cpu_count(),
        "files": {"teacher": str(teacher.path), "student": str(student.path)},
        "bytes": sizes,
        "summary": summary,
        "runs": runs,
        "per_file": per_file,
        "quality": {
            "teacher_gold": teacher_gold,
            "student_gold": student_gold,
            "retention": student_gold / teacher_gold if teacher_gold and student_gold is not None else None,
        },
        "per_call": _per_call(cfg, rows, runs),
        "strip_instructions": cfg.data.strip_instructions,
        "usd_per_1m_output_tokens": usd,
        "reference_api_usd_per_1m_output": c.reference_api_usd_per_1m_output,
        "reference_api_usd_per_1m_input": c.reference_api_usd_per_1m_input,
        "ratios": _ratios(summary, sizes, usd, c.reference_api_usd_per_1m_output),
        "break_even": {
            "one_time_seconds": one_time_s,
            "one_time_usd": one_time_usd,
            "saving_usd_per_1m_output": saving,
            "output_tokens": one_time_usd / saving * 1e6 if saving > 0 else None,
            "capacity_tokens_per_month": 3600
            * HOURS_PER_MONTH
            / summary["student"]["seconds_per_output_token"]["median"],
            "hardware_usd_per_month": c.usd_per_hour * HOURS_PER_MONTH,
        },
        "settings": {"usd_per_hour": c.usd_per_hour, "distill_hardware_usd_per_hour": c.distill_hardware_usd_per_hour},
        "loaded": loaded_report,
    }
    if served_runs:
        srv = _summary(served_runs)
        each = [(_summary([s]).get("decode_tps"), _summary([r]).get("decode_tps"))
                for s, r in zip(served_runs, runs["student"])]  # each served run follows its raw run
        pairs = [s["median"] / r["median"] for s, r in each if s and r]
        report["served"] = {"summary": srv, "decode_ratio_vs_raw": statistics.median(pairs) if pairs else None,
                            "decode_ratio_runs": pairs}
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / "bench.md").write_text(bench_markdown(report), encoding="utf-8")
    console.print(bench_markdown(report).split("\n\n", 2)[1], highlight=False, soft_wrap=True)
    r = report["ratios"]
    return Manifest(metrics={"decode_speedup": r["decode_tps"], "cost_ratio_vs_api": r["student_cost_vs_api"],
                             "served_vs_raw": report.get("served", {}).get("decode_ratio_vs_raw")})


def _exported(export_dir: Path, export_report: dict) -> list[tuple[served.Served, dict]]:
    """Every file export wrote, with its export.md row (one bench run each: speed per quantization)."""
    out = []
    for row in export_report["files"]:
        path = export_dir / row["file"]
        if row["format"] == "gguf":
            out.append((served.Served(path, "llama_cpp", row["variant"], "student", row["variant"]), row))
        else:
            backend = "onnxruntime_genai" if row["variant"].startswith("genai_") else "onnxruntime"  # its own loop
            out.append((served.Served(path.parent, backend, row["variant"], "student", row["variant"]), row))
    return out


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _ratios(summary: dict, sizes: dict, usd: dict, api: float) -> dict:
    def ratio(key):
        t, s = summary["teacher"].get(key), summary["student"].get(key)
        return s["median"] / t["median"] if s and t and t["median"] else None

    return {"decode_tps": ratio("decode_tps"), "prompt_tps": ratio("prompt_tps"),
            "ttft": ratio("ttft_ms"), "peak_rss": ratio("peak_rss_bytes"),
            "size": sizes["student"] / sizes["teacher"], "usd_per_1m": usd["student"] / usd["teacher"],
            "student_cost_vs_api": usd["student"] / api if api else None}


if __name__ == "__main__":  # the raw engine measurement runs in a child process of its own (_measure)
    child()
