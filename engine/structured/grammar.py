"""Grammars from what requests ask for (a JSON schema, any JSON object, a regex, a choice of
strings, a Lark or GBNF grammar), compiled by llguidance against the model's vocabulary.

llguidance (the Low-level Guidance library) builds a token-level matcher from the tokenizer's
own JSON, so every token the model has is judged by the bytes it spells, merges included.
Grammars are compiled once per content and validated before a request is queued; each request
gets a copy of a pristine matcher, so compiling is paid once per grammar, not per request.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from llguidance import LLMatcher, LLTokenizer
from llguidance.gbnf_to_lark import any_to_lark

KINDS = ("json_schema", "json_object", "regex", "choice", "lark", "gbnf")


class GrammarError(ValueError):
    """A grammar llguidance cannot compile, or a feature it does not support; the message
    names the problem (and, for schemas, where in the schema it is)."""


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """One constraint as a request states it. ``source``: the schema (a JSON string), regex,
    grammar text, or the choices as a JSON list; empty for ``json_object``."""

    kind: str
    source: str = ""

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool) -> GrammarSpec:
        return cls("json_schema", json.dumps(schema, sort_keys=True))

    @classmethod
    def choice(cls, options: list[str]) -> GrammarSpec:
        return cls("choice", json.dumps(list(options)))


class GrammarConstraint:
    """A request's matcher, as the engine's ``TokenConstraint``: the allowed tokens come from
    llguidance's bitmask (one bit per token id, little-endian 32-bit words)."""

    def __init__(
        self, matcher: LLMatcher, eos_token_ids: tuple[int, ...], origin: tuple | None = None
    ) -> None:
        self.matcher = matcher
        self.eos_token_ids = eos_token_ids
        self._origin = origin  # (spec, vocab size, eos ids): what compiles it again elsewhere

    def __reduce__(self):
        """Pickled (to another rank of a tensor-parallel server) as what it was compiled from;
        that process compiles it again (see ``accept_constraints``). Only a fresh constraint
        travels: one that consumed tokens would lose its state."""
        if self._origin is None or self.matcher.is_stopped():
            raise TypeError("this grammar constraint cannot be sent to another process")
        return (_compile_again, self._origin)

    def allowed(self, vocab_size: int) -> np.ndarray:
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[:vocab_size].astype(bool)
        if mask.size < vocab_size:  # the model's vocabulary is padded past the tokenizer's
            mask = np.concatenate([mask, np.zeros(vocab_size - mask.size, dtype=bool)])
        if not mask.any():  # nothing can follow: only an end of sequence is left
            mask[[t for t in self.eos_token_ids if t < vocab_size]] = True
        return mask

    def advance(self, token_id: int) -> None:
        if not self.matcher.consume_token(token_id):
            raise ValueError(f"the grammar rejected token {token_id}: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()


class GrammarCompiler:
    """Compiles and caches grammars for one tokenizer (thread-safe: the server compiles in
    worker threads, the engine thread only uses the matchers it is handed)."""

    def __init__(
        self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int], cache_size: int = 256
    ) -> None:
        self.eos_token_ids = tuple(eos_token_ids)
        self.vocab_size = vocab_size
        self.tokenizer = LLTokenizer(
            tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids) or None
        )
        self._cache: OrderedDict[GrammarSpec, LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def constraint(self, spec: GrammarSpec) -> GrammarConstraint:
        """A fresh matcher for ``spec`` (compiled on first use); GrammarError if it cannot be."""
        with self._lock:
            pristine = self._cache.get(spec)
            if pristine is not None:
                self._cache.move_to_end(spec)
        if pristine is None:
            pristine = self._compile(spec)
            with self._lock:
                self._cache[spec] = pristine
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        origin = (spec, self.vocab_size, self.eos_token_ids)
        return GrammarConstraint(pristine.deep_copy(), self.eos_token_ids, origin)

    def _compile(self, spec: GrammarSpec) -> LLMatcher:
        grammar = _grammar(spec)
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise GrammarError(_describe(spec, messages[0]))
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(_describe(spec, matcher.get_error()))
        return matcher


_received: dict = {"tokenizer": None, "compilers": {}}  # for constraints sent to this process
_received_lock = threading.Lock()


def accept_constraints(tokenizer_json: str) -> None:
    """Let this process rebuild grammar constraints pickled by another one serving the same
    model (a tensor-parallel rank): they are compiled again against ``tokenizer_json``."""
    with _received_lock:
        _received["tokenizer"] = tokenizer_json
        _received["compilers"] = {}


def _compile_again(spec: GrammarSpec, vocab_size: int, eos_token_ids: tuple[int, ...]):
    with _received_lock:
        tokenizer = _received["tokenizer"]
        if tokenizer is None:
            raise GrammarError("this process was not given a tokenizer to compile grammars with")
        key = (vocab_size, eos_token_ids)
        compiler = _received["compilers"].get(key)
        if compiler is None:
            compiler = GrammarCompiler(tokenizer, vocab_size, list(eos_token_ids))
            _received["compilers"][key] = compiler
    return compiler.constraint(spec)


def _grammar(spec: GrammarSpec) -> str:
    """The llguidance grammar for ``spec``."""
    try:
        if spec.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(spec.source)
        if spec.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"})
        if spec.kind == "regex":
            return LLMatcher.grammar_from_regex(spec.source)
        if spec.kind == "choice":
            options = json.loads(spec.source)
            if not options or not all(isinstance(o, str) for o in options):
                raise GrammarError("a choice needs a non-empty list of strings")
            return LLMatcher.grammar_from_lark("start: " + " | ".join(map(json.dumps, options)))
        if spec.kind == "lark":
            return LLMatcher.grammar_from_lark(spec.source)
        if spec.kind == "gbnf":
            return LLMatcher.grammar_from_lark(any_to_lark(spec.source))
    except GrammarError:
        raise
    except Exception as e:  # llguidance's converters raise plain exceptions on bad input
        raise GrammarError(_describe(spec, str(e))) from None
    raise GrammarError(f"unknown grammar kind {spec.kind!r} (known: {', '.join(KINDS)})")


def _describe(spec: GrammarSpec, message: str) -> str:
    what = {"json_schema": "JSON schema", "gbnf": "GBNF grammar", "lark": "Lark grammar"}
    text = f"the {what.get(spec.kind, spec.kind)} cannot be used: {message.strip()}"
    if spec.kind == "json_schema":
        paths = schema_paths(json.loads(spec.source), message)
        if paths:
            text += f" (at {', '.join(paths[:5])})"
    return text


def schema_paths(schema: Any, message: str) -> list[str]:
    """Where in ``schema`` (JSON pointers) the problem llguidance's ``message`` names lies: the
    keys it quotes (an unimplemented keyword, a value of the wrong type), the ``$ref`` or
    ``pattern`` whose text it quotes. Empty when nothing in the schema matches."""
    quoted = set(re.findall(r"\"([^\"]+)\"|'([^']+)'", message))
    words = {a or b for a, b in quoted}
    lines = message.strip().splitlines()
    regex = lines[1].strip() if len(lines) > 1 and "regex" in lines[0] else None
    found: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{path}/{_escape(key)}"
                if (
                    (key in words and key not in ("properties", "$defs", "definitions"))
                    or (key == "$ref" and isinstance(value, str) and value.lstrip("#") in words)
                    or (key == "pattern" and regex is not None and value == regex)
                ):
                    found.append(here)
                walk(value, here)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}/{i}")

    walk(schema, "")
    return found


def _escape(key: str) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")
