"""The student as its teacher's draft model, in llama.cpp's own speculative decoding.

The draft proposes up to n tokens; the teacher checks them in one pass and keeps the longest prefix its own
sampler agrees with, plus one token of its own. The output is the teacher's (greedy: token for token), and the
gain depends on how often the draft is right and on what a draft token costs next to a teacher pass, which is
why it is measured where it will run: llama.cpp's ``llama-speculative-simple`` (built once from the runtime's own
sdist with the wheel's flags, ``gguf_io.tools_dir``), next to the teacher alone decoding the same prompts in the
same process through llama-cpp-python (the same ggml kernels and flags, one ``llama_decode`` a token; the
speculative binary aborts at draft length 0), side by side in one call.

llama.cpp takes a draft only when its vocabulary is the teacher's (``incompatibility`` says why not, from the two
GGUF headers, before anything runs): a student with a trimmed vocabulary (``student.vocab``) cannot be one.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from toolchain.artifacts import gguf_io
from toolchain.artifacts.files import run_tool
from toolchain.backends.llama_cpp import LlamaCppEngine
from toolchain.models.references import gguf_metadata, gguf_strings

# llama.cpp's common/speculative.cpp: a draft's vocabulary may differ in size by this much, and every token text
# from this id on must be the target's.
VOCAB_MAX_SIZE_DIFFERENCE = 128
VOCAB_CHECK_START_TOKEN_ID = 5


def _tokenizer(path: Path) -> dict:
    meta = gguf_metadata(path)
    return {"model": meta.get("tokenizer.ggml.model"), "tokens": gguf_strings(path, "tokenizer.ggml.tokens") or [],
            "bos": meta.get("tokenizer.ggml.bos_token_id"), "eos": meta.get("tokenizer.ggml.eos_token_id"),
            "add_bos": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            "add_eos": bool(meta.get("tokenizer.ggml.add_eos_token", False))}


def incompatibility(teacher: Path, draft: Path) -> str | None:
    """Why llama.cpp would refuse ``draft`` as ``teacher``'s draft model, in one line; None when it takes it. The
    checks of its ``common_speculative_are_compatible``, read from the two GGUF headers: the tokenizer type, the
    BOS/EOS tokens added and which, the vocabulary sizes, and every token's text from id 5 on."""
    t, d = _tokenizer(teacher), _tokenizer(draft)
    if t["model"] != d["model"]:
        return f"the teacher's tokenizer is {t['model']!r} and the draft's {d['model']!r}"
    for end in ("bos", "eos"):
        if t[f"add_{end}"] != d[f"add_{end}"] or (t[f"add_{end}"] and t[end] != d[end]):
            return (f"the {end.upper()} token differs: the teacher adds {t[end] if t[f'add_{end}'] else 'none'}, "
                    f"the draft {d[end] if d[f'add_{end}'] else 'none'}")
    if abs(len(t["tokens"]) - len(d["tokens"])) > VOCAB_MAX_SIZE_DIFFERENCE:
        return (f"the draft has {len(d['tokens']):,} tokens and the teacher {len(t['tokens']):,} (llama.cpp allows "
                f"{VOCAB_MAX_SIZE_DIFFERENCE} apart; a student with a trimmed vocabulary, student.vocab, cannot draft "
                "for its teacher)")
    for i in range(VOCAB_CHECK_START_TOKEN_ID, min(len(t["tokens"]), len(d["tokens"]))):
        if t["tokens"][i] != d["tokens"][i]:
            return f"token {i} is {t['tokens'][i]!r} in the teacher and {d['tokens'][i]!r} in the draft"
    return None


@dataclass
class Decoded:
    """One llama-speculative-simple call: tokens generated, decode seconds (the prompt's evaluation excluded), draft
    tokens proposed and accepted, and the generated text."""

    tokens: int
    seconds: float
    drafted: int
    accepted: int
    text: str


_NUMBERS = {
    "decoded": re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds"),
    "drafted": re.compile(r"n_drafted\s*=\s*(\d+)"),
    "accepted": re.compile(r"n_accept\s*=\s*(\d+)"),
}


def decode(teacher: Path, draft: Path, prompt: str, max_tokens: int, draft_max: int, threads: int,
           temperature: float = 0.0, seed: int = 0, p_min: float = 0.0, timeout_s: float = 600) -> Decoded:
    """``prompt`` (text with the chat template applied) through llama.cpp's speculative loop with up to
    ``draft_max`` (>= 1) tokens a draft."""
    tools = gguf_io.tools_dir()
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp) / "prompt.txt"
        prompt_file.write_text(prompt, encoding="utf-8")
        cmd = [str(tools / "llama-speculative-simple"), "-m", str(teacher), "-md", str(draft), "-f", str(prompt_file),
               "-n", str(max_tokens), "--spec-type", "draft-simple", "--spec-draft-n-max", str(draft_max),
               "--spec-draft-n-min", "0",
               "--spec-draft-p-min", str(p_min), "-t", str(threads), "-td", str(threads), "-c", "2048",
               "--temp", str(temperature), "--seed", str(seed), "-ngl", "0", "-ngld", "0"]
        done = run_tool(cmd, f"llama-speculative-simple on {Path(teacher).name} with {Path(draft).name}", timeout_s)
    log = done.stderr + done.stdout
    found = {k: rx.search(log) for k, rx in _NUMBERS.items()}
    if done.returncode != 0 or not all(found.values()):
        errors = [ln for ln in log.splitlines() if "error" in ln.lower() or "failed" in ln.lower()]
        raise RuntimeError(f"llama-speculative-simple failed (return code {done.returncode}): "
                           f"{(errors or log.strip().splitlines()[-1:] or ['no output'])[0].strip()}")
    out = done.stdout
    start = out.find(prompt)
    text = out[start + len(prompt):] if start >= 0 else out
    return Decoded(tokens=int(found["decoded"].group(1)), seconds=float(found["decoded"].group(2)),
                   drafted=int(found["drafted"].group(1)), accepted=int(found["accepted"].group(1)),
                   text=text.strip())


def alone(engine, prompt: str, max_tokens: int, temperature: float = 0.0, seed: int = 0) -> Decoded:
    """The teacher alone (a ``LlamaCppEngine``) on ``prompt``: decode seconds from its first token to its last."""
    ids = engine.tokenize(prompt)
    start, first, tokens = time.perf_counter(), None, []
    for tok in engine.stream(ids, max_tokens, temperature=temperature, seed=seed):
        tokens.append(tok)
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return Decoded(tokens=max(len(tokens) - 1, 0), seconds=end - (first or start), drafted=0, accepted=0,
                   text=engine.detokenize(tokens).strip())


def same_answer(a: str, b: str) -> bool:
    """One text is the other cut shorter (the speculative loop may overshoot the token limit by a draft)."""
    return a.startswith(b) or b.startswith(a)


def measure(teacher: Path, draft: Path, prompts: list[str], max_tokens: int, lengths: list[int], threads: int,
            temperatures: tuple[float, ...] = (0.0,), seed: int = 0, tick=None) -> list[dict]:
    """Per (temperature, draft length; 0 = the teacher alone), over ``prompts``: decode tok/s, the draft's acceptance
    rate, tokens per teacher pass and the speed-up over the teacher alone, every setting of a prompt run one after
    the other so that a slow spell of the machine falls on all of them; greedy rows also count the prompts whose
    answer is the teacher alone's. The draft alone decodes each prompt too (the same kernels and threads): its
    tok/s gives the cost of a draft token in teacher tokens, and each row the speed-up the standard formula
    predicts from its measured tokens per pass (``predicted``). ``tick`` (a callable) hears each finished call."""
    engine = LlamaCppEngine(teacher, threads=threads, seed=seed)
    drafter = LlamaCppEngine(draft, threads=threads, seed=seed)
    rows = []
    try:
        for temp in temperatures:
            runs: dict[int, list[Decoded]] = {n: [] for n in [0, *lengths]}
            by_draft: list[Decoded] = []
            for prompt in prompts:
                by_draft.append(alone(drafter, prompt, max_tokens, temp, seed))
                for n in runs:
                    runs[n].append(alone(engine, prompt, max_tokens, temp, seed) if n == 0 else
                                   decode(teacher, draft, prompt, max_tokens, n, threads, temp, seed))
                    if tick:
                        tick()
            rows += _rows(temp, runs, _tps(by_draft))
    finally:
        engine.close()
        drafter.close()
    return rows


def best(rows: list[dict]) -> dict | None:
    """The greedy row of ``measure`` with a draft (length > 0) and the highest speed-up over the teacher alone."""
    greedy = [r for r in rows if r["temperature"] == 0 and r["draft_max"] > 0]
    return max(greedy, key=lambda r: r["speedup"], default=None)


def _tps(done: list[Decoded]) -> float:
    return sum(r.tokens for r in done) / max(sum(r.seconds for r in done), 1e-9)


def predicted(tokens_per_pass: float, drafted_per_pass: float, cost: float) -> float:
    """The speed-up of speculative decoding (Leviathan et al. 2023; Chen et al. 2023) when each teacher pass checks
    ``drafted_per_pass`` draft tokens at the price of one teacher token and yields ``tokens_per_pass``, and a draft
    token costs ``cost`` teacher tokens: tokens_per_pass / (1 + drafted_per_pass · cost)."""
    return tokens_per_pass / (1 + drafted_per_pass * cost)


# What a draft token costs in target tokens for a 0.5B draft of a 7B target at the same quantization: decode of a
# single sequence on a CPU is memory-bound, so cost follows the bytes read per token.
LARGE_PAIR_COST = 0.5 / 7


def _rows(temp: float, runs: dict[int, list[Decoded]], draft_tps: float | None = None) -> list[dict]:
    alone_runs = runs[0]
    base_tps = _tps(alone_runs)
    cost = base_tps / draft_tps if draft_tps else None
    rows = []
    for n, done in runs.items():
        tokens, tps = sum(r.tokens for r in done), _tps(done)
        drafted, accepted = sum(r.drafted for r in done), sum(r.accepted for r in done)
        passes = max(tokens - accepted, 1)  # each teacher pass yields its accepted draft tokens and one of its own
        row = {"temperature": temp, "draft_max": n, "prompts": len(done), "tokens": tokens,
               "decode_tps": round(tps, 2), "speedup": round(tps / base_tps, 3),
               "drafted": drafted, "accepted": accepted,
               "acceptance": round(accepted / drafted, 4) if drafted else None,
               "tokens_per_teacher_pass": round(tokens / passes, 3)}
        if n > 0 and cost is not None:
            row["draft_alone_tps"] = round(draft_tps, 2)
            row["draft_token_cost"] = round(cost, 4)
            row["predicted_speedup"] = round(predicted(tokens / passes, drafted / passes, cost), 3)
            row["predicted_speedup_large_pair"] = round(predicted(tokens / passes, drafted / passes,
                                                                  LARGE_PAIR_COST), 3)
        if temp == 0:
            row["same_text_as_teacher"] = sum(same_answer(a.text, b.text) for a, b in zip(done, alone_runs))
        rows.append(row)
    return rows
