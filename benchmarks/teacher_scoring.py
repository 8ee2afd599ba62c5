"""Which engine should score the student's samples on an on-policy step: the torch teacher or llama.cpp?

    python benchmarks/teacher_scoring.py --batches 6 --batch 8

On an on-policy step the teacher reads prompt + sample for every sequence of the batch and gives its logits at
the sampled positions. Two ways in-process, timed side by side on the same sequences (the default recipe's
teacher answers as the samples, its trimmed vocabulary when a finished default run has one):
  torch     the GGUF dequantized into PyTorch, distill's OnlineTeacher (the shared prompt prefix from a KV cache,
            the output projection only at the scored positions and, with a trimmed student, only over its rows);
  llama.cpp the GGUF itself, logits_all, several sequences per llama_decode with the shared prefix read once
            (LlamaCppEngine.logits_many), then the kept rows picked out (what training would need).
Prints seconds per batch of each, the ratio, and how far llama.cpp's logits (8-bit activations) are from torch's:
top-1 agreement and the KL between the two distributions at the scored positions.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from toolchain.backends.llama_cpp import LlamaCppEngine  # noqa: E402
from toolchain.models.chat import IGNORE, common_prefix, tokenize_pairs  # noqa: E402
from toolchain.data.rows import iter_jsonl  # noqa: E402
from toolchain.models.references import DEFAULT_TEACHER, load_tokenizer, load_torch_model, resolve  # noqa: E402
from toolchain.training.batches import collate  # noqa: E402
from toolchain.training.step import OnlineTeacher  # noqa: E402


def _newest(runs: Path, pattern: str) -> Path | None:
    found = sorted(glob.glob(str(runs / pattern)), key=os.path.getmtime)
    return Path(found[-1]) if found else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=Path, default=ROOT / "runs", help="where the default recipe's runs are")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pairs_file = _newest(args.runs, "*/generate-*/train.jsonl")
    if pairs_file is None:
        sys.exit("no teacher answers found: run `distillery generate recipes/ci.yaml` first")
    ref = resolve(DEFAULT_TEACHER)
    tok = load_tokenizer(ref)
    rows = [r for _, r in iter_jsonl(pairs_file)][: args.batches * args.batch]
    pairs, _, _ = tokenize_pairs(tok, rows, None, 256)
    student = _newest(args.runs, "default/distill-*/student.json")
    kept = json.loads(student.read_text()).get("vocab_kept") if student else None
    teacher = OnlineTeacher(load_torch_model(ref), common_prefix([ids for ids, _ in pairs]))
    kept_t = None if kept is None else torch.tensor(kept)
    if kept_t is not None:
        head = teacher.model.get_output_embeddings().weight.detach()
        teacher.head_weight = head[kept_t].clone()  # as distill does for a trimmed student (batches stay in teacher ids)
    engine = LlamaCppEngine(ref.path, n_ctx=2048, threads=args.threads, logits_all=True)
    print(f"{len(pairs)} sequences from {pairs_file}; batch {args.batch}; vocabulary "
          f"{len(kept) if kept else len(tok)} of {len(tok)}; {args.threads} threads", flush=True)

    times = {"torch": 0.0, "llama.cpp": 0.0}
    agree, kls, positions = 0, [], 0
    for b in range(0, len(pairs), args.batch):
        chunk = pairs[b: b + args.batch]
        batch = collate(chunk, tok.pad_token_id)
        keep = batch["labels"][:, 1:] != IGNORE
        t0 = time.perf_counter()
        t_logits = teacher.logits_at(batch, keep)
        times["torch"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        starts = [next(j for j, y in enumerate(labels) if y != IGNORE) for _, labels in chunk]
        got = dict(engine.logits_many([(ids, s) for (ids, _), s in zip(chunk, starts)], slots=args.batch))
        l_logits = np.concatenate([got[k] for k in range(len(chunk))])
        if kept is not None:
            l_logits = l_logits[:, kept]
        times["llama.cpp"] += time.perf_counter() - t0
        lp_t = torch.log_softmax(t_logits, -1)
        lp_l = torch.log_softmax(torch.from_numpy(l_logits).float(), -1)
        agree += int((lp_t.argmax(-1) == lp_l.argmax(-1)).sum())
        kls.append(float((lp_t.exp() * (lp_t - lp_l)).sum(-1).sum()))
        positions += len(lp_t)
    engine.close()
    n = len(range(0, len(pairs), args.batch))
    ratio = times["llama.cpp"] / times["torch"]
    print(f"torch      {times['torch'] / n:6.3f} s per batch")
    print(f"llama.cpp  {times['llama.cpp'] / n:6.3f} s per batch ({ratio:.2f}x torch's time)")
    print(f"{positions} scored positions: top-1 agreement {agree / positions:.1%}, "
          f"KL(torch ‖ llama.cpp) {sum(kls) / positions:.4f} nats per position")
    print(json.dumps({"torch_s_per_batch": round(times["torch"] / n, 4),
                      "llama_cpp_s_per_batch": round(times["llama.cpp"] / n, 4), "ratio_llama_cpp_over_torch":
                      round(ratio, 3), "top1_agreement": round(agree / positions, 4),
                      "kl_per_position": round(sum(kls) / positions, 5), "positions": positions}))


if __name__ == "__main__":
    main()
