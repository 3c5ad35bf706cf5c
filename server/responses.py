"""Building OpenAI's response bodies from choice events: whole responses and stream chunks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.outputs import TokenLogprob
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)
from server.serving import ChoiceEvent, OpenAIServing, PreparedRequest


@dataclass(slots=True)
class ChoiceTotals:
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


class Accumulator:
    """Collects the events of every choice of one request, for a whole response and usage."""

    def __init__(self, prepared: PreparedRequest) -> None:
        self.prepared = prepared
        self.choices = [ChoiceTotals() for _ in range(prepared.n)]
        self.cached_tokens = 0

    def add(self, event: ChoiceEvent) -> None:
        c = self.choices[event.index]
        c.text.append(event.text)
        c.tokens += len(event.token_ids)
        c.logprobs.extend(event.logprobs)
        c.finish_reason = event.finish_reason or c.finish_reason
        self.cached_tokens = max(self.cached_tokens, event.num_cached_tokens)

    def usage(self) -> Usage:
        prompt = len(self.prepared.prompt_ids)
        completion = sum(c.tokens for c in self.choices)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens),
        )


class ResponseBuilder:
    """Chat and completions bodies in OpenAI's exact shapes."""

    def __init__(self, serving: OpenAIServing, prepared: PreparedRequest) -> None:
        self.serving = serving
        self.prepared = prepared
        self.created = int(time.time())
        self.model = prepared.served.name

    def _envelope(self) -> dict:
        """The fields every body and chunk of one response shares."""
        return {
            "id": self.prepared.request_id,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.serving.fingerprint,
        }

    # -- logprobs -----------------------------------------------------------------------------

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        text = self.serving.token_text(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    def chat_logprobs(self, items: list[TokenLogprob]) -> ChatLogprobs | None:
        if self.prepared.params.logprobs is None:
            return None
        content = []
        for lp in items:
            top = self._top(lp.token_id, lp.logprob)
            alternatives = [self._top(t, v) for t, v in lp.top]
            content.append(ChatTokenLogprob(**top.model_dump(), top_logprobs=alternatives))
        return ChatLogprobs(content=content)

    def completion_logprobs(self, items: list[TokenLogprob], offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for lp in items:
            text = self.serving.token_text(lp.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self.serving.token_text(t): v for t, v in lp.top})
            out.text_offset.append(offset)
            offset += len(text)
        return out

    # -- whole responses ----------------------------------------------------------------------

    def chat_response(self, acc: Accumulator) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content="".join(c.text)),
                logprobs=self.chat_logprobs(c.logprobs),
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(acc.choices)
        ]
        return ChatCompletionResponse(
            **self._envelope(),
            choices=choices,
            usage=acc.usage(),
        )

    def completion_response(self, acc: Accumulator) -> CompletionResponse:
        wants = self.prepared.params.logprobs is not None
        choices = [
            CompletionChoice(
                index=i,
                text="".join(c.text),
                logprobs=self.completion_logprobs(c.logprobs, 0) if wants else None,
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(acc.choices)
        ]
        return CompletionResponse(
            **self._envelope(),
            choices=choices,
            usage=acc.usage(),
        )

    # -- stream chunks ------------------------------------------------------------------------

    def chat_chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return ChatCompletionChunk(
            **self._envelope(),
            choices=choices,
            usage=usage,
        ).model_dump_json(exclude_unset=False)

    def chat_role_chunk(self, index: int) -> str:
        return self.chat_chunk(
            [ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))]
        )

    def chat_event_chunk(self, event: ChoiceEvent) -> str | None:
        if not event.text and not event.finish_reason and not event.logprobs:
            return None
        delta = DeltaMessage(content=event.text) if event.text else DeltaMessage()
        choice = ChatChunkChoice(
            index=event.index,
            delta=delta,
            logprobs=self.chat_logprobs(event.logprobs),
            finish_reason=event.finish_reason,
        )
        return self.chat_chunk([choice])

    def completion_chunk(
        self, event: ChoiceEvent | None, usage: Usage | None = None, offset: int = 0
    ) -> str | None:
        choices = []
        if event is not None:
            if not event.text and not event.finish_reason and not event.logprobs:
                return None
            wants = self.prepared.params.logprobs is not None
            choices.append(
                CompletionChoice(
                    index=event.index,
                    text=event.text,
                    logprobs=self.completion_logprobs(event.logprobs, offset) if wants else None,
                    finish_reason=event.finish_reason,
                )
            )
        return CompletionResponse(
            **self._envelope(),
            choices=choices,
            usage=usage,
        ).model_dump_json()
