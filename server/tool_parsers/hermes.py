"""Hermes-style calls, as Qwen 2.5, Qwen3 and NousResearch Hermes templates ask for them:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, several in a row; text before, between and after is content. The closing
tag may be missing at the end of the output (the model stopped right after the object).
"""

from __future__ import annotations

from server.tool_parsers.base import (
    ParsedOutput,
    StreamingToolParser,
    ToolCall,
    ToolParser,
    assemble,
    read_call,
    skip_whitespace,
)
from server.tool_parsers.json_stream import WHITESPACE

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


class HermesToolParser(ToolParser):
    family = "hermes"
    tags = (OPEN, CLOSE)

    def parse(self, text: str) -> ParsedOutput:
        pieces: list[str | ToolCall] = []
        pos = 0
        while (i := text.find(OPEN, pos)) >= 0:
            pieces.append(text[pos:i])
            after = i + len(OPEN)
            call, end = read_call(text, skip_whitespace(text, after), require_arguments=False)
            if call is None:
                pieces.append(OPEN)
                pos = after
                continue
            pieces.append(call)
            pos = skip_whitespace(text, end)
            if text.startswith(CLOSE, pos):
                pos += len(CLOSE)
        pieces.append(text[pos:])
        return assemble(pieces)

    def streaming(self) -> HermesStream:
        return HermesStream()


_TEXT, _CALL, _AFTER, _DISCARD = range(4)


class HermesStream(StreamingToolParser):
    def __init__(self) -> None:
        super().__init__()
        self._state = _TEXT

    def _step(self) -> bool:
        if self._state == _TEXT:
            if self._scan_text((OPEN,)) is None:
                return False
            self._open_call(OPEN, require_arguments=False)
            self._state = _CALL
            return True
        if self._state == _CALL:
            outcome = self._read_call()
            if outcome == "failed":
                self._fail()
                self._state = _TEXT
            elif outcome in ("done", "broken"):
                self._state = _AFTER if outcome == "done" else _DISCARD
            return outcome != "more"
        if self._state == _AFTER:
            return self._after_call_step()
        # _DISCARD: a call that broke after it started; drop the rest of its block.
        i = self._buf.find(CLOSE)
        if i < 0:
            self._buf = self._buf[len(self._buf) - min(len(self._buf), len(CLOSE) - 1) :]
            return False
        self._buf = self._buf[i + len(CLOSE) :]
        self._state = _TEXT
        return True

    def _after_call_step(self) -> bool:
        """After a call's object: whitespace, then its closing tag if it has one."""
        buf = self._buf.lstrip(WHITESPACE)
        self._buf = buf
        if not buf:
            return False
        if buf.startswith(CLOSE):
            self._buf = buf[len(CLOSE) :]
        elif CLOSE.startswith(buf) and not self._final:
            return False
        self._state = _TEXT
        return True
