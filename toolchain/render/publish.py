"""``distillery publish``: folders a model hub takes as they are.

    <to>/<recipe>/        the merged student (safetensors, config, tokenizer) and a model card: YAML front matter
                          (license, base_model, base_model_relation, pipeline_tag, library_name, tags), the
                          teacher-vs-student eval table, every exported file's quality and the measured speed, and
                          the licence terms the student inherits
    <to>/<recipe>-GGUF/   the GGUFs and their Ollama Modelfiles, with a card whose base_model is the student
                          (base_model_relation: quantized)

With ``repo`` (org/name) both are uploaded with ``huggingface_hub`` (org/name and org/name-GGUF); that needs
network and a token, as the Hub does. Nothing published names a local path or an endpoint's URL (cards,
configs, GGUF metadata): publishing scans every file it would write and refuses, writing nothing, when one would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import yaml

from toolchain.artifacts.inspection import scan_for_leaks
from toolchain.models.licenses import LicenceDecision, model_card_section
from toolchain.models.references import gguf_metadata, hub_repo, resolve
from toolchain.pipeline.plans import finished
from toolchain.pipeline.runs import RunError
from toolchain.quality.scores import flagged_files
from toolchain.recipe import Recipe
from toolchain.render.markdown import bench_markdown as bench_md
from toolchain.render.markdown import cascade_markdown, eval_table
from toolchain.render.markdown import export_markdown as export_md
from toolchain.render.report import gather

MODEL_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")


def hub_id(ref_text: str) -> str | None:
    """The Hugging Face id of a model reference, where it has one (hf:, or a GGUF that names its source repo)."""

    repo = hub_repo(ref_text)
    if repo:
        return repo
    ref = resolve(ref_text)
    if ref.kind == "gguf" and ref.path is not None:
        meta = gguf_metadata(ref.path)
        for key in ("general.base_model.0.repo_url", "general.source.repo_url", "general.source.url"):
            m = re.match(r"https://huggingface\.co/([\w.-]+/[\w.-]+)", str(meta.get(key, "")))
            if m:
                return m.group(1)
    return None


def _front(meta: dict) -> str:
    return "---\n" + yaml.safe_dump({k: v for k, v in meta.items() if v is not None}, sort_keys=False) + "---\n"


def endpoint_urls(cfg: Recipe) -> list[str]:
    """The endpoint URLs a recipe names (teacher, judges): never to be written into what is published."""
    refs = [cfg.teacher, *(t.judge for t in cfg.tasks.values() if t.judge)]
    return [r[len("openai:"):].partition("#")[0] for r in refs if r.startswith("openai:")]


def left_out(export_report: dict, gguf_dir: Path, include_flagged: bool = False) -> dict[str, str]:
    """GGUF files of an export that do not ship, and why: files flagged below the PyTorch student (unless
    ``include_flagged``) and llama.cpp's importance matrix (quantization input, not a model)."""
    out = {} if include_flagged else {Path(f).name: why for f, why in flagged_files(export_report).items()
                                      if f.endswith(".gguf")}
    if (gguf_dir / "imatrix.gguf").is_file():
        out["imatrix.gguf"] = "the importance matrix the 4-bit files were quantized with, not a model"
    return out


def _left_out_lines(skipped: dict[str, str]) -> list[str]:
    if not skipped:
        return []
    return ["", "## Left out", ""] + [f"- `{name}`: {why}" for name, why in sorted(skipped.items())]


def _cards(cfg: Recipe, data: dict, licence: dict, repo: str | None, base_model: str | None,
           skipped: dict[str, str]) -> tuple[str, str]:
    teacher_id = base_model or hub_id(cfg.teacher)
    tags = ["distillation", "distillery", f"{cfg.distill.flavour}-label"]
    ov = data["eval"]["retention"]["overall"]
    model_front = {"license": licence.get("teacher_licence") or "other", "base_model": teacher_id,
                   "base_model_relation": "finetune" if teacher_id else None, "pipeline_tag": "text-generation",
                   "library_name": "transformers", "tags": tags}
    teacher_name = teacher_id or cfg.teacher.rsplit("/", 1)[-1]
    summary = (
        f"A {cfg.distill.flavour}-label student distilled by distillery from `{teacher_name}` (recipe "
        f"`{cfg.name}`). Held-out gold accuracy: student {100 * (ov['student'] or 0):.1f}%, teacher "
        f"{100 * (ov['teacher'] or 0):.1f}%, retention "
        f"{ov['retention'] if ov['retention'] is None else round(ov['retention'], 2)} "
        f"over {ov['gold_docs']} prompts."
    )
    decision = LicenceDecision(**{k: licence.get(k) for k in LicenceDecision.__dataclass_fields__}) if licence else None
    body = [f"# {cfg.name} student", "", summary, "", "## Quality: teacher vs student (held-out prompts)", "", "```",
            eval_table(data["eval"], data.get("gate")), "```", "",
            *cascade_markdown(data.get("cascade")), "",
            "## Exported files", "", export_md(data["export"]).split("\n", 2)[2],
            "## Speed (same machine, same quantization)", "", bench_md(data["bench"]).split("\n", 2)[2]]
    body += _left_out_lines(skipped)
    if decision:
        body += ["", model_card_section(decision, teacher_name)]
    model_card = _front(model_front) + "\n".join(body) + "\n"

    gguf_front = {
        "license": model_front["license"],
        "base_model": repo,
        "base_model_relation": "quantized" if repo else None,
        "pipeline_tag": "text-generation",
        "tags": tags + ["gguf"],
    }
    files = [r for r in data["export"]["files"] if r["format"] == "gguf" and Path(r["file"]).name not in skipped]
    lines = [f"# {cfg.name} student, GGUF", "", summary, "", "| file | size (MB) | bits/weight | held-out gold % | "
                                                             "retention |",
             "|---|---:|---:|---:|---:|"]
    for r in files:
        gold = "-" if r.get("gold") is None else f"{100 * r['gold']:.1f}"
        ret = "-" if r.get("retention") is None else f"{r['retention']:.2f}"
        lines.append(f"| {Path(r['file']).name} | {r['bytes'] / 1e6:.1f} | {r['bits_per_weight']:.2f} | {gold} | "
                     f"{ret} |")
    lines += ["", "Each file carries the chat template the student was trained with (the recipe's system prompt as its "
              "default) and its end-of-turn token: `llama-server -m <file>` and LM Studio run it as it is. Ollama: "
              "`ollama create <name> -f <file>.Modelfile` in this folder."]
    lines += _left_out_lines(skipped)
    if decision:
        lines += ["", model_card_section(decision, teacher_name)]
    return model_card, _front(gguf_front) + "\n".join(lines) + "\n"


def build(cfg: Recipe, runs_root, to: Path, repo: str | None = None, force: bool = False,
          base_model: str | None = None, include_flagged: bool = False) -> tuple[Path, Path]:
    """Write <to>/<recipe>/ and <to>/<recipe>-GGUF/ from the recipe's finished stages (``base_model``: the
    teacher's Hub id where its reference does not say it, e.g. a local GGUF). Files export flagged below the
    PyTorch student stay out (``include_flagged`` ships them), and the cards say what was left out and why."""

    data = gather(cfg, runs_root)
    merge = finished(cfg, runs_root, "merge")
    export = Path(data["dirs"]["export"])
    licence = json.loads((merge / "manifest.json").read_text(encoding="utf-8")).get("licence") or {}
    skipped = left_out(data["export"], export / "gguf", include_flagged)
    model_card, gguf_card = _cards(cfg, data, licence, repo, base_model, skipped)
    roots = [Path.cwd().resolve(), Path(runs_root).resolve(), Path.home(), Path(to).resolve()]
    out = {"model": Path(to) / cfg.name, "gguf": Path(to) / f"{cfg.name}-GGUF"}
    for folder in out.values():
        if folder.exists() and not force:
            raise RunError(f"{folder} exists; pass --force to replace it")
    staged = {kind: folder.with_name(folder.name + ".tmp") for kind, folder in out.items()}
    for kind, tmp in staged.items():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if kind == "model":
            for f in MODEL_FILES:
                if (merge / "model" / f).is_file():
                    shutil.copy2(merge / "model" / f, tmp / f)
            (tmp / "README.md").write_text(model_card, encoding="utf-8")
        else:
            for f in sorted((export / "gguf").iterdir()):
                if f.suffix in (".gguf", ".Modelfile") and f"{f.stem}.gguf" not in skipped:
                    shutil.copy2(f, tmp / f.name)
            (tmp / "README.md").write_text(gguf_card, encoding="utf-8")
    bad = [f"{out[k].name}/{hit}" for k, tmp in staged.items()
           for hit in scan_for_leaks(tmp, roots + [tmp.resolve(), merge.resolve()], endpoint_urls(cfg))]
    if bad:
        for tmp in staged.values():
            shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"publish: {bad[0]} would leave the machine; nothing written")
    for kind, tmp in staged.items():
        shutil.rmtree(out[kind], ignore_errors=True)
        os.replace(tmp, out[kind])
    return out["model"], out["gguf"]


def upload(model: Path, gguf: Path, repo: str) -> list[str]:
    """Both folders to the Hub as repo and repo-GGUF (needs network and a token)."""
    from huggingface_hub import create_repo, upload_folder

    urls = []
    for folder, repo_id in ((model, repo), (gguf, f"{repo}-GGUF")):
        create_repo(repo_id, exist_ok=True, repo_type="model")
        upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model")
        urls.append(f"https://huggingface.co/{repo_id}")
    return urls
