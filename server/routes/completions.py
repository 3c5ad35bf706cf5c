"""POST /v1/chat/completions and POST /v1/completions: each handed to its API module."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.api import openai_chat, openai_completions
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.routes.deps import serving_of

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await openai_chat.create(body, request, serving_of(request))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await openai_completions.create(body, request, serving_of(request))
