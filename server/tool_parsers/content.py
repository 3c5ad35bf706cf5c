"""Content: the text of a reply outside its calls, as it is let out of a stream."""

from __future__ import annotations


class ContentJoiner:
    """Content is the text outside calls. Whitespace that touches a call is not content, except
    that where text resumes after calls, the whitespace that stood before the first of them
    separates the two texts ("A\n<call>\nB" is "A\nB"). The stream and the whole parser
    both join their text through this, so they agree on it by construction."""

    __slots__ = ("_after_call", "_any", "_pending", "_separator")

    def __init__(self) -> None:
        self._pending = ""  # trailing whitespace, held until we know whether a call follows
        self._separator = ""  # what goes between the text before calls and the text after
        self._after_call = False
        self._any = False  # some content was let out

    def text(self, text: str) -> str:
        """What of ``text`` is content, to be sent now."""
        if self._after_call:
            text = text.lstrip()
            if not text:
                return ""
            self._after_call = False
        body = text.rstrip()
        if not body:
            self._pending += text
            return ""
        out = self._separator + self._pending + body
        self._separator, self._pending, self._any = "", text[len(body) :], True
        return out

    def call(self) -> None:
        if self._any and self._pending:
            self._separator = self._pending
        self._pending, self._after_call = "", True

    def finish(self) -> str:
        out, self._pending = self._pending, ""
        return out


def held_prefix_length(text: str, tags: tuple[str, ...]) -> int:
    """The longest end of ``text`` that is a proper start of some tag (it may become one)."""
    for n in range(min(len(text), max(map(len, tags)) - 1), 0, -1):
        end = text[-n:]
        if any(tag.startswith(end) for tag in tags):
            return n
    return 0
