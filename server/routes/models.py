"""GET /v1/models: the base model, its adapters (with their parent) and the embedding
models."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.protocol import ModelCard, ModelList
from server.routes.deps import serving_of, state_of

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    state = state_of(request)
    created = int(state.started)
    embedders = [
        ModelCard(id=name, created=created, max_model_len=e.max_length)
        for name, e in state.embedders.items()
    ]
    if state.serving is None and embedders:  # embeddings only
        return ModelList(data=embedders)
    serving = serving_of(request)
    card = ModelCard(id=serving.served_name, created=created, max_model_len=serving.max_model_len)
    adapters = [
        ModelCard(id=v.name, created=int(v.created), parent=serving.served_name,
                  max_model_len=serving.max_model_len)
        for v in (serving.registry.list() if serving.registry else [])
    ]  # fmt: skip
    others = [c for c in embedders if c.id != serving.served_name]
    return ModelList(data=[card, *adapters, *others])
