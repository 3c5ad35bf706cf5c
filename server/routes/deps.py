"""What handlers need from the app: the serving layer, or 503 while it is not ready."""

from __future__ import annotations

from fastapi import Request

from server.errors import Unavailable
from server.serving import Serving
from server.state import ServerState


def state_of(request: Request) -> ServerState:
    return request.app.state.cw


def serving_of(request: Request) -> Serving:
    state = state_of(request)
    if state.admission is not None and state.admission.draining:
        raise Unavailable("the server is shutting down")
    if state.serving is None:
        raise Unavailable(state.load_error or "the model is still loading")
    return state.serving
