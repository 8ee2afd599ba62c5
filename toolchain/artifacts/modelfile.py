"""What a laptop runtime needs to run the student as it was trained: the chat template with the recipe's system
prompt as its default (written into the GGUF), and an Ollama Modelfile whose TEMPLATE renders the same text.

Ollama does not run Jinja: it matches a GGUF's template against built-ins and falls back to the bare prompt for
one it does not know, so the Modelfile carries a Go template. It is derived, not hand-written: the Jinja template
is rendered on marker conversations and the text around each marker gives every role's prefix and suffix, the
generation prompt and the default system message. Templates whose per-message text is not a fixed prefix and
suffix per role (tool calls, conditional formatting) are refused with a message naming what differed.
"""

from __future__ import annotations

_M = "\x02{}\x03"


class TemplateError(ValueError):
    """A chat template this module cannot turn into a runtime's own syntax."""


def with_default_system(template: str, system: str | None) -> str:
    """The Jinja chat template, with ``system`` inserted as the first message when a conversation has none."""
    if not system:
        return template
    literal = system.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    head = ("{%- if not messages or messages[0]['role'] != 'system' -%}"
            f"{{%- set messages = [{{'role': 'system', 'content': '{literal}'}}] + messages -%}}"
            "{%- endif -%}")
    return head + template


def _render(template: str, messages: list[dict], gen: bool, bos: str, eos: str) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    out, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=gen,
                                   bos_token=bos, eos_token=eos)
    return out[0]


def roles(template: str, bos: str = "", eos: str = "") -> dict:
    """Per role its prefix and suffix, the generation prompt, the text before the first message and the
    template's default system message (None when it adds none)."""
    s, u1, a1, u2 = (_M.format(x) for x in ("S", "U1", "A1", "U2"))
    conv = [{"role": "system", "content": s}, {"role": "user", "content": u1}, {"role": "assistant", "content": a1},
            {"role": "user", "content": u2}]
    full = _render(template, conv, True, bos, eos)
    plain = _render(template, conv, False, bos, eos)
    ended = _render(template, conv[:3], False, bos, eos)
    for text in (full, plain, ended):
        if any(m not in text for m in (s, u1, a1)):
            raise TemplateError("the chat template drops a message's content")

    def between(text, a, b):
        return text[text.index(a) + len(a): text.index(b)]

    suf_u = plain[plain.index(u2) + len(u2):]
    gen = full[full.index(u2) + len(u2):]
    if not gen.startswith(suf_u):
        raise TemplateError("the generation prompt does not follow the user turn's end")
    gen = gen[len(suf_u):]
    suf_a = ended[ended.index(a1) + len(a1):]
    pre_a = between(full, u1, a1)
    pre_u = between(full, a1, u2)
    if not pre_a.startswith(suf_u) or not pre_u.startswith(suf_a):
        raise TemplateError("a turn's end differs between positions in the conversation")
    pre_a, pre_u = pre_a[len(suf_u):], pre_u[len(suf_a):]
    sys_to_user = between(full, s, u1)
    if not sys_to_user.endswith(pre_u):
        raise TemplateError("the system message is not followed by the user turn's start")
    suf_s = sys_to_user[: len(sys_to_user) - len(pre_u)]
    head = full[: full.index(s)]
    start = bos if bos and head.startswith(bos) and not pre_u.startswith(bos) else ""  # a BOS, not a turn marker
    out = {"start": start, "system": (head[len(start):], suf_s), "user": (pre_u, suf_u),
           "assistant": (pre_a, suf_a), "generation": gen, "default_system": None}
    alone = _render(template, [{"role": "user", "content": u1}], True, bos, eos)
    expected = start + pre_u + u1 + suf_u + gen
    if alone != expected:
        sys_pre = start + out["system"][0]
        tail = suf_s + pre_u + u1 + suf_u + gen
        if not (alone.startswith(sys_pre) and alone.endswith(tail)):
            raise TemplateError("without a system message the template writes something other than a system turn")
        out["default_system"] = alone[len(sys_pre): len(alone) - len(tail)]
    return out


def _go(text: str) -> str:
    """A literal for a Go template (braces cannot appear literally next to each other)."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(r: dict) -> str:
    """The Go template Ollama renders over .Messages (its SYSTEM is sent as the first message when a request
    has none), giving the same text as the Jinja template."""
    parts = ["{{- range .Messages }}"]
    for i, role in enumerate(("system", "user", "assistant")):
        pre, suf = r[role]
        parts.append(
            ("{{ if" if i == 0 else "{{ else if") + f' eq .Role "{role}" }}}}{_go(pre)}{{{{ .Content }}}}{_go(suf)}'
        )
    parts.append("{{ end }}{{ end }}" + _go(r["generation"]))
    return _go(r["start"]) + "".join(parts)


def modelfile(gguf_name: str, r: dict, system: str | None, stops: list[str], n_ctx: int, licence_text: str) -> str:
    """An Ollama Modelfile for one GGUF in the same folder."""
    q = '"""'
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {q}{ollama_template(r)}{q}"]
    sys = system if system else r["default_system"]
    if sys:
        lines.append(f"SYSTEM {q}{sys}{q}")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER num_ctx {n_ctx}", "PARAMETER temperature 0"]
    if licence_text:
        lines.append(f"LICENSE {q}{licence_text}{q}")
    return "\n".join(lines) + "\n"
