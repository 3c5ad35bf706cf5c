"""What a request's structured-output fields ask for, as one engine grammar.

OpenAI's ``response_format``, vLLM's ``structured_outputs`` (and its older ``guided_*`` fields)
and llama.cpp's ``grammar`` / ``json_schema`` all become one ``GrammarSpec``; asking in two ways
at once, or for something we know and do not do, is a 400 naming the field.
"""

from __future__ import annotations

import json
from typing import Any

from engine.structured.grammar import GrammarSpec
from server.errors import BadRequest
from server.protocol import SamplingFields

# Fields clients send that we know and do not serve: each is a 400, never silently ignored.
UNSUPPORTED = {
    "functions": "the legacy `functions` field is not supported; send `tools`",
    "function_call": "the legacy `function_call` field is not supported; send `tool_choice`",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "guided_decoding_backend": "the structured-output backend is not selectable",
    "guided_whitespace_pattern": "a whitespace pattern for JSON is not supported",
}
_GUIDED = {  # vLLM's older fields, still sent by many clients
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def check_unsupported(req: SamplingFields) -> None:
    extra = req.model_extra or {}
    for name, why in UNSUPPORTED.items():
        if extra.get(name) not in (None, False):
            raise BadRequest(f"{name}: {why}", param=name)
    modalities = extra.get("modalities")
    if modalities not in (None, ["text"]):
        raise BadRequest("modalities: only text output is supported", param="modalities")
    if req.structured_outputs is not None:
        so_extra = req.structured_outputs.model_extra or {}
        for name in ("structural_tag", "whitespace_pattern", "disable_fallback"):
            if so_extra.get(name) not in (None, False):
                raise BadRequest(
                    f"structured_outputs.{name} is not supported",
                    param=f"structured_outputs.{name}",
                )


def grammar_spec(req: SamplingFields) -> tuple[GrammarSpec | None, str | None]:
    """The request's one constraint and the field that asked for it, or (None, None); a 400
    when it asks in more than one way."""
    check_unsupported(req)
    asked: list[tuple[str, GrammarSpec]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        asked.append(("response_format", GrammarSpec("json_object")))
    elif rf is not None and rf.type == "json_schema":
        asked.append(("response_format", _schema(rf.json_schema.schema_, "response_format")))
    so = req.structured_outputs
    if so is not None:
        for field, value in (
            ("json", so.json_),
            ("regex", so.regex),
            ("choice", so.choice),
            ("grammar", so.grammar),
        ):
            if value is not None:
                asked.append((f"structured_outputs.{field}", _vllm(field, value)))
        if so.json_object:
            asked.append(("structured_outputs.json_object", GrammarSpec("json_object")))
    extra = req.model_extra or {}
    for name, field in _GUIDED.items():
        if extra.get(name) is not None:
            asked.append((name, _vllm(field, extra[name], name)))
    if req.grammar is not None:
        asked.append(("grammar", GrammarSpec("gbnf", req.grammar)))
    if req.json_schema is not None:
        asked.append(("json_schema", _schema(req.json_schema, "json_schema")))
    if len(asked) > 1:
        names = ", ".join(name for name, _ in asked)
        raise BadRequest(f"ask for one output constraint, not several ({names})")
    if not asked:
        return None, None
    field, spec = asked[0]
    return spec, field


def _vllm(field: str, value: Any, param: str | None = None) -> GrammarSpec:
    param = param or f"structured_outputs.{field}"
    if field == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise BadRequest(f"{param} is not valid JSON: {e}", param=param) from None
        return _schema(value, param)
    if field == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise BadRequest(f"{param} must be a non-empty list of strings", param=param)
        return GrammarSpec.choice(value)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{param} must be a non-empty string", param=param)
    if field == "regex":
        return GrammarSpec("regex", value)
    # vLLM's grammar field takes Lark or GBNF (EBNF); llguidance reads both.
    return GrammarSpec("gbnf", value)


def _schema(schema: Any, param: str) -> GrammarSpec:
    if not isinstance(schema, dict | bool):
        raise BadRequest(f"{param}: a JSON schema must be an object", param=param)
    return GrammarSpec.json_schema(schema)
