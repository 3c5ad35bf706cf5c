"""OpenAI chat completions over the serving core: a ``ChatCompletionRequest`` becomes a
``GenerationRequest``; the events become a ``chat.completion`` body or ``chat.completion.chunk``
events (a role chunk per choice first, then one chunk per visible delta, then the usage)."""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace

from fastapi import Request, Response

from engine.outputs import TokenLogprob
from server.api.openai_common import (
    Collected,
    Reply,
    generation_request,
    is_empty,
    respond,
    split_finish,
    usage_of,
)
from server.api.openai_tools import (
    CallStream,
    ToolUse,
    forced_grammar,
    template_messages,
    tool_use,
    whole_calls,
)
from server.errors import BadRequest
from server.generation import ChoiceDelta, GenerationEvent, PreparedRequest, TokenUsage
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
    Usage,
)
from server.serving import Serving


def prompt_ids(
    serving: Serving, body: ChatCompletionRequest, use: ToolUse | None = None
) -> list[int]:
    """The messages through the model's chat template (also what /tokenize counts); tools go
    to the template as transformers passes them."""
    messages = template_messages(body)
    extra = {"tools": use.tools} if use is not None and use.reads_calls else {}
    return serving.chat_prompt(messages, body.add_generation_prompt, **extra)


async def create(body: ChatCompletionRequest, request: Request, serving: Serving) -> Response:
    prepared, reads = prepare(body, serving)
    return await respond(
        request,
        serving,
        body,
        prepared,
        functools.partial(chunks, tools=reads),
        functools.partial(response, tools=reads),
    )


def prepare(
    body: ChatCompletionRequest, serving: Serving, id_prefix: str = "chatcmpl"
) -> tuple[PreparedRequest, ToolUse | None]:
    """The request checked and in the core's terms, with its tools when the reply is read for
    calls (other APIs that translate into chat messages prepare through here too)."""
    use = tool_use(body, serving)
    spec = generation_request(
        body,
        prompt_ids(serving, body, use),
        id_prefix=id_prefix,
        prompt_field="messages",
        max_tokens=body.max_completion_tokens or body.max_tokens,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )
    if use is not None and (forced := forced_grammar(use, serving)) is not None:
        if spec.grammar is not None:
            raise BadRequest(
                f"tool_choice forces a call; it cannot be combined with {spec.grammar_field}",
                param="tool_choice",
            )
        spec = replace(spec, grammar=forced, grammar_field="tool_choice")
    reads = use if use is not None and use.reads_calls else None
    if reads is not None:  # the parser must see its tags, even where they are control tokens
        spec = replace(spec, keep_tokens=serving.special_tags(reads.parser.tags))
    return serving.prepare(spec), reads


def response(reply: Reply, got: Collected, tools: ToolUse | None = None) -> ChatCompletionResponse:
    choices = []
    for i, c in enumerate(got.choices):
        text, finish, calls = "".join(c.text), c.finish_reason, None
        if tools is not None:
            parsed = tools.parser.parse(text)
            text, calls = parsed.content, whole_calls(parsed) or None
            if calls and finish == "stop":
                finish = "tool_calls"
        choices.append(
            ChatChoice(
                index=i,
                message=AssistantMessage(content=text, tool_calls=calls),
                logprobs=_logprobs(reply, c.logprobs),
                finish_reason=finish,
            )
        )
    return ChatCompletionResponse(**reply.envelope(), choices=choices, usage=usage_of(got.usage))


async def chunks(
    reply: Reply,
    events: AsyncIterator[GenerationEvent],
    include_usage: bool,
    tools: ToolUse | None = None,
) -> AsyncGenerator[str, None]:
    for i in range(reply.prepared.num_choices):
        role = DeltaMessage(role="assistant", content="")
        yield _chunk(reply, [ChatChunkChoice(index=i, delta=role)])
    calls = (
        [CallStream(tools.parser.streaming()) for _ in range(reply.prepared.num_choices)]
        if tools
        else None
    )
    async for event in events:
        if isinstance(event, ChoiceDelta) and calls is not None:
            for chunk in _tool_chunks(reply, event, calls[event.index]):
                yield chunk
        elif isinstance(event, ChoiceDelta):
            if event.text and event.finish_reason:
                # The last text, then the finish on its own empty delta, as OpenAI sends them:
                # clients that stop reading at finish_reason keep the last token.
                *head, tail = split_finish(event)
                for part in (*head, tail):
                    yield _chunk(reply, [_delta_choice(reply, part)])
            elif not is_empty(event):
                yield _chunk(reply, [_delta_choice(reply, event)])
        elif isinstance(event, TokenUsage) and include_usage:
            yield _chunk(reply, [], usage=usage_of(event))


def _tool_chunks(reply: Reply, event: ChoiceDelta, stream: CallStream) -> list[str]:
    """A delta read through the tool parser: content and call fragments as their own deltas,
    the finish (``tool_calls`` once a call was made) last and alone."""
    fields = stream.deltas(stream.parser.feed(event.text)) if event.text else []
    if event.finish_reason:
        fields += stream.deltas(stream.parser.finish())
    out = []
    logprobs = _logprobs(reply, event.logprobs)
    for f in fields:
        choice = ChatChunkChoice(index=event.index, delta=DeltaMessage(**f), logprobs=logprobs)
        out.append(_chunk(reply, [choice]))
        logprobs = None  # the step's logprobs go with its first delta
    if event.finish_reason:
        finish = (
            "tool_calls" if stream.called and event.finish_reason == "stop" else event.finish_reason
        )
        out.append(
            _chunk(
                reply,
                [ChatChunkChoice(index=event.index, delta=DeltaMessage(), finish_reason=finish)],
            )
        )
    elif not fields and logprobs is not None:
        out.append(
            _chunk(
                reply, [ChatChunkChoice(index=event.index, delta=DeltaMessage(), logprobs=logprobs)]
            )
        )
    return out


def _chunk(reply: Reply, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
    return ChatCompletionChunk(**reply.envelope(), choices=choices, usage=usage).model_dump_json()


def _delta_choice(reply: Reply, delta: ChoiceDelta) -> ChatChunkChoice:
    return ChatChunkChoice(
        index=delta.index,
        delta=DeltaMessage(content=delta.text) if delta.text else DeltaMessage(),
        logprobs=_logprobs(reply, delta.logprobs),
        finish_reason=delta.finish_reason,
    )


def _logprobs(reply: Reply, items: list[TokenLogprob]) -> ChatLogprobs | None:
    if not reply.wants_logprobs:
        return None
    content = []
    for lp in items:
        top = _top(reply, lp.token_id, lp.logprob)
        alternatives = [_top(reply, t, v) for t, v in lp.top]
        content.append(ChatTokenLogprob(**top.model_dump(), top_logprobs=alternatives))
    return ChatLogprobs(content=content)


def _top(reply: Reply, token_id: int, logprob: float) -> TopLogprob:
    text = reply.token_text(token_id)
    return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))
