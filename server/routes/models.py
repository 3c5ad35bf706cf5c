"""GET /v1/models: the base model (adapters will be listed here with their parent)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.protocol import ModelCard, ModelList
from server.routes.deps import serving_of, state_of

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    serving = serving_of(request)
    created = int(state_of(request).started)
    card = ModelCard(id=serving.served_name, created=created, max_model_len=serving.max_model_len)
    adapters = [
        ModelCard(id=v.name, created=int(v.created), parent=serving.served_name,
                  max_model_len=serving.max_model_len)
        for v in (serving.registry.list() if serving.registry else [])
    ]  # fmt: skip
    return ModelList(data=[card, *adapters])
