"""What a server is started with (limits, prices, the key), and which addresses count as local."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from toolchain.recipe import Recipe


@dataclass(frozen=True)
class Settings:
    model_id: str
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    max_body_bytes: int = 1_000_000
    max_queue: int = 64
    temperature: float = 0.0
    api_key: str | None = None
    usd_per_hour: float = 0.10
    reference_usd_per_1m_input: float = 2.5
    reference_usd_per_1m_output: float = 10.0
    system_prompt: str | None = None  # added to chat requests that bring no system message (as in training)
    batch: int = 1  # requests decoded together (llama.cpp); 1 = one at a time
    n_ctx_per_slot: int = 4096
    stream_interval_ms: float = 0.0  # streamed text at most this often (first token at once); 0 = every token
    file: str = ""  # the served file's name, a label on every metric
    aliases: tuple[str, ...] = ()  # other names a request's `model` may use (the recipe name, the file name)
    # serve.constrain: task -> (grammar kind, definition) (toolchain.quality.constraints), and the task of a request
    # that names none
    constraints: dict = field(default_factory=dict)
    default_task: str | None = None
    unconstrained: tuple[str, ...] = ()  # tasks of the recipe whose metric has no shape to enforce
    # On SIGTERM/SIGINT the server stops taking requests, lets those in flight finish for at most this long, then
    # closes them and exits.
    shutdown_grace_s: float = 5.0
    # serve.route: cascade — the student answers a call of task T when its confidence ``rules[T].score`` is at or
    # above ``rules[T].threshold`` (``rules[None]``: calls that name no task); anything else goes upstream
    route: str = "student"
    rules: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)  # each label task's labels (its confidence is the label's share)
    shadow: float = 0.0  # share of calls answered by both the student and the upstream, the pair recorded

    @classmethod
    def from_recipe(cls, cfg: Recipe, model_id: str, file: str, aliases: tuple[str, ...] = (),
                    api_key: str | None = None, constraints: dict | None = None,
                    unconstrained: tuple[str, ...] = (), routes=None) -> Settings:
        """A recipe's serve: and cost: sections, the system prompt the student was trained with, and ``routes``
        (toolchain.serve.routing.Routing) when calls are routed."""
        s, c = cfg.serve, cfg.cost
        return cls(
            model_id=model_id, file=file, aliases=aliases, api_key=api_key,
            constraints=constraints or {}, unconstrained=unconstrained, default_task=s.task,
            max_prompt_tokens=s.max_prompt_tokens, max_new_tokens=s.max_new_tokens, max_body_bytes=s.max_body_bytes,
            max_queue=s.max_queue, temperature=s.temperature, batch=s.batch,
            n_ctx_per_slot=s.max_prompt_tokens + s.max_new_tokens + 8, stream_interval_ms=s.stream_interval_ms,
            usd_per_hour=c.usd_per_hour, reference_usd_per_1m_input=c.reference_api_usd_per_1m_input,
            reference_usd_per_1m_output=c.reference_api_usd_per_1m_output, system_prompt=cfg.student_system_prompt(),
            **({"route": routes.route, "shadow": routes.shadow, "rules": routes.rules, "labels": routes.labels}
               if routes is not None else {}),
        )

    def model_ids(self) -> list[str]:
        """What a request may name in `model` (and /v1/models lists); anything else is 404 model_not_found."""
        return [self.model_id, *(a for a in self.aliases if a != self.model_id)]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
