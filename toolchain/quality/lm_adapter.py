"""An lm-eval model over an exported artifact (llama.cpp GGUF or onnxruntime ONNX), so exported files are scored
by the same tasks, prompts and metrics as the PyTorch student.

The engine gives token ids, logits at every position and greedy continuations (``LlamaCppEngine`` with
``logits_all=True``, ``OnnxEngine``); the HF tokenizer gives the chat template and the decoding. Requests are
handled the way lm-eval's HFLM handles them: greedy generation cut at the ``until`` strings and the end-of-turn
token; the continuation of a likelihood request is what the whole text adds to the context's tokens.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from lm_eval.api.model import LM

from toolchain.backends.base import log_softmax
from toolchain.ui import progress


def continuation_logprob(logits: np.ndarray, cont: list[int]) -> tuple[float, bool]:
    """What lm-eval's likelihood request answers: the log-probability of ``cont`` under the logits that predict
    it ([len(cont), vocab]), and whether greedy decoding would give exactly it."""
    logp = log_softmax(logits.astype(np.float64))
    picked = logp[np.arange(len(cont)), cont]
    return float(picked.sum()), bool((logits.argmax(-1) == np.array(cont)).all())


class EngineLM(LM):
    def __init__(self, engine, tokenizer, name: str, batch: int = 8):
        super().__init__()
        self.engine, self.tok, self.name, self.batch = engine, tokenizer, name, batch

    @property
    def tokenizer_name(self) -> str:
        return self.name

    def chat_template(self, chat_template=False):
        return self.tok.chat_template

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tok.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy answers cut at the ``until`` strings. llama.cpp decodes up to ``batch`` sequences together
        with continuous batching (``greedy_stream``); another ``batchable`` engine (onnxruntime, but for
        dynamically quantized models) decodes ``batch`` prompts of similar length together, left-padded
        (``greedy_batch``); others one at a time."""
        jobs = [(self.engine.tokenize(req.args[0]), int(req.args[1].get("max_gen_toks", 256)),
                 [s for s in req.args[1].get("until") or [] if s]) for req in requests]
        streamed = hasattr(self.engine, "greedy_stream") and self.batch > 1
        batched = getattr(self.engine, "batchable", False) and self.batch > 1
        step = self.batch if batched else 1
        groups: dict[int, list[int]] = defaultdict(list)  # same token limit: one batch can hold them
        for i, (_, limit, _) in enumerate(jobs):
            groups[limit].append(i)
        out: list[str] = [""] * len(jobs)

        def finish(i: int, new: list[int]) -> None:
            text = self.tok.decode(new, skip_special_tokens=True)
            for stop in jobs[i][2]:
                text = text.split(stop)[0]
            out[i] = text

        with progress() as bar:
            task = bar.add_task(f"{self.name}: generate", total=len(jobs), info="")
            for limit, members in groups.items():
                if streamed:
                    for k, new, _ in self.engine.greedy_stream([jobs[i][0] for i in members], limit, slots=self.batch):
                        finish(members[k], new)
                        bar.update(task, advance=1)
                    continue
                if batched:
                    members.sort(key=lambda i: len(jobs[i][0]))  # little padding within a batch
                for start in range(0, len(members), step):
                    chunk = members[start:start + step]
                    news = (self.engine.greedy_batch([jobs[i][0] for i in chunk], limit) if batched
                            else [self.engine.greedy(jobs[chunk[0]][0], limit)])
                    for i, new in zip(chunk, news):
                        finish(i, new)
                    bar.update(task, advance=len(chunk))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its context, and whether greedy decoding would give it.
        llama.cpp reads several requests per decode (``logits_many``, their shared prefix once)."""
        seqs = []
        for req in requests:
            context, continuation = req.args
            spaces = len(context) - len(context.rstrip())
            if spaces:  # trailing spaces of the context belong to the continuation, as in HFLM
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            seqs.append((self.engine.tokenize(context + continuation), len(self.engine.tokenize(context))))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(seqs)

        def scored(i: int, logits: np.ndarray) -> None:
            out[i] = continuation_logprob(logits, seqs[i][0][seqs[i][1]:])

        with progress() as bar:
            task = bar.add_task(f"{self.name}: likelihood", total=len(requests), info="")
            if hasattr(self.engine, "logits_many") and self.batch > 1:
                for i, logits in self.engine.logits_many(seqs):
                    scored(i, logits)
                    bar.update(task, advance=1)
            else:
                for i, (whole, start) in enumerate(seqs):
                    scored(i, self.engine.logits(whole)[start - 1: len(whole) - 1])
                    bar.update(task, advance=1)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("rolling likelihood is not used by distillery's tasks")
