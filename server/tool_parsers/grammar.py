"""The grammar that makes a model call a tool (``tool_choice`` ``required`` or a named
function): only the family's call syntax, the name one of the chosen functions, and the
arguments valid against that function's ``parameters`` (an inline ``%json`` schema in
llguidance's Lark).

Tags the vocabulary holds as single special tokens must be written ``<[id]>``: llguidance
gives special tokens, and added tokens shaped ``<...>`` such as Qwen 2.5's ``<tool_call>``
(which is not marked special), bytes of their own, so a quoted ``"<tool_call>"`` would never
match that token (and llguidance's mask would even offer it). Other tags are quoted, and match
the vocabulary's own tokens for them. ``tag_token_ids`` asks llguidance which is which.

The call objects are written as the families' templates render them (``json.dumps``
separators), which is also how the parsers read them back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from llguidance import LLTokenizer

from engine.structured.grammar import GrammarSpec
from server.tool_parsers.base import ToolParser
from server.tool_parsers.validation import Function, chosen_functions, validate_tools

# Arguments as the templates' ``tojson`` writes them: ", " and ": ", no other whitespace.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def tag_token_ids(tokenizer: LLTokenizer, parser: ToolParser) -> dict[str, int]:
    """The parser's tags that ``tokenizer`` holds as one special token, with their ids."""
    ids = {}
    for tag in parser.tags:
        tokens = tokenizer.tokenize_str(tag)
        if len(tokens) == 1 and tokenizer.is_special_token(tokens[0]):
            ids[tag] = tokens[0]
    return ids


def tool_call_grammar(
    parser: ToolParser,
    tools: list[Any] | None,
    tool_choice: Any,
    parallel_tool_calls: bool = True,
    tag_ids: Mapping[str, int] | None = None,
    max_calls: int | None = None,
) -> GrammarSpec | None:
    """A Lark grammar for calls in ``parser``'s syntax, or None when ``tool_choice`` does not
    force a call (``none``, ``auto``, absent). With ``parallel_tool_calls`` false, exactly one
    call; else one or more (at most ``max_calls`` if given). ``tag_ids``: the tags that are
    single special tokens (see ``tag_token_ids``). Raises ToolSpecError on bad tools or
    tool_choice."""
    if max_calls is not None and max_calls < 1:
        raise ValueError(f"max_calls must be at least 1, not {max_calls}")
    functions = chosen_functions(validate_tools(tools, tool_choice), tool_choice)
    if functions is None:
        return None
    tag_ids = dict(tag_ids or {})

    def tag(text: str) -> str:
        return f"<[{tag_ids[text]}]>" if text in tag_ids else json.dumps(text)

    family = parser.family
    if family == "hermes":
        rules = _calls(f'{tag("<tool_call>")} "\\n" fn "\\n" {tag("</tool_call>")}', '"\\n"')
        fns = _objects(functions, "arguments")
    elif family == "llama3":
        rules = _calls("fn", '"; "')
        fns = _objects(functions, "parameters")
    elif family == "mistral" and getattr(parser, "style", "list") == "args":
        rules = _calls(f"{tag('[TOOL_CALLS]')} fn", "")
        fns = _named_arguments(functions, tag("[ARGS]"))
    elif family == "mistral":
        rules = _calls("fn", '", "', f'{tag("[TOOL_CALLS]")} "["', '"]"')
        fns = _objects(functions, "arguments")
    elif family == "json":
        rules = _calls("fn", '", "', '"["', '"]"') if parallel_tool_calls else "start: fn\n"
        fns = _objects(functions, "arguments")
    else:
        raise ValueError(f"no tool-call grammar for the {family!r} family")
    if not parallel_tool_calls or max_calls == 1:
        rules = rules.replace(" (sep call)*", "")
    elif max_calls is not None:
        rules = rules.replace(" (sep call)*", f" (sep call){{0,{max_calls - 1}}}")
    return GrammarSpec("lark", "%llguidance {}\n" + rules + fns)


def _calls(call: str, separator: str, before: str = "", after: str = "") -> str:
    """``start``: one call, then (sep call)* (dropped when parallel calls are off)."""
    sep = f"sep: {separator}\n" if separator else 'sep: ""\n'
    return f"start: {before} call (sep call)* {after}\ncall: {call}\n{sep}"


def _objects(functions: list[Function], arguments_key: str) -> str:
    """``fn``: ``{"name": "<name>", "<arguments_key>": <arguments>}`` for each function."""
    rules = [f"fn: {' | '.join(f'fn_{i}' for i in range(len(functions)))}"]
    for i, f in enumerate(functions):
        head = '{"name": ' + json.dumps(f.name) + ', "' + arguments_key + '": '
        rules.append(f'fn_{i}: {json.dumps(head)} %json {_schema(f.parameters)} "}}"')
    return "\n".join(rules) + "\n"


def _named_arguments(functions: list[Function], args_tag: str) -> str:
    """``fn``: ``<name>[ARGS]<arguments>`` for each function (Mistral's newer form)."""
    rules = [f"fn: {' | '.join(f'fn_{i}' for i in range(len(functions)))}"]
    for i, f in enumerate(functions):
        rules.append(f"fn_{i}: {json.dumps(f.name)} {args_tag} %json {_schema(f.parameters)}")
    return "\n".join(rules) + "\n"


def _schema(parameters: dict[str, Any]) -> str:
    style = {**JSON_STYLE, **parameters.get("x-guidance", {})}
    return json.dumps({**parameters, "x-guidance": style}, ensure_ascii=False)
