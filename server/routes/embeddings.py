"""POST /v1/embeddings: handed to its API module, for the embedding model ``model`` names."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.api import openai_embeddings
from server.protocol_embeddings import EmbeddingRequest, EmbeddingResponse
from server.routes.deps import embedder_of

router = APIRouter()


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    return await openai_embeddings.create(body, embedder_of(request, body.model))
