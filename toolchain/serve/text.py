"""Generated token ids to the text a client receives: whole characters, cut at stop strings."""

from __future__ import annotations


class TextStream:
    """Token ids in, text out: whole characters only (a multi-byte character can span tokens), cut at the first
    stop string, and never emitting a tail that might still become a stop string.

    Incremental: each token decodes a short window (the tokens since the last complete text, and the ones before
    them, so a tokenizer that drops a leading space at the start of a decode drops it on both sides), not the
    whole answer again; the cost per token stays flat however long the answer grows."""

    def __init__(self, engine, stop: list[str]):
        self.engine, self.stop = engine, stop
        self.ids: list[int] = []
        self.full = ""  # every complete character so far
        self.text = ""  # the same, cut at a stop string once one is found
        self.sent = 0
        self.stopped = False
        self.prefix = self.read = 0  # window: ids[prefix:read] decoded already, ids[read:] not yet

    def push(self, tok: int) -> str:
        self.ids.append(tok)
        before = self.engine.detokenize(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        now = self.engine.detokenize(self.ids[self.prefix:])
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""
        self.full += now[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        text = self.text = self.full
        for s in self.stop:
            i = text.find(s)
            if i >= 0:
                self.text, self.stopped = text[:i], True
                return self._emit(len(self.text))
        hold = max((k for s in self.stop for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), default=0)
        return self._emit(len(text) - hold)

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        out = self.text[self.sent: upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return out
