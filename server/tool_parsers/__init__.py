"""Tool calls in model output, one module per family's syntax, and the grammar that makes a
model write one (``grammar.py``). The chat template says which family a model speaks."""

from __future__ import annotations

from server.tool_parsers.base import (
    ArgumentsDelta,
    ContentDelta,
    Event,
    ParsedOutput,
    StreamingToolParser,
    ToolCall,
    ToolCallStart,
    ToolParser,
    new_call_id,
)
from server.tool_parsers.hermes import HermesToolParser
from server.tool_parsers.llama3 import Llama3ToolParser
from server.tool_parsers.mistral import MistralToolParser
from server.tool_parsers.plain_json import PlainJsonToolParser

__all__ = [
    "ArgumentsDelta",
    "ContentDelta",
    "Event",
    "HermesToolParser",
    "Llama3ToolParser",
    "MistralToolParser",
    "ParsedOutput",
    "PlainJsonToolParser",
    "StreamingToolParser",
    "ToolCall",
    "ToolCallStart",
    "ToolParser",
    "new_call_id",
    "parser_for_template",
]


def parser_for_template(template: str | None) -> ToolParser:
    """The parser for the syntax a chat template teaches, judged as vLLM and mlx-lm do by the
    tags it writes: ``<tool_call>`` (Hermes, Qwen), ``[TOOL_CALLS]`` (Mistral; ``[ARGS]`` for
    its newer form), ``<|python_tag|>`` or the ``ipython`` role (Llama 3.1+); bare JSON else."""
    template = template or ""
    if "<tool_call>" in template:
        return HermesToolParser()
    if "[TOOL_CALLS]" in template:
        return MistralToolParser("args" if "[ARGS]" in template else "list")
    if "<|python_tag|>" in template or "ipython" in template:
        return Llama3ToolParser()
    return PlainJsonToolParser()
