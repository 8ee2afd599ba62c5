"""What /metrics reports (Prometheus text): requests by status; prompt, generated and cached-prompt tokens;
latency histograms with the names vLLM's operators already scrape (time to first token, inter-token latency,
end-to-end latency, queue time); cost totals. Every series is labelled with the model id and the file served."""

from __future__ import annotations

import bisect
import threading

# Bucket upper bounds in seconds (vLLM's for time to first token and inter-token latency, wider for the others).
BUCKETS = {
    "time_to_first_token_seconds": (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                                    7.5, 10.0),
    "inter_token_latency_seconds": (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                                    0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0),
    "e2e_request_latency_seconds": (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                                    40.0, 50.0, 60.0, 120.0),
    "request_queue_time_seconds": (0.001, 0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                                   30.0, 60.0),
}


class Histogram:
    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.sum, self.n = bounds, [0] * len(bounds), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [f"# TYPE {name} histogram"], 0
        for bound, count in zip(self.bounds, self.counts):
            running += count
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {running}')
        out += [f'{name}_bucket{{{labels},le="+Inf"}} {self.n}', f"{name}_sum{{{labels}}} {self.sum}",
                f"{name}_count{{{labels}}} {self.n}"]
        return out


class Metrics:
    def __init__(self, model_id: str, file: str = ""):
        self.model_id, self.file = model_id, file
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.totals = {"prompt_tokens": 0, "completion_tokens": 0, "engine_seconds": 0.0, "queue_seconds": 0.0,
                       "ttft_seconds": 0.0, "cost_usd": 0.0, "reference_cost_usd": 0.0, "generations": 0,
                       "cached_tokens": 0}
        self.histograms = {name: Histogram(bounds) for name, bounds in BUCKETS.items()}
        self.waiting = 0
        self.routes: dict[tuple[str, str], int] = {}  # (task, answered_by) -> calls the cascade routed
        self.pairs: dict[str, int] = {}  # task -> shadow pairs recorded
        self.reloads = {"done": 0, "failed": 0}  # the served file re-opened after a promotion

    def reload(self, outcome: str) -> None:
        with self.lock:
            self.reloads[outcome] += 1

    def route(self, task: str | None, who: str) -> None:
        """A call the cascade routed, and who answered it."""
        with self.lock:
            key = (task or "", who)
            self.routes[key] = self.routes.get(key, 0) + 1

    def pair(self, task: str | None) -> None:
        """A shadow pair recorded."""
        with self.lock:
            self.pairs[task or ""] = self.pairs.get(task or "", 0) + 1

    def observe_gaps(self, gaps: list[float]) -> None:
        """The times between one request's successive tokens (inter-token latency)."""
        with self.lock:
            for gap in gaps:
                self.histograms["inter_token_latency_seconds"].observe(gap)

    def count(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def add(self, usage: dict, cost: dict) -> None:
        with self.lock:
            t = self.totals
            t["prompt_tokens"] += usage["prompt_tokens"]
            t["completion_tokens"] += usage["completion_tokens"]
            t["engine_seconds"] += cost["wall_ms"] / 1000
            t["queue_seconds"] += cost["queue_ms"] / 1000
            t["ttft_seconds"] += cost["ttft_ms"] / 1000
            t["cost_usd"] += cost["usd"]
            t["reference_cost_usd"] += cost["reference_usd"]
            t["generations"] += 1
            t["cached_tokens"] += usage["prompt_tokens_details"]["cached_tokens"]
            h = self.histograms
            h["time_to_first_token_seconds"].observe(cost["ttft_ms"] / 1000)
            h["e2e_request_latency_seconds"].observe((cost["queue_ms"] + cost["wall_ms"]) / 1000)
            h["request_queue_time_seconds"].observe(cost["queue_ms"] / 1000)

    def render(self, speculation: dict | None = None) -> str:
        """``speculation``: a served engine's draft counters (teacher passes, drafted and accepted tokens)."""
        m = f'model="{self.model_id}",file="{self.file}"'
        with self.lock:
            lines = ["# TYPE distillery_requests_total counter"]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'distillery_requests_total{{{m},endpoint="{endpoint}",status="{status}"}} {n}')
            t = self.totals
            for name, key, kind in (("prompt_tokens_total", "prompt_tokens", "counter"),
                                    ("completion_tokens_total", "completion_tokens", "counter"),
                                    ("engine_seconds_total", "engine_seconds", "counter"),
                                    ("queue_seconds_total", "queue_seconds", "counter"),
                                    ("time_to_first_token_seconds_total", "ttft_seconds", "counter"),
                                    ("generations_total", "generations", "counter"),
                                    ("cost_usd_total", "cost_usd", "counter"),
                                    ("reference_api_cost_usd_total", "reference_cost_usd", "counter"),
                                    ("generation_tokens_total", "completion_tokens", "counter"),
                                    ("prompt_tokens_cached_total", "cached_tokens", "counter")):
                lines += [f"# TYPE distillery_{name} {kind}", f"distillery_{name}{{{m}}} {t[key]}"]
            for name, hist in self.histograms.items():
                lines += hist.lines(f"distillery_{name}", m)
            lines.append("# TYPE distillery_reloads_total counter")
            lines += [f'distillery_reloads_total{{{m},outcome="{k}"}} {n}' for k, n in self.reloads.items()]
            if self.routes:
                lines.append("# TYPE distillery_cascade_calls_total counter")
                lines += [f'distillery_cascade_calls_total{{{m},task="{task}",answered_by="{who}"}} {n}'
                          for (task, who), n in sorted(self.routes.items())]
                lines.append("# TYPE distillery_shadow_pairs_total counter")
                lines += [f'distillery_shadow_pairs_total{{{m},task="{task}"}} {n}'
                          for task, n in sorted(self.pairs.items())]
            if speculation is not None:  # the names llama-server's /metrics gives the same counts
                for name, key in (("draft_passes_total", "passes"), ("draft_tokens_total", "drafted"),
                                  ("draft_tokens_accepted_total", "accepted")):
                    lines += [f"# TYPE distillery_{name} counter", f"distillery_{name}{{{m}}} {speculation[key]}"]
            done = t["completion_tokens"]
            lines += ["# TYPE distillery_usd_per_1m_output_tokens gauge",
                      f"distillery_usd_per_1m_output_tokens{{{m}}} {t['cost_usd'] / done * 1e6 if done else 0.0}",
                      "# TYPE distillery_queue_depth gauge", f"distillery_queue_depth{{{m}}} {self.waiting}"]
        return "\n".join(lines) + "\n"
