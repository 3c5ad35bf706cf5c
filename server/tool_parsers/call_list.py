"""A JSON list of call objects, read as it streams (Mistral's older ``[TOOL_CALLS] [...]``
and the bare-JSON fallback): ``[`` call (``,`` call)* ``]``, each call through the stream's
own call reading, so its start and arguments go out as they come."""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.tool_parsers.json_stream import WHITESPACE, CallReader

if TYPE_CHECKING:
    from server.tool_parsers.base import StreamingToolParser

_BRACKET, _ITEM, _IN_CALL, _SEPARATOR = range(4)


class CallListReader:
    """Drives ``stream`` through one list; ``step()`` answers as ``_read_call`` does: "done",
    "failed" (no call started: the tag is text), "broken" (after a call started) or "more"."""

    def __init__(self, stream: StreamingToolParser, require_arguments: bool) -> None:
        self.stream = stream
        self.require_arguments = require_arguments
        self._state = _BRACKET
        self._calls = 0

    def open(self, tag: str) -> None:
        """Start a list after ``tag``; what the stream read since the tag stays in its raw."""
        self.stream._tag = tag
        self._state, self._calls = _BRACKET, 0

    def step(self) -> str:
        stream = self.stream
        if self._state == _IN_CALL:
            outcome = stream._read_call()
            if outcome == "done":
                self._calls += 1
                self._state = _SEPARATOR
                return self.step()
            if outcome == "failed" and self._calls:
                return "broken"
            return outcome
        while stream._buf:
            ch = stream._buf[0]
            if ch in WHITESPACE:
                self._consume()
                continue
            if self._state == _BRACKET and ch == "[":
                self._consume()
                self._state = _ITEM
            elif self._state == _ITEM and ch == "{":
                stream._reader = CallReader(self.require_arguments)
                stream._started = False
                self._state = _IN_CALL
                return self.step()
            elif self._state == _SEPARATOR and ch == ",":
                self._consume()
                self._state = _ITEM
            elif self._state == _SEPARATOR and ch == "]":
                self._consume()
                return "done"
            else:
                return "broken" if self._calls else "failed"
        if stream._final:
            return "broken" if self._calls else "failed"
        return "more"

    def _consume(self) -> None:
        stream = self.stream
        if not self._calls:
            stream._raw.append(stream._buf[0])
        stream._buf = stream._buf[1:]
