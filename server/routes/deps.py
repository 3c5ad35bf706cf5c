"""What handlers need from the app: the serving layer, or 503 while it is not ready."""

from __future__ import annotations

from fastapi import Request

from server.embeddings import Embedder
from server.errors import BadRequest, NotFound, Unavailable
from server.serving import Serving
from server.state import ServerState


def state_of(request: Request) -> ServerState:
    return request.app.state.cw


def serving_of(request: Request) -> Serving:
    state = state_of(request)
    if state.admission is not None and state.admission.draining:
        raise Unavailable("the server is shutting down")
    if state.serving is None and state.embedders:
        names = ", ".join(repr(n) for n in state.embedders)
        raise BadRequest(f"this server serves only embeddings ({names}): use POST /v1/embeddings")
    if state.serving is None:
        raise Unavailable(state.load_error or "the model is still loading")
    return state.serving


def embedder_of(request: Request, model: str) -> Embedder:
    """The embedding model ``model`` names: a 400 for a model that does not embed (the chat
    model, an adapter), a 404 for one this server does not have."""
    state = state_of(request)
    if state.admission is not None and state.admission.draining:
        raise Unavailable("the server is shutting down")
    if not state.ready:
        raise Unavailable(state.load_error or "the model is still loading")
    if (embedder := state.embedders.get(model)) is not None:
        return embedder
    serving = state.serving
    generative = serving is not None and (
        model == serving.served_name
        or (serving.registry is not None and serving.registry.resolve(model) is not None)
    )
    embedding = ", ".join(repr(n) for n in state.embedders) or "none"
    if generative:
        raise BadRequest(
            f"the model {model!r} generates text and does not serve embeddings (embedding "
            f"models here: {embedding}; serve one beside it with --embedding-model)",
            param="model",
        )
    raise NotFound(
        f"the model {model!r} does not exist (embedding models here: {embedding})",
        param="model",
        code="model_not_found",
    )
