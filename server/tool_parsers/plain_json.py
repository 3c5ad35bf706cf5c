"""Calls written as bare JSON, for models whose template has no tool syntax (SmolLM2 and
the like): the reply is one call object or a list of them,

    {"name": "get_weather", "arguments": {"city": "Paris"}}
    [{"name": "get_weather", "parameters": {"city": "Paris"}}, ...]

(the list with ``parameters`` is what vLLM's ``required`` mode produces). Only the start of
the reply is looked at, and an object is a call only with a name and its arguments, so a reply
that is some other JSON stays content. Text after the calls is content.
"""

from __future__ import annotations

from server.tool_parsers.base import (
    ParsedOutput,
    StreamingToolParser,
    ToolParser,
    assemble,
    read_call,
    read_call_list,
    skip_whitespace,
)
from server.tool_parsers.call_list import CallListReader
from server.tool_parsers.json_stream import WHITESPACE


class PlainJsonToolParser(ToolParser):
    family = "json"

    def parse(self, text: str) -> ParsedOutput:
        start = skip_whitespace(text, 0)
        if text.startswith("[", start):
            calls, end = read_call_list(text, start, require_arguments=True)
        else:
            call, end = read_call(text, start, require_arguments=True)
            calls = [call] if call is not None else []
        if not calls:
            return ParsedOutput(text or None)
        return assemble([text[:start], *calls, text[end:]])

    def streaming(self) -> PlainJsonStream:
        return PlainJsonStream()


_START, _TEXT, _CALL, _LIST, _DISCARD = range(5)


class PlainJsonStream(StreamingToolParser):
    def __init__(self) -> None:
        super().__init__()
        self._state = _START
        self._list = CallListReader(self, require_arguments=True)

    def _step(self) -> bool:
        state = self._state
        if state == _START:
            body = self._buf.lstrip(WHITESPACE)
            if not body and not self._final:
                return False
            self._emit_text(self._buf[: len(self._buf) - len(body)])
            self._buf = body
            if body.startswith("{"):
                self._open_call("", require_arguments=True)
                self._state = _CALL
            elif body.startswith("["):
                self._list.open("")
                self._state = _LIST
            else:
                self._state = _TEXT
            return bool(body)
        if state == _TEXT:
            self._emit_text(self._buf)
            self._buf = ""
            return False
        if state == _CALL:
            outcome = self._read_call()
        elif state == _LIST:
            outcome = self._list.step()
        else:  # _DISCARD
            self._buf = ""
            return False
        if outcome == "failed":
            self._fail()
            self._state = _TEXT
        elif outcome != "more":
            self._state = _TEXT if outcome == "done" else _DISCARD
        return outcome != "more"
