"""The fine-tuning jobs API: create, list, get, events, checkpoints, cancel."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request

from server.errors import BadRequest
from server.routes.files import fine_tuning_of, listing, page_params

router = APIRouter()


@router.post("/v1/fine_tuning/jobs")
async def create_job(request: Request) -> dict:
    svc = fine_tuning_of(request)
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not JSON: {e}") from None
    job = await asyncio.to_thread(svc.create, body)
    return job.describe()


@router.get("/v1/fine_tuning/jobs")
async def list_jobs(request: Request, limit: int | None = None, after: str | None = None) -> dict:
    jobs, more = fine_tuning_of(request).jobs.list(page_params(limit, 20), after)
    return listing([j.describe() for j in jobs], more)


@router.get("/v1/fine_tuning/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> dict:
    return fine_tuning_of(request).job(job_id).describe()


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def job_events(
    job_id: str, request: Request, limit: int | None = None, after: str | None = None
) -> dict:
    svc = fine_tuning_of(request)
    svc.job(job_id)
    return listing(*svc.jobs.events(job_id, page_params(limit, 20, 10_000), after))


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
async def job_checkpoints(
    job_id: str, request: Request, limit: int | None = None, after: str | None = None
) -> dict:
    svc = fine_tuning_of(request)
    svc.job(job_id)
    return listing(*svc.jobs.checkpoints(job_id, page_params(limit, 10), after))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request) -> dict:
    job = await asyncio.to_thread(fine_tuning_of(request).cancel, job_id)
    return job.describe()
