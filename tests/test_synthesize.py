"""synthesize: near-duplicate and contamination filters, reply cleaning, quotas, and a resumed run that writes the
same file (a tiny random model with the embedded tokenizer as the teacher)."""

import json

import pytest

from toolchain.data import similarity
from toolchain.recipe import RecipeError, parse
from toolchain.stages import synthesize as syn



def test_near_duplicates_catch_rewordings_and_keep_distinct_prompts():
    near = similarity.NearDuplicates(threshold=0.7)
    near.add("a", "Classify the sentiment of this review: the pasta was cold and the waiter was rude to us.")
    near.add("b", "Summarise in one sentence: the city council voted to build a new bridge over the river.")
    # one word changed, one added: Jaccard over word 2-shingles well above 0.7
    assert near.similar("Classify the sentiment of this review: the pasta was cold and the waiter was very rude "
                        "to us.") == "a"
    assert near.similar("summarise in one sentence:  The city council voted to build a new bridge over the river!") == "b"
    # the same task on another subject, and another task: kept
    assert near.similar("Classify the sentiment of this review: the hotel room was spotless and the staff kind.") is None
    assert near.similar("Extract the person's name: Maria Lopez opened a bakery in Lyon last spring.") is None


def test_decontamination_drops_a_paraphrase_of_a_heldout_prompt_and_keeps_an_unrelated_one():
    dirty = similarity.Contamination(["What is the capital city of Australia and when was it founded?",
                               "Classify the sentiment: the battery died after two days of light use."], n=5)
    assert dirty.overlap("What is the capital city of Australia, and when was it founded?") == pytest.approx(1.0)
    assert dirty.overlap("Tell me: what is the capital city of Australia and when was it founded") >= 0.5
    assert dirty.overlap("Classify the sentiment: the concert was loud, crowded and wonderful.") < 0.5
    assert dirty.overlap("Name the largest planet of the solar system.") == 0.0


@pytest.mark.parametrize("reply, prompt", [
    ("New input: Summarise the following text.", "Summarise the following text."),
    ('"What is the boiling point of water?"', "What is the boiling point of water?"),
    ("**Input:** Classify: great food", "Classify: great food"),
    ("  Plain prompt.  ", "Plain prompt."),
    ("Name the capital of Peru.\nAnswer: Lima", "Name the capital of Peru."),
    ("Sure! Here is a new text:\n\nThe soup was cold.", "The soup was cold."),
])
def test_replies_are_cleaned_to_the_prompt(reply, prompt):
    assert syn.clean_reply(reply) == prompt


def test_a_task_pattern_cuts_the_preamble_before_the_prompt():
    pattern = r'^Which city is mentioned in this sentence\? "'
    reply = ('Sure! Here is a new input for the task:\n\nWhich city is mentioned in this sentence? "The fair in Oslo '
             'drew Ana Lee." Answer with the city only.\n**Output:** Oslo')
    assert syn.clean_reply(reply, pattern) == ('Which city is mentioned in this sentence? "The fair in Oslo drew Ana '
                                               'Lee." Answer with the city only.')
    assert syn.clean_reply("Nothing like the task here.", pattern) == "Nothing like the task here."
    question = r"^(What|Which|Name)\b[^\n]{0,80}$"
    assert syn.clean_reply("I'm here to help with that. What is the capital of Japan?", question) == \
        "What is the capital of Japan?"


def _recipe(tmp_path, teacher, **changes):
    seeds = tmp_path / "seeds.jsonl"
    rows = [{"id": f"s{i}", "task": "ask" if i % 2 else "tell", "prompt": f"Question number {i} about topic {i * 7}?"}
            for i in range(6)]
    seeds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"id": "h0", "task": "ask", "prompt": "A held out question?"}) + "\n")
    s = {"target": 12, "max_new_tokens": 12, "min_words": 1, "max_rounds": 3, "dedup_threshold": 0.9, **changes}
    return parse({"name": "syn", "teacher": str(teacher), "data": {"train": [str(seeds)], "heldout": [str(held)]},
                  "synthesize": s}, str(tmp_path / "r.yaml"))


def test_quotas_share_the_target_as_the_seeds_are(tiny_dir, tmp_path):
    from toolchain.data.formats import load_prompts

    cfg = _recipe(tmp_path, tiny_dir, target=30)
    train, _ = load_prompts(cfg)
    assert syn.quotas(cfg, train) == {"ask": 12, "tell": 12}
    only = _recipe(tmp_path, tiny_dir, target=30, tasks=["ask"])
    assert syn.quotas(only, train) == {"ask": 12}


def test_a_killed_synthesize_resumes_and_writes_the_same_file(tiny_dir, tmp_path, monkeypatch):
    cfg = _recipe(tmp_path, tiny_dir)
    whole = tmp_path / "whole"
    whole.mkdir()
    m = syn.run(cfg, {}, whole)
    assert m.metrics["written"] >= 1 and m.metrics["written"] == sum(
        v for k, v in m.metrics.items() if k.startswith("dropped_")) + m.metrics["kept"]

    from toolchain.backends.hf import HFEngine

    real, calls = HFEngine.chat, {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    killed = tmp_path / "killed"
    killed.mkdir()
    monkeypatch.setattr(HFEngine, "chat", dying)
    with pytest.raises(KeyboardInterrupt):
        syn.run(cfg, {}, killed)
    assert len((killed / "candidates.jsonl").read_text().splitlines()) == 3
    monkeypatch.setattr(HFEngine, "chat", real)
    syn.run(cfg, {}, killed)
    assert (killed / "candidates.jsonl").read_text() == (whole / "candidates.jsonl").read_text()
    assert (killed / "prompts.jsonl").read_text() == (whole / "prompts.jsonl").read_text()


def test_synthesize_settings_are_checked(tmp_path):
    with pytest.raises(RecipeError, match="synthesize.patterns: ask: not a regular expression"):
        parse({"name": "x", "teacher": "pip:x/y.gguf", "data": {"train": ["a"], "heldout": ["b"]},
               "synthesize": {"target": 10, "patterns": {"ask": "(("}}}, "r.yaml")


def test_teacher_gold_keeps_only_prompts_whose_labels_agree(tiny_dir, tmp_path):
    """gold: teacher on a task whose seeds have golds: each new prompt is labelled `samples` times; disagreeing
    labels drop it, an agreeing one becomes its gold, and the agreement rate is reported."""
    seeds = tmp_path / "gold.jsonl"
    seeds.write_text("".join(json.dumps({"id": f"g{i}", "task": "ask", "prompt": f"Is {i} even? Answer yes or no.",
                                         "gold": "yes" if i % 2 == 0 else "no"}) + "\n" for i in range(4)))
    cfg = _recipe(tmp_path, tiny_dir, gold="teacher", samples=2, target=8, max_rounds=1)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": [str(seeds)]}),
                                 "generate": cfg.generate.model_copy(update={"max_new_tokens": 4})})
    out = tmp_path / "out"
    out.mkdir()
    m = syn.run(cfg, {}, out)
    rows = [json.loads(x) for x in (out / "candidates.jsonl").read_text().splitlines()]
    labelled = [r for r in rows if "agreement" in r]
    assert labelled and 0 < m.metrics["label_agreement"] <= 1
    for r in labelled:
        assert (r["reason"] == "kept") == (r["agreement"] == 1.0) == (r["gold"] is not None)
    kept = [json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()]
    assert all(p["gold"] for p in kept)


class _Writer:
    """An OpenAI-shaped teacher on loopback that writes a prompt from the request's seed (so answers are reproducible)
    after a random delay (so they arrive out of order), counting the requests in flight."""

    def __init__(self):
        import random
        import threading
        import time

        from tests.loopback import Loopback, chat_completion

        lock = threading.Lock()
        self.in_flight = self.most = 0

        def answer(path, raw, headers):
            body = json.loads(raw)
            with lock:
                self.in_flight += 1
                self.most = max(self.most, self.in_flight)
            time.sleep(random.random() * 0.05)
            seed = body.get("seed", 0)
            text = (f"Question {seed % 6}: is it even?" if "Write one new input" in body["messages"][-1]["content"]
                    else ["yes", "no"][seed % 4 == 0])
            with lock:
                self.in_flight -= 1
            return 200, chat_completion(text, completion_tokens=3), {}

        self.server = Loopback(answer)
        self.url = f"openai:{self.server.url}/v1#m"


def test_an_endpoint_teacher_is_asked_concurrently_and_the_files_do_not_depend_on_it(tmp_path):
    """generate.concurrency requests go out at once; decisions (duplicates, quotas, labels) are taken in job order,
    so concurrency 1 and 6 write the same candidates and prompts."""
    server = _Writer()
    seeds = tmp_path / "gold.jsonl"
    seeds.write_text("".join(json.dumps({"id": f"g{i}", "task": "ask", "prompt": f"Is {i} even? Answer yes or no.",
                                         "gold": "yes" if i % 2 == 0 else "no"}) + "\n" for i in range(4)))
    outs = {}
    try:
        for workers in (1, 6):
            cfg = _recipe(tmp_path, "x", gold="teacher", samples=2, target=8, max_rounds=6)
            cfg = cfg.model_copy(update={"teacher": server.url,
                                         "data": cfg.data.model_copy(update={"train": [str(seeds)]}),
                                         "generate": cfg.generate.model_copy(update={"concurrency": workers})})
            out = tmp_path / f"c{workers}"
            out.mkdir()
            server.most = 0
            m = syn.run(cfg, {}, out)
            outs[workers] = ((out / "candidates.jsonl").read_text(), (out / "prompts.jsonl").read_text(), server.most)
    finally:
        server.server.close()
    assert outs[1][2] == 1 and outs[6][2] > 1
    assert outs[1][:2] == outs[6][:2]
    rows = [json.loads(x) for x in outs[6][0].splitlines()]
    reasons = {r["reason"] for r in rows}
    assert "kept" in reasons and "exact duplicate" in reasons and "labels disagree" in reasons
    assert m.metrics["kept"] == 4 and m.metrics["reached"]


def test_frames_find_each_seeds_shared_wording_and_leave_the_rest():
    sentiment = "Classify the sentiment. Answer with one word.\n\nReview: "
    extract = 'Which city is named in this sentence? "'
    texts = ([sentiment + r for r in ("The soup was cold.", "Great phone.", "The staff were rude: never again.")]
             + [f'{extract}{s}" Answer with the city only.' for s in ("We met in Oslo.", "Rome was hot.", "Lima: rain.")]
             + ["What is the capital of Peru?", "Name a prime number."])
    got = similarity.frames(texts)
    assert got[:3] == [(sentiment, "")] * 3
    assert got[3:6] == [(extract, '" Answer with the city only.')] * 3
    assert got[6:] == [("", "")] * 2
    assert similarity.frames(texts[:2]) == [("", "")] * 2  # two texts are too few to call their wording shared


def test_fill_puts_the_teachers_text_back_in_the_seeds_wording(tiny_dir, tmp_path):
    seeds = tmp_path / "fill.jsonl"
    head, tail = 'Which city is named in this sentence? "', '" Answer with the city only.'
    places = ["We met in Oslo last May.", "Rome was hot in July.", "The train to Lima was late.", "Kyiv in spring."]
    seeds.write_text("".join(json.dumps({"id": f"f{i}", "task": "ask", "prompt": f"{head}{p}{tail}"}) + "\n"
                             for i, p in enumerate(places)))
    cfg = _recipe(tmp_path, tiny_dir, method="fill", target=10, max_rounds=2)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": [str(seeds)]})})
    out = tmp_path / "out"
    out.mkdir()
    syn.run(cfg, {}, out)
    rows = [json.loads(x) for x in (out / "candidates.jsonl").read_text().splitlines()]
    assert rows and all(r["method"] == "fill" for r in rows)
    for r in rows:  # one-line contents (as the seeds' are), put between the seed's wording
        assert "\n" not in r["content"]
        assert r["prompt"] == (f"{head}{r['content']}{tail}" if r["content"] else "")


def test_init_offers_a_synthesize_section_for_little_data(tmp_path):
    """init on a small file writes a commented synthesize: section (fill) and a commented distill.validation that
    parse once uncommented; a large file gets no synthesize: section."""
    import yaml

    from toolchain.data.init_recipe import SYNTHESIZE_BELOW, inspect, recipe_text

    rows = [{"id": f"r{i}", "prompt": f"Classify this ticket: printer {i} is jammed", "gold": "ham"} for i in range(40)]
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text, check = recipe_text(inspect(str(small), "tickets"), "tickets", None)
    assert "# synthesize:" in text and any("only 32 training rows" in c for c in check)
    uncommented = "\n".join(line[2:] if line.startswith(("# synthesize", "#   ")) else
                            line.replace("# validation:", "validation:") for line in text.splitlines())
    cfg = parse(yaml.safe_load(uncommented), str(tmp_path / "r.yaml"))
    assert cfg.synthesize.method == "fill" and cfg.synthesize.target == SYNTHESIZE_BELOW
    assert cfg.distill.validation.fraction == 0.1 and cfg.distill.validation.keep == "best"  # offered, commented
    assert cfg.student.vocab == 4096  # the embedded teacher's BPE: the fast student, its output layer trimmed
    named, _ = recipe_text(inspect(str(small), "tickets"), "tickets", "local/model.gguf")
    assert parse(yaml.safe_load(named), str(tmp_path / "n.yaml")).student.vocab is None  # offered, commented
    assert "# vocab: 4096" in named
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({**r, "id": f"b{i}"}) + "\n" for i, r in enumerate(rows * 20)))
    text, _ = recipe_text(inspect(str(big), "tickets"), "tickets", None)
    assert "# synthesize:" not in text
