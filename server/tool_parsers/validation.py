"""Checks on a request's ``tools`` and ``tool_choice`` before anything is queued: every
problem at once, each with the path of the field at fault, for the server to answer 400."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from llguidance import LLMatcher

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what OpenAI accepts as a function name
CHOICES = ("none", "auto", "required")
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class ToolSpecError(ValueError):
    """Bad ``tools`` or ``tool_choice``; ``problems`` holds (path, message) pairs, ``param``
    the path when exactly one field is at fault."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        self.param = problems[0][0] if len(problems) == 1 else None
        super().__init__("; ".join(f"{path}: {message}" for path, message in problems))


@dataclass(frozen=True, slots=True)
class Function:
    name: str
    parameters: dict[str, Any]  # a JSON schema of the arguments object


def validate_tools(tools: list[Any] | None, tool_choice: Any = None) -> list[Function]:
    """The functions ``tools`` declares (missing ``parameters`` = no arguments); raises
    ToolSpecError naming every problem in ``tools`` and ``tool_choice``."""
    problems: list[tuple[str, str]] = []
    functions: list[Function] = []
    if tools is not None and not isinstance(tools, list):
        problems.append(("tools", "must be a list"))
        tools = []
    for i, tool in enumerate(tools or []):
        function = _function(tool, f"tools[{i}]", problems)
        if function is None:
            continue
        if any(f.name == function.name for f in functions):
            problems.append((f"tools[{i}].function.name", f"{function.name!r} is declared twice"))
        functions.append(function)
    _check_choice(tool_choice, [f.name for f in functions], bool(tools), problems)
    if problems:
        raise ToolSpecError(problems)
    return functions


def chosen_functions(functions: list[Function], tool_choice: Any) -> list[Function] | None:
    """The functions a reply must call from (None when it need not call any)."""
    if tool_choice is None or tool_choice in ("none", "auto"):
        return None
    if tool_choice == "required":
        return functions
    name = tool_choice["function"]["name"]
    return [f for f in functions if f.name == name]


def _function(tool: Any, path: str, problems: list[tuple[str, str]]) -> Function | None:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        problems.append((f"{path}.type", 'only tools of type "function" are supported'))
        return None
    spec = tool.get("function")
    if not isinstance(spec, dict):
        problems.append((f"{path}.function", "must be an object with a name"))
        return None
    name = spec.get("name")
    ok = True
    if not isinstance(name, str) or not NAME.fullmatch(name):
        problems.append((f"{path}.function.name", "must be 1-64 letters, digits, _ or -"))
        ok = False
    parameters = spec.get("parameters", EMPTY_PARAMETERS)
    problem = _schema_problem(parameters)
    if problem:
        problems.append((f"{path}.function.parameters", problem))
        ok = False
    return Function(name, parameters) if ok else None


def _schema_problem(schema: Any) -> str | None:
    if not isinstance(schema, dict):
        return "must be a JSON schema object"
    if schema.get("type", "object") != "object":
        return 'must describe an object ("type": "object")'
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema)
    except Exception as e:  # llguidance raises plain exceptions on input it cannot read
        return f"not a usable JSON schema: {e}"
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    return f"not a usable JSON schema: {messages[0].strip()}" if is_error else None


def _check_choice(
    choice: Any, names: list[str], have_tools: bool, problems: list[tuple[str, str]]
) -> None:
    if choice is None or choice in ("none", "auto"):
        return
    if choice == "required":
        if not have_tools:
            problems.append(("tool_choice", '"required" needs at least one tool in tools'))
        return
    if isinstance(choice, str):
        problems.append(("tool_choice", f"must be one of {', '.join(CHOICES)} or a function"))
        return
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or name is None:
        problems.append(("tool_choice", 'must be {"type": "function", "function": {"name": ...}}'))
    elif name not in names:
        known = ", ".join(names) or "none"
        problems.append(
            ("tool_choice.function.name", f"no tool is named {name!r} (known: {known})")
        )
