"""What a call costs: an API's bill per call (input, cached input and output tokens priced separately) and a local
student's (its wall time at an hourly price), per call and per 1,000 calls, so the two compare at a task's own
prompt and answer lengths.

The built-in prices are the providers' published list prices (USD per 1M tokens: input, cached input, output)
as of ``PRICES_AS_OF``; they change, so ``--prices`` (a file or three numbers) overrides them, and a model not in
the table has no price until given one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from toolchain.data.rows import DataError

PRICES_AS_OF = "2025-06"
# model id prefix: (input, cached input, output) USD per 1M tokens; the longest matching prefix wins
PRICES: dict[str, tuple[float, float, float]] = {
    "gpt-4o-mini": (0.15, 0.075, 0.60),
    "gpt-4o": (2.50, 1.25, 10.00),
    "gpt-4.1-nano": (0.10, 0.025, 0.40),
    "gpt-4.1-mini": (0.40, 0.10, 1.60),
    "gpt-4.1": (2.00, 0.50, 8.00),
    "o4-mini": (1.10, 0.275, 4.40),
    "o3": (2.00, 0.50, 8.00),
    "claude-3-5-haiku": (0.80, 0.08, 4.00),
    "claude-sonnet-4": (3.00, 0.30, 15.00),
    "claude-opus-4": (15.00, 1.50, 75.00),
    "gemini-2.5-flash": (0.30, 0.075, 2.50),
    "gemini-2.5-pro": (1.25, 0.31, 10.00),
}


@dataclass(frozen=True)
class Price:
    """USD per 1M tokens."""

    input: float
    cached_input: float
    output: float
    source: str = ""

    def per_call(self, prompt_tokens: float, completion_tokens: float, cached_tokens: float = 0.0) -> float:
        """USD for one call: uncached input, cached input and output tokens each at their price."""
        cached = min(cached_tokens or 0.0, prompt_tokens)
        return ((prompt_tokens - cached) * self.input + cached * self.cached_input
                + completion_tokens * self.output) / 1e6


def price_for(model: str | None, given: dict[str, Price] | None = None) -> Price | None:
    """The price of ``model``: from ``given`` (``--prices``), else the built-in table (longest prefix of the id,
    after any provider/ prefix), else None."""
    if not model:
        return None
    given = given or {}
    if model in given:
        return given[model]
    if "*" in given:
        return given["*"]
    name = model.rsplit("/", 1)[-1].lower()
    hits = [k for k in PRICES if name.startswith(k)]
    if not hits:
        return None
    key = max(hits, key=len)
    return Price(*PRICES[key], source=f"{key} list price as of {PRICES_AS_OF}")


def read_prices(spec: str) -> dict[str, Price]:
    """``--prices``: three numbers (input,cached_input,output: every model at that price) or a YAML/JSON file
    mapping model ids to {input, cached_input, output} (USD per 1M tokens)."""
    if re.fullmatch(r"\s*[\d.]+\s*,\s*[\d.]+\s*,\s*[\d.]+\s*", spec):
        a, b, c = (float(x) for x in spec.split(","))
        return {"*": Price(a, b, c, source="--prices")}
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"--prices {spec}: neither three numbers (input,cached_input,output per 1M tokens) nor a file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.suffix != ".json" else json.loads(
            path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, ValueError) as err:
        raise DataError(f"{path}: not YAML or JSON ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping of model id to {{input, cached_input, output}}")
    out = {}
    for model, p in data.items():
        try:
            out[str(model)] = Price(float(p["input"]), float(p.get("cached_input", p["input"])), float(p["output"]),
                                    source=str(path))
        except (TypeError, KeyError, ValueError):
            raise DataError(f"{path}: {model}: needs numbers input and output (and cached_input)") from None
    return out


def local_per_call(wall_s: float, usd_per_hour: float) -> float:
    """USD for one call served locally: its wall time at the machine's hourly price."""
    return wall_s * usd_per_hour / 3600


@dataclass(frozen=True)
class LocalSpeed:
    """How fast a local student reads and writes tokens, and what its machine costs; ``measured`` when it comes
    from a finished bench stage, else an estimate (``source`` says from what)."""

    prompt_tps: float
    decode_tps: float
    usd_per_hour: float
    source: str
    measured: bool

    def per_call(self, prompt_tokens: float, completion_tokens: float) -> float:
        return local_per_call(prompt_tokens / self.prompt_tps + completion_tokens / self.decode_tps,
                              self.usd_per_hour)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def task_bill(usage: list[tuple[int, int, int]], calls_per_day: float, price: Price | None,
              local: LocalSpeed | None) -> dict:
    """A task's bill from its calls' (prompt, cached, completion) tokens: API $ per call and per 1,000 calls at
    ``price``, the local student's at ``local`` (the upstream's token counts stand in for the student's own), per
    day at ``calls_per_day``, and what the student would save a day."""
    api = [price.per_call(p, c, k) for p, k, c in usage] if price else []
    mine = [local.per_call(p, c) for p, _, c in usage] if local else []
    api_call, local_call = _mean(api), _mean(mine)
    out = {"calls_per_day": calls_per_day,
           "api_usd_per_call": api_call, "api_usd_per_1k": None if api_call is None else api_call * 1000,
           "api_usd_per_day": None if api_call is None else api_call * calls_per_day,
           "student_usd_per_call": local_call,
           "student_usd_per_1k": None if local_call is None else local_call * 1000,
           "student_usd_per_day": None if local_call is None else local_call * calls_per_day}
    both = api_call is not None and local_call is not None
    out["saved_usd_per_day"] = (api_call - local_call) * calls_per_day if both else None
    out["ratio"] = api_call / local_call if both and local_call > 0 else None
    return out
