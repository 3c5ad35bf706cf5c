"""Tool-call parsers: each family on replies written as its chat template asks (one call,
several, text around them, none); the streaming parser, fed the same text split at every
character and in random chunks, reads what the whole parser reads and never sends a tag as
content; both read randomly formatted JSON exactly as ``json`` does."""

from __future__ import annotations

import json
import random

import pytest

from server.tool_parsers import (
    ArgumentsDelta,
    ContentDelta,
    HermesToolParser,
    Llama3ToolParser,
    MistralToolParser,
    PlainJsonToolParser,
    ToolCallStart,
    new_call_id,
    parser_for_template,
)
from server.tool_parsers.json_stream import JsonStreamError, JsonValue

HERMES, LLAMA, MISTRAL, PLAIN = (
    HermesToolParser(),
    Llama3ToolParser(),
    MistralToolParser(),
    PlainJsonToolParser(),
)
PARSERS = {"hermes": HERMES, "llama3": LLAMA, "mistral": MISTRAL, "json": PLAIN}
TAG_TEXTS = {"hermes": ["<tool_call>", "</tool_call>"], "llama3": ["<|python_tag|>"]}
TAG_TEXTS |= {"mistral": ["[TOOL_CALLS]", "[ARGS]"], "json": []}

W = {"city": "Paris", "unit": "celsius"}
T = {"tz": "Europe/Paris"}
Q = {"query": 'say "hi"\n', "n": 3, "deep": {"a": [1, 2.5, None, True]}}
U = {"text": "naïve café ☕ 😀", "esc": "\u0001\\/"}

# (reply as the family's template renders it, content, [(name, arguments)]).
CASES = {
    "hermes": [
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
            '"celsius"}}\n</tool_call>',
            None,
            [("get_weather", W)],
        ),
        (
            "Let me check both.\n<tool_call>\n"
            + json.dumps({"name": "get_weather", "arguments": W})
            + "\n</tool_call>\n<tool_call>\n"
            + json.dumps({"name": "get_time", "arguments": T})
            + "\n</tool_call>",
            "Let me check both.",
            [("get_weather", W), ("get_time", T)],
        ),
        (
            "<tool_call>\n"
            + json.dumps({"name": "search", "arguments": Q}, indent=2)
            + "\n</tool_call>\nDone, searching.",
            "Done, searching.",
            [("search", Q)],
        ),
        (
            '<tool_call>\n{"arguments": ' + json.dumps(U) + ', "name": "echo"}\n</tool_call>',
            None,
            [("echo", U)],
        ),
        ('<tool_call>\n{"name": "now"}\n</tool_call>', None, [("now", {})]),
        (  # arguments as a JSON string, as templates render OpenAI-style history
            '<tool_call>\n{"name": "get_time", "arguments": ' + json.dumps(json.dumps(T)) + "}",
            None,
            [("get_time", T)],
        ),
        (
            "I will look.\n\n<tool_call>\n"
            + json.dumps({"name": "get_time", "arguments": T})
            + "\n</tool_call>\nMeanwhile, hello.\n",
            "I will look.\n\nMeanwhile, hello.\n",
            [("get_time", T)],
        ),
        (
            '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}',
            None,
            [("get_time", T)],
        ),  # the model stopped before the closing tag
        (
            "The weather in Paris is 18°C. Use <b>tags</b> and a < b > c freely.",
            "The weather in Paris is 18°C. Use <b>tags</b> and a < b > c freely.",
            [],
        ),
        (
            "<tool_call>I changed my mind</tool_call> sorry",
            "<tool_call>I changed my mind</tool_call> sorry",
            [],
        ),
    ],
    "llama3": [
        (
            '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
            None,
            [("get_weather", W)],
        ),
        (
            '<|python_tag|>{"name": "get_weather", "parameters": ' + json.dumps(W) + "}",
            None,
            [("get_weather", W)],
        ),
        (
            json.dumps({"name": "get_weather", "parameters": W})
            + "; "
            + json.dumps({"name": "get_time", "parameters": T}),
            None,
            [("get_weather", W), ("get_time", T)],
        ),
        (
            '{"name": "search", "arguments": ' + json.dumps(Q, ensure_ascii=False) + "}",
            None,
            [("search", Q)],
        ),
        ("It is sunny in Paris today.", "It is sunny in Paris today.", []),
        ('{"answer": 42, "name": "not a call"}', '{"answer": 42, "name": "not a call"}', []),
        (
            'Checking.<|python_tag|>{"name": "echo", "parameters": ' + json.dumps(U) + "}",
            "Checking.",
            [("echo", U)],
        ),
        (
            '<|python_tag|>brave_search.call(query="Paris")',
            '<|python_tag|>brave_search.call(query="Paris")',
            [],
        ),
    ],
    "mistral": [
        (
            '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
            '"celsius"}}]',
            None,
            [("get_weather", W)],
        ),
        (
            "[TOOL_CALLS] "
            + json.dumps(
                [
                    {"name": "get_weather", "arguments": W},
                    {"name": "get_time", "arguments": T, "id": "a1b2c3d4e"},
                ]
            ),
            None,
            [("get_weather", W), ("get_time", T)],
        ),
        ("Sure.[TOOL_CALLS]get_weather[ARGS]" + json.dumps(W), "Sure.", [("get_weather", W)]),
        (
            "[TOOL_CALLS]get_weather[ARGS]"
            + json.dumps(W)
            + "[TOOL_CALLS]search[ARGS]"
            + json.dumps(Q),
            None,
            [("get_weather", W), ("search", Q)],
        ),
        ("[TOOL_CALLS]echo[ARGS]" + json.dumps(U, ensure_ascii=False), None, [("echo", U)]),
        ("[TOOL_CALLS]get_time[ARGS]" + json.dumps(json.dumps(T)), None, [("get_time", T)]),
        ("Paris is [mostly] sunny.", "Paris is [mostly] sunny.", []),
        ("[TOOL_CALLS] I cannot call that.", "[TOOL_CALLS] I cannot call that.", []),
    ],
    "json": [
        (
            '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
            None,
            [("get_weather", W)],
        ),
        (
            json.dumps(
                [{"name": "get_weather", "parameters": W}, {"name": "get_time", "parameters": T}]
            ),
            None,
            [("get_weather", W), ("get_time", T)],
        ),
        (
            "\n" + json.dumps({"name": "search", "arguments": Q}, indent=1) + "\n",
            None,
            [("search", Q)],
        ),
        ("Hello! How can I help?", "Hello! How can I help?", []),
        ('{"city": "Paris"}', '{"city": "Paris"}', []),
        ("[1, 2, 3]", "[1, 2, 3]", []),
    ],
}
ALL = [(family, i) for family, cases in CASES.items() for i in range(len(cases))]


def streamed(parser, pieces: list[str]):
    """(content, [(name, arguments)]) as a stream fed ``pieces`` reports them; checks the
    events' order on the way: a call starts before its arguments, indices count up."""
    stream = parser.streaming()
    events = [e for piece in pieces for e in stream.feed(piece)] + stream.finish()
    calls: dict[int, list[str]] = {}
    for e in events:
        if isinstance(e, ToolCallStart):
            assert e.index == len(calls)
            calls[e.index] = [e.name, ""]
        elif isinstance(e, ArgumentsDelta):
            assert e.index in calls and e.text
        else:
            assert isinstance(e, ContentDelta) and e.text
    for e in events:
        if isinstance(e, ArgumentsDelta):
            calls[e.index][1] += e.text
    content = "".join(e.text for e in events if isinstance(e, ContentDelta)) or None
    return content, [tuple(c) for c in calls.values()], events


def whole(parser, text: str):
    parsed = parser.parse(text)
    return parsed.content, [(c.name, c.arguments) for c in parsed.calls]


def random_chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, min(len(text), 12))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize(("family", "i"), ALL)
def test_documented_replies(family, i):
    text, content, calls = CASES[family][i]
    parsed = PARSERS[family].parse(text)
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == calls
    for call, (_, arguments) in zip(parsed.calls, calls, strict=True):
        assert call.arguments == json.dumps(arguments, ensure_ascii=False)


@pytest.mark.parametrize(("family", "i"), ALL)
def test_stream_split_anywhere_reads_the_same(family, i):
    text = CASES[family][i][0]
    parser = PARSERS[family]
    expected = whole(parser, text)
    rng = random.Random(i)
    chunkings = [[text[:k], text[k:]] for k in range(len(text) + 1)]
    chunkings += [list(text)] + [random_chunks(text, rng) for _ in range(30)]
    for pieces in chunkings:
        content, calls, events = streamed(parser, pieces)
        assert (content, calls) == expected, pieces
        if expected[1]:  # a well-formed call: no piece of any tag is ever content
            for e in events:
                if isinstance(e, ContentDelta):
                    for tag in TAG_TEXTS[family]:
                        assert tag not in e.text


def test_content_is_never_part_of_a_tag():
    """Text that could still become a tag is held back, and released once it cannot."""
    stream = HERMES.streaming()
    assert stream.feed("Hi <tool") == [ContentDelta("Hi")]
    assert stream.feed("_ca") == []
    assert stream.feed("ll>\n{") == []
    assert stream.feed('"name": "f"') == [ToolCallStart(0, "f")]
    stream = HERMES.streaming()
    assert stream.feed("a <tool") == [ContentDelta("a")]
    assert stream.feed("box") == [ContentDelta(" <toolbox")]
    stream = MISTRAL.streaming()
    assert stream.feed("x [TOOL_") == [ContentDelta("x")]
    assert stream.feed("CALLS]f[AR") == []
    assert stream.feed('GS]{"a"') == [ToolCallStart(0, "f"), ArgumentsDelta(0, '{"a"')]


def test_arguments_stream_as_they_arrive():
    stream = HERMES.streaming()
    events = stream.feed('<tool_call>\n{"name": "s", "arguments": {"q": "long te')
    assert events == [ToolCallStart(0, "s"), ArgumentsDelta(0, '{"q": "long te')]
    assert stream.feed('xt"}}\n</tool_call>') == [ArgumentsDelta(0, 'xt"}')]
    assert stream.finish() == []


def test_cut_off_output_agrees_up_to_the_call_being_written():
    """A reply cut at any point: the stream has the whole parser's calls, plus at most the one
    it had started when the text ended (that one is text to the whole parser)."""
    for family, i in ALL:
        text = CASES[family][i][0]
        parser = PARSERS[family]
        for k in range(len(text) + 1):
            content, calls = whole(parser, text[:k])
            s_content, s_calls, _ = streamed(parser, [text[:k]])
            assert s_calls[: len(calls)] == calls, (family, text[:k])
            assert len(s_calls) - len(calls) in (0, 1), (family, text[:k])
            if len(s_calls) == len(calls):
                assert s_content == content, (family, text[:k])


# Random replies: random arguments, formatted at random, in each family's syntax.

ALPHABET = 'ab é€😀"\\/\n\t\u0001{}[]:,<>|'


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.randint(-(10**12), 10**12)
    if kind == 2:
        return rng.choice([0.5, -1e-7, 1e21, 3.25, 123456.789])
    if kind in (3, 4):
        return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 8)))
    if kind == 5:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return random_object(rng, depth + 1)


def random_object(rng: random.Random, depth: int = 0) -> dict:
    keys = {"".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 4))) for _ in range(3)}
    return {k: random_value(rng, depth) for k in sorted(keys)[: rng.randint(0, 3)]}


def dumps_randomly(value, rng: random.Random) -> str:
    return json.dumps(
        value,
        ensure_ascii=rng.random() < 0.5,
        indent=rng.choice([None, None, 0, 2, "\t"]),
        separators=rng.choice([None, (",", ":"), (" ,  ", " : ")]),
    )


def render(family: str, calls: list[tuple[str, dict]], rng: random.Random) -> str:
    key = rng.choice(["arguments", "parameters"]) if family in ("llama3", "json") else "arguments"
    objs = [dumps_randomly({"name": n, key: a}, rng) for n, a in calls]
    if family == "hermes":
        return "Thinking...\n" + "\n".join(f"<tool_call>\n{o}\n</tool_call>" for o in objs)
    if family == "llama3":
        return rng.choice(["", "<|python_tag|>"]) + " ; ".join(objs)
    if family == "mistral":
        if rng.random() < 0.5:
            return "Okay. [TOOL_CALLS] [" + ", ".join(objs) + "]"
        return "".join(f"[TOOL_CALLS]{n}[ARGS]{dumps_randomly(a, rng)}" for n, a in calls)
    return objs[0] if len(objs) == 1 and rng.random() < 0.5 else "[" + ",\n".join(objs) + "]"


@pytest.mark.parametrize("family", PARSERS)
def test_random_replies_round_trip(family):
    rng = random.Random(family)
    parser = PARSERS[family]
    for _ in range(60):
        calls = [(rng.choice(["f", "get_weather", "a-b_c"]), random_object(rng)) for _ in range(3)]
        calls = calls[: rng.randint(1, 3)]
        text = render(family, calls, rng)
        expected = [(n, json.dumps(a, ensure_ascii=False)) for n, a in calls]
        assert whole(parser, text)[1] == expected, text
        for pieces in [random_chunks(text, rng) for _ in range(5)]:
            assert streamed(parser, pieces)[:2] == whole(parser, text), pieces


def normalized_by_stream(text: str) -> str | None:
    """``text`` as JsonValue writes it, or None where it rejects it."""
    value = JsonValue()
    rest = text + " "  # a bare word at the top ends only at the next character
    i = 0
    try:
        while i < len(rest) and not value.done:
            i += value.push(rest[i])
    except JsonStreamError:
        return None
    if not value.done or rest[i:].strip(" \t\n\r"):
        return None
    return value.take()


def normalized_by_json(text: str) -> str | None:
    def no_duplicates(pairs):
        if len({k for k, _ in pairs}) < len(pairs):
            raise KeyError("duplicate key")
        return dict(pairs)

    try:
        value = json.loads(text, strict=False, object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError):
        return None
    return json.dumps(value, ensure_ascii=False)


def test_json_value_matches_the_json_module_on_valid_and_broken_text():
    rng = random.Random(7)
    special = [
        '"\\ud83d\\ude00"',
        '"\\ud83d"',
        '"\\ud83dx"',
        '"\\ud83d\\n"',
        '"\\ud83d\\ud83d"',
        "-0",
        "1E400",
        "-Infinity",
        "NaN",
        "01",
        "1.",
        ".5",
        '"\\x"',
        "[1,]",
        "{,}",
        "tru",
    ]
    texts = special + [dumps_randomly(random_value(rng), rng) for _ in range(400)]
    for text in list(texts):
        for _ in range(3):  # broken copies: a character dropped, doubled or replaced
            i = rng.randrange(len(text))
            texts.append(
                rng.choice(
                    [
                        text[:i] + text[i + 1 :],
                        text[:i] + text[i] + text[i:],
                        text[:i] + rng.choice(ALPHABET + "0e.-") + text[i + 1 :],
                    ]
                )
            )
    agree = 0
    for text in texts:
        try:
            expected = normalized_by_json(text)
        except KeyError:
            continue
        assert normalized_by_stream(text) == expected, text
        agree += expected is not None
    assert agree > 400


TEMPLATES = {
    "hermes": '{%- for tool_call in message.tool_calls %}{{- "<tool_call>\\n{\\"name\\": \\"" }}'
    '{{- tool_call.name }}{{- \'", "arguments": \' }}{{- tool_call.arguments | tojson }}',
    "llama3": '{{- "Environment: ipython\\n" }}{%- if builtin_tools is defined %}'
    '{{- "<|python_tag|>" + tool_call.name + ".call(" }}',
    "mistral-list": '{{- "[TOOL_CALLS] [" }}{%- for tool_call in message.tool_calls %}',
    "mistral-args": "{{- '[TOOL_CALLS]' + tool_call['function']['name'] + '[ARGS]' }}",
    "json": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}",
}


@pytest.mark.parametrize("family", TEMPLATES)
def test_family_from_template(family):
    parser = parser_for_template(TEMPLATES[family])
    assert parser.family == family.split("-")[0]
    if family.startswith("mistral"):
        assert parser.style == family.split("-")[1]


def test_no_template_means_bare_json_and_ids_look_like_openais():
    assert isinstance(parser_for_template(None), PlainJsonToolParser)
    ids = {new_call_id() for _ in range(100)}
    assert len(ids) == 100 and all(i.startswith("call_") and len(i) == 29 for i in ids)


FRAGMENTS = [
    "<tool_call>",
    "</tool_call>",
    "<tool_",
    "<|python_tag|>",
    "<|py",
    "[TOOL_CALLS]",
    "[TOOL",
    "[ARGS]",
    "[AR",
    '{"name": "f", ',
    '"arguments": ',
    '"parameters": ',
    '{"a": [1, "x"]}',
    "}",
    "]",
    "[",
    "{",
    ", ",
    "; ",
    "\n",
    "  ",
    "text",
    '"',
    "\\",
    "é",
    "get_weather",
    ":",
    "5",
]
FRAGMENTS += ['{"name": "f", "arguments": {"a": 1}}', '{"parameters": {}, "name": "g"}'] * 4
FRAGMENTS += ['<tool_call>{"name": "h"}</tool_call>', '[TOOL_CALLS]k[ARGS]{"x": 1}'] * 3


@pytest.mark.parametrize("family", PARSERS)
def test_any_text_streams_the_same_however_it_is_cut(family):
    """Random mixes of tags, JSON pieces and text, well-formed or not: the stream never fails
    and what it reads does not depend on where the deltas end."""
    rng = random.Random(family)
    parser = PARSERS[family]
    for _ in range(300):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 14)))
        once = streamed(parser, [text])[:2]
        assert streamed(parser, list(text))[:2] == once, text
        assert streamed(parser, random_chunks(text, rng))[:2] == once, text
        if not once[1]:  # no call: the reply is all content, untouched
            assert once == whole(parser, text) and once[0] in (text, None), text
