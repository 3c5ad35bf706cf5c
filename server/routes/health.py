"""GET /health (200 once serving, 503 while loading or draining) and GET /metrics. Both stay
open without an API key, for load balancers and Prometheus."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine import cpu_blas
from server.routes.deps import state_of

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    state = state_of(request)
    ranks = {"ranks": state.parallel.ranks()} if state.parallel is not None else {}
    if state.parallel is not None and state.parallel.fault:
        body = {"status": "error", "error": state.parallel.fault}
        return JSONResponse(body | ranks, status_code=503)
    if state.admission is not None and state.admission.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not state.ready:
        status = "error" if state.load_error else "loading"
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)
    blas = cpu_blas.current_report()  # which BLAS the CPU's matmuls run on (Linux)
    return JSONResponse({"status": "ok"} | ranks | ({"cpu_blas": blas.as_dict()} if blas else {}))


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    registry = state_of(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
