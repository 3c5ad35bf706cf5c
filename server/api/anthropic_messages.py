"""Anthropic's Messages API over the serving core: a ``MessagesRequest`` becomes a
``GenerationRequest`` (its messages rendered through the chat template as OpenAI-style messages,
``tool_use`` as ``tool_calls`` and ``tool_result`` as ``tool`` messages); the events become one
assistant ``message`` with ``text`` and ``tool_use`` content blocks, whole or as Anthropic's
stream of events.

One ``Turn`` reads the events either way: a streamed reply sends what it returns, a whole reply
keeps only the message it builds, so the two cannot disagree.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from server.api.openai_tools import ToolUse, checked_tools, forced_grammar
from server.errors import APIError, BadRequest, anthropic_error_body
from server.generation import ChoiceDelta, GenerationEvent, GenerationRequest, TokenUsage
from server.protocol_anthropic import (
    Conversation,
    CountTokensRequest,
    CountTokensResponse,
    MessagesRequest,
    MessagesResponse,
    MessagesUsage,
    TextBlock,
    TextOut,
    ToolResultBlock,
    ToolUseBlock,
    ToolUseOut,
)
from server.serving import Serving
from server.streaming import ClientDisconnected, EventStream, unless_disconnected
from server.tool_parsers import ArgumentsDelta, ContentDelta, Event, ToolCallStart

log = logging.getLogger(__name__)

NamedEvent = tuple[str, dict[str, Any]]
PING: NamedEvent = ("ping", {"type": "ping"})

# Anthropic's tool_choice in OpenAI's words, as the tool checks and grammars take it.
_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


# -- the request ------------------------------------------------------------------------------


def tool_use(body: Conversation, serving: Serving) -> ToolUse | None:
    """The request's tools as OpenAI function tools, checked; None without tools."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": t.name,
                **({"description": t.description} if t.description else {}),
                "parameters": t.input_schema,
            },
        }
        for t in body.tools or ()
    ]
    choice: Any = None
    parallel = True
    if (c := body.tool_choice) is not None:
        choice = _CHOICES.get(c.type) or {"type": "function", "function": {"name": c.name}}
        parallel = not c.disable_parallel_tool_use
    try:
        return checked_tools(tools, choice, parallel, serving)
    except BadRequest as e:  # checked as OpenAI tools: name the fields as this request has them
        raise BadRequest(_anthropic_names(e.message), _anthropic_names(e.param), e.code) from e


def _anthropic_names(text: str | None) -> str | None:
    """OpenAI's tool field names in ``text`` as Anthropic's."""
    if text is None:
        return None
    text = re.sub(r"(tools\[\d+\])\.function\.parameters", r"\1.input_schema", text)
    text = re.sub(r"(tools\[\d+\])\.function\.", r"\1.", text)
    return text.replace("tool_choice.function.name", "tool_choice.name")


def template_messages(body: Conversation) -> list[dict[str, Any]]:
    """The conversation as chat templates take it (OpenAI's roles): the system prompt first, an
    assistant's ``tool_use`` blocks as its ``tool_calls``, a ``tool_result`` as a ``tool``
    message, in the order they came."""
    out: list[dict[str, Any]] = []
    if body.system:
        system = body.system
        text = system if isinstance(system, str) else "\n".join(b.text for b in system)
        out.append({"role": "system", "content": text})
    for i, m in enumerate(body.messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(m.content):
            misplaced = ToolResultBlock if m.role == "assistant" else ToolUseBlock
            if isinstance(block, misplaced):
                raise BadRequest(
                    f"messages[{i}].content[{j}]: a {block.type} block cannot be in a {m.role} "
                    "message",
                    param=f"messages[{i}].content[{j}]",
                )
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ToolUseBlock):
                function = {"name": block.name, "arguments": block.input}
                calls.append({"id": block.id, "type": "function", "function": function})
            else:  # a tool result: the user's text so far goes first, as it came
                if texts:
                    out.append({"role": "user", "content": "\n".join(texts)})
                    texts = []
                result = {"role": "tool", "tool_call_id": block.tool_use_id}
                out.append({**result, "content": block.text})
        if m.role == "assistant":
            message: dict[str, Any] = {"role": "assistant"}
            if texts or not calls:
                message["content"] = "\n".join(texts)
            out.append({**message, "tool_calls": calls} if calls else message)
        elif texts:
            out.append({"role": "user", "content": "\n".join(texts)})
    return out


def prompt_ids(serving: Serving, body: Conversation, use: ToolUse | None) -> list[int]:
    extra = {"tools": use.tools} if use is not None and use.reads_calls else {}
    return serving.chat_prompt(template_messages(body), True, **extra)


def count_tokens(body: CountTokensRequest, serving: Serving) -> CountTokensResponse:
    serving.check_model(body.model)
    return CountTokensResponse(input_tokens=len(prompt_ids(serving, body, tool_use(body, serving))))


def generation_request(
    body: MessagesRequest, serving: Serving
) -> tuple[GenerationRequest, ToolUse | None]:
    """The request in the core's terms, and its tools when the reply is to be read for calls."""
    use = tool_use(body, serving)
    spec = GenerationRequest(
        model=body.model,
        prompt_ids=prompt_ids(serving, body, use),
        id_prefix="msg",
        prompt_field="messages",
        max_tokens=body.max_tokens,
        stop=tuple(body.stop_sequences or ()),
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
    )
    if use is not None and (forced := forced_grammar(use, serving)) is not None:
        spec = replace(spec, grammar=forced, grammar_field="tool_choice")
    if use is None or not use.reads_calls:
        return spec, None
    # The parser must see its tags, even where they are control tokens.
    return replace(spec, keep_tokens=serving.special_tags(use.parser.tags)), use


# -- answering --------------------------------------------------------------------------------


async def create(body: MessagesRequest, request: Request, serving: Serving) -> Response:
    """Admit the request (429 before anything starts), then stream it or answer it whole; the
    lease is released once either way (see ``openai_common.respond``)."""
    spec, reads = generation_request(body, serving)
    prepared = serving.prepare(spec)
    message_id = prepared.request_id.replace("-", "_", 1)  # msg_..., as Anthropic's look
    turn = Turn(message_id, prepared.model, prepared.num_prompt_tokens, reads)
    lease = serving.admit(prepared)
    if not body.stream:
        with lease:
            events = serving.generate(prepared, lease)
            try:
                await unless_disconnected(request, _drain(turn, events))
            except ClientDisconnected:
                return Response(status_code=499)  # nobody is listening
        return JSONResponse(turn.message().model_dump())
    try:
        return EventStream(_sse(turn, serving.generate(prepared, lease)), lease)
    except BaseException:
        lease.release()
        raise


async def _drain(turn: Turn, events: AsyncIterator[GenerationEvent]) -> None:
    async for event in events:
        turn.on(event)


async def _sse(
    turn: Turn, events: AsyncGenerator[GenerationEvent, None]
) -> AsyncGenerator[tuple[str, str], None]:
    """Anthropic's stream: message_start and a ping, the blocks, message_delta, message_stop;
    an ``error`` event if it fails midway. Closing it closes the generation (which aborts it)."""
    try:
        for name, data in turn.start():
            yield name, json.dumps(data)
        async with aclosing(events):
            async for event in events:
                for name, data in turn.on(event):
                    yield name, json.dumps(data)
    except Exception as e:
        if not isinstance(e, APIError):
            log.exception("request failed while streaming")
            e = APIError(f"{type(e).__name__}: {e}")
        yield "error", json.dumps(anthropic_error_body(e.status, e.type, e.message))


class Turn:
    """The assistant message a generation writes, built from its events; each event also
    returns the stream events that show it."""

    def __init__(self, id_: str, model: str, prompt_tokens: int, tools: ToolUse | None) -> None:
        self.id, self.model, self.prompt_tokens = id_, model, prompt_tokens
        self.parser = tools.parser.streaming() if tools is not None else None
        self.content: list[TextOut | ToolUseOut] = []
        self.open = False  # whether the last block is still being written
        self.arguments: dict[int, str] = {}  # a call's index → its arguments so far
        self.blocks: dict[int, int] = {}  # a call's index → its block's index
        self.called = False
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None
        self.usage = MessagesUsage(input_tokens=prompt_tokens, output_tokens=0)

    def message(self) -> MessagesResponse:
        return MessagesResponse(
            id=self.id,
            model=self.model,
            content=self.content,
            stop_reason=self.stop_reason,
            stop_sequence=self.stop_sequence,
            usage=self.usage,
        )

    def start(self) -> list[NamedEvent]:
        start = self.message().model_dump()
        return [("message_start", {"type": "message_start", "message": start}), PING]

    def on(self, event: GenerationEvent) -> list[NamedEvent]:
        if isinstance(event, TokenUsage):
            return self._end(event)
        return self._delta(event)

    def _delta(self, delta: ChoiceDelta) -> list[NamedEvent]:
        if self.parser is None:
            parsed: list[Event] = [ContentDelta(delta.text)] if delta.text else []
        else:
            parsed = self.parser.feed(delta.text) if delta.text else []
            if delta.finish_reason:
                parsed += self.parser.finish()
        out = [e for p in parsed for e in self._parsed(p)]
        if delta.finish_reason:
            out += self._close()
            self.stop_reason, self.stop_sequence = self._stop_reason(delta)
        return out

    def _stop_reason(self, delta: ChoiceDelta) -> tuple[str, str | None]:
        if delta.finish_reason == "length":
            return "max_tokens", None
        if delta.stop_string is not None:
            return "stop_sequence", delta.stop_string
        return ("tool_use" if self.called else "end_turn"), None

    def _parsed(self, event: Event) -> list[NamedEvent]:
        if isinstance(event, ContentDelta):
            if not event.text:
                return []
            out = [] if self._writing(TextOut) else [*self._close(), self._begin(TextOut(text=""))]
            text = self.content[-1]
            assert isinstance(text, TextOut)
            text.text += event.text
            return [*out, self._block_delta({"type": "text_delta", "text": event.text})]
        if isinstance(event, ToolCallStart):
            self.called = True
            block = ToolUseOut(id="toolu_" + secrets.token_hex(12), name=event.name, input={})
            out = self._close()
            self.blocks[event.index], self.arguments[event.index] = len(self.content), ""
            return [*out, self._begin(block)]
        if isinstance(event, ArgumentsDelta) and event.text:
            self.arguments[event.index] += event.text
            delta = {"type": "input_json_delta", "partial_json": event.text}
            return [self._block_delta(delta, self.blocks[event.index])]
        return []

    def _writing(self, kind: type) -> bool:
        return self.open and isinstance(self.content[-1], kind)

    def _begin(self, block: TextOut | ToolUseOut) -> NamedEvent:
        self.content.append(block)
        self.open = True
        data = {"type": "content_block_start", "index": len(self.content) - 1}
        return "content_block_start", {**data, "content_block": block.model_dump()}

    def _block_delta(self, delta: dict[str, Any], index: int | None = None) -> NamedEvent:
        index = len(self.content) - 1 if index is None else index
        data = {"type": "content_block_delta", "index": index, "delta": delta}
        return "content_block_delta", data

    def _close(self) -> list[NamedEvent]:
        if not self.open:
            return []
        self.open = False
        index = len(self.content) - 1
        block = self.content[index]
        if isinstance(block, ToolUseOut):
            call = next(i for i, b in self.blocks.items() if b == index)
            block.input = _arguments(self.arguments[call])
        return [("content_block_stop", {"type": "content_block_stop", "index": index})]

    def _end(self, usage: TokenUsage) -> list[NamedEvent]:
        self.usage = MessagesUsage(
            input_tokens=usage.prompt_tokens - usage.cached_tokens,
            output_tokens=usage.completion_tokens,
            cache_read_input_tokens=usage.cached_tokens,
        )
        delta = {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence}
        return [
            (
                "message_delta",
                {"type": "message_delta", "delta": delta, "usage": self.usage.model_dump()},
            ),
            ("message_stop", {"type": "message_stop"}),
        ]


def _arguments(text: str) -> dict[str, Any]:
    """A call's arguments as its ``input`` object; the text as written kept under ``arguments``
    when it is not one (a call the model wrote unconstrained)."""
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {"arguments": text}
    return value if isinstance(value, dict) else {"arguments": text}
