"""POST /v1/messages and POST /v1/messages/count_tokens: Anthropic's Messages API, handed to
its API module (errors on these routes come in Anthropic's shape: see server.errors)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.api import anthropic_messages
from server.protocol_anthropic import CountTokensRequest, CountTokensResponse, MessagesRequest
from server.routes.deps import serving_of

router = APIRouter()


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: Request) -> Response:
    return await anthropic_messages.create(body, request, serving_of(request))


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request) -> CountTokensResponse:
    return anthropic_messages.count_tokens(body, serving_of(request))
