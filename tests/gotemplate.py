"""A small renderer for the subset of Go's text/template an Ollama chat TEMPLATE uses (for tests): text,
{{ .Content }}, {{ .Role }}, {{ .System }}, {{ "literal" }}, {{ range .Messages }}, {{ if eq .Role "x" }} /
{{ else if ... }} / {{ else }} / {{ end }}, {{ if .System }}, and the {{- / -}} whitespace trims."""

import re

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.DOTALL)


def _lex(src: str):
    out, pos = [], 0
    for m in _ACTION.finditer(src):
        out.append(("text", src[pos:m.start()]))
        out.append(("action", m.group(2), m.group(1) == "-", m.group(3) == "-"))
        pos = m.end()
    out.append(("text", src[pos:]))
    # apply trims
    for i, tok in enumerate(out):
        if tok[0] != "action":
            continue
        if tok[2] and i > 0:
            out[i - 1] = ("text", out[i - 1][1].rstrip())
        if tok[3] and i + 1 < len(out):
            out[i + 1] = ("text", out[i + 1][1].lstrip())
    return [t for t in out if t[0] == "action" or t[1]]


def _parse(tokens, i=0, stop=("end",)):
    nodes = []
    while i < len(tokens):
        tok = tokens[i]
        if tok[0] == "text":
            nodes.append(("text", tok[1]))
            i += 1
            continue
        body = tok[1]
        word = body.split()[0] if body.split() else ""
        if word in stop or body.startswith("else"):
            return nodes, i
        if word == "range":
            assert body == "range .Messages", body
            inner, i = _parse(tokens, i + 1)
            nodes.append(("range", inner))
            i += 1
        elif word == "if":
            branches = []
            cond = body[3:].strip()
            while True:
                inner, i = _parse(tokens, i + 1)
                branches.append((cond, inner))
                nxt = tokens[i][1]
                if nxt == "end":
                    break
                cond = nxt[len("else"):].strip()
                cond = cond[len("if"):].strip() if cond.startswith("if") else "true"
            nodes.append(("if", branches))
            i += 1
        else:
            nodes.append(("value", body))
            i += 1
    return nodes, i


def _value(expr, ctx):
    if expr.startswith('"'):
        return expr[1:-1]
    if expr == "true":
        return True
    m = re.fullmatch(r'eq (\.\w+) "(.*)"', expr)
    if m:
        return _value(m.group(1), ctx) == m.group(2)
    if expr.startswith("."):
        return ctx.get(expr[1:], "")
    raise ValueError(f"unknown template expression {expr!r}")


def _run(nodes, ctx, out):
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "value":
            out.append(str(_value(node[1], ctx)))
        elif node[0] == "range":
            for m in ctx["Messages"]:
                _run(node[1], {**ctx, "Role": m["role"], "Content": m["content"]}, out)
        elif node[0] == "if":
            for cond, body in node[1]:
                if _value(cond, ctx):
                    _run(body, ctx, out)
                    break


def render(template: str, messages: list[dict], system: str = "") -> str:
    nodes, _ = _parse(_lex(template))
    out: list[str] = []
    _run(nodes, {"Messages": messages, "System": system}, out)
    return "".join(out)
