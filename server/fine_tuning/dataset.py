"""Training files: JSONL, one example a line, in OpenAI's chat format ``{"messages": [...]}``
(an assistant message may carry ``"weight": 0`` to be shown but not learned) or the legacy
``{"prompt": ..., "completion": ...}``.

Checked twice: at upload for what the file alone says (every line parses, has one of the two
shapes, has something to learn), and when a job names it for what the model says (each example
fits the context, the chat template renders it, it has tokens to learn). Each time every bad
line is reported with its number, at once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.chat_template import ChatTemplateError
from engine.tokenizer import Tokenizer
from engine.training.data import Example, ExampleError, chat_example, completion_example

MAX_PROBLEMS = 30
ROLES = ("system", "developer", "user", "assistant")


class DatasetError(ValueError):
    def __init__(self, what: str, problems: list[str]) -> None:
        if len(problems) > MAX_PROBLEMS:
            problems = [*problems[:MAX_PROBLEMS], f"and {len(problems) - MAX_PROBLEMS} more"]
        super().__init__(f"{what}: " + "; ".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Record:
    """One line: its number (1-based) and the example it holds, as given."""

    line: int
    messages: list[dict[str, Any]] | None
    prompt: str | None = None
    completion: str | None = None


def parse_jsonl(data: bytes, what: str = "the file") -> list[Record]:
    """Every example of a JSONL training file; ``DatasetError`` names each bad line."""
    problems: list[str] = []
    records: list[Record] = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(what, [f"not UTF-8 text (byte {e.start})"]) from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            problems.append(f"line {number}: not JSON ({getattr(e, 'msg', e)})")
            continue
        record = _record(number, value, problems)
        if record is not None:
            records.append(record)
    if not records and not problems:
        problems.append("it holds no examples")
    if problems:
        raise DatasetError(what, problems)
    return records


def _record(number: int, value: Any, problems: list[str]) -> Record | None:
    where = f"line {number}"
    if not isinstance(value, dict):
        problems.append(f"{where}: not a JSON object")
        return None
    if "messages" in value:
        return _chat(number, value["messages"], problems)
    prompt, completion = value.get("prompt"), value.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            problems.append(f"{where}: the completion is empty")
            return None
        return Record(number, None, prompt, completion)
    problems.append(f'{where}: neither {{"messages": [...]}} nor {{"prompt", "completion"}}')
    return None


def _chat(number: int, messages: Any, problems: list[str]) -> Record | None:
    where = f"line {number}"
    if not isinstance(messages, list) or not messages:
        problems.append(f"{where}: messages must be a non-empty list")
        return None
    found = len(problems)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            problems.append(f"{where}: messages[{i}] is not an object")
            continue
        if m.get("role") not in ROLES:
            problems.append(f"{where}: messages[{i}].role must be one of {', '.join(ROLES)}")
        content = _text(m.get("content"))
        if content is None:
            problems.append(f"{where}: messages[{i}].content must be a string or text parts")
        if m.get("weight", 1) not in (0, 1) or isinstance(m.get("weight"), bool):
            problems.append(f"{where}: messages[{i}].weight must be 0 or 1")
        if "tool_calls" in m or "function_call" in m:
            problems.append(f"{where}: messages[{i}] has tool calls, which are not supported")
        out.append({"role": m.get("role"), "content": content, "weight": m.get("weight", 1)})
    if len(problems) > found:
        return None
    if not any(m["role"] == "assistant" and m["weight"] == 1 for m in out):
        problems.append(f"{where}: no assistant message to learn")
        return None
    return Record(number, out)


def _text(content: Any) -> str | None:
    """A string, or the text of OpenAI content parts joined by newlines (as serving does)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "\n".join(p["text"] for p in content)
    return None


def examples(records: list[Record], tokenizer: Tokenizer, max_len: int, what: str) -> list[Example]:
    """Tokenize every record; ``DatasetError`` names each one over ``max_len`` tokens, without
    tokens to learn, or that the chat template refuses."""
    problems: list[str] = []
    out = []
    for r in records:
        try:
            if r.messages is not None:
                example = chat_example(tokenizer, r.messages)
            else:
                example = completion_example(tokenizer, r.prompt, r.completion)
        except (ChatTemplateError, ExampleError) as e:
            problems.append(f"line {r.line}: {e}")
            continue
        if len(example) > max_len:
            problems.append(f"line {r.line}: {len(example)} tokens, over the context of {max_len}")
        elif example.num_learned == 0:
            problems.append(f"line {r.line}: no tokens to learn")
        else:
            out.append(example)
    if problems:
        raise DatasetError(what, problems)
    return out
