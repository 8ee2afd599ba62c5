import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("DISTILLERY_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def distillery(*args: str, cwd: Path = ROOT, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (what a user types)."""
    proc = subprocess.run([sys.executable, "-m", "toolchain.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "DISTILLERY_NO_PROGRESS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"distillery {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture()
def tiny_llama():
    """A tiny random Llama (tied embeddings), built from a config: no download."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


def recipe_copy(tmp: Path, name: str = "ci", base: str = "ci", **changes) -> Path:
    """A shipped recipe (recipes/<base>.yaml) with absolute data paths and dotted changes (a__b=value)."""
    data = yaml.safe_load((ROOT / "recipes" / f"{base}.yaml").read_text())
    data["name"] = name
    data["data"]["train"] = [str(ROOT / p) for p in data["data"]["train"]]
    data["data"]["heldout"] = [str(ROOT / p) for p in data["data"]["heldout"]]
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def stage_dirs(runs: Path, name: str) -> dict[str, Path]:
    """Finished stage directories of a run, by stage name."""
    return {p.name.split("-")[0]: p for p in sorted((runs / name).glob("*-*")) if (p / "manifest.json").exists()}


# --- whole distill runs on a tiny random model that uses the embedded teacher's tokenizer (real chat template and
# end-of-turn token, a model small enough to train in seconds) ---

@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def tiny_model_dir(folder: Path, extra_rows: int = 0, layers: int = 4) -> Path:
    """A random 4-layer Llama saved with the embedded teacher's tokenizer; ``extra_rows`` pads its vocabulary
    (embedding and output rows no token maps to, as Qwen2.5's 151,936 rows over 151,665 tokens)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from toolchain.models.references import DEFAULT_TEACHER, load_tokenizer, resolve

    tok = load_tokenizer(resolve(DEFAULT_TEACHER))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok) + extra_rows, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_recipe(folder: Path, tmp: Path, student: dict | None = None, **distill_):
    """A soft-label recipe over ``folder`` as the teacher (the student pruned to 2 of its layers unless given)."""
    import json

    from toolchain.recipe import parse

    base = {"flavour": "soft", "soft": {"loss": "jsd", "teacher_logits": "online", "alpha": 0.5},
            "method": "full", "epochs": 1, "batch_size": 4, "seq_len": 96, "lr": 1e-3, "checkpoint_every": 2,
            "warmup_steps": 0}
    train, heldout = tmp / "train.jsonl", tmp / "heldout.jsonl"
    train.write_text("".join(json.dumps({"id": f"t{w}", "prompt": f"Say {w}.", "task": "t"}) + "\n" for w in "ab"))
    heldout.write_text("".join(json.dumps({"id": f"h{w}", "prompt": f"Name {w}.", "task": "t"}) + "\n" for w in "cd"))
    return parse({"name": "tiny", "teacher": str(folder),
                  "student": student or {"from": "teacher", "keep_layers": 2, "select": "even"},
                  "data": {"train": [str(train)], "heldout": [str(heldout)]},
                  "distill": {**base, **distill_}}, str(tmp / "r.yaml"))


def tiny_generate_dir(tmp: Path) -> Path:
    """What generate leaves for distill: eight (prompt, answer) rows."""
    import json

    gen = tmp / "gen"
    gen.mkdir(exist_ok=True)
    words = ["red", "blue", "green", "seven", "tea", "snow", "a cat", "the sea"]
    rows = [{"id": f"p{i}", "sample": 0, "prompt": f"Name thing {i}.", "response": f"It is {w}.", "task": "t"}
            for i, w in enumerate(words)]
    (gen / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return gen


def tiny_train(cfg, tmp: Path, name: str):
    """distill.run on the tiny rows: (manifest, train log rows, saved weights)."""
    import json

    from safetensors.torch import load_file

    from toolchain.stages import distill

    out = tmp / name
    out.mkdir()
    manifest = distill.run(cfg, {"generate": tiny_generate_dir(tmp)}, out)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return manifest, log, load_file(out / "model" / "model.safetensors")
