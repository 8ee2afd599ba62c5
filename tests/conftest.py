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
