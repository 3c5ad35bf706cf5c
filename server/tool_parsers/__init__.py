"""Tool calls in model output, one module per family's syntax, and the grammar that makes a
model write one (``grammar.py``). The chat template says which family a model speaks.

How serving uses it: ``validate_tools`` (validation.py) on the request, a 400 from its
ToolSpecError; ``parser_for_template`` once per model; for ``required`` or a named function,
``tool_call_grammar(parser, tools, tool_choice, parallel_tool_calls,
tag_token_ids(compiler.tokenizer, parser))`` and the compiler's constraint; then
``parser.parse(text)`` on a whole reply, or one ``parser.streaming()`` per streamed choice fed
the detokenized deltas (``new_call_id()`` per call start). The text handed over must keep the
tags: detokenize without skipping special tokens where a tag is one (Mistral's control tokens).
"""

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
