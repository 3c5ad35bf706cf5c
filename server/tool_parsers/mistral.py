"""Mistral's calls, after the ``[TOOL_CALLS]`` control token, in either of its templates' forms:

    [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, ...]   (older)
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]...                   (newer)

Text before the token is content. The parser reads both; ``style`` says which one a grammar
should make, and comes from the template (``[ARGS]`` in it means the newer form). The server
must keep special tokens in the text it hands over, or the token is not there to be found.
"""

from __future__ import annotations

import json
import re

from server.tool_parsers.base import (
    DECODER,
    ArgumentsDelta,
    ParsedOutput,
    StreamingToolParser,
    ToolCall,
    ToolParser,
    assemble,
    read_call,
    read_call_list,
    skip_whitespace,
)
from server.tool_parsers.call_list import CallListReader
from server.tool_parsers.json_stream import WHITESPACE, JsonStreamError, JsonValue, arguments_json

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


class MistralToolParser(ToolParser):
    family = "mistral"
    tags = (TOOL_CALLS, ARGS)

    def __init__(self, style: str = "list") -> None:
        if style not in ("list", "args"):
            raise ValueError(f"unknown Mistral call style {style!r} (known: list, args)")
        self.style = style

    def parse(self, text: str) -> ParsedOutput:
        pieces: list[str | ToolCall] = []
        pos = 0
        while (i := text.find(TOOL_CALLS, pos)) >= 0:
            pieces.append(text[pos:i])
            after = i + len(TOOL_CALLS)
            calls, end = _read_calls(text, skip_whitespace(text, after))
            if calls:
                pieces.extend(calls)
                pos = end
            else:
                pieces.append(TOOL_CALLS)
                pos = after
        pieces.append(text[pos:])
        return assemble(pieces)

    def streaming(self) -> MistralStream:
        return MistralStream()


def _read_calls(text: str, pos: int) -> tuple[list[ToolCall], int]:
    if text.startswith("[", pos):
        return read_call_list(text, pos, require_arguments=False)
    if text.startswith("{", pos):
        call, end = read_call(text, pos, require_arguments=False)
        return ([call], end) if call is not None else ([], pos)
    name = NAME.match(text, pos)
    if name is None or not text.startswith(ARGS, name.end()):
        return [], pos
    try:
        value, end = DECODER.raw_decode(text, skip_whitespace(text, name.end() + len(ARGS)))
    except ValueError:
        return [], pos
    return [ToolCall(name.group(), arguments_json(value))], end


_TEXT, _OPENED, _NAME, _ARGUMENTS, _CALL, _LIST, _DISCARD = range(7)


class MistralStream(StreamingToolParser):
    def __init__(self) -> None:
        super().__init__()
        self._state = _TEXT
        self._list = CallListReader(self, require_arguments=False)
        self._value: JsonValue | None = None

    def _step(self) -> bool:
        state = self._state
        if state == _TEXT:
            if self._scan_text((TOOL_CALLS,)) is None:
                return False
            self._tag, self._raw, self._state = TOOL_CALLS, [], _OPENED
            return True
        if state == _OPENED:  # whitespace, then a list, an object or a name
            while self._buf[:1] in tuple(WHITESPACE):
                self._consume_raw(1)
            if not self._buf:
                return self._fail_at_end()
            ch = self._buf[0]
            if ch == "[":
                self._list.open(TOOL_CALLS)
                self._state = _LIST
            elif ch == "{":
                raw = self._raw
                self._open_call(TOOL_CALLS, require_arguments=False)
                self._raw, self._state = raw, _CALL
            else:
                self._state = _NAME
            return True
        if state == _NAME:
            return self._name_step()
        if state == _ARGUMENTS:
            return self._arguments_step()
        if state in (_CALL, _LIST):
            outcome = self._read_call() if state == _CALL else self._list.step()
            if outcome == "failed":
                self._fail()
                self._state = _TEXT
            elif outcome != "more":
                self._state = _TEXT if outcome == "done" else _DISCARD
            return outcome != "more"
        self._buf = ""  # _DISCARD
        return False

    def _consume_raw(self, n: int) -> None:
        self._raw.append(self._buf[:n])
        self._buf = self._buf[n:]

    def _fail_at_end(self) -> bool:
        if not self._final:
            return False
        self._fail()
        self._state = _TEXT
        return True

    def _name_step(self) -> bool:
        buf = self._buf
        n = 0
        while n < len(buf) and buf[n] in _NAME_CHARS:
            n += 1
        rest = buf[n:]
        if rest.startswith(ARGS) and (n or self._raw_name()):
            name = self._raw_name() + buf[:n]
            self._buf = rest[len(ARGS) :]
            self._start(name)
            self._value = JsonValue()
            self._state = _ARGUMENTS
            return True
        if (ARGS.startswith(rest) or not rest) and not self._final:
            self._consume_raw(n)  # the name so far; what may be "[ARGS]" stays buffered
            return False
        self._fail()
        self._state = _TEXT
        return True

    def _raw_name(self) -> str:
        """The name characters read so far (the raw text after the tag, whitespace aside)."""
        return "".join(self._raw).lstrip(WHITESPACE)

    def _arguments_step(self) -> bool:
        value, buf, i = self._value, self._buf, 0
        try:
            while i < len(buf) and not value.done:
                if value.push(buf[i]):
                    i += 1
        except JsonStreamError:
            self._buf, self._state = "", _DISCARD
            return False
        self._buf = buf[i:]
        if value.is_string:  # judged whole (see arguments_json)
            text = arguments_json(json.loads(value.take())) if value.done else ""
        else:
            text = value.take()
        if text:
            self._events.append(ArgumentsDelta(self._index, text))
        if not value.done:
            return False
        self._end_call()
        self._state = _TEXT
        return True
