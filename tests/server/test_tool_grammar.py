"""The grammar that forces a tool call: a random-weight tiny model sampling at temperature 1
under it writes calls that the family's own parser reads back, whose arguments ``jsonschema``
accepts, one call only when parallel calls are off; with the tags as plain text and as single
special tokens. And the checks on ``tools`` / ``tool_choice`` that come before."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from engine.structured.grammar import GrammarCompiler
from server.tool_parsers import (
    HermesToolParser,
    Llama3ToolParser,
    MistralToolParser,
    PlainJsonToolParser,
)
from server.tool_parsers.base import ArgumentsDelta, ContentDelta, ToolCallStart
from server.tool_parsers.grammar import tag_token_ids, tool_call_grammar
from server.tool_parsers.validation import ToolSpecError, validate_tools
from tests.engine.test_structured import _bytes_to_unicode
from tests.engine.tiny_models import build_tiny

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("torch")
EOS = 0
TAGS = ["<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]"]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 6},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": -50, "maximum": 50},
                    "b": {"type": "number"},
                    "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
                },
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
    {"type": "function", "function": {"name": "ping"}},  # no parameters: an empty object
]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {}) for t in TOOLS}
PARSERS = {
    "hermes": HermesToolParser(),
    "llama3": Llama3ToolParser(),
    "mistral-list": MistralToolParser("list"),
    "mistral-args": MistralToolParser("args"),
    "json": PlainJsonToolParser(),
}
NAMED = {"type": "function", "function": {"name": "add"}}
CHOICES = {"required": ("required", True), "required-one": ("required", False)}
CHOICES["named"] = (NAMED, True)


def tool_tokenizer(tags: str):
    """One token per byte of printable ASCII and newline (byte-level, as GPT-2's); </s> is 0.
    ``tags``: "text" (spelled out), "special" (added special tokens, as Mistral's control
    tokens) or "added" (added tokens that are not special, as Qwen 2.5's <tool_call>)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    table = _bytes_to_unicode()
    vocab = {"</s>": EOS}
    for b in [10, *range(32, 127)]:
        vocab[table[b]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["</s>", *(TAGS if tags == "special" else [])])
    if tags == "added":
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    return tok


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from engine.loader.hf import load_hf_model

    folder = tmp_path_factory.mktemp("toolllama")
    vocab = len(TAGS) + 97  # room for the tag tokens in both tokenizers
    build_tiny("llama", folder, vocab_size=vocab, bos_token_id=EOS, eos_token_id=EOS)
    return load_hf_model(folder, mx.float32), vocab


def drive(core: EngineCore, requests: list[EngineRequest]) -> dict[str, tuple[list[int], str]]:
    for r in requests:
        core.add_request(r)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    finish = {}
    while core.has_work:
        for out in core.step():
            assert out.error is None, out.error
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finished:
                finish[out.request_id] = out.finish_reason
    return {rid: (tokens[rid], finish[rid]) for rid in tokens}


def streamed(parser, pieces: list[str]):
    stream = parser.streaming()
    events = [e for piece in pieces for e in stream.feed(piece)] + stream.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta)) or None
    calls: dict[int, list[str]] = {}
    for e in events:
        if isinstance(e, ToolCallStart):
            calls[e.index] = [e.name, ""]
        elif isinstance(e, ArgumentsDelta):
            calls[e.index][1] += e.text
    return content, [tuple(c) for c in calls.values()]


TAGGED = ("hermes", "mistral-list", "mistral-args")


@pytest.mark.parametrize("tags", ["text", "special", "added"])
def test_forced_calls_parse_and_validate(model, tags):
    weights, vocab = model
    tok = tool_tokenizer(tags)
    compiler = GrammarCompiler(tok.to_str(), vocab, [EOS])
    requests, expect = [], {}
    for family, parser in PARSERS.items():
        if tags != "text" and family not in TAGGED:
            continue  # nothing of theirs changes with the tags' tokens
        tag_ids = tag_token_ids(compiler.tokenizer, parser)
        # llguidance gives its own bytes to special tokens and to added ones shaped <...>;
        # other added tokens are plain text to it, and a quoted tag matches them.
        assert bool(tag_ids) == (tags == "special" or (tags == "added" and family == "hermes"))
        for choice_id, (choice, parallel) in CHOICES.items():
            spec = tool_call_grammar(parser, TOOLS, choice, parallel, tag_ids, max_calls=3)
            for seed in range(2):
                rid = f"{family}/{choice_id}/{seed}"
                prompt = np.random.default_rng(seed).integers(1, 96, size=6).tolist()
                params = SamplingParams(max_tokens=400, temperature=1.0, seed=seed)
                constraint = compiler.constraint(spec)
                requests.append(
                    EngineRequest(rid, prompt, params, frozenset({EOS}), constraint=constraint)
                )
                open_tag = tok.token_to_id(parser.tags[0]) if parser.tags else None
                expect[rid] = (parser, choice, parallel, open_tag)
    config = EngineConfig(num_blocks=4096, block_size=16, max_num_seqs=128)
    results = drive(EngineCore(weights, config, mx.float32), requests)
    counts = []
    for rid, (ids, finish) in results.items():
        parser, choice, parallel, open_tag = expect[rid]
        assert (open_tag in ids) == (tags != "text"), rid  # the tag came as one token
        # Added tokens that are not special survive the default detokenizing.
        skip = tags == "added"
        pieces = [tok.decode([t], skip_special_tokens=skip) for t in ids if t != EOS]
        text = "".join(pieces)
        assert finish == "stop", f"{rid} ended by {finish}: {text!r}"
        parsed = parser.parse(text)
        assert parsed.content is None and parsed.calls, f"{rid}: {text!r} -> {parsed}"
        for call in parsed.calls:
            assert call.name in SCHEMAS and (choice == "required" or call.name == "add"), rid
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
        assert len(parsed.calls) <= (3 if parallel else 1), f"{rid}: {text!r}"
        counts.append(len(parsed.calls))
        # Token by token, as a server streams it, the stream reads the same calls.
        assert streamed(parser, pieces) == (None, [(c.name, c.arguments) for c in parsed.calls])
    assert max(counts) > 1  # parallel calls really happen where they are allowed


def test_grammar_text_for_each_family():
    """The shape of each family's grammar, tags quoted or as token ids."""
    hermes = tool_call_grammar(PARSERS["hermes"], TOOLS, NAMED, False, {"<tool_call>": 7})
    assert hermes.kind == "lark"
    assert '<[7]> "\\n" fn "\\n" "</tool_call>"' in hermes.source
    assert "(sep call)" not in hermes.source and '\\"add\\"' in hermes.source
    assert "get_weather" not in hermes.source  # a named choice offers only that function
    llama = tool_call_grammar(PARSERS["llama3"], TOOLS, "required", True).source
    assert '\\"parameters\\": "' in llama and "(sep call)*" in llama
    args = tool_call_grammar(PARSERS["mistral-args"], TOOLS, "required", True, {"[ARGS]": 3})
    assert '"ping" <[3]> %json' in args.source and '"[TOOL_CALLS]" fn' in args.source


@pytest.mark.parametrize("choice", [None, "none", "auto"])
def test_no_grammar_when_no_call_is_forced(choice):
    assert tool_call_grammar(PARSERS["hermes"], TOOLS, choice) is None


def tool(name, parameters=None):
    function = {"name": name} if parameters is None else {"name": name, "parameters": parameters}
    return {"type": "function", "function": function}


BAD = {
    "parameters-not-object": (
        [tool("a"), tool("b", ["x"])],
        "auto",
        ["tools[1].function.parameters: must be a JSON schema object"],
    ),
    "parameters-not-an-object-schema": (
        [tool("a", {"type": "string"})],
        None,
        ["tools[0].function.parameters: must describe an object"],
    ),
    "schema-llguidance-rejects": (
        [tool("a", {"type": "object", "properties": {"x": {"$ref": "#/$defs/gone"}}})],
        "required",
        ["tools[0].function.parameters: not a usable JSON schema", "gone"],
    ),
    "schema-bad-type": (
        [tool("a"), tool("b", {"type": "object", "properties": {"x": {"type": "strin"}}})],
        "required",
        ["tools[1].function.parameters", "strin"],
    ),
    "unknown-named-function": (
        [tool("a")],
        {"type": "function", "function": {"name": "b"}},
        ["tool_choice.function.name: no tool is named 'b' (known: a)"],
    ),
    "required-without-tools": ([], "required", ['tool_choice: "required" needs at least one tool']),
    "bad-choice": ([tool("a")], "always", ["tool_choice: must be one of none, auto, required"]),
    "bad-name-and-duplicate": (
        [tool("a b"), tool("c"), tool("c")],
        "auto",
        ["tools[0].function.name: must be 1-64", "tools[2].function.name: 'c' is declared twice"],
    ),
    "not-a-function": ([{"type": "code_interpreter"}], None, ["tools[0].type"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_tools_name_the_problem_and_the_path(case):
    tools, choice, words = BAD[case]
    with pytest.raises(ToolSpecError) as info:
        validate_tools(tools, choice)
    assert isinstance(info.value, ValueError)
    for w in words:
        assert w in str(info.value), str(info.value)
    with pytest.raises(ToolSpecError):  # the grammar builder checks the same way
        tool_call_grammar(PARSERS["json"], tools, choice)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ToolSpecError) as info:
        validate_tools([tool("a", 5), tool("b")], {"type": "function", "function": {"name": "z"}})
    assert [p for p, _ in info.value.problems] == [
        "tools[0].function.parameters",
        "tool_choice.function.name",
    ]
    assert info.value.param is None


def test_good_tools_give_their_functions():
    functions = validate_tools(TOOLS, NAMED)
    assert [f.name for f in functions] == ["get_weather", "add", "ping"]
    assert functions[2].parameters == {"type": "object", "properties": {}}
