"""POST /v1/responses and the stored responses: GET and DELETE /v1/responses/{id}, and
POST /v1/responses/{id}/cancel for a running one."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.api import openai_responses
from server.errors import Unavailable
from server.protocol_responses import DeletedResponse, ResponsesRequest
from server.responses_store import ResponsesStore
from server.routes.deps import serving_of, state_of

router = APIRouter()


def store_of(request: Request) -> ResponsesStore:
    store = state_of(request).responses
    if store is None:
        raise Unavailable("the model is still loading")
    return store


@router.post("/v1/responses")
async def create(body: ResponsesRequest, request: Request) -> Response:
    serving = serving_of(request)
    return await openai_responses.create(body, request, serving, store_of(request))


@router.get("/v1/responses/{response_id}")
def get(response_id: str, request: Request) -> dict:
    return openai_responses.stored(store_of(request), response_id)


@router.delete("/v1/responses/{response_id}")
def delete(response_id: str, request: Request) -> DeletedResponse:
    store = store_of(request)
    openai_responses.stored(store, response_id)  # 404 unless stored
    store.delete(response_id)
    return DeletedResponse(id=response_id)


@router.post("/v1/responses/{response_id}/cancel")
async def cancel(response_id: str, request: Request) -> dict:
    return openai_responses.cancel(store_of(request), response_id)
