"""JSON read a character at a time, for tool calls that stream.

``JsonValue`` reads one JSON value and writes it out as ``json.dumps(json.loads(value),
ensure_ascii=False)`` would, piece by piece as the characters arrive, so the argument fragments
of a streamed call join into exactly the string the whole-response parser reports. It is as
strict as ``json.loads(..., strict=False)``: what one rejects, the other rejects (duplicate
keys aside: ``json.loads`` keeps the last, the stream cannot take back the first).

``CallReader`` reads one call object, ``{"name": ..., "arguments": {...}}`` (``"parameters"``
is the same), keys in any order: the name is known once its string closes, the arguments
stream as they come.
"""

from __future__ import annotations

import json

WHITESPACE = " \t\n\r"  # JSON's, as json.loads skips it
_BARE = frozenset("0123456789+-.eEabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_SHORT_ESCAPES |= {"\b": "\\b", "\f": "\\f"}
_UNESCAPE = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_HEX = frozenset("0123456789abcdefABCDEF")
ARGUMENT_KEYS = ("arguments", "parameters")


def arguments_json(value: object) -> str:
    """A call's arguments as reported: ``json.dumps(value, ensure_ascii=False)``, except that
    arguments written as a string holding a JSON object (as some templates render them from
    OpenAI-style history) are that object."""
    if isinstance(value, str):
        try:
            inner = json.loads(value, strict=False)
        except ValueError:
            inner = None
        if isinstance(inner, dict):
            value = inner
    return json.dumps(value, ensure_ascii=False)


# What a value reader expects next, outside strings and bare words.
_VALUE, _VALUE_OR_CLOSE, _KEY, _KEY_OR_CLOSE, _COLON, _COMMA = range(6)


class JsonStreamError(ValueError):
    """The characters so far are not the start of valid JSON."""


def escape_char(ch: str) -> str:
    """One character inside a JSON string as json.dumps(..., ensure_ascii=False) writes it."""
    short = _SHORT_ESCAPES.get(ch)
    if short is not None:
        return short
    return f"\\u{ord(ch):04x}" if ch < " " else ch


class JsonValue:
    """One JSON value, read a character at a time; ``out`` gathers its normalized text."""

    __slots__ = ("_bare", "_escape", "_expect", "_high", "_in_string", "_is_key", "_stack")
    __slots__ += ("done", "out", "is_string")

    def __init__(self) -> None:
        self.out: list[str] = []
        self.done = False
        self.is_string = False  # the value is a string (known from its first character)
        self._stack: list[str] = []  # the open containers, "{" or "["
        self._expect = _VALUE
        self._in_string = False
        self._is_key = False
        self._escape: str | None = None  # after a backslash: "" then "u", "u1", ...
        self._high: int | None = None  # a high surrogate waiting for its low half
        self._bare: str | None = None  # a number, true, false, null, NaN or Infinity so far

    def take(self) -> str:
        text = "".join(self.out)
        self.out.clear()
        return text

    def push(self, ch: str) -> bool:
        """Read ``ch``; False when the value had already ended before it (a bare word ends
        only at the next character), and then ``ch`` belongs to whoever reads on."""
        assert not self.done
        if self._escape is not None:
            self._read_escape(ch)
        elif self._in_string:
            self._read_string_char(ch)
        elif self._bare is not None and ch in _BARE:
            self._bare += ch
        else:
            if self._bare is not None:
                self._end_bare()
                if self.done:
                    return False
            if ch not in WHITESPACE:
                self._read_structure(ch)
        return True

    def _read_structure(self, ch: str) -> None:
        expect = self._expect
        if expect in (_VALUE, _VALUE_OR_CLOSE):
            if ch == "]" and expect == _VALUE_OR_CLOSE:
                self._close()
            elif ch in "{[":
                self._stack.append(ch)
                self.out.append(ch)
                self._expect = _KEY_OR_CLOSE if ch == "{" else _VALUE_OR_CLOSE
            elif ch == '"':
                self._open_string(is_key=False)
            elif ch in _BARE:
                self._bare = ch
            else:
                raise JsonStreamError(f"expected a value, got {ch!r}")
        elif expect in (_KEY, _KEY_OR_CLOSE):
            if ch == "}" and expect == _KEY_OR_CLOSE:
                self._close()
            elif ch == '"':
                self._open_string(is_key=True)
            else:
                raise JsonStreamError(f"expected a key, got {ch!r}")
        elif expect == _COLON:
            if ch != ":":
                raise JsonStreamError(f"expected ':', got {ch!r}")
            self.out.append(": ")
            self._expect = _VALUE
        else:  # _COMMA
            top = self._stack[-1]
            if ch == ",":
                self.out.append(", ")
                self._expect = _KEY if top == "{" else _VALUE
            elif ch == ("}" if top == "{" else "]"):
                self._close()
            else:
                raise JsonStreamError(f"expected ',' or a closing bracket, got {ch!r}")

    def _open_string(self, is_key: bool) -> None:
        self._in_string, self._is_key = True, is_key
        self.is_string = not self._stack
        self.out.append('"')

    def _read_string_char(self, ch: str) -> None:
        if ch == "\\":
            self._escape = ""
            return
        self._flush_high()
        if ch == '"':
            self.out.append('"')
            self._in_string = False
            if self._is_key:
                self._expect = _COLON
            else:
                self._value_ended()
        else:
            self.out.append(escape_char(ch))

    def _read_escape(self, ch: str) -> None:
        esc = self._escape
        if esc == "":
            if ch == "u":
                self._escape = "u"
            elif ch in _UNESCAPE:
                self._escape = None
                self._flush_high()
                self.out.append(escape_char(_UNESCAPE[ch]))
            else:
                raise JsonStreamError(f"invalid escape \\{ch}")
        elif ch in _HEX:
            esc += ch
            self._escape = esc
            if len(esc) == 5:
                self._escape = None
                self._code_point(int(esc[1:], 16))
        else:
            raise JsonStreamError(f"invalid \\u escape: {esc + ch!r}")

    def _code_point(self, code: int) -> None:
        # As json.loads: a high surrogate joins a low one escaped right after it.
        if self._high is not None and 0xDC00 <= code <= 0xDFFF:
            self.out.append(chr(0x10000 + ((self._high - 0xD800) << 10) + (code - 0xDC00)))
            self._high = None
            return
        self._flush_high()
        if 0xD800 <= code <= 0xDBFF:
            self._high = code
        else:
            self.out.append(escape_char(chr(code)))

    def _flush_high(self) -> None:
        if self._high is not None:
            self.out.append(chr(self._high))
            self._high = None

    def _end_bare(self) -> None:
        word, self._bare = self._bare, None
        try:
            value = json.loads(word)
        except ValueError:
            raise JsonStreamError(f"invalid JSON word {word!r}") from None
        self.out.append(json.dumps(value))
        self._value_ended()

    def _close(self) -> None:
        self.out.append("}" if self._stack.pop() == "{" else "]")
        self._value_ended()

    def _value_ended(self) -> None:
        if self._stack:
            self._expect = _COMMA
        else:
            self.done = True


# What a call reader expects next.
_OPEN, _CALL_KEY_OR_CLOSE, _CALL_KEY, _CALL_COLON, _CALL_VALUE, _CALL_COMMA, _CALL_DONE = range(7)


class CallReader:
    """One call object, read a character at a time.

    ``name`` is set once the name's string closes; ``has_arguments`` once an arguments key is
    read, after which ``take_arguments()`` returns their normalized text as it grows. Raises
    JsonStreamError on anything that is not a call: bad JSON, a name that is not a string, or
    an object that closes without a name (or, with ``require_arguments``, without arguments).
    """

    def __init__(self, require_arguments: bool) -> None:
        self.require_arguments = require_arguments
        self.name: str | None = None
        self.has_arguments = False
        self.done = False
        self._state = _OPEN
        self._value: JsonValue | None = None
        self._key: str | None = None
        self._role = ""  # what the value being read is: "key", "name", "arguments" or "other"
        self._arguments: list[str] = []

    def take_arguments(self) -> str:
        text = "".join(self._arguments)
        self._arguments.clear()
        return text

    def push(self, ch: str) -> None:
        if self._value is not None:  # inside a key or a value
            value = self._value
            consumed = value.push(ch)
            self._stream_arguments(value)
            if value.done:
                self._value_done()
            if consumed:
                return
        state = self._state
        if ch in WHITESPACE:
            return
        if state == _OPEN and ch == "{":
            self._state = _CALL_KEY_OR_CLOSE
        elif state in (_CALL_KEY, _CALL_KEY_OR_CLOSE) and ch == '"':
            self._start_value("key", ch)
        elif state in (_CALL_KEY_OR_CLOSE, _CALL_COMMA) and ch == "}":
            self._close()
        elif state == _CALL_COLON and ch == ":":
            self._state = _CALL_VALUE
            self._role = "other"
            if self._key == "name" and self.name is None:
                self._role = "name"
            elif self._key in ARGUMENT_KEYS and not self.has_arguments:
                self._role, self.has_arguments = "arguments", True
        elif state == _CALL_VALUE:
            self._start_value(self._role, ch)
        elif state == _CALL_COMMA and ch == ",":
            self._state = _CALL_KEY
        else:
            raise JsonStreamError(f"not a call object: unexpected {ch!r}")

    def _start_value(self, role: str, ch: str) -> None:
        self._role = role
        self._value = JsonValue()
        self._state = _CALL_KEY if role == "key" else _CALL_VALUE
        self._value.push(ch)
        self._stream_arguments(self._value)

    def _stream_arguments(self, value: JsonValue) -> None:
        # A string may hold the arguments as JSON: it is judged whole, when it closes.
        if self._role == "arguments" and not value.is_string:
            self._arguments.append(value.take())

    def _value_done(self) -> None:
        text, was_string = self._value.take(), self._value.is_string
        self._value = None
        if self._role == "key":
            self._key = json.loads(text)
            self._state = _CALL_COLON
            return
        if self._role == "arguments" and was_string:
            self._arguments.append(arguments_json(json.loads(text)))
        if self._role == "name":
            self.name = json.loads(text)
            if not isinstance(self.name, str):
                raise JsonStreamError("the call's name is not a string")
        self._state = _CALL_COMMA

    def _close(self) -> None:
        if self.name is None:
            raise JsonStreamError("the object has no name")
        if self.require_arguments and not self.has_arguments:
            raise JsonStreamError("the object has no arguments")
        self._state = _CALL_DONE
        self.done = True
