"""Teacher licence policy and the terms a distilled student inherits.

A student trained on a teacher's outputs (or pruned from its weights) is, under several model licences, a
derivative of the teacher. The guard decides before any compute is spent, and the decision travels with
every manifest and the student's model card.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from toolchain.models.references import ModelRef, gguf_metadata

# licence id -> (allowed without acknowledgement, what the student inherits)
POLICY: dict[str, tuple[bool, str]] = {
    "apache-2.0": (True, "Apache-2.0: keep the teacher's NOTICE and licence text with the student."),
    "mit": (True, "MIT: keep the teacher's copyright notice with the student."),
    "gemma": (
        True,
        "Gemma Terms of Use: the student is a 'Model Derivative'; the Gemma terms and prohibited-use policy "
        "apply to it and must be passed on to its users.",
    ),
    "llama2": (False, "Llama 2 Community License: acceptable-use policy applies; naming and user-count terms."),
    "llama3": (
        False,
        "Llama 3 Community License: 'Built with Llama' attribution; derivative names start with 'Llama'.",
    ),
    "qwen": (False, "Qwen License Agreement: commercial use above 100M monthly users needs Alibaba's permission."),
    "qwen-research": (False, "Qwen Research License: non-commercial use only."),
    "deepseek": (False, "DeepSeek License Agreement: use-based restrictions apply to derivatives."),
    "mistral-research": (False, "Mistral AI Research License: research and non-commercial use only; commercial "
                                "use needs a licence from Mistral AI."),
    "mistral-non-production": (False, "Mistral AI Non-Production License: no production or commercial use."),
    "own-data": (True, "Answers written by the data's owner: no third-party terms."),
    # Hosted providers whose terms forbid training competing models on their outputs.
    "openai-terms": (
        False,
        "OpenAI Terms of Use, 'What you cannot do': you may not 'use Output to develop models "
        "that compete with OpenAI'.",
    ),
    "anthropic-terms": (
        False,
        "Anthropic Commercial Terms of Service, Use Restrictions: customers may not use the "
        "Services 'to build a competing product or service, including to train competing AI "
        "models'.",
    ),
    "google-terms": (
        False,
        "Gemini API Additional Terms of Service: you may not use the Services 'to develop models "
        "that compete with' them.",
    ),
}

# Hosts of providers whose outputs are under their terms, and open-weight model ids -> licence id (first match).
PROVIDER_HOSTS = {"api.openai.com": "openai-terms", "openai.azure.com": "openai-terms",
                  "api.anthropic.com": "anthropic-terms", "generativelanguage.googleapis.com": "google-terms",
                  "aiplatform.googleapis.com": "google-terms"}
PROVIDERS = {"openai": "openai-terms", "anthropic": "anthropic-terms", "google": "google-terms",
             "gemini": "google-terms"}
# Open-weight model names (the id without its organisation, lower case) -> licence id. Each pattern must match
# the whole start of the name up to a separator (-, _, . or the end), and the first that matches wins, so the
# exceptions of a family come before its rule: Qwen2.5-3B and -72B are not Apache-2.0 like the rest of Qwen2.5,
# Qwen2-72B is under the Qwen licence, Mistral-Large under Mistral's research licence, and the R1 distillations
# keep the licence of the model they were distilled into (Llama or Qwen), not R1's MIT.
OPEN_WEIGHTS = (
    (r"deepseek-r1-distill-llama-\d+b", "llama3"),
    (r"deepseek-r1-distill-qwen-[\d.]+b", "apache-2.0"),
    (r"deepseek-r1(-0528)?", "mit"),
    (r"deepseek-v3-0324", "mit"),
    (r"deepseek-[\w.-]+", "deepseek"),
    (r"qwen2\.5-(coder-|math-|vl-)?3b", "qwen-research"),
    (r"qwen2\.5-(coder-|math-|vl-)?72b", "qwen"),
    (r"qwen2\.5-(coder-|math-|vl-)?(0\.5|1\.5|7|14|32)b", "apache-2.0"),
    (r"qwen2-(vl-)?72b", "qwen"),
    (r"qwen2-(vl-|math-|audio-)?(0\.5|1\.5|2|7|57b-a14)b", "apache-2.0"),
    (r"qwen3-[\w.-]+", "apache-2.0"),
    (r"qwq-32b", "apache-2.0"),
    (r"qwen(1\.5)?-[\w.-]+", "qwen"),
    (r"(meta-)?llama-?2-[\w.-]+", "llama2"),
    (r"(meta-)?llama-?3(\.[1-3])?-[\w.-]+", "llama3"),
    (r"(mistral-large|pixtral-large|ministral)-[\w.-]+", "mistral-research"),
    (r"codestral-[\w.-]+", "mistral-non-production"),
    (r"(mistral-(7b|nemo|small)|mixtral-8x(7|22)b|pixtral-12b)[\w.-]*", "apache-2.0"),
    (r"(code)?gemma-?[\d.]*-[\w.-]+", "gemma"),
    (r"phi-[\d.]+(-[\w.-]+)?", "mit"),
    (r"smollm\d?-[\w.-]+", "apache-2.0"),
)

ALIASES = {
    "apache 2.0": "apache-2.0",
    "apache2": "apache-2.0",
    "apache-2": "apache-2.0",
    "gemma-terms": "gemma",
    "llama2-community": "llama2",
    "llama3-community": "llama3",
    "llama3.1": "llama3",
    "llama3.2": "llama3",
    "llama3.3": "llama3",
}


class LicenceError(ValueError):
    """The teacher's licence does not allow this run without an explicit acknowledgement."""


@dataclass(frozen=True)
class LicenceDecision:
    teacher_licence: str
    source: str  # where the licence id came from
    allowed: bool
    acknowledged: str | None
    student_terms: str
    answers_from: str | None = None  # who wrote the data's reference answers the student learns from
    answers_licence: str | None = None
    answers_terms: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def normalise(licence: str) -> str:
    key = licence.strip().lower()
    return ALIASES.get(key, key)


def open_weight_licence(model_id: str) -> str | None:
    """The licence of an open-weight model by its id (``org/name`` or ``name``; a GGUF file name too), or None
    when the table does not know it (then the run needs licence.acknowledge)."""
    name = model_id.lower().rsplit("/", 1)[-1]
    return next((lic for pattern, lic in OPEN_WEIGHTS if re.match(f"(?:{pattern})(?:$|[-_.])", name)), None)


def classify_source(source: str) -> tuple[str, str]:
    """(licence id, why) of whoever wrote some answers: a hosted provider by name or by its API host, an
    open-weight model by its id (also behind an OpenAI-compatible server such as vLLM or TGI), or the data's
    owner. Forms: openai:gpt-4o, openai:<base_url>#<model>, anthropic:<model>, google:<model>,
    open-weight:<model id>, human."""
    from urllib.parse import urlparse

    kind, _, rest = source.partition(":")
    kind = kind.strip().lower()
    if kind in ("human", "own", "self"):
        return "own-data", "the data's own answers"
    if kind == "open-weight":
        lic = open_weight_licence(rest)
        return (
            (lic, f"open-weight model id '{rest}'")
            if lic
            else ("unknown", f"open-weight model '{rest}' not in the table")
        )
    if kind == "openai" and "#" in rest:
        base, _, model = rest.partition("#")
        host = (urlparse(base).hostname or "").lower()
        hosted = next((lic for h, lic in PROVIDER_HOSTS.items() if host == h or host.endswith("." + h)), None)
        if hosted:
            return hosted, f"hosted at {host}"
        lic = open_weight_licence(model)
        return (lic, f"model id '{model}' served at {host}") if lic else ("unknown", f"model '{model}' at {host}")
    if kind in PROVIDERS:
        return PROVIDERS[kind], f"{kind} output"
    return "unknown", f"'{source}' is not a known source"


def detect(ref: ModelRef) -> tuple[str, str]:
    """Find the teacher's licence id in its own files (GGUF metadata, config or model card front matter), or for
    an openai: endpoint from its host or model id."""
    if ref.kind == "openai":
        return classify_source(ref.ref)
    if ref.kind == "gguf" and ref.path is not None:
        meta = gguf_metadata(ref.path)
        if meta.get("general.license"):
            return normalise(str(meta["general.license"])), "gguf:general.license"
        name = str(meta.get("general.name", "")) + " " + str(meta.get("general.basename", ""))
        if "gemma" in name.lower():
            return "gemma", "gguf:general.name"
    if ref.kind == "hf_dir" and ref.path is not None:
        card = Path(ref.path) / "README.md"
        if card.is_file():
            for line in card.read_text(encoding="utf-8", errors="replace").splitlines()[:40]:
                if line.lower().startswith("license:"):
                    return normalise(line.split(":", 1)[1]), "README.md front matter"
    return "unknown", "not found in the model files"


def _terms(licence: str) -> tuple[bool, str]:
    return POLICY.get(licence, (False, f"Unknown licence '{licence}': check the terms yourself."))


def decide(ref: ModelRef, declared: str | None, acknowledge: str | None, answers_from: str | None = None,
           uses_answers: bool = False) -> LicenceDecision:
    """Apply the policy to the teacher and, when the student learns from answers in the data
    (``uses_answers``), to whoever wrote them (``answers_from``). Raises LicenceError (one line) when the run
    must not proceed."""
    if declared:
        licence, source = normalise(declared), "recipe licence.teacher"
    else:
        licence, source = detect(ref)
    allowed, terms = _terms(licence)
    if not allowed and not acknowledge:
        clause = f": {terms}" if licence.endswith("-terms") else ""
        raise LicenceError(
            f"teacher licence '{licence}' ({source}) needs an explicit acknowledgement{clause} Set licence.acknowledge "
            "in the recipe to a sentence accepting the teacher's terms"
        )
    if not uses_answers:
        return LicenceDecision(licence, source, allowed, acknowledge, terms)
    if not answers_from:
        raise LicenceError("data.answers_from: the student learns from the data's own answers (generate.answers), so "
                           "say who wrote them: openai:gpt-4o, anthropic:<model>, open-weight:<model id> or human")
    a_licence, why = classify_source(answers_from)
    a_allowed, a_terms = _terms(a_licence)
    if not a_allowed and not acknowledge:
        raise LicenceError(f"data.answers_from '{answers_from}' ({why}, {a_licence}): {a_terms} Training a student "
                           "on them needs licence.acknowledge")
    return LicenceDecision(licence, source, allowed and a_allowed, acknowledge, terms, answers_from, a_licence, a_terms)


def model_card_section(decision: LicenceDecision, teacher_ref: str) -> str:
    lines = [
        "## Licence",
        "",
        f"Distilled from `{teacher_ref}`, whose licence is **{decision.teacher_licence}** ({decision.source}).",
        "",
        decision.student_terms,
    ]
    if decision.answers_from:
        lines += ["", f"Trained on answers written by `{decision.answers_from}` (**{decision.answers_licence}**): "
                      f"{decision.answers_terms}"]
    if decision.acknowledged:
        lines += ["", f"Acknowledged by the recipe: \"{decision.acknowledged}\""]
    return "\n".join(lines) + "\n"
