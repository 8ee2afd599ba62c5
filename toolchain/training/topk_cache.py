"""The teacher's top-k log-probabilities at every response position, written once and read every epoch.

Files (in the generate stage's directory):
    teacher_topk.json         header: k, temperature, vocab size, id dtype, bytes per position
    teacher_topk.ids.bin      token ids, [positions, k], uint16 when the vocabulary fits, else int32
    teacher_topk.logp.bin     log-probs at the header's temperature, [positions, k], float16
    teacher_topk.index.jsonl  one line per example: id, first row, rows (appended after its rows are on disk)

The index is the commit record: after a kill, rows past the last indexed example are cut off and the
example is computed again, so nothing is lost or stored twice. Positions are those whose next token is a
response token (what the student is trained to predict), in order; a student sequence cut short at the end
simply uses the first rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from toolchain.data.rows import read_jsonl_resumable
from toolchain.models.chat import IGNORE

NAME = "teacher_topk"


class CacheError(ValueError):
    """A top-k cache that does not match what training asks for."""


def _paths(root: Path) -> dict[str, Path]:
    return {k: root / f"{NAME}.{k}" for k in ("json", "ids.bin", "logp.bin", "index.jsonl")}


class TopKWriter:
    def __init__(self, root: Path, k: int, temperature: float, vocab_size: int, padded: bool = False):
        """``padded``: rows may hold fewer than k real slots (an endpoint returned fewer); the empty slots carry
        the id ``vocab_size`` (the header's ``pad_id``), which training maps to "no token" (no mass either side)."""
        self.p = _paths(root)
        self.k = k
        self.id_dtype = np.uint16 if vocab_size + padded <= 65536 else np.int32
        self.bytes_per_position = k * (np.dtype(self.id_dtype).itemsize + 2)
        header = {"k": k, "temperature": temperature, "vocab_size": vocab_size,
                  "id_dtype": np.dtype(self.id_dtype).name, "logp_dtype": "float16",
                  "bytes_per_position": self.bytes_per_position, **({"pad_id": vocab_size} if padded else {})}
        if self.p["json"].exists() and json.loads(self.p["json"].read_text()) != header:
            raise CacheError(f"{self.p['json']}: written with other settings; delete the work directory")
        self.p["json"].write_text(json.dumps(header, indent=2))
        done = read_jsonl_resumable(self.p["index.jsonl"])
        self.done = {r["id"] for r in done}
        self.rows = (done[-1]["start"] + done[-1]["rows"]) if done else 0
        for name, width in (("ids.bin", np.dtype(self.id_dtype).itemsize), ("logp.bin", 2)):
            path = self.p[name]
            with open(path, "ab") as fh:
                fh.truncate(self.rows * self.k * width)  # drop rows of an example that was never indexed
        self.ids_fh = open(self.p["ids.bin"], "ab")
        self.logp_fh = open(self.p["logp.bin"], "ab")
        self.index_fh = open(self.p["index.jsonl"], "a", encoding="utf-8")

    def append(self, example_id: str, ids: torch.Tensor, logp: torch.Tensor) -> None:
        n = ids.shape[0]
        self.ids_fh.write(ids.numpy().astype(self.id_dtype).tobytes())
        self.logp_fh.write(logp.numpy().astype(np.float16).tobytes())
        for fh in (self.ids_fh, self.logp_fh):
            fh.flush()
            os.fsync(fh.fileno())
        self.index_fh.write(json.dumps({"id": example_id, "start": self.rows, "rows": n}) + "\n")
        self.index_fh.flush()
        os.fsync(self.index_fh.fileno())
        self.rows += n
        self.done.add(example_id)

    def close(self) -> None:
        for fh in (self.ids_fh, self.logp_fh, self.index_fh):
            fh.close()


class TopKCache:
    """Memory-mapped reader."""

    def __init__(self, root: Path):
        p = _paths(root)
        if not p["json"].is_file():
            raise CacheError(
                f"{root}: no teacher top-k cache (was generate run with distill.soft.teacher_logits: cache?)"
            )
        self.header = json.loads(p["json"].read_text())
        self.k = self.header["k"]
        self.index = {r["id"]: (r["start"], r["rows"]) for r in read_jsonl_resumable(p["index.jsonl"])}
        rows = sum(n for _, n in self.index.values())
        self.ids = (
            np.memmap(p["ids.bin"], dtype=self.header["id_dtype"], mode="r", shape=(rows, self.k)) if rows else None
        )
        self.logp = np.memmap(p["logp.bin"], dtype=np.float16, mode="r", shape=(rows, self.k)) if rows else None

    def check(self, k: int, temperature: float) -> None:
        if self.header["k"] != k or abs(self.header["temperature"] - temperature) > 1e-9:
            raise CacheError(f"cache has k={self.header['k']}, T={self.header['temperature']}; "
                             f"training asks for k={k}, T={temperature}")

    def rows_for(self, example_id: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, rows = self.index[example_id]
        if n > rows:
            raise CacheError(f"example {example_id}: {n} positions asked, {rows} cached (tokenization changed?)")
        ids = torch.from_numpy(np.asarray(self.ids[start:start + n], dtype=np.int64))
        logp = torch.from_numpy(np.asarray(self.logp[start:start + n], dtype=np.float32))
        return ids, logp

    @property
    def bytes_per_position(self) -> int:
        return int(self.header["bytes_per_position"])


def example_key(row: dict) -> str:
    """How a cached example is named: a teacher answer is (prompt id, sample index)."""
    return f"{row['id']}#{row['sample']}"


def target_positions(labels: list[int]) -> list[int]:
    """Positions t whose next token is trained (labels[t + 1] != IGNORE)."""
    return [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE]


@torch.inference_mode()
def teacher_topk(teacher, ids: list[int], labels: list[int], k: int, temperature: float,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k (ids, log-probs at temperature T) at each trained position of one example."""
    logits = teacher(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    pos = torch.tensor(target_positions(labels), dtype=torch.long)
    return topk_logprobs(logits[pos].float(), k, temperature)


PAD_LOGP = -30.0  # the log-prob written in an empty slot (masked in training; exp() is 0 in float16 anyway)


class EndpointTopK:
    """The top-k rows of an answer from the per-token log-probs an OpenAI-compatible endpoint returned (generate's
    ``logprobs``: token, logprob, top [[token, logprob], ...]), in the ids of a tokenizer the teacher shares.

    Tokens come back as text. A string maps to the id whose decoded text it is; vLLM's ``token_id:N`` form (its
    --return-tokens-as-token-ids) maps directly. Where several ids decode alike (byte pieces, a special token
    and its text), the answer's own token wins for the chosen slot and the lowest id otherwise. Positions past
    the endpoint's tokens (the end-of-turn token a server does not report) or where the answer tokenizes
    otherwise than the endpoint's tokens get the answer's token with all the mass: cross-entropy there. Every
    such case is counted (``counts``), never dropped silently.
    """

    def __init__(self, tok, k: int):
        self.k, self.vocab = k, len(tok)
        self.by_text: dict[str, list[int]] = {}
        for i in range(len(tok)):
            self.by_text.setdefault(tok.decode([i], clean_up_tokenization_spaces=False), []).append(i)
        self.counts = {"positions": 0, "from_endpoint": 0, "end_of_turn": 0, "unaligned": 0, "short_rows": 0,
                       "unmapped_tokens": 0, "ambiguous_tokens": 0}

    def _id(self, text: str, prefer: int | None = None) -> int | None:
        if text.startswith("token_id:") and text[9:].isdigit():
            return int(text[9:])
        ids = self.by_text.get(text)
        if not ids:
            self.counts["unmapped_tokens"] += 1
            return None
        if len(ids) > 1:
            self.counts["ambiguous_tokens"] += 1
            return prefer if prefer in ids else ids[0]
        return ids[0]

    def rows(self, labels: list[int], entries: list[dict] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [n, k], log-probs [n, k]) for an answer whose trained tokens are ``labels`` (in order)."""
        ids = np.full((len(labels), self.k), self.vocab, dtype=np.int64)
        logp = np.full((len(labels), self.k), PAD_LOGP, dtype=np.float32)
        entries = entries or []
        aligned = True
        for j, label in enumerate(labels):
            self.counts["positions"] += 1
            e = entries[j] if j < len(entries) and aligned else None
            if e is not None and self._id(e["token"], prefer=label) != label:
                aligned = False  # the answer tokenizes otherwise from here on: no safe alignment after it
                e = None
            if e is None:
                self.counts["end_of_turn" if aligned and j >= len(entries) else "unaligned"] += 1
                ids[j, 0], logp[j, 0] = label, 0.0
                continue
            slots, seen = [], set()
            for text, value in e.get("top") or []:
                i = self._id(text)
                if i is not None and i not in seen and i < self.vocab:
                    seen.add(i)
                    slots.append((i, value))
            if label not in seen and e.get("logprob") is not None:
                slots.append((label, e["logprob"]))  # the chosen token is always known
            slots = sorted(slots, key=lambda x: -x[1])[: self.k]
            if len(slots) < self.k:
                self.counts["short_rows"] += 1
            for slot, (i, value) in enumerate(slots):
                ids[j, slot], logp[j, slot] = i, value
            self.counts["from_endpoint"] += 1
        return torch.from_numpy(ids), torch.from_numpy(logp)


def topk_logprobs(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, log-probs) of the k most likely tokens at temperature T, per row of ``logits``, most likely first."""
    vals, top = torch.log_softmax(logits / temperature, dim=-1).topk(k, dim=-1)
    return top, vals
