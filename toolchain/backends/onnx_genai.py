"""onnxruntime-genai: a folder written by its model builder (``export.onnx: genai_int4 / genai_fp32``), decoded by
its own C++ generation loop (one shared KV buffer, sampling inside the library) instead of a Python loop around
onnxruntime. Tokens in and out are the HF tokenizer's (the builder copies the student's tokenizer files), so the
chat template and the ids are the ones every other engine uses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from toolchain.backends.base import TokenLoop
from toolchain.models.references import ModelError


class GenaiEngine(TokenLoop):
    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime_genai as og
        from transformers import AutoTokenizer


        path = Path(path)
        folder = path.parent if path.suffix == ".onnx" else path
        config_file = folder / "genai_config.json"
        if not config_file.is_file():
            raise ModelError(f"{folder}: no genai_config.json (the onnxruntime-genai backend runs folders made by "
                             "export.onnx genai_int4 / genai_fp32)")
        self.path = folder
        self.context = int(json.loads(config_file.read_text(encoding="utf-8"))["model"]["context_length"])
        config = og.Config(str(folder))
        config.clear_providers()  # CPU
        session = {"intra_op_num_threads": threads or os.cpu_count() or 1, "log_severity_level": 3}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        self._og = og
        self.model = og.Model(config)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.eos_ids = {i for i in [self.tokenizer.eos_token_id] if i is not None}
        self._last = None

    def _tokens(self, ids: list[int], max_tokens: int, temperature: float, top_p: float, seed: int | None,
                stop: set[int]) -> Iterator[int]:
        """Token ids from the library's loop, the stop token included when reached."""
        og = self._og
        budget = min(max_tokens, self.context - len(ids))
        if budget <= 0:
            return
        params = og.GeneratorParams(self.model)
        options = {"max_length": len(ids) + budget, "do_sample": temperature > 0, "batch_size": 1}
        if temperature > 0:
            options.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
            if seed is not None:
                options["random_seed"] = int(seed) % (2**31)
        params.set_search_options(**options)
        gen = og.Generator(self.model, params)
        try:
            gen.append_tokens(np.asarray([ids], dtype=np.int32))
            for _ in range(budget):
                if gen.is_done():
                    return
                self._last = gen.get_logits()  # the library computes the next step's logits eagerly
                gen.generate_next_token()
                tok = int(gen.get_next_tokens()[0])
                yield tok
                if tok in stop:
                    return
        finally:
            del gen

    def step_logits(self) -> np.ndarray:
        """While ``stream`` runs: the logits the token just yielded was picked from."""
        return np.asarray(self._last, dtype=np.float32).reshape(-1)

    def close(self) -> None:
        self.model = None
