"""The Responses API's input in chat's terms: input items (a string is one user message) become
the chat messages the template renders, as chat would get the same conversation. A stored
conversation is kept as items too (its output items are valid input items), so one function
reads both."""

from __future__ import annotations

from typing import Any

from server.errors import BadRequest


def input_items(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The input as a list of items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return list(value)


def chat_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as chat messages: text parts joined, calls on an assistant message (calls in a
    row on one), each call's output a ``tool`` message. A 400 naming the item otherwise."""
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{where} must be an object", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise BadRequest(
                    f"{where}.role must be user, assistant, system or developer, got {role!r}",
                    param=f"{where}.role",
                )
            messages.append(
                {
                    "role": "system" if role == "developer" else role,
                    "content": _text(item.get("content"), f"{where}.content"),
                }
            )
        elif kind == "function_call":
            call = {
                "id": _string(item, "call_id", where),
                "type": "function",
                "function": {
                    "name": _string(item, "name", where),
                    "arguments": _string(item, "arguments", where),
                },
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": _string(item, "call_id", where),
                    "content": output if isinstance(output, str) else _text(output, where),
                }
            )
        else:
            raise BadRequest(
                f"{where}.type {kind!r} is not supported (message, function_call, "
                "function_call_output)",
                param=f"{where}.type",
            )
    return messages


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where} must be a string or a list of text parts", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(
            part.get("text"), str
        ):
            raise BadRequest(
                f"{where}[{j}]: only text parts are supported (input_text), got {kind!r}",
                param=f"{where}[{j}]",
            )
        texts.append(part["text"])
    # Joined with a newline, as chat joins text parts.
    return "\n".join(texts)


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise BadRequest(f"{where}.{key} must be a string", param=f"{where}.{key}")
    return value
