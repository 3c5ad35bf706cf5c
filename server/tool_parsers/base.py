"""What every tool-call parser shares: the parsed shapes, the streaming events, and the rules
both kinds of parser follow so that a streamed response and a whole one agree.

Rules, the same in ``parse`` and in the stream:
- A call is an object with a string ``name`` and its ``arguments`` (or ``parameters``), which
  are reported as ``json.dumps(value, ensure_ascii=False)`` (``"{}"`` when absent; a string
  holding a JSON object counts as that object, see ``arguments_json``).
- Content is the text outside calls, joined as ``ContentJoiner`` says.
- A tag followed by something that is not a call is text (nothing the model wrote is lost),
  and reading resumes right after the tag.
- A stream never sends any part of a tag as content: text that may be the start of a tag is
  held back until the next characters decide it. The one exception is the previous rule.
- Output cut off inside a call after its name was read (``max_tokens``): the stream has sent
  the call's start and the arguments so far; ``parse`` returns that tail as text.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

from server.tool_parsers.content import ContentJoiner, held_prefix_length
from server.tool_parsers.json_stream import (
    ARGUMENT_KEYS,
    WHITESPACE,
    CallReader,
    JsonStreamError,
    arguments_json,
)

DECODER = json.JSONDecoder(strict=False)


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # a JSON text, as json.dumps(value, ensure_ascii=False) writes it


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    content: str | None
    calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    index: int
    name: str


@dataclass(frozen=True, slots=True)
class ArgumentsDelta:
    index: int
    text: str


Event = ContentDelta | ToolCallStart | ArgumentsDelta


def new_call_id() -> str:
    """An id for a call, shaped as OpenAI's (``call_`` and 24 characters)."""
    return "call_" + secrets.token_hex(12)


class ToolParser:
    """One model family's tool-call syntax. ``family`` names it for the grammar builder."""

    family = ""
    tags: tuple[str, ...] = ()  # the tag texts of the syntax, which may be single tokens

    def parse(self, text: str) -> ParsedOutput:
        raise NotImplementedError

    def streaming(self) -> StreamingToolParser:
        raise NotImplementedError


def skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in WHITESPACE:
        pos += 1
    return pos


def read_call(text: str, pos: int, require_arguments: bool) -> tuple[ToolCall | None, int]:
    """The call object at ``text[pos]`` and where it ends, or (None, pos) if there is none."""
    if pos >= len(text) or text[pos] != "{":
        return None, pos
    try:
        obj, end = DECODER.raw_decode(text, pos)
    except ValueError:
        return None, pos
    call = call_from_object(obj, require_arguments)
    return (call, end) if call is not None else (None, pos)


def call_from_object(obj: object, require_arguments: bool) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    key = next((k for k in obj if k in ARGUMENT_KEYS), None)
    if key is None and require_arguments:
        return None
    arguments = arguments_json(obj[key]) if key is not None else "{}"
    return ToolCall(obj["name"], arguments)


def read_call_list(text: str, pos: int, require_arguments: bool) -> tuple[list[ToolCall], int]:
    """The calls of the JSON list at ``text[pos]`` and where the list ends, read element by
    element as the stream reads them: none unless the first element is a call; after a call,
    anything but ``,`` call or ``]`` breaks the list, and (as in the stream) the rest of the
    reply is dropped."""
    calls: list[ToolCall] = []
    i = skip_whitespace(text, pos + 1)
    while True:
        call, end = read_call(text, i, require_arguments)
        if call is None:
            break
        calls.append(call)
        i = skip_whitespace(text, end)
        if text.startswith("]", i):
            return calls, i + 1
        if not text.startswith(",", i):
            break
        i = skip_whitespace(text, i + 1)
    return (calls, len(text)) if calls else ([], pos)


def assemble(pieces: list[str | ToolCall]) -> ParsedOutput:
    """Text runs and calls in reply order → the content and the calls."""
    joiner, content, calls = ContentJoiner(), [], []
    for piece in pieces:
        if isinstance(piece, ToolCall):
            joiner.call()
            calls.append(piece)
        else:
            content.append(joiner.text(piece))
    text = "".join(content) + joiner.finish()
    return ParsedOutput(text or None, calls)


class StreamingToolParser:
    """Fed text deltas, returns events. Subclasses implement ``_step`` over ``self._buf``.

    ``_step`` consumes from the start of the buffer and returns True while it made progress,
    False when it needs more text (or, once ``_final``, has nothing left). While a call is
    read and not yet started, the characters it consumed are kept in ``_raw``, so that if it
    proves not to be a call the tag can become text and reading resume after it.
    """

    def __init__(self) -> None:
        self._buf = ""
        self._final = False
        self._events: list[Event] = []
        self._joiner = ContentJoiner()
        self._index = 0  # calls started so far
        self._reader: CallReader | None = None
        self._started = False
        self._tag = ""  # the tag that opened the call being read
        self._raw: list[str] = []

    def feed(self, delta: str) -> list[Event]:
        self._buf += delta
        while self._step():
            pass
        return self._take()

    def finish(self) -> list[Event]:
        """The end of the output: flushes what was held back."""
        self._final = True
        while self._step():
            pass
        tail = self._joiner.finish()
        if tail:
            self._events.append(ContentDelta(tail))
        return self._take()

    def _step(self) -> bool:
        raise NotImplementedError

    def _take(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    # Content.

    def _emit_text(self, text: str) -> None:
        content = self._joiner.text(text)
        if content:
            self._events.append(ContentDelta(content))

    def _scan_text(self, tags: tuple[str, ...]) -> str | None:
        """Send the content before the first tag in the buffer and consume that tag (returned);
        with no tag, send all but a possible start of one and return None."""
        buf = self._buf
        found = [(i, tag) for tag in tags if (i := buf.find(tag)) >= 0]
        if found:
            i, tag = min(found)
            self._emit_text(buf[:i])
            self._buf = buf[i + len(tag) :]
            return tag
        keep = 0 if self._final else held_prefix_length(buf, tags)
        self._emit_text(buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep :]
        return None

    # Calls.

    def _open_call(self, tag: str, require_arguments: bool) -> None:
        self._tag, self._raw = tag, []
        self._reader = CallReader(require_arguments)
        self._started = False

    def _read_call(self) -> str:
        """Push buffered characters into the open call: "done" once it closed, "failed" if it
        proved not to be a call before it started, "broken" after, "more" for more text.

        The call starts at the character that makes it one, whatever the chunking, so that
        where a delta ends never changes what the stream reads; its arguments go out once
        per delta."""
        reader = self._reader
        buf, i = self._buf, 0
        try:
            while i < len(buf) and not reader.done:
                ch = buf[i]
                i += 1
                if not self._started:
                    self._raw.append(ch)
                reader.push(ch)
                if not self._started and self._is_call(reader):
                    self._start(reader.name)
        except JsonStreamError:
            self._buf = buf[i:]
            self._flush_arguments(reader)
            return "broken" if self._started else "failed"
        self._buf = buf[i:]
        self._flush_arguments(reader)
        if reader.done:
            if not reader.has_arguments:
                self._events.append(ArgumentsDelta(self._index, "{}"))
            self._end_call()
            return "done"
        if self._final:  # cut off inside the call
            return "broken" if self._started else "failed"
        return "more"

    @staticmethod
    def _is_call(reader: CallReader) -> bool:
        if reader.name is None:
            return False
        return reader.has_arguments or not reader.require_arguments

    def _flush_arguments(self, reader: CallReader) -> None:
        if self._started and reader.has_arguments:
            text = reader.take_arguments()
            if text:
                self._events.append(ArgumentsDelta(self._index, text))

    def _start(self, name: str) -> None:
        self._joiner.call()
        self._started = True
        self._raw = []
        self._events.append(ToolCallStart(self._index, name))

    def _end_call(self) -> None:
        self._index += 1
        self._reader, self._started = None, False

    def _fail(self) -> None:
        """The open tag did not start a call: it is text, and reading resumes after it."""
        self._emit_text(self._tag)
        self._buf = "".join(self._raw) + self._buf
        self._reader, self._raw, self._tag = None, [], ""
