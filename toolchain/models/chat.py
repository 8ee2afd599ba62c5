"""How a prompt and a response become model input: one place, used by generate, distill, the top-k cache
and held-out scoring, so the teacher, the trainer and the scorer always see the same tokens."""

from __future__ import annotations

IGNORE = -100


def context(row) -> dict:
    """An example's own system message and earlier turns (``system``, ``history``), from a prompt or a JSONL row."""
    if isinstance(row, dict):
        return {k: row[k] for k in ("system", "history") if row.get(k) is not None}
    return {k: v for k, v in row.extras().items() if k in ("system", "history")}


def messages_for(prompt: str, system_prompt: str | None, ctx: dict | None = None) -> list[dict]:
    """The chat messages of one example: its own system message where it has one (else the recipe's), its
    earlier turns, then the prompt as the last user turn."""
    ctx = ctx or {}
    system = ctx.get("system", system_prompt)
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [dict(m) for m in ctx.get("history", ())] + [{"role": "user", "content": prompt}]


def flat_prompt(prompt: str, ctx: dict | None) -> str:
    """The prompt for a raw (no chat template) model: earlier turns written out before it."""
    turns = [f"{m['role']}: {m['content']}" for m in (ctx or {}).get("history", ())]
    return "\n\n".join(turns + [prompt])


def with_instruction(prompt: str, instruction: str | None) -> str:
    return f"{prompt}\n\n{instruction}" if instruction else prompt


def encode_pair(tok, prompt: str, response: str, system_prompt: str | None, ctx: dict | None = None,
                ) -> tuple[list[int], list[int]]:
    """(input_ids, labels): chat-templated prompt with any earlier turns (masked) + response + end-of-turn
    token (trained): only the answer to the last user turn is learned."""
    prompt_ids = list(tok.apply_chat_template(messages_for(prompt, system_prompt, ctx), add_generation_prompt=True))
    resp_ids = tok(response + tok.eos_token, add_special_tokens=False)["input_ids"]
    return prompt_ids + resp_ids, [IGNORE] * len(prompt_ids) + resp_ids


def common_prefix(sequences: list[list[int]]) -> list[int]:
    """The longest token prefix every sequence shares (with a chat template: system prompt + user header):
    computed once, then reused by the online teacher and by batched decoding."""
    if not sequences:
        return []
    first = sequences[0]
    n = min(len(x) for x in sequences)
    for seq in sequences[1:]:
        n = next((i for i in range(n) if seq[i] != first[i]), n)
    return first[:n]


def tokenize_pairs(tok, rows: list[dict], system_prompt: str | None, seq_len: int | None, bare: bool = False,
                   ) -> tuple[list[tuple[list[int], list[int]]], list[int], int]:
    """Examples cut to seq_len (from the end, so cached teacher positions stay aligned), the index of the
    row each came from, and how many were cut. Rows use ``train_prompt`` when present, else ``prompt``; ``bare``
    leaves out each row's own system message and earlier turns (the student of data.strip_instructions)."""
    out, source, cut = [], [], 0
    for i, r in enumerate(rows):
        ids, labels = encode_pair(tok, r.get("train_prompt", r["prompt"]), r["response"], system_prompt,
                                  {} if bare else context(r))
        if seq_len is not None and len(ids) > seq_len:
            cut += 1
            ids, labels = ids[:seq_len], labels[:seq_len]
        if any(x != IGNORE for x in labels[1:]):
            out.append((ids, labels))
            source.append(i)
    return out, source, cut


def final_answer(text: str, pattern: str) -> str | None:
    """Group 1 of the last match of the reasoning answer pattern, or None."""
    import re

    found = re.findall(pattern, text)
    if not found:
        return None
    last = found[-1]
    return (last[0] if isinstance(last, tuple) else last).strip()


def served_text(text: str, settings: dict) -> str:
    """What a served student returns: for reasoning students with served_output 'strip', only the final
    answer (the whole text when no answer line is found, so nothing is silently lost)."""
    r = settings.get("reasoning")
    if not r or r.get("served_output") != "strip":
        return text
    answer = final_answer(text, r["answer_pattern"])
    return text if answer is None else answer
