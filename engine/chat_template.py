"""Rendering a model's chat template the way transformers does.

Chat templates are Jinja programs shipped with the model, so the rendering rules are part of the
model's prompt format: a prompt that differs from transformers' by one newline is a different
prompt. We therefore mirror `transformers.utils.chat_template_utils`: a sandboxed, immutable
environment with `trim_blocks` and `lstrip_blocks`, loop controls, `raise_exception`,
`strftime_now`, a `tojson` that keeps non-ASCII text and does not HTML-escape, and the
`{% generation %}` tag (which only marks assistant text for training masks, so its body renders as
is). Every failure, at compile or at render, becomes a `ChatTemplateError`: a template error is a
bad request or a bad model, never a server crash with a Jinja traceback.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The chat template could not be compiled or rendered; the message says why."""


class _TemplateRaised(Exception):
    """What `raise_exception()` throws inside the template, so its message reaches the caller."""


def _raise_exception(message: str) -> NoReturn:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Jinja's own `tojson` HTML-escapes `<>&'`; a prompt must carry the JSON unchanged."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` renders its body; templates that mark assistant
    turns for transformers' `return_assistant_tokens_mask` must still compile here."""

    tags = frozenset({"generation"})

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)  # the `generation` name
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()

# Errors a template can provoke from the data it is given (a missing key, a None where it wants
# a string, ...). They are the template's or the request's fault, so they are reported, not raised.
_RENDER_ERRORS = (
    jinja2.TemplateError,
    _TemplateRaised,
    TypeError,
    ValueError,
    KeyError,
    IndexError,
    AttributeError,
    ZeroDivisionError,
)


class ChatTemplate:
    """One compiled chat template. Compiling is the slow part, so `compile_chat_template` caches
    these by source text; rendering is cheap and thread-safe (the environment is immutable)."""

    __slots__ = ("_template", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        try:
            self._template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(
                f"chat template syntax error at line {exc.lineno}: {exc.message}"
            ) from None

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        bos_token: str = "",
        eos_token: str = "",
        **variables: Any,
    ) -> str:
        """The prompt text; `variables` (e.g. `tools`, `documents`) are passed to the template."""
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token,
                eos_token=eos_token,
                **variables,
            )
        except _TemplateRaised as exc:
            raise ChatTemplateError(f"chat template rejected the request: {exc}") from None
        except _RENDER_ERRORS as exc:
            raise ChatTemplateError(
                f"chat template failed to render: {type(exc).__name__}: {exc}"
            ) from None


@lru_cache(maxsize=32)
def compile_chat_template(source: str) -> ChatTemplate:
    """A cached `ChatTemplate(source)`; raises `ChatTemplateError` on a syntax error."""
    return ChatTemplate(source)


def render_chat_template(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **variables: Any,
) -> str:
    """Compile (cached) and render in one call."""
    return compile_chat_template(source).render(
        messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
        **variables,
    )
