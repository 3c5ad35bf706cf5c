"""OpenAI's Responses API over the serving core.

A request's input items (with those of the conversation ``previous_response_id`` continues) become
chat messages, and the request a ``ChatCompletionRequest`` prepared as chat's is (the same
template, tools, forced-call grammar and structured output); the deltas, read through the tool
parser when there are tools, become output items (``message`` with ``output_text``,
``function_call``) and, streamed, the Responses events, each with its ``sequence_number``.
A stored response keeps its conversation as input items, output included, in the
``ResponsesStore``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from server.api import openai_chat
from server.api.openai_tools import ToolUse
from server.api.responses_input import chat_messages, input_items
from server.errors import APIError, BadRequest, NotFound
from server.generation import ChoiceDelta, GenerationEvent, PreparedRequest, TokenUsage
from server.protocol import ChatCompletionRequest
from server.protocol_responses import (
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    MessageItem,
    OutputText,
    ResponseError,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from server.responses_store import ResponsesStore
from server.serving import Serving
from server.streaming import ClientDisconnected, EventStream, unless_disconnected
from server.tool_parsers import ArgumentsDelta, ContentDelta, ToolCallStart, new_call_id

log = logging.getLogger(__name__)

# Chat's field names in errors, as this API calls them.
_PARAMS = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
}
# Fields clients send that change nothing here (reasoning models only, or server-side caching).
_IGNORED = ("reasoning", "include", "prompt_cache_key", "truncation", "service_tier")


async def create(
    body: ResponsesRequest, request: Request, serving: Serving, store: ResponsesStore
) -> Response:
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        found = await asyncio.to_thread(store.get, body.previous_response_id)
        if found is None:
            raise NotFound(
                f"no stored response with id {body.previous_response_id!r}",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        history = found[1]
    items = history + input_items(body.input)
    prepared, tools = _prepare(body, items, serving)
    run = _Run(body, prepared, tools, items, store)
    lease = serving.admit(prepared)
    if not body.stream:
        with lease:
            events = serving.generate(prepared, lease)
            try:
                await unless_disconnected(request, _drain(run.events(events)))
            except ClientDisconnected:
                return Response(status_code=499)
        if run.failure is not None:  # stored as failed; the client gets the error itself
            raise run.failure
        return JSONResponse(run.response.model_dump())
    try:
        return EventStream(_sse(run.events(serving.generate(prepared, lease))), lease)
    except BaseException:
        lease.release()
        raise


def chat_request(body: ResponsesRequest, items: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The request in chat's terms; a 400 for what this API does not serve."""
    extra = body.model_extra or {}
    if extra.get("background"):
        raise BadRequest("background responses are not supported", param="background")
    messages = chat_messages(items)
    if body.instructions:
        messages.insert(0, {"role": "system", "content": body.instructions})
    if not messages:
        raise BadRequest("input is empty", param="input")
    chat: dict[str, Any] = {
        "model": body.model,
        "messages": messages,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_completion_tokens": body.max_output_tokens,
        "parallel_tool_calls": body.parallel_tool_calls,
    }
    if body.tools:
        chat["tools"] = [
            {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
            for t in body.tools
        ]
    if isinstance(body.tool_choice, str):
        chat["tool_choice"] = body.tool_choice
    elif body.tool_choice is not None:
        chat["tool_choice"] = {"type": "function", "function": {"name": body.tool_choice.name}}
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise BadRequest("text.format.schema is required for json_schema", "text.format")
        schema = {"name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict}
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BadRequest(f"{where}: {first['msg']}", param=where) from None


def _prepare(
    body: ResponsesRequest, items: list[dict[str, Any]], serving: Serving
) -> tuple[PreparedRequest, ToolUse | None]:
    """Prepared as chat prepares; an error names this API's field, not chat's."""
    try:
        return openai_chat.prepare(chat_request(body, items), serving, id_prefix="resp")
    except APIError as e:
        if e.param is None:
            raise
        param = _PARAMS.get(e.param) or e.param
        if param.startswith("tools"):  # this API's tools have no ``function`` wrapper
            param = param.replace(".function", "")
        e.message, e.param = e.message.replace(e.param, param), param
        raise


# -- the reply ------------------------------------------------------------------------------


class _Run:
    """One response as it is generated: its output items, grown from the deltas, and the
    Responses events that tell a streaming client how they grow (without sequence numbers).
    Stored and forgotten as ``running`` once it ends, however it ends."""

    def __init__(
        self,
        body: ResponsesRequest,
        prepared: PreparedRequest,
        tools: ToolUse | None,
        items: list[dict[str, Any]],
        store: ResponsesStore,
    ) -> None:
        self.body, self.prepared, self.items, self.store = body, prepared, items, store
        self.parser = tools.parser.streaming() if tools is not None else None
        fmt = body.text.format if body.text is not None and body.text.format else None
        self.response = ResponseObject(
            id=prepared.request_id,
            status="in_progress",
            instructions=body.instructions,
            max_output_tokens=body.max_output_tokens,
            model=prepared.model,
            parallel_tool_calls=body.parallel_tool_calls,
            previous_response_id=body.previous_response_id,
            store=body.store,
            temperature=body.temperature,
            top_p=body.top_p,
            text={"format": fmt.model_dump(exclude_none=True, by_alias=True)}
            if fmt
            else {"format": {"type": "text"}},
            tool_choice=body.tool_choice.model_dump()
            if body.tool_choice is not None and not isinstance(body.tool_choice, str)
            else (body.tool_choice or "auto"),
            tools=[t.model_dump(exclude_none=True) for t in body.tools or []],
            metadata=body.metadata or {},
        )
        self.open: MessageItem | FunctionCallItem | None = None
        self.calls: dict[int, FunctionCallItem] = {}  # the parser's call index -> its item
        self.cancel = asyncio.Event()
        self.output_tokens = 0  # the usage of a run cut short, which gets no TokenUsage
        self.failure: Exception | None = None

    @property
    def output(self) -> list[MessageItem | FunctionCallItem]:
        return self.response.output

    def _snapshot(self, kind: str) -> dict[str, Any]:
        return {"type": kind, "response": self.response.model_dump()}

    async def events(self, deltas: AsyncIterator[GenerationEvent]) -> AsyncGenerator[dict, None]:
        """The whole run as events; the response object is final once they end."""
        self.store.running[self.response.id] = self
        try:
            yield self._snapshot("response.created")
            yield self._snapshot("response.in_progress")
            finish = None
            async with aclosing(deltas):
                async for event in deltas:
                    if isinstance(event, TokenUsage):
                        self.response.usage = ResponseUsage(
                            input_tokens=event.prompt_tokens,
                            input_tokens_details=InputTokensDetails(
                                cached_tokens=event.cached_tokens
                            ),
                            output_tokens=event.completion_tokens,
                            total_tokens=event.total_tokens,
                        )
                        continue
                    self.output_tokens += len(event.token_ids)
                    for out in self._feed(event):
                        yield out
                    finish = event.finish_reason or finish
                    if self.cancel.is_set():
                        finish = "abort"
                        break
            for out in self._close():
                yield out
            self._conclude(finish)
        except Exception as e:
            self.failure = e
            self.response.status = "failed"
            if isinstance(e, APIError):
                self.response.error = ResponseError(code=e.type, message=e.message)
            else:
                log.exception("response failed")
                self.response.error = ResponseError(
                    code="server_error", message=f"{type(e).__name__}: {e}"
                )
            await self._keep()
            yield self._snapshot("response.failed")
            return
        finally:
            self.store.running.pop(self.response.id, None)
        await self._keep()
        yield self._snapshot(
            "response.completed" if self.response.status == "completed" else "response.incomplete"
        )

    def _conclude(self, finish: str | None) -> None:
        r = self.response
        if finish == "length":
            r.status = "incomplete"
            r.incomplete_details = IncompleteDetails(reason="max_output_tokens")
            for item in r.output:
                item.status = "incomplete"
        elif finish == "abort":
            r.status = "cancelled"
            if r.usage is None:
                prompt = self.prepared.num_prompt_tokens
                r.usage = ResponseUsage(
                    input_tokens=prompt,
                    input_tokens_details=InputTokensDetails(),
                    output_tokens=self.output_tokens,
                    total_tokens=prompt + self.output_tokens,
                )
        else:
            r.status = "completed"

    async def _keep(self) -> None:
        """Store the response, off the event loop (SQLite commits wait for the disk)."""
        if not self.body.store:
            return
        output = [item.model_dump() for item in self.output]
        body = self.response.model_dump()
        await asyncio.to_thread(self.store.put, self.response.id, body, self.items + output)

    def _feed(self, delta: ChoiceDelta) -> list[dict[str, Any]]:
        if self.parser is None:
            parsed = [ContentDelta(delta.text)] if delta.text else []
        else:
            parsed = self.parser.feed(delta.text) if delta.text else []
            if delta.finish_reason:
                parsed += self.parser.finish()
        out: list[dict[str, Any]] = []
        for event in parsed:
            if isinstance(event, ContentDelta) and event.text:
                out += self._text(event.text)
            elif isinstance(event, ToolCallStart):
                out += self._close()
                item = FunctionCallItem(
                    id=_item_id("fc"),
                    call_id=new_call_id(),
                    name=event.name,
                    arguments="",
                    status="in_progress",
                )
                self.calls[event.index] = self.open = item
                out.append(self._added(item))
            elif isinstance(event, ArgumentsDelta) and event.text:
                item = self.calls[event.index]
                item.arguments += event.text
                out.append(
                    {
                        "type": "response.function_call_arguments.delta",
                        "item_id": item.id,
                        "output_index": self.output.index(item),
                        "delta": event.text,
                    }
                )
        return out

    def _text(self, text: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        item = self.open
        if not isinstance(item, MessageItem):
            out += self._close()
            item = self.open = MessageItem(id=_item_id("msg"), status="in_progress")
            out.append(self._added(item))
            item.content.append(OutputText(text=""))
            out.append(
                {
                    "type": "response.content_part.added",
                    "item_id": item.id,
                    "output_index": len(self.output) - 1,
                    "content_index": 0,
                    "part": OutputText(text="").model_dump(),
                }
            )
        item.content[0].text += text
        out.append(
            {
                "type": "response.output_text.delta",
                "item_id": item.id,
                "output_index": len(self.output) - 1,
                "content_index": 0,
                "delta": text,
            }
        )
        return out

    def _added(self, item: MessageItem | FunctionCallItem) -> dict[str, Any]:
        self.output.append(item)
        return {
            "type": "response.output_item.added",
            "output_index": len(self.output) - 1,
            "item": item.model_dump(),
        }

    def _close(self) -> list[dict[str, Any]]:
        """The open item's closing events."""
        item, self.open = self.open, None
        if item is None:
            return []
        index = self.output.index(item)
        item.status = "completed"
        out: list[dict[str, Any]] = []
        if isinstance(item, MessageItem):
            part = item.content[0]
            where = {"item_id": item.id, "output_index": index, "content_index": 0}
            out.append({"type": "response.output_text.done", **where, "text": part.text})
            out.append({"type": "response.content_part.done", **where, "part": part.model_dump()})
        else:
            out.append(
                {
                    "type": "response.function_call_arguments.done",
                    "item_id": item.id,
                    "output_index": index,
                    "arguments": item.arguments,
                }
            )
        out.append(
            {"type": "response.output_item.done", "output_index": index, "item": item.model_dump()}
        )
        return out


def _item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


async def _drain(events: AsyncGenerator[dict, None]) -> None:
    async with aclosing(events):
        async for _ in events:
            pass


async def _sse(events: AsyncGenerator[dict, None]) -> AsyncGenerator[tuple[str, str], None]:
    """Each event with its ``sequence_number``, in the order sent, named by its type (an
    ``event:`` line, as OpenAI sends them)."""
    async with aclosing(events):
        seq = 0
        async for event in events:
            yield event["type"], json.dumps({**event, "sequence_number": seq})
            seq += 1


def stored(store: ResponsesStore, response_id: str) -> dict[str, Any]:
    """A stored response, or one still running as it stands now."""
    run = store.running.get(response_id)
    if run is not None:
        return run.response.model_dump()
    found = store.get(response_id)
    if found is None:
        raise NotFound(f"no stored response with id {response_id!r}", param="response_id")
    return found[0]


def cancel(store: ResponsesStore, response_id: str) -> dict[str, Any]:
    """Stop a running response; it ends ``cancelled`` at its next token."""
    run = store.running.get(response_id)
    if run is None:
        if store.get(response_id) is not None:
            raise BadRequest(
                f"response {response_id!r} is not running; only a running one can be cancelled",
                param="response_id",
            )
        raise NotFound(f"no running response with id {response_id!r}", param="response_id")
    run.cancel.set()
    return {**run.response.model_dump(), "status": "cancelled"}
