"""OpenAI's embeddings API over the embeddings core (``server/embeddings.py``): the four shapes
of ``input`` into a list of texts and token lists, naming the index at fault; vectors into
``data`` as floats or base64 (little-endian float32, as OpenAI encodes them)."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi import Response
from fastapi.responses import JSONResponse

from server.embeddings import MAX_INPUTS, Embedder
from server.errors import BadRequest
from server.protocol_embeddings import EmbeddingRequest

_SHAPES = "a string, a list of strings, a list of token ids or a list of lists of token ids"


async def create(body: EmbeddingRequest, embedder: Embedder) -> Response:
    if body.truncate_prompt_tokens == 0:
        raise BadRequest("truncate_prompt_tokens must be -1 or positive", "truncate_prompt_tokens")
    inputs = inputs_of(body.input)
    prepared = embedder.prepare(inputs, body.dimensions, body.truncate_prompt_tokens)
    vectors = await embedder.embed(prepared)
    data = [
        {"object": "embedding", "index": i, "embedding": encode(v, body.encoding_format)}
        for i, v in enumerate(vectors)
    ]
    usage = {"prompt_tokens": prepared.num_tokens, "total_tokens": prepared.num_tokens}
    return JSONResponse({"object": "list", "data": data, "model": body.model, "usage": usage})


def encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def inputs_of(value: Any) -> list[str | list[int]]:
    """OpenAI's ``input`` as a list of items, each a text or a list of token ids; a 400 naming
    every item that is neither."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise BadRequest(f"input must be {_SHAPES}, not {_kind(value)}", param="input")
    if not value:
        raise BadRequest("input is an empty list: give at least one text or token list", "input")
    if len(value) > MAX_INPUTS:
        raise BadRequest(f"input has {len(value)} items; at most {MAX_INPUTS} per request", "input")
    if all(_is_token(v) for v in value):
        return [value]  # one input given as token ids
    problems = []
    for i, item in enumerate(value):
        if isinstance(item, list) and not item:
            problems.append(f"input[{i}] is an empty list")
        elif isinstance(item, list):
            bad = [j for j, t in enumerate(item) if not _is_token(t)]
            if bad:
                problems.append(f"input[{i}][{bad[0]}] is {_kind(item[bad[0]])}, not a token id")
        elif not isinstance(item, str):
            problems.append(f"input[{i}] is {_kind(item)}: each item must be a string or a list "
                            "of token ids")  # fmt: skip
    if problems:
        more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise BadRequest("; ".join(problems[:10]) + more, param="input")
    return value


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    """How a JSON value reads in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return "a string"
