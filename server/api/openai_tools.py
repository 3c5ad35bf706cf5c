"""Tools on OpenAI's chat API: the request's ``tools`` and ``tool_choice`` checked and handed to
the template and, when a call is forced, to the grammar; the reply read back into ``tool_calls``
by the model family's parser, whole or as OpenAI streams them."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

from engine.structured.grammar import GrammarSpec
from server.errors import BadRequest
from server.protocol import ChatCompletionRequest, FunctionCall, NamedToolChoice, ToolCallOut
from server.serving import Serving
from server.tool_parsers import (
    ArgumentsDelta,
    ContentDelta,
    Event,
    ParsedOutput,
    StreamingToolParser,
    ToolCallStart,
    ToolParser,
    new_call_id,
)
from server.tool_parsers.grammar import tag_token_ids, tool_call_grammar
from server.tool_parsers.validation import ToolSpecError, validate_tools


@dataclass(frozen=True, slots=True)
class ToolUse:
    """A request's tools, as the reply needs them: whether to read calls out of the text, and
    with which family's parser."""

    tools: list[dict[str, Any]]
    tool_choice: Any
    parallel: bool
    parser: ToolParser

    @property
    def reads_calls(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


def tool_use(body: ChatCompletionRequest, serving: Serving) -> ToolUse | None:
    """The request's tools checked (a 400 naming every bad field), or None without tools."""
    tools = [t.model_dump(exclude_none=True, by_alias=True) for t in body.tools or []]
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice):
        choice = choice.model_dump(exclude_none=True)
    return checked_tools(tools, choice, body.parallel_tool_calls, serving)


def checked_tools(
    tools: list[dict[str, Any]], choice: Any, parallel: bool, serving: Serving
) -> ToolUse | None:
    """Tools and a choice in OpenAI's chat form, from whichever API, checked (a 400 naming
    every bad field); None without tools."""
    if not tools and choice in (None, "none", "auto"):
        return None
    try:
        validate_tools(tools, choice)
    except ToolSpecError as e:
        raise BadRequest(str(e), param=e.param) from None
    return ToolUse(tools, choice, parallel, serving.tool_parser)


def forced_grammar(use: ToolUse, serving: Serving) -> GrammarSpec | None:
    """For ``required`` or a named function: a grammar that only writes calls of the family's
    syntax whose arguments fit the functions' schemas; None otherwise."""
    if use.tool_choice in (None, "none", "auto"):
        return None
    tags = tag_token_ids(serving.grammars.tokenizer, use.parser)
    # A named function is called once; "required" allows parallel calls, a bounded number.
    parallel = use.parallel and use.tool_choice == "required"
    max_calls = max(8, len(use.tools)) if parallel else 1
    try:
        return tool_call_grammar(
            use.parser, use.tools, use.tool_choice, parallel, tags, max_calls=max_calls
        )
    except ToolSpecError as e:
        raise BadRequest(str(e), param=e.param) from None


def template_messages(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The messages as templates expect them: a call's ``arguments`` as an object (the wire
    carries a JSON string; templates write it with ``tojson``)."""
    messages = []
    for m in body.messages:
        d = m.model_dump(exclude_none=True)
        for call in d.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                with contextlib.suppress(json.JSONDecodeError):  # else the text as it came
                    fn["arguments"] = json.loads(fn["arguments"])
        messages.append(d)
    return messages


def whole_calls(parsed: ParsedOutput) -> list[ToolCallOut]:
    return [
        ToolCallOut(id=new_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
        for c in parsed.calls
    ]


@dataclass(slots=True)
class CallStream:
    """One streamed choice's calls: parser events become OpenAI delta fields."""

    parser: StreamingToolParser
    called: bool = False
    ids: dict[int, str] = field(default_factory=dict)

    def deltas(self, events: list[Event]) -> list[dict[str, Any]]:
        """Each event as the fields of one delta (``content`` or ``tool_calls``)."""
        out: list[dict[str, Any]] = []
        for event in events:
            if isinstance(event, ContentDelta):
                if event.text:
                    out.append({"content": event.text})
            elif isinstance(event, ToolCallStart):
                self.called = True
                self.ids[event.index] = call_id = new_call_id()
                fn = {"name": event.name, "arguments": ""}
                out.append(
                    {
                        "tool_calls": [
                            {
                                "index": event.index,
                                "id": call_id,
                                "type": "function",
                                "function": fn,
                            }
                        ]
                    }
                )
            elif isinstance(event, ArgumentsDelta) and event.text:
                out.append(
                    {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}
                )
        return out
