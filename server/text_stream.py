"""One choice's text as it streams: detokenized, cut at the first stop string, and never
showing the start of a stop string before it is known whether the stop string follows."""

from __future__ import annotations

from collections.abc import Mapping

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer


class TextStream:
    """Feed token ids, get text that is safe to send.

    Invariant: the text sent so far contains no stop string, and no suffix of it is held back
    unless it is a proper prefix of some stop string. So a stop string that appears later starts
    inside the held-back text, and searching that text alone finds it.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: list[str],
        skip_special_tokens: bool = True,
        keep: Mapping[int, str] | None = None,
    ):
        """``keep``: special tokens whose text the stream keeps although special tokens are
        skipped (a tool-call tag that is a control token, such as Mistral's ``[TOOL_CALLS]``)."""
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self._keep = dict(keep or {})
        self._stop = [s for s in stop if s]
        self._held = ""
        self.stopped = False
        self.stop_string: str | None = None  # the stop string that ended the text, once stopped

    def add(self, token_id: int) -> str:
        """The text this token releases ("" while held back); nothing once stopped."""
        if self.stopped:
            return ""
        if token_id in self._keep:
            self._held += self._detok.flush() + self._keep[token_id]
        else:
            self._held += self._detok.add(token_id)
        return self._release()

    def finish(self) -> str:
        """Everything still held, at the end of the stream."""
        if self.stopped:
            return ""
        self._held += self._detok.flush()
        out = self._cut_at_stop()
        if out is not None:
            return out
        out, self._held = self._held, ""
        return out

    def _release(self) -> str:
        out = self._cut_at_stop()
        if out is not None:
            return out
        hold = self._longest_partial_stop()
        cut = len(self._held) - hold
        out, self._held = self._held[:cut], self._held[cut:]
        return out

    def _cut_at_stop(self) -> str | None:
        hits = [(i, s) for s in self._stop if (i := self._held.find(s)) >= 0]
        if not hits:
            return None
        self.stopped = True
        at, self.stop_string = min(hits, key=lambda hit: hit[0])
        out, self._held = self._held[:at], ""
        return out

    def _longest_partial_stop(self) -> int:
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._held)), best, -1):
                if self._held.endswith(s[:n]):
                    best = n
                    break
        return best
