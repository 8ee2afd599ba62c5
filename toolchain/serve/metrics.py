"""What /metrics reports: requests by status, token and cost totals (Prometheus text)."""

from __future__ import annotations

import threading


class Metrics:
    def __init__(self, model_id: str):
        self.model_id = model_id
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.totals = {"prompt_tokens": 0, "completion_tokens": 0, "engine_seconds": 0.0, "queue_seconds": 0.0,
                       "ttft_seconds": 0.0, "cost_usd": 0.0, "reference_cost_usd": 0.0, "generations": 0}
        self.waiting = 0

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

    def render(self) -> str:
        m = f'model="{self.model_id}"'
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
                                    ("reference_api_cost_usd_total", "reference_cost_usd", "counter")):
                lines += [f"# TYPE distillery_{name} {kind}", f"distillery_{name}{{{m}}} {t[key]}"]
            done = t["completion_tokens"]
            lines += ["# TYPE distillery_usd_per_1m_output_tokens gauge",
                      f"distillery_usd_per_1m_output_tokens{{{m}}} {t['cost_usd'] / done * 1e6 if done else 0.0}",
                      "# TYPE distillery_queue_depth gauge", f"distillery_queue_depth{{{m}}} {self.waiting}"]
        return "\n".join(lines) + "\n"
