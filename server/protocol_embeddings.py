"""The wire of ``POST /v1/embeddings``: OpenAI's request and response (pydantic v2)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.protocol import TextBody


class EmbeddingRequest(TextBody):
    """OpenAI's fields, and vLLM's ``truncate_prompt_tokens`` (-1: the model's limit).

    ``input`` is a string, a list of strings, a list of token ids or a list of such lists; its
    shape is checked by ``server.api.openai_embeddings``, which names the index at fault."""

    model_config = ConfigDict(extra="allow")

    model: str
    input: Any
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
