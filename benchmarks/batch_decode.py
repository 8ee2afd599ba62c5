"""Decode tokens/s of S sequences stepped together in one llama.cpp context, against one, side by side.

    python benchmarks/batch_decode.py [model.gguf]     (default: the embedded teacher)

Each S in 1, 2, 4, 8 (twice, alternating): the first 8 training prompts of recipes/data/train.jsonl are read,
then 48 greedy steps decode one token per sequence per ``llama_decode`` (``BatchDecoder.step``); prints the
aggregate and per-sequence tokens/s. Prompt reading is not timed (``benchmarks/score_speed.py`` times a whole
batched job).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STEPS = 48


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from toolchain.backends.llama_batch import BatchDecoder
    from toolchain.backends.llama_cpp import LlamaCppEngine
    from toolchain.models.references import DEFAULT_TEACHER, resolve

    path = Path(sys.argv[1]) if len(sys.argv) > 1 else resolve(DEFAULT_TEACHER).path
    engine = LlamaCppEngine(path, n_ctx=512)
    with open(ROOT / "recipes" / "data" / "train.jsonl", encoding="utf-8") as fh:
        prompts = [json.loads(line)["prompt"] for line, _ in zip(fh, range(8))]
    ids = [engine.tokenize(engine.chat_text([{"role": "user", "content": p}])) for p in prompts]
    for _ in range(2):
        for slots in (1, 2, 4, 8):
            decoder = BatchDecoder(engine, slots, 512)
            seqs = [decoder.acquire() for _ in range(slots)]
            toks = [int(np.argmax(decoder.prefill(s, ids[k]))) for k, s in enumerate(seqs)]
            pos = [len(ids[k]) for k in range(slots)]
            started = time.perf_counter()
            for _ in range(STEPS):
                rows = decoder.step([(s, toks[k], pos[k]) for k, s in enumerate(seqs)])
                toks, pos = [int(np.argmax(r)) for r in rows], [p + 1 for p in pos]
            wall = time.perf_counter() - started
            print(f"{slots} together: {slots * STEPS / wall:.1f} tokens/s in all, {STEPS / wall:.1f} per sequence")
            decoder.close()
    engine.close()


if __name__ == "__main__":
    main()
