"""export: the merged student as GGUF files for llama.cpp and ONNX models for onnxruntime, each checked.

Inputs: merge's model/ (safetensors + tokenizer), generate's held-out prompts, eval's eval.json (the PyTorch
student's and the teacher's scores on the same tasks).
Outputs: gguf/<name>-<quant>.gguf, onnx/<variant>/ (model.onnx + tokenizer files), export.json (every number)
and export.md (the table a user picks a file from).

GGUF: llama.cpp's own converter at the runtime's version writes a float32 GGUF, the source GGUF's tokenizer
metadata replaces whatever the converter would write, and llama.cpp's quantizer makes each listed type (with
``export.imatrix``, weighted by llama-imatrix's importance matrix over the training conversations).
ONNX: optimum exports one decoder with KV cache (``text-generation-with-past``); onnxruntime quantizes it.

Checks on every file, before it counts as exported: it re-opens (GGUFReader / the full ONNX checker) and
loads in its runtime; the 50 strings in evals/tokenizer_strings.json tokenize to the same ids as the HF
tokenizer and the source GGUF; greedy generation on five fixed prompts matches PyTorch token for token for
float files; top-1 agreement and mean KL(PyTorch ‖ file) over those sequences for every file; and, with
``export.score``, the held-out tasks of the eval stage scored through the file's own runtime.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import numpy as np

from toolchain.artifacts import gguf_io, onnx_io
from toolchain.artifacts.files import ExportError, check_safetensors
from toolchain.artifacts.modelfile import modelfile, roles, with_default_system
from toolchain.backends.base import log_softmax
from toolchain.backends.llama_cpp import LlamaCppEngine
from toolchain.backends.onnx import OnnxEngine
from toolchain.data.rows import iter_jsonl
from toolchain.models import references
from toolchain.models.chat import messages_for, tokenize_pairs
from toolchain.models.references import resolve
from toolchain.pipeline.runs import RESUME_DIR, Manifest, read_manifest, write_json_atomic
from toolchain.quality import heldout
from toolchain.quality import scores as em
from toolchain.quality.constraints import free_and_constrained
from toolchain.recipe import Recipe
from toolchain.render.markdown import export_markdown, num, pct, quality_notes
from toolchain.serve import targets as served
from toolchain.ui import console, progress

STRINGS = Path(__file__).resolve().parents[2] / "evals" / "tokenizer_strings.json"
CHECK_PROMPTS = [
    "What is the capital of Peru?",
    "Write one sentence about the sea.",
    "Translate to French: good morning, my friend.",
    "Is 17 a prime number? Answer yes or no.",
    "List three primary colours.",
]
EXACT = {"f32", "f16", "fp32"}  # float files: greedy output must equal PyTorch's token for token


def tokenizer_source(cfg: Recipe) -> Path | None:
    """The GGUF the student's tokenizer came from: the teacher, the student's own starting model, or — for a
    student from an HF folder whose vocabulary is the GGUF teacher's token for token — the teacher's, so llama.cpp
    gets the exact tables it already runs rather than the converter's reading of the folder."""
    ref = resolve(cfg.student_source())
    if ref.kind == "gguf":
        return ref.path
    teacher = resolve(cfg.teacher)
    if teacher.kind == "gguf" and ref.kind == "hf_dir" and _same_vocabulary(cfg.teacher, cfg.student.from_):
        return teacher.path
    return None


@functools.lru_cache(maxsize=8)
def _same_vocabulary(teacher: str, student_from: str) -> bool:
    """``references.vocabulary`` equal (the test soft labels use too), once per pair in a process."""
    return references.vocabulary(resolve(teacher)) == references.vocabulary(resolve(student_from))


class Reference:
    """What every exported file is compared with: the merged PyTorch model's greedy outputs and logits on the
    check prompts, and the HF (and source GGUF) token ids of the fidelity strings."""

    def __init__(self, cfg: Recipe, model_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.prompts = [self.tok.apply_chat_template(messages_for(p, cfg.student_system_prompt()), tokenize=False,
                                                     add_generation_prompt=True) for p in CHECK_PROMPTS]
        self.prompt_ids = [self.tok(t, add_special_tokens=False).input_ids for t in self.prompts]
        self.greedy, self.logits = [], []
        with torch.inference_mode():
            for ids in self.prompt_ids:
                x = torch.tensor([ids])
                out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=cfg.export.check_tokens,
                                     do_sample=False, pad_token_id=self.tok.pad_token_id)
                new = out[0, len(ids):].tolist()
                self.greedy.append(new)
                self.logits.append(model(torch.tensor([ids + new])).logits[0].float().numpy())
        del model
        self.strings = json.loads(STRINGS.read_text(encoding="utf-8"))
        self.hf_ids = [self.tok(s, add_special_tokens=False).input_ids for s in self.strings]
        self.source_ids = None
        src = tokenizer_source(cfg)
        if src is not None and cfg.student.vocab is None:  # a trimmed vocabulary differs from its source by design
            from llama_cpp import Llama

            with gguf_io.captured_stderr():  # llama.cpp warns about the context size of a vocab-only load
                vocab = Llama(model_path=str(src), vocab_only=True, verbose=False)
            self.source_ids = [vocab.tokenize(s.encode("utf-8"), add_bos=False, special=True) for s in self.strings]
            vocab.close()


def compare(engine, ref: Reference) -> dict:
    """Tokenizer identity, greedy parity and logit agreement of one loaded file against the reference."""
    ids = [engine.tokenize(s) for s in ref.strings]
    same_hf = sum(a == b for a, b in zip(ids, ref.hf_ids))
    same_src = None if ref.source_ids is None else sum(a == b for a, b in zip(ids, ref.source_ids))
    mismatched = [s for s, a, b in zip(ref.strings, ids, ref.hf_ids) if a != b]
    greedy_same, near_ties, top1, kl = 0, 0, [], []
    for prompt, new, want in zip(ref.prompt_ids, ref.greedy, ref.logits):
        got = engine.greedy(prompt, len(new), stop_ids=None) if new else []
        greedy_same += got == new
        have = engine.logits(prompt + new).astype(np.float64)
        if got != new:
            near_ties += _near_tie(prompt, new, got, want, have)
        p = log_softmax(want.astype(np.float64))
        q = log_softmax(have)
        kl.append(float((np.exp(p) * (p - q)).sum(-1).mean()))
        top1.append(float((want.argmax(-1) == have.argmax(-1)).mean()))
    return {
        "tokenizer_strings": len(ref.strings),
        "tokenizer_same_as_hf": same_hf,
        "tokenizer_same_as_source": same_src,
        "tokenizer_mismatches": mismatched[:5],
        "greedy_prompts": len(ref.greedy),
        "greedy_same": greedy_same,
        "greedy_near_ties": near_ties,
        "top1_agreement": float(np.mean(top1)),
        "mean_kl": float(np.mean(kl)),
    }


def _near_tie(prompt: list[int], new: list[int], got: list[int], want: np.ndarray, have: np.ndarray) -> bool:
    """Whether a float file's greedy output left PyTorch's at a near tie: where they first differ, PyTorch
    prefers its token over the file's by less than twice the largest logit difference between the two on the
    sequence so far. Float rounding (f16 weights, another CPU kernel) legitimately flips such a step; a wrong
    weight or tokenizer does not stay that close."""
    j = next((i for i, (a, b) in enumerate(zip(new, got)) if a != b), min(len(new), len(got)))
    if j >= len(new) or j >= len(got):
        return False
    row = len(prompt) + j - 1
    margin = float(want[row, new[j]] - want[row, got[j]])
    noise = float(np.abs(want[: row + 1] - have[: row + 1]).max())
    return margin < 2 * noise


def _verdict(kind: str, label: str, path: Path, checks: dict) -> None:
    """Refuse a file that would mislead a user: a different tokenizer, or a float file that decodes differently."""
    n = checks["tokenizer_strings"]
    if checks["tokenizer_same_as_hf"] != n or checks["tokenizer_same_as_source"] not in (None, n):
        bad = checks["tokenizer_mismatches"][0] if checks["tokenizer_mismatches"] else "(source GGUF differs)"
        raise ExportError(
            f"{path}: tokenizer differs from the student's on {n - checks['tokenizer_same_as_hf']} of {n} "
            f"strings, e.g. {bad!r}"
        )
    if label in EXACT and checks["greedy_same"] + checks.get("greedy_near_ties", 0) != checks["greedy_prompts"]:
        raise ExportError(
            f"{path}: {kind} {label} greedy output differs from PyTorch on "
            f"{checks['greedy_prompts'] - checks['greedy_same']} of {checks['greedy_prompts']} check prompts "
            "(not at a near tie)"
        )


def _score(cfg: Recipe, engine, ref: Reference, rows: list[dict], label: str, work: Path, evaluation: dict) -> dict:
    """The eval stage's held-out tasks through this file's runtime, and the file against the PyTorch student
    prompt by prompt."""
    from toolchain.quality.lm_adapter import EngineLM

    names = heldout.write_tasks(cfg, rows, ref.tok, work / "tasks", "student")
    result = heldout.score(cfg, EngineLM(engine, ref.tok, label), work / "tasks" / "student", names, chat=True,
                           rows=rows)
    tasks = sorted({r["task"] for r in rows})
    scores = heldout.task_scores(result, tasks)
    table = em.retention_table({"teacher": evaluation["scores"]["teacher"], "student": scores},
                               heldout.gold_counts(rows))
    return {"scores": scores, "gold": table["overall"]["student"], "retention": table["overall"]["retention"],
            "perplexity": em.mean_known([s.get("perplexity") for s in scores.values()]),
            "vs_pytorch": em.against(evaluation.get("paired") or {}, result["samples"]),
            # per prompt, so two files (or two runs' files) can be compared prompt by prompt
            "gold_by_prompt": {t: {s["id"]: s["gold"] for s in result["samples"].get(t, [])
                                   if s.get("gold") is not None} for t in tasks}}


def _finish(cfg: Recipe, kind: str, label: str, path: Path, describe: dict, engine, ref, rows, work,
            evaluation) -> dict:
    checks = compare(engine, ref)
    _verdict(kind, label, path, checks)
    quality = _score(cfg, engine, ref, rows, f"{kind}-{label}", work, evaluation) if cfg.export.score else {}
    return {"format": kind, "variant": label, **describe, **checks, **quality}


def _base_models(cfg: Recipe) -> list[dict]:
    """general.base_model.*: the teacher, and the student's own starting model when it is not the teacher."""

    out = []
    for ref_text in [cfg.teacher] + ([cfg.student.from_] if cfg.student.from_ != "teacher" else []):
        ref = resolve(ref_text)
        entry = {"name": references.public_name(ref_text).rsplit("/", 1)[-1].removesuffix(".gguf")}
        if ref.kind == "gguf" and ref.path is not None:
            meta = references.gguf_metadata(ref.path)
            entry["name"] = str(meta.get("general.name") or entry["name"])
            if meta.get("general.organization"):
                entry["organization"] = str(meta["general.organization"])
        repo = references.hub_repo(ref_text)
        if repo:
            entry.update(name=repo.split("/")[-1], organization=repo.split("/")[0],
                         repo_url=f"https://huggingface.co/{repo}")
        out.append(entry)
    return out


def runtime_chat(cfg: Recipe, tok) -> tuple[str, dict]:
    """The chat template the student was trained with, the recipe's system prompt as its default, and its
    per-role parts (toolchain.artifacts.modelfile.roles): what the GGUF and its Modelfile both carry."""

    template = with_default_system(tok.chat_template, cfg.student_system_prompt())
    return template, roles(template, tok.bos_token or "", tok.eos_token or "")


def gguf_metadata(cfg: Recipe, tok, evaluation: dict, licence: dict) -> dict:
    """What a model browser, a licence scanner and a laptop runtime read from the file: provenance
    (general.*), the chat template the student was trained with (the recipe's system prompt as its default)
    and the end-of-turn token."""
    template, parts = runtime_chat(cfg, tok)
    ov = evaluation["retention"]["overall"]
    result = ("" if ov.get("teacher") is None else
              f"; held-out gold {pct(ov['student'])}% vs the teacher's {pct(ov['teacher'])}% "
              f"(retention {num(ov['retention'])}, {ov['gold_docs']} prompts)")
    meta = {"general.name": f"{cfg.name} student", "general.organization": "distillery",
            "general.quantized_by": "distillery", "general.tags": ["distillation", "distillery",
                                                                  f"{cfg.distill.flavour}-label"],
            "general.description": f"Recipe '{cfg.name}': a {cfg.distill.flavour}-label student distilled from "
                                   f"{references.public_name(cfg.teacher)}{result}.",
            "tokenizer.chat_template": template}
    if licence.get("teacher_licence"):
        meta["general.license"] = licence["teacher_licence"]
    bases = _base_models(cfg)
    meta["general.base_model.count"] = len(bases)
    for i, b in enumerate(bases):
        meta.update({f"general.base_model.{i}.{k}": v for k, v in b.items()})
    end = parts["assistant"][1].strip()
    eot = tok.convert_tokens_to_ids(end) if end else None
    if isinstance(eot, int) and eot != tok.unk_token_id:
        meta["tokenizer.ggml.eot_token_id"] = eot
    return meta


def write_modelfile(cfg: Recipe, tok, gguf: Path, licence: dict) -> Path:
    """An Ollama Modelfile next to the GGUF: its template in Ollama's syntax, the system prompt, the stops."""

    _, r = runtime_chat(cfg, tok)
    stops = list(dict.fromkeys(x for x in (r["assistant"][1].strip(), tok.eos_token) if x))
    terms = " ".join(x for x in (licence.get("teacher_licence"), licence.get("student_terms")) if x)
    path = gguf.with_suffix(".Modelfile")
    path.write_text(modelfile(gguf.name, r, cfg.student_system_prompt(), stops, cfg.serve.n_ctx, terms),
                    encoding="utf-8")
    return path


def foreign_server_check(cfg: Recipe, path: Path, max_tokens: int) -> dict:
    """The GGUF behind llama-cpp-python's own OpenAI server (not ours; its chat format read from the file),
    asked the check prompts with no system message, answers as ``distillery serve`` does (which adds the
    recipe's system prompt): the file alone reproduces the training prompt. ExportError at the first that
    differs."""
    import sys
    import urllib.request
    from importlib.metadata import version


    # the thread counts of our engine: llama.cpp's sums can round otherwise with another count (its server
    # defaults to half the cores), and a near tie would then look like a template problem
    threads = str(os.cpu_count() or 1)
    try:
        proc, port = served.start_child_server(
            lambda port: [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--host", "127.0.0.1",
                          "--port", str(port), "--n_ctx", "2048", "--n_threads", threads, "--n_threads_batch", threads,
                          "--verbose", "false"],
            "/v1/models", "llama-cpp-python's server")
    except RuntimeError as err:
        raise ExportError(f"{path.name}: {err}") from None

    def post(body: dict) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.loads(resp.read())

    engine = LlamaCppEngine(path, n_ctx=2048)
    try:
        same = 0
        for i, prompt in enumerate(CHECK_PROMPTS):
            theirs = post(
                {
                    "messages": [{"role": "user", "content": prompt}],
                    "temperature": 0,
                    "top_p": 1,
                    "repeat_penalty": 1.0,
                    "max_tokens": max_tokens,
                    "seed": 0,
                }
            )["choices"][0]["message"]["content"]
            ours = engine.chat(messages_for(prompt, cfg.student_system_prompt()), max_tokens=max_tokens).text
            if theirs.strip() != ours.strip():
                raise ExportError(
                    f"{path.name}: llama-cpp-python's own server (no system message) answers check prompt "
                    f"{i + 1} {prompt!r} with {theirs[:80]!r}, distillery serve with {ours[:80]!r}"
                )
            same += 1
    finally:
        engine.close()
        served.stop_child_server(proc)
    return {
        "server": f"llama_cpp.server {version('llama-cpp-python')}",
        "file": path.name,
        "prompts": len(CHECK_PROMPTS),
        "same": same,
        "system_message_sent": False,
    }


def calibration_text(cfg: Recipe, tok, train: Path) -> str:
    """The training conversations token for token as the student trained on them (chat template, the row's own
    system message and turns, the answer and its end-of-turn token), as text, one after another: what the
    importance matrix is measured on."""

    pairs, _, _ = tokenize_pairs(tok, [r for _, r in iter_jsonl(train)], cfg.student_system_prompt(), None,
                                 bare=cfg.data.strip_instructions)
    return "\n".join(tok.decode(ids, skip_special_tokens=False) for ids, _ in pairs)


def _imatrix(cfg: Recipe, tok, train: Path, base: Path, work: Path, bar, task) -> tuple[Path | None, dict | None]:
    """The importance matrix of the float32 student on the training conversations (once; resumed)."""
    if not cfg.export.imatrix or not set(cfg.export.quants) & set(gguf_io.IMATRIX_QUANTS):
        return None, None
    out, saved = work / "imatrix.gguf", work / "imatrix.json"
    if out.is_file() and saved.is_file():
        return out, json.loads(saved.read_text(encoding="utf-8"))
    gguf_io.tools_dir(announce=lambda line: console.print(f"  export: {line}"))
    bar.update(task, info="gguf: importance matrix")
    text = work / "imatrix-calibration.txt"
    calibration = calibration_text(cfg, tok, train)
    text.write_text(calibration, encoding="utf-8")
    # llama-imatrix wants at least two windows of text: a small training set gets shorter windows
    n_ctx = min(512, len(tok(calibration, add_special_tokens=False).input_ids) // 2 // 16 * 16)
    if n_ctx < 32:
        raise ExportError(f"{train}: too little training text for an importance matrix (export.imatrix)")
    info = gguf_io.compute_imatrix(base, text, out, cfg.export.imatrix_chunks, n_ctx=n_ctx)
    info["source"] = "generate/train.jsonl through the chat template"
    write_json_atomic(saved, info)
    return out, info


def _gguf(cfg: Recipe, merged: Path, out_dir: Path, work: Path, licence: dict, ref, rows, evaluation, bar, task,
          train: Path):
    """Convert once to float32 GGUF (with the source tokenizer and the metadata runtimes read), quantize to
    each listed type (with the importance matrix where the recipe asks), check each, and write its Ollama
    Modelfile."""
    base = work / "student-f32.gguf"
    if not base.is_file():
        bar.update(task, info="gguf: convert")
        gguf_io.build_float(merged, base, tokenizer_source(cfg), gguf_metadata(cfg, ref.tok, evaluation, licence))
    imatrix, imatrix_info = _imatrix(cfg, ref.tok, train, base, work, bar, task)
    results = []
    (out_dir / "gguf").mkdir(exist_ok=True)
    for quant in cfg.export.quants:
        saved = work / f"gguf-{quant}.json"
        path = out_dir / "gguf" / f"{cfg.name}-{quant}.gguf"
        if saved.is_file() and path.is_file():
            results.append(json.loads(saved.read_text(encoding="utf-8")))
            bar.update(task, advance=1)
            continue
        bar.update(task, info=f"gguf {quant}")
        tmp = path.with_suffix(".tmp")
        weighted = imatrix is not None and quant in gguf_io.IMATRIX_QUANTS
        gguf_io.quantize(base, tmp, quant, imatrix=imatrix if weighted else None)
        os.replace(tmp, path)

        engine = LlamaCppEngine(path, n_ctx=2048, logits_all=True)
        try:
            result = _finish(cfg, "gguf", quant, path, gguf_io.describe(path), engine, ref, rows, work, evaluation)
            if cfg.serve.constrain == "task" and cfg.export.score:
                bar.update(task, info=f"gguf {quant}: task-constrained decoding")
                result["constrained"] = free_and_constrained(engine, cfg.task_specs(rows), rows,
                                                             cfg.student_system_prompt(), cfg.eval.max_new_tokens,
                                                             bare=cfg.data.strip_instructions)
        finally:
            engine.close()
        result["file"] = str(path.relative_to(out_dir))
        result["imatrix"] = imatrix_info if weighted else None
        result["modelfile"] = str(write_modelfile(cfg, ref.tok, path, licence).relative_to(out_dir))
        write_json_atomic(saved, result)
        results.append(result)
        bar.update(task, advance=1)
    if imatrix is not None:  # kept beside the files: what they were quantized with, for requantizing later
        shutil.copyfile(imatrix, out_dir / "gguf" / "imatrix.gguf")
    return results


def _onnx(cfg: Recipe, merged: Path, params: int, out_dir: Path, work: Path, ref, rows, evaluation, bar, task):
    """optimum export (float32) once, onnxruntime quantization per listed variant, check each."""

    fp32 = work / "onnx-fp32"
    optimum = any(not v.startswith("genai_") for v in cfg.export.onnx)  # genai variants come from their builder
    if optimum and not (fp32 / "model.onnx").is_file():
        bar.update(task, info="onnx: export")
        shutil.rmtree(fp32, ignore_errors=True)
        onnx_io.export(merged, work / "onnx-fp32.tmp")
        os.replace(work / "onnx-fp32.tmp", fp32)
    results = []
    for variant in cfg.export.onnx:
        saved = work / f"onnx-{variant}.json"
        folder = out_dir / "onnx" / variant
        if saved.is_file() and (folder / "model.onnx").is_file():
            results.append(json.loads(saved.read_text(encoding="utf-8")))
            bar.update(task, advance=1)
            continue
        bar.update(task, info=f"onnx {variant}")
        tmp = folder.with_name(f"{variant}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if variant == "fp32":
            shutil.copytree(fp32, tmp)
        elif variant.startswith("genai_"):
            onnx_io.genai_build(merged, tmp, variant)
        else:
            onnx_io.quantize(fp32 / "model.onnx", tmp, variant)
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(exist_ok=True)
        os.replace(tmp, folder)
        described = onnx_io.check(folder / "model.onnx")
        described["bits_per_weight"] = round(8 * described["bytes"] / params, 3)
        described["parameters"] = params
        engine = OnnxEngine(folder)
        try:
            result = _finish(
                cfg, "onnx", variant, folder / "model.onnx", described, engine, ref, rows, work, evaluation
            )
        finally:
            engine.close()
        result["file"] = str((folder / "model.onnx").relative_to(out_dir))
        write_json_atomic(saved, result)
        results.append(result)
        bar.update(task, advance=1)
    return results


def run(cfg: Recipe, inputs: dict[str, Path], out_dir: Path) -> Manifest:
    merged = inputs["merge"] / "model"
    safetensors = check_safetensors(merged / "model.safetensors")  # a truncated file: one line naming it
    read_manifest(inputs["merge"])  # and every merged file still matches its manifest
    source = tokenizer_source(cfg)
    if source is not None:
        gguf_io.open_reader(source)
    evaluation = json.loads((inputs["eval"] / "eval.json").read_text(encoding="utf-8"))
    licence = json.loads((inputs["merge"] / "manifest.json").read_text()).get("licence") or {}
    rows = heldout.heldout_rows(cfg, inputs["generate"])
    work = out_dir / RESUME_DIR
    work.mkdir(exist_ok=True)

    console.print("  export: PyTorch reference (check prompts, tokenizer strings)")
    ref = Reference(cfg, merged)
    total = len(cfg.export.quants) * ("gguf" in cfg.export.formats) + len(cfg.export.onnx) * (
        "onnx" in cfg.export.formats
    )
    results: list[dict] = []
    with progress() as bar:
        task = bar.add_task("export", total=total, info="")
        foreign = None
        if "gguf" in cfg.export.formats:
            results += _gguf(cfg, merged, out_dir, work, licence, ref, rows, evaluation, bar, task,
                             inputs["generate"] / "train.jsonl")
            quant = "q8_0" if "q8_0" in cfg.export.quants else cfg.export.quants[0]
            saved = work / "foreign-server.json"
            if not saved.is_file():
                bar.update(task, info=f"gguf {quant}: llama-cpp-python's server")
                check = foreign_server_check(
                    cfg, out_dir / "gguf" / f"{cfg.name}-{quant}.gguf", cfg.export.check_tokens
                )
                write_json_atomic(saved, check)
            foreign = json.loads(saved.read_text(encoding="utf-8"))
        if "onnx" in cfg.export.formats:
            results += _onnx(cfg, merged, safetensors["parameters"], out_dir, work, ref, rows,
                             evaluation, bar, task)

    pytorch = {"format": "pytorch", "variant": "fp32", "file": "(merge) model/model.safetensors",
               "bytes": safetensors["bytes"], "parameters": safetensors["parameters"],
               "bits_per_weight": round(8 * safetensors["bytes"] / safetensors["parameters"], 3),
               "gold": evaluation["retention"]["overall"]["student"],
               "retention": evaluation["retention"]["overall"]["retention"],
               "perplexity": em.mean_known([s.get("perplexity") for s in evaluation["scores"]["student"].values()])}
    report = {"recipe": cfg.name, "teacher_gold": evaluation["retention"]["overall"]["teacher"],
              "gate_level": cfg.eval.gate_level,
              "pytorch": pytorch, "files": results, "check_prompts": CHECK_PROMPTS,
              "check_tokens": cfg.export.check_tokens, "tokenizer_source": str(source) if source else None,
              "foreign_server": foreign}
    (out_dir / "export.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / "export.md").write_text(export_markdown(report), encoding="utf-8")
    console.print(export_markdown(report).split("\n\n")[1], highlight=False, soft_wrap=True)
    for note in quality_notes(report):
        console.print(f"  {note.replace('**', '')}", highlight=False, soft_wrap=True)
    return Manifest(metrics={f"{r['format']}:{r['variant']}": {k: r.get(k) for k in ("bytes", "bits_per_weight", "gold",
                                                                                      "top1_agreement", "mean_kl")}
                             for r in results})
