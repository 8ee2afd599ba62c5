"""onnxruntime: a decoder exported by optimum (``text-generation-with-past``), run with its KV cache.

One thin loop instead of a wrapper class hierarchy: the first call feeds the prompt with an empty cache, each
later call feeds one token and the ``present.*`` outputs of the step before.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import numpy as np

from toolchain.artifacts.onnx_io import external_files
from toolchain.backends.base import TokenLoop, pick

DYNAMIC = {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}


def dynamic_ops(path: Path) -> set[str]:
    """The op types of the model's graph (weights not loaded)."""
    import onnx

    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


class OnnxEngine(TokenLoop):
    def __init__(self, path: Path, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        path = Path(path)
        self.path = path if path.suffix == ".onnx" else path / "model.onnx"
        external_files(self.path)  # refuses external data outside the model's folder before onnxruntime reads it
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), opts, providers=providers or ["CPUExecutionProvider"])
        self.tokenizer = AutoTokenizer.from_pretrained(self.path.parent)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.kv_type = np.float16 if any("float16" in self.inputs[n].type for n in self.past_names) else np.float32
        self.eos_ids = {i for i in [self.tokenizer.eos_token_id] if i is not None}

    @cached_property
    def batchable(self) -> bool:
        """Whether ``greedy_batch`` gives each prompt what it gets alone. Dynamic quantization scales each
        activation tensor by its own range, which a batch shares: decoded together, one prompt's answer would
        depend on the others'. Read from the graph on first use only (serving never asks)."""
        return not (dynamic_ops(self.path) & DYNAMIC)

    def _empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        out = {}
        for n in self.past_names:
            shape = self.inputs[n].shape  # [batch, heads, past, head_dim]
            out[n] = np.zeros((batch, shape[1], 0, shape[3]), dtype=self.kv_type)
        return out

    def _step(self, ids: list[int], past: dict[str, np.ndarray], start: int):
        n = len(ids)
        logits, present = self._run(np.array([ids], dtype=np.int64), np.ones((1, start + n), dtype=np.int64), past)
        return logits[0], present

    def _run(self, ids: np.ndarray, mask: np.ndarray, past: dict[str, np.ndarray]):
        """One forward pass of a [batch, new] block after ``past``; ``mask`` covers past and new positions
        (0 = padding), and each token's position counts only the unpadded ones before it."""
        feed = {"input_ids": ids, "attention_mask": mask, **past}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -ids.shape[1]:]
        outs = self.session.run(None, feed)
        names = [o.name for o in self.session.get_outputs()]
        present = {
            n.replace("present.", "past_key_values."): v for n, v in zip(names, outs) if n.startswith("present.")
        }
        return outs[names.index("logits")], present

    def greedy_batch(self, prompts: list[list[int]], max_new_tokens: int,
                     stop_ids: set[int] | None = None) -> list[list[int]]:
        """Greedy continuations of several prompts decoded together (left-padded, masked; a finished sequence
        leaves the batch): the tokens ``greedy`` gives each, but for float rounding at a near tie. One
        onnxruntime call per step for the whole batch instead of one per sequence (benchmarks/score_speed.py)."""
        stop = self.eos_ids if stop_ids is None else stop_ids
        width = max(len(p) for p in prompts)
        ids = np.zeros((len(prompts), width), dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
        out: list[list[int]] = [[] for _ in prompts]
        rows = np.arange(len(prompts))  # which prompt each batch row is
        logits, past = self._run(ids, mask, self._empty_past(len(prompts)))
        while len(rows):
            nxt = logits[:, -1].argmax(-1)
            live = []
            for k, (row, tok) in enumerate(zip(rows, nxt.tolist())):
                out[row].append(tok)
                if tok not in stop and len(out[row]) < max_new_tokens:
                    live.append(k)
            if len(live) < len(rows):
                rows, mask = rows[live], mask[live]
                past = {n: v[live] for n, v in past.items()}
                nxt = nxt[live]
            if not len(rows):
                break
            mask = np.concatenate([mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)
            logits, past = self._run(nxt[:, None].astype(np.int64), mask, past)
        return out

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of ``ids`` [n, vocab] in one pass."""
        return self._step(list(ids), self._empty_past(), 0)[0]

    def _tokens(self, ids: list[int], max_tokens: int, temperature: float, top_p: float, seed: int | None,
                stop: set[int]) -> Iterator[int]:
        """Token ids, the stop token included when reached: the prompt in one pass, then one token per step."""
        rng = np.random.default_rng(seed)
        logits, past = self._step(list(ids), self._empty_past(), 0)
        pos = len(ids)
        for _ in range(max_tokens):
            self._last = logits[-1]
            tok = pick(logits[-1], temperature, top_p, rng)
            yield tok
            if tok in stop:
                return
            logits, past = self._step([tok], past, pos)
            pos += 1

    def step_logits(self) -> np.ndarray:
        """While ``stream`` runs: the logits the token just yielded was picked from."""
        return self._last

    def close(self) -> None:
        self.session = None
