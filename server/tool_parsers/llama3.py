"""Llama 3.1+ JSON calls, as Meta's templates ask for them ("Respond in the format
{"name": function name, "parameters": dictionary of argument name and its value}"):

    {"name": "get_weather", "parameters": {"city": "Paris"}}

at the start of the reply, optionally after ``<|python_tag|>``, several separated by ``;``.
There is no closing tag, so a reply that merely starts with a JSON object (a model answering
in JSON) is a call only if the object has both a name and its parameters (or arguments).
Text that follows the calls is content; ``<|python_tag|>`` later in the text starts calls too.
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

PYTHON_TAG = "<|python_tag|>"
SEPARATORS = WHITESPACE + ";"


def _skip_separators(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in SEPARATORS:
        pos += 1
    return pos


class Llama3ToolParser(ToolParser):
    family = "llama3"
    tags = (PYTHON_TAG,)

    def parse(self, text: str) -> ParsedOutput:
        pieces: list[str | ToolCall] = []
        pos, at_call = 0, True  # at_call: where a bare object may be a call
        while True:
            if at_call:
                start = skip_whitespace(text, pos)
                pieces.append(text[pos:start])
                call, end = read_call(text, start, require_arguments=True)
                if call is not None:
                    pieces.append(call)
                    pos = _skip_separators(text, end)
                    continue
                pos, at_call = start, False
            i = text.find(PYTHON_TAG, pos)
            if i < 0:
                pieces.append(text[pos:])
                return assemble(pieces)
            pieces.append(text[pos:i])
            after = i + len(PYTHON_TAG)
            call, end = read_call(text, skip_whitespace(text, after), require_arguments=True)
            if call is None:
                pieces.append(PYTHON_TAG)
                pos = after
            else:
                pieces.append(call)
                pos, at_call = _skip_separators(text, end), True

    def streaming(self) -> Llama3Stream:
        return Llama3Stream()


_AT_CALL, _TEXT, _CALL, _AFTER, _DISCARD = range(5)


class Llama3Stream(StreamingToolParser):
    def __init__(self) -> None:
        super().__init__()
        self._state = _AT_CALL

    def _step(self) -> bool:
        state = self._state
        if state == _AT_CALL:
            body = self._buf.lstrip(WHITESPACE)
            if not body and not self._final:
                return False
            self._emit_text(self._buf[: len(self._buf) - len(body)])
            self._buf = body
            if body.startswith("{"):
                self._open_call("", require_arguments=True)
                self._state = _CALL
            else:
                self._state = _TEXT
            return bool(body)
        if state == _TEXT:
            if self._scan_text((PYTHON_TAG,)) is None:
                return False
            self._open_call(PYTHON_TAG, require_arguments=True)
            self._state = _CALL
            return True
        if state == _CALL:
            outcome = self._read_call()
            if outcome == "failed":
                self._fail()
                self._state = _TEXT
            elif outcome != "more":
                self._state = _AFTER if outcome == "done" else _DISCARD
            return outcome != "more"
        if state == _AFTER:
            body = self._buf.lstrip(SEPARATORS)
            self._buf = body
            if not body:
                return False
            self._state = _AT_CALL
            return True
        self._buf = ""  # _DISCARD: with no closing tag, a broken call runs to the end
        return False
