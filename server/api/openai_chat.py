"""OpenAI chat completions over the serving core: a ``ChatCompletionRequest`` becomes a
``GenerationRequest``; the events become a ``chat.completion`` body or ``chat.completion.chunk``
events (a role chunk per choice first, then one chunk per visible delta, then the usage)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

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
from server.generation import ChoiceDelta, GenerationEvent, TokenUsage
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


def prompt_ids(serving: Serving, body: ChatCompletionRequest) -> list[int]:
    """The messages through the model's chat template (also what /tokenize counts)."""
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    return serving.chat_prompt(messages, body.add_generation_prompt)


async def create(body: ChatCompletionRequest, request: Request, serving: Serving) -> Response:
    spec = generation_request(
        body,
        prompt_ids(serving, body),
        id_prefix="chatcmpl",
        prompt_field="messages",
        max_tokens=body.max_completion_tokens or body.max_tokens,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )
    return await respond(request, serving, body, serving.prepare(spec), chunks, response)


def response(reply: Reply, got: Collected) -> ChatCompletionResponse:
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content="".join(c.text)),
            logprobs=_logprobs(reply, c.logprobs),
            finish_reason=c.finish_reason,
        )
        for i, c in enumerate(got.choices)
    ]
    return ChatCompletionResponse(**reply.envelope(), choices=choices, usage=usage_of(got.usage))


async def chunks(
    reply: Reply, events: AsyncIterator[GenerationEvent], include_usage: bool
) -> AsyncGenerator[str, None]:
    for i in range(reply.prepared.n):
        role = DeltaMessage(role="assistant", content="")
        yield _chunk(reply, [ChatChunkChoice(index=i, delta=role)])
    async for event in events:
        if isinstance(event, ChoiceDelta):
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
