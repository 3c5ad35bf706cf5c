"""The Files API for training data: POST /v1/files (multipart: ``file``, ``purpose``), list, get,
GET /v1/files/{id}/content, DELETE."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response

from server.errors import BadRequest, NotFound, TooLarge, Unavailable
from server.fine_tuning.service import FineTuningService
from server.routes.deps import state_of

router = APIRouter()


def fine_tuning_of(request: Request) -> FineTuningService:
    state = state_of(request)
    if state.fine_tuning is None:
        if state.serving is None:
            raise Unavailable(state.load_error or "the model is still loading")
        if state.parallel is not None:
            raise NotFound("fine-tuning is not available with --tensor-parallel")
        raise NotFound("fine-tuning needs LoRA adapters, which are off (--max-loras 0)")
    return state.fine_tuning


def page_params(limit: int | None, default: int, most: int = 100) -> int:
    if limit is None:
        return default
    if not 1 <= limit <= most:
        raise BadRequest(f"limit must be in 1..{most}, got {limit}", param="limit")
    return limit


def listing(items: list[dict], more: bool) -> dict:
    return {
        "object": "list",
        "data": items,
        "has_more": more,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
    }


@router.post("/v1/files")
async def upload(
    request: Request, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
) -> dict:
    svc = fine_tuning_of(request)
    data = await file.read(svc.max_file_bytes + 1)
    if len(data) > svc.max_file_bytes:
        raise TooLarge(f"the file is over {svc.max_file_bytes} bytes (--max-file-bytes)")
    stored = await asyncio.to_thread(svc.upload, file.filename or "file.jsonl", purpose, data)
    return stored.describe()


@router.get("/v1/files")
async def list_files(
    request: Request,
    purpose: str | None = None,
    limit: int | None = None,
    after: str | None = None,
    order: str = "desc",
) -> dict:
    if order not in ("asc", "desc"):
        raise BadRequest(f"order must be asc or desc, got {order!r}", param="order")
    svc = fine_tuning_of(request)
    files, more = svc.files.list(purpose, page_params(limit, 10_000, 10_000), after,
                                 order == "desc")  # fmt: skip
    return listing([f.describe() for f in files], more)


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, request: Request) -> dict:
    return fine_tuning_of(request).file(file_id).describe()


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, request: Request) -> Response:
    svc = fine_tuning_of(request)
    svc.file(file_id)
    data = await asyncio.to_thread(svc.files.read, file_id)
    return Response(data, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, request: Request) -> dict:
    await asyncio.to_thread(fine_tuning_of(request).delete_file, file_id)
    return {"id": file_id, "object": "file", "deleted": True}
