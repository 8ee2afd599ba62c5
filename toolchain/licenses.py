"""Teacher licence policy and the terms a distilled student inherits.

A student trained on a teacher's outputs (or pruned from its weights) is, under several model licences, a
derivative of the teacher. The guard decides before any compute is spent, and the decision travels with
every manifest and the student's model card.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from toolchain.models import ModelRef, gguf_metadata

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
    "llama3": (False, "Llama 3 Community License: 'Built with Llama' attribution; derivative names start with 'Llama'."),
}

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

    def as_dict(self) -> dict:
        return asdict(self)


def normalise(licence: str) -> str:
    key = licence.strip().lower()
    return ALIASES.get(key, key)


def detect(ref: ModelRef) -> tuple[str, str]:
    """Find the teacher's licence id in its own files: GGUF metadata, config or model card front matter."""
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


def decide(ref: ModelRef, declared: str | None, acknowledge: str | None) -> LicenceDecision:
    """Apply the policy. Raises LicenceError (one line) when the run must not proceed."""
    if declared:
        licence, source = normalise(declared), "recipe licence.teacher"
    else:
        licence, source = detect(ref)
    allowed, terms = POLICY.get(licence, (False, f"Unknown licence '{licence}': check the teacher's terms yourself."))
    if not allowed and not acknowledge:
        raise LicenceError(
            f"teacher licence '{licence}' ({source}) needs an explicit acknowledgement: set licence.acknowledge "
            "in the recipe to a sentence accepting the teacher's terms"
        )
    return LicenceDecision(licence, source, allowed, acknowledge, terms)


def model_card_section(decision: LicenceDecision, teacher_ref: str) -> str:
    lines = [
        "## Licence",
        "",
        f"Distilled from `{teacher_ref}`, whose licence is **{decision.teacher_licence}** ({decision.source}).",
        "",
        decision.student_terms,
    ]
    if decision.acknowledged:
        lines += ["", f"Acknowledged by the recipe: \"{decision.acknowledged}\""]
    return "\n".join(lines) + "\n"
