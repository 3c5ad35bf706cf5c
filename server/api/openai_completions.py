"""OpenAI (legacy) completions over the serving core: a ``CompletionRequest`` becomes a
``GenerationRequest``; the events become a ``text_completion`` body or stream chunks (one per
visible delta, then the usage)."""

from __future__ import annotations

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
from server.generation import ChoiceDelta, GenerationEvent, TokenUsage
from server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from server.serving import Serving


def prompts(serving: Serving, body: CompletionRequest) -> list[list[int]]:
    """Each prompt as token ids: a string, token ids, or a batch of either (served as OpenAI
    does: n choices of each prompt, in order)."""
    prompt = body.prompt
    batch = (
        prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int)
        else [prompt]
    )
    out = []
    for i, p in enumerate(batch):
        where = "prompt" if len(batch) == 1 else f"prompt[{i}]"
        out.append(
            serving.tokenizer.encode(p) if isinstance(p, str) else serving.token_prompt(p, where)
        )
    return out


async def create(body: CompletionRequest, request: Request, serving: Serving) -> Response:
    first, *more = prompts(serving, body)
    spec = generation_request(
        body,
        first,
        id_prefix="cmpl",
        prompt_field="prompt",
        max_tokens=body.max_tokens,
        logprobs=body.logprobs,
    )
    spec = replace(spec, more_prompts=tuple(more))
    return await respond(request, serving, body, serving.prepare(spec), chunks, response)


def response(reply: Reply, got: Collected) -> CompletionResponse:
    choices = [
        CompletionChoice(
            index=i,
            text="".join(c.text),
            logprobs=_logprobs(reply, c.logprobs, 0) if reply.wants_logprobs else None,
            finish_reason=c.finish_reason,
        )
        for i, c in enumerate(got.choices)
    ]
    return CompletionResponse(**reply.envelope(), choices=choices, usage=usage_of(got.usage))


async def chunks(
    reply: Reply, events: AsyncIterator[GenerationEvent], include_usage: bool
) -> AsyncGenerator[str, None]:
    offsets = [
        0
    ] * reply.prepared.num_choices  # each choice's text so far, for logprobs' text_offset
    async for event in events:
        if isinstance(event, ChoiceDelta):
            parts = split_finish(event) if event.text and event.finish_reason else (event,)
            for part in parts:  # the last text, then the finish alone, as OpenAI sends them
                if not is_empty(part):
                    yield _chunk(reply, [_delta_choice(reply, part, offsets[part.index])])
                offsets[part.index] += len(part.text)
        elif isinstance(event, TokenUsage) and include_usage:
            yield _chunk(reply, [], usage=usage_of(event))


def _chunk(reply: Reply, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
    return CompletionResponse(**reply.envelope(), choices=choices, usage=usage).model_dump_json()


def _delta_choice(reply: Reply, delta: ChoiceDelta, offset: int) -> CompletionChoice:
    return CompletionChoice(
        index=delta.index,
        text=delta.text,
        logprobs=_logprobs(reply, delta.logprobs, offset) if reply.wants_logprobs else None,
        finish_reason=delta.finish_reason,
    )


def _logprobs(reply: Reply, items: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for lp in items:
        text = reply.token_text(lp.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({reply.token_text(t): v for t, v in lp.top})
        out.text_offset.append(offset)
        offset += len(text)
    return out
