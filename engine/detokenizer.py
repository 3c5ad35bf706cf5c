"""Turning a stream of generated token ids into a stream of text, one piece per token.

Decoding token by token and concatenating is wrong in three ways: a character split over byte
tokens decodes to U+FFFD halves, SentencePiece drops the leading space of whatever token comes
first in a decode call, and ByteFallback decodes a run of byte tokens as a group (one stray byte
turns the whole run into U+FFFD). Decoding everything so far at each step is right but costs
O(length) per token.

We do what vLLM does (its prefix_offset/read_offset method) with a sliding window: decode the
last emitted chunk (the prefix) and the pending tokens together, and emit the text beyond the
prefix's own decoding. The prefix absorbs the window-start effects (leading-space stripping),
so the difference is exactly what the new tokens add in context. Pending tokens are held back
while the text is not final:
- it ends in U+FFFD (a character may still be completing),
- the last token is a `<0xXX>` byte piece (its run may still be invalidated, see above),
- it adds no text yet (e.g. a skipped special token).
The window then slides so the new chunk becomes the prefix. Invariant: the window starts right
after an emitted chunk, i.e. on a character boundary and (unless a run outgrew `LONG_RUN`) at
the start of a byte run, so decoding from there agrees with decoding from the start, and the
concatenation of everything returned by `add()` and `flush()` equals `tokenizer.decode(all_ids)`.

Two limits keep the cost per token bounded (two decodes of a window of at most
`2 * HARD_LIMIT` tokens, usually two). After `LONG_RUN` pending tokens an open byte run no
longer holds text back, so a long run of byte-fallback characters streams at character
boundaries (at the small risk that a stray byte later spoils the run). After `HARD_LIMIT`
pending tokens, which only garbage output reaches (a real character needs at most four bytes),
the text is emitted as it stands.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

LONG_RUN = 32
HARD_LIMIT = 64
PROMPT_CONTEXT = 4

_REPLACEMENT = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class _Decoder(Protocol):
    """What we need of `engine.tokenizer.Tokenizer` (kept structural for tests and stubs)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...

    def id_to_token(self, token_id: int) -> str | None: ...


class IncrementalDetokenizer:
    """Per-request streaming decoder. Not thread-safe; one per request."""

    __slots__ = ("_pending", "_prefix_text", "_skip_special", "_tokenizer", "_window")

    def __init__(
        self,
        tokenizer: _Decoder,
        skip_special_tokens: bool = False,
        prompt_ids: Sequence[int] = (),
    ) -> None:
        """With `prompt_ids`, the stream is the text the tokens add after the prompt: the first
        token decodes in context, so SentencePiece keeps its space (" Paris" after "France is",
        as a client appending a completion to its prompt expects); the concatenation is then
        `decode(prompt + ids)` minus `decode(prompt)`. Without, it is `decode(ids)`."""
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        start = max(len(prompt_ids) - PROMPT_CONTEXT, 0)
        while (
            start > 0
            and len(prompt_ids) - start < LONG_RUN
            and self._is_byte_piece(prompt_ids[start - 1])
        ):
            start -= 1  # begin the window at the start of a byte run, never inside it
        self._window: list[int] = list(prompt_ids[start:])  # emitted chunk, then pending tokens
        self._pending = 0  # how many tokens at the end of the window are not yet emitted
        self._prefix_text = self._decode(self._window)  # the emitted chunk's text, in context

    def add(self, token_id: int) -> str:
        """Take one generated token; return the text that became final (often "")."""
        self._window.append(token_id)
        self._pending += 1
        text = self._decode(self._window)
        if self._pending >= HARD_LIMIT or self._is_final(text, token_id):
            return self._emit(text)
        return ""

    def flush(self) -> str:
        """The text still held back, as it decodes now (end of stream: nothing will complete it)."""
        if self._pending == 0:
            return ""
        return self._emit(self._decode(self._window))

    def _is_final(self, text: str, token_id: int) -> bool:
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT):
            return False
        return self._pending >= LONG_RUN or not self._is_byte_piece(token_id)

    def _is_byte_piece(self, token_id: int) -> bool:
        piece = self._tokenizer.id_to_token(token_id)
        return piece is not None and _BYTE_PIECE.fullmatch(piece) is not None

    def _emit(self, text: str) -> str:
        """Return what `text` adds beyond the prefix, and make the pending tokens the prefix."""
        new_text = text[len(self._prefix_text) :]
        self._window = self._window[len(self._window) - self._pending :]
        self._pending = 0
        self._prefix_text = self._decode(self._window)
        return new_text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)
