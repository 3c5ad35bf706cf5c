"""POST /tokenize and POST /detokenize (vLLM's shapes)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.api import openai_chat
from server.errors import BadRequest
from server.protocol import (
    ChatCompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from server.routes.deps import serving_of

router = APIRouter()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    serving = serving_of(request)
    serving.check_model(body.model)
    if body.messages is not None:
        chat = ChatCompletionRequest(
            model=body.model or serving.served_name,
            messages=body.messages,
            add_generation_prompt=body.add_generation_prompt,
        )
        tokens = openai_chat.prompt_ids(serving, chat)
    else:
        tokens = serving.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=serving.max_model_len)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    serving = serving_of(request)
    serving.check_model(body.model)
    vocab = serving.loaded.config.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise BadRequest(f"token ids out of range [0, {vocab}): {bad[:10]}", param="tokens")
    return DetokenizeResponse(prompt=serving.tokenizer.decode(body.tokens))
