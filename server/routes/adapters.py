"""LoRA adapters over HTTP: upload (multipart), list, get, delete; and vLLM's load/unload
aliases, which read a folder under --adapter-dir."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from fastapi.responses import JSONResponse

from server.adapter_service import AdapterService
from server.errors import BadRequest, NotFound, TooLarge
from server.protocol import LoadLoRARequest, UnloadLoRARequest
from server.routes.deps import state_of

router = APIRouter()


def service(request: Request) -> AdapterService:
    state = state_of(request)
    if state.adapters is None:
        raise NotFound("LoRA adapters are turned off on this server (--max-loras 0)")
    return state.adapters


@router.post("/v1/adapters", status_code=201)
async def upload(
    request: Request,
    name: Annotated[str, Form()],
    config: Annotated[UploadFile, File()],
    weights: Annotated[UploadFile, File()],
) -> JSONResponse:
    svc = service(request)
    limit = svc.max_bytes
    config_bytes = await config.read(limit + 1)
    weights_bytes = await weights.read(limit + 1)
    size = len(config_bytes) + len(weights_bytes)
    if size > limit:
        raise TooLarge(f"the adapter is over {limit} bytes (--max-adapter-bytes)")
    version = await asyncio.to_thread(svc.register, name, config_bytes, weights_bytes)
    return JSONResponse(svc.describe(version), status_code=201)


@router.get("/v1/adapters")
async def list_adapters(request: Request) -> dict:
    svc = service(request)
    return {"object": "list", "data": [svc.describe(v) for v in svc.registry.list()]}


@router.get("/v1/adapters/{name}")
async def get_adapter(name: str, request: Request) -> dict:
    return service(request).describe(service(request).get(name))


@router.delete("/v1/adapters/{name}")
async def delete_adapter(name: str, request: Request) -> dict:
    svc = service(request)
    await asyncio.to_thread(svc.unregister, name)
    return {"id": name, "object": "adapter", "deleted": True}


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRARequest, request: Request) -> Response:
    svc = service(request)
    try:
        folder = svc.allowed_folder(Path(body.lora_path))
        files = svc.read_folder(folder)
    except (OSError, ValueError) as e:  # a NUL byte, a name too long for the file system
        reason = getattr(e, "strerror", None) or str(e)
        raise BadRequest(f"lora_path is not a usable path: {reason}", param="lora_path") from e
    version = await asyncio.to_thread(svc.register, body.lora_name, *files)
    return JSONResponse(svc.describe(version))


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRARequest, request: Request) -> dict:
    await asyncio.to_thread(service(request).unregister, body.lora_name)
    return {"id": body.lora_name, "object": "adapter", "deleted": True}
