"""Two tokenizations of one text, aligned on character spans: the ground that soft labels across tokenizers
stand on (training/cross_vocab.py).

Each tokenizer cuts the text into tokens with character spans. A position where *both* may cut the text (a token of
each side ends there, and no token of either side runs across it) is a common boundary; the tokens between two
consecutive common boundaries form a group. A group of one token on each side is **one-to-one**: both tokens spell
the same text after the same text, so the two models' next-token distributions there can be compared on the tokens
both vocabularies spell alike. Other groups (``12`` as one token against ``1``+``2``, an emoji cut into byte pieces
on one side) still start at a common boundary, but compare only through a vocabulary-free distance. A token of no
width (a start-of-text token, a special token) belongs to no group: it falls out, and the report says so.

Spans come from a fast tokenizer's offsets or from the bytes of llama.cpp's pieces (``spans_from_pieces``); a
token that ends inside a character another token finishes (the byte pieces of one emoji) is no place to cut.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass, field

Span = tuple[int, int]


@dataclass(frozen=True)
class Group:
    """Tokens of side a and side b (indices into each side's token list) that spell ``text[start:end]``."""

    a: tuple[int, ...]
    b: tuple[int, ...]
    start: int
    end: int

    @property
    def one_to_one(self) -> bool:
        return len(self.a) == 1 and len(self.b) == 1


def spans_from_pieces(text: str, pieces: list[bytes]) -> list[Span]:
    """Character spans of tokens given as the UTF-8 bytes each one spells (llama.cpp's pieces), in order.

    A piece that starts or ends inside a character is given the span of the whole character: two such pieces of
    one emoji then overlap, and ``clean_ends`` cuts after neither. Pieces whose bytes run past the text (a
    tokenizer that spells a token differently from the text it read) end at the text's end."""
    starts = []  # the character each byte belongs to
    for i, ch in enumerate(text):
        starts += [i] * len(ch.encode("utf-8"))
    n = len(starts)
    out, pos = [], 0
    for piece in pieces:
        a, b = pos, pos + len(piece)
        pos = b
        if a >= n or b == a:
            out.append((len(text), len(text)) if a >= n else (starts[a], starts[a]))
            continue
        b = min(b, n)
        end = starts[b - 1] + 1
        out.append((starts[a], end))
    return out


def clean_ends(spans: list[Span]) -> list[int | None]:
    """Where the text may be cut after each token: its end, or None for a token of no width or one whose end
    another token runs across (the first byte piece of a character the next piece finishes)."""
    out: list[int | None] = [None] * len(spans)
    next_start = None  # the start of the next token with width
    for i in range(len(spans) - 1, -1, -1):
        s, e = spans[i]
        if e > s:
            out[i] = e if next_start is None or next_start >= e else None
            next_start = s
    return out


def align(a: list[Span], b: list[Span]) -> tuple[list[Group], list[int], list[int]]:
    """Groups of tokens between common boundaries, and the tokens of a and of b in none (of no width, or spelling
    text the other side does not cover)."""
    ends_a, ends_b = clean_ends(a), clean_ends(b)
    common = sorted({e for e in ends_a if e is not None} & {e for e in ends_b if e is not None})
    groups: list[Group] = []
    in_a = [i for i, (s, e) in enumerate(a) if e > s]
    in_b = [i for i, (s, e) in enumerate(b) if e > s]
    ia = ib = 0
    start = 0
    for cut in common:
        ga, gb = [], []
        while ia < len(in_a) and a[in_a[ia]][1] <= cut:
            ga.append(in_a[ia])
            ia += 1
        while ib < len(in_b) and b[in_b[ib]][1] <= cut:
            gb.append(in_b[ib])
            ib += 1
        if ga and gb:
            groups.append(Group(tuple(ga), tuple(gb), start, cut))
        start = cut
    grouped_a = {i for g in groups for i in g.a}
    grouped_b = {i for g in groups for i in g.b}
    return groups, [i for i in range(len(a)) if i not in grouped_a], [i for i in range(len(b)) if i not in grouped_b]


def kind_of(text: str) -> str:
    """What a stretch of text is, for the report: digits, whitespace, non-ASCII (emoji, accents), punctuation, words."""
    if not text:
        return "no text (start-of-text, special)"
    if text.strip() == "":
        return "whitespace"
    core = text.strip()
    if any(c.isdigit() for c in core):
        return "digits"
    if any(ord(c) > 127 for c in core):
        return "non-ASCII"
    if all(unicodedata.category(c).startswith("P") or unicodedata.category(c).startswith("S") for c in core):
        return "punctuation"
    return "words"


@dataclass
class Report:
    """How much of a set of texts two tokenizers align one-to-one, and what falls out."""

    chars: int = 0
    aligned_chars: int = 0
    groups: int = 0
    one_to_one: int = 0
    dropped: Counter = field(default_factory=Counter)  # kind of text -> characters outside one-to-one groups
    examples: dict = field(default_factory=dict)  # kind -> Counter of the texts

    def add(self, text: str, a: list[Span], b: list[Span], a_tokens: list[str] | None = None,
            b_tokens: list[str] | None = None) -> list[Group]:
        groups, lost_a, lost_b = align(a, b)
        self.chars += len(text)
        self.groups += len(groups)
        for g in groups:
            piece = text[g.start:g.end]
            if g.one_to_one:
                self.one_to_one += 1
                self.aligned_chars += g.end - g.start
            else:
                self._drop(piece, g.end - g.start)
        for side, lost, names in (("teacher", lost_a, a_tokens), ("student", lost_b, b_tokens)):
            for i in lost:
                s, e = (a if side == "teacher" else b)[i]
                name = text[s:e] if e > s else (names[i] if names else "")
                self._drop(f"{side}: {name}" if e <= s else name, 0, kind="no text (start-of-text, special)"
                           if e <= s else None)
        return groups

    def _drop(self, piece: str, chars: int, kind: str | None = None) -> None:
        kind = kind or kind_of(piece)
        self.dropped[kind] += chars
        self.examples.setdefault(kind, Counter())[piece] += 1

    @property
    def share(self) -> float:
        return self.aligned_chars / self.chars if self.chars else 0.0

    def lines(self, top: int = 4) -> list[str]:
        """The report as printed by validate and distill."""
        out = [f"{self.share:.1%} of {self.chars:,} answer characters in one-to-one token pairs "
               f"({self.one_to_one:,} of {self.groups:,} groups); the rest compare by sorted probabilities"]
        for kind, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            seen = ", ".join(repr(t) for t, _ in self.examples[kind].most_common(top))
            share = f"{n / self.chars:.1%} of characters" if n else f"{sum(self.examples[kind].values())} tokens"
            out.append(f"  not one-to-one: {kind}: {share} (e.g. {seen})")
        return out

    def as_dict(self) -> dict:
        return {"characters": self.chars, "aligned_share": round(self.share, 4), "groups": self.groups,
                "one_to_one": self.one_to_one, "not_aligned": {k: v for k, v in self.dropped.items()}}


def shared_vocabulary(a_texts: list[str | None], b_texts: list[str | None]) -> tuple[list[int], list[int]]:
    """Token ids of a and of b that spell the same text, pairwise (each text once: its first id on each side).
    A token with no text of its own (None: special tokens, byte pieces of a character) is in no pair."""
    first_b: dict[str, int] = {}
    for j, t in enumerate(b_texts):
        if t and t not in first_b:
            first_b[t] = j
    seen: set[str] = set()
    ids_a, ids_b = [], []
    for i, t in enumerate(a_texts):
        if t and t not in seen and t in first_b:
            seen.add(t)
            ids_a.append(i)
            ids_b.append(first_b[t])
    return ids_a, ids_b
