"""Texts alike and texts apart: word-level normalising, near-duplicates (MinHash LSH from datasketch over word
2-shingles), n-gram overlap with held-out prompts, and the fixed wording a set of templated texts shares around
what varies. synthesize judges new prompts with them; traffic analysis groups logged calls with them."""

from __future__ import annotations

import re
from collections import Counter


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def normalise(text: str) -> str:
    return " ".join(words(text))


class NearDuplicates:
    """MinHash LSH (datasketch, 128 permutations) over word 2-shingles: ``seen`` answers whether a text is at or above
    the Jaccard threshold with anything added before (estimated; the exact similarity is checked for candidates)."""

    def __init__(self, threshold: float, num_perm: int = 128):
        from datasketch import MinHashLSH

        self.threshold, self.num_perm = threshold, num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.shingles: dict[str, set[str]] = {}

    @staticmethod
    def shingle(text: str) -> set[str]:
        w = words(text)
        return {" ".join(w[i:i + 2]) for i in range(len(w) - 1)} or set(w)

    def _minhash(self, sh: set[str]):
        from datasketch import MinHash

        m = MinHash(num_perm=self.num_perm, seed=1)
        m.update_batch([s.encode("utf-8") for s in sorted(sh)])
        return m

    def similar(self, text: str) -> str | None:
        """The key of a text added before that this one nearly duplicates, or None."""
        sh = self.shingle(text)
        if not sh:
            return None
        for key in self.lsh.query(self._minhash(sh)):
            other = self.shingles[key]
            if len(sh & other) / len(sh | other) >= self.threshold:
                return key
        return None

    def add(self, key: str, text: str) -> None:
        sh = self.shingle(text)
        if sh and key not in self.shingles:
            self.shingles[key] = sh
            self.lsh.insert(key, self._minhash(sh))


class Contamination:
    """Word n-gram overlap with the held-out prompts: the largest share of a text's n-grams found in one held-out
    prompt (texts shorter than n words are compared as one n-gram of their whole length). An n-gram found in
    ``boilerplate`` or more distinct held-out prompts is the tasks' wording ("classify the sentiment of this review"),
    not a prompt's content, and counts for nothing: without that, every new prompt of a templated task would be
    "contaminated" (of the default data's 250 seed prompts, 137 would be at 5-grams and 0.5)."""

    def __init__(self, heldout: list[str], n: int, boilerplate: int = 2):
        self.n = n
        self.index: dict[tuple, set[int]] = {}
        for i, text in enumerate(dict.fromkeys(normalise(t) for t in heldout)):
            for g in self.grams(text):
                self.index.setdefault(g, set()).add(i)
        self.common = {g for g, where in self.index.items() if len(where) >= boilerplate}

    def grams(self, text: str) -> set[tuple]:
        w = words(text)
        n = min(self.n, len(w))
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)} if n else set()

    def overlap(self, text: str) -> float:
        grams = self.grams(text) - self.common
        if not grams:
            return 0.0
        hits = Counter(i for g in grams for i in self.index.get(g, ()))
        return max(hits.values(), default=0) / len(grams)


_OPENS = ("\n", ": ", ' "', "? ", ". ")  # a seed's fixed wording ends after one of these ...
_CLOSES = ('"', "\n")                   # ... and starts again at one of these


FRAME_CHARS = 600  # a seed's shared wording is looked for in its first and last this many characters


def frames(texts: list[str], min_share: int | None = None) -> list[tuple[str, str]]:
    """Each text's fixed wording around what varies, as (prefix, suffix): the longest prefix ending at a delimiter
    and the longest suffix starting at one that at least ``min_share`` texts (default: max(3, n/10)) have in common,
    with something left between them. ("", "") for a text that shares none."""
    need = min_share or max(3, len(texts) // 10)

    def opens(t: str) -> list[int]:
        return [k for k in range(1, min(len(t), FRAME_CHARS)) if t[:k].endswith(_OPENS)]

    def closes(t: str) -> list[int]:
        return [k for k in range(max(1, len(t) - FRAME_CHARS), len(t)) if t[k:].startswith(_CLOSES)]

    heads = Counter(t[:k] for t in texts for k in opens(t))
    tails = Counter(t[k:] for t in texts for k in closes(t))
    out = []
    for t in texts:
        head = max((t[:k] for k in opens(t) if heads[t[:k]] >= need), key=len, default="")
        tail = max((t[k:] for k in closes(t) if k > len(head) and tails[t[k:]] >= need and t[len(head):k].strip()),
                   key=len, default="")
        out.append((head, tail) if t[len(head):len(t) - len(tail)].strip() else ("", ""))
    return out
