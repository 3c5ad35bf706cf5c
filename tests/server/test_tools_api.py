"""Tool calls over HTTP with the official openai client on a random-weight model: a forced call
comes back as ``tool_calls`` whose arguments fit the function's schema; streamed calls, put
together by the client, equal the whole reply's; bad tools are 400s naming the field."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.server.fixtures import serving_tiny, write_tiny_model

pytest.importorskip("torch")
jsonschema = pytest.importorskip("jsonschema")
MODEL = "tiny"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
BROKEN = {"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}
TOOLS = [
    {"type": "function", "function": {"name": "weather", "parameters": WEATHER}},
    {
        "type": "function",
        "function": {
            "name": "clock",
            "parameters": {
                "type": "object",
                "properties": {"tz": {"enum": ["utc", "cet"]}},
                "required": ["tz"],
                "additionalProperties": False,
            },
        },
    },
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny"))
    with serving_tiny(folder, MODEL, num_blocks=512) as served:
        yield served


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


def call_args(seed: int, **kw) -> dict:
    return dict(
        model=MODEL,
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=TOOLS,
        temperature=1.0,
        seed=seed,
        max_tokens=300,
        **kw,
    )


def test_a_named_function_is_called_with_valid_arguments(client):
    for seed in range(3):
        r = client.chat.completions.create(
            **call_args(seed, tool_choice={"type": "function", "function": {"name": "weather"}})
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_streamed_calls_equal_the_whole_reply(client):
    kw = call_args(5, tool_choice="required", parallel_tool_calls=False)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls
    stream = client.chat.completions.create(**kw, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or ():
            got = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                assert got["id"] is None and tc.function.arguments == ""  # the first delta
                got["id"], got["name"] = tc.id, tc.function.name
            else:
                got["arguments"] += tc.function.arguments or ""
        assert not (delta.content or "").strip()  # nothing of a call leaks into content
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (w.function.name, w.function.arguments) for w in whole
    ]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]},
            "tools.0.function.parameters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": BROKEN}}]},
            "tools[0].function.parameters",
        ),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ],
    ids=["unknown-function", "not-a-schema", "broken-schema", "with-response-format"],
)
def test_bad_tools_are_400_naming_the_field(served, extra, words):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "x"}],
        "tools": TOOLS,
        "max_tokens": 5,
        **extra,
    }
    r = httpx.post(f"{served[0]}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]


def test_history_with_calls_and_tool_results_renders(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "clock", "arguments": '{"tz": "utc"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
        ],
        tools=TOOLS,
        tool_choice="none",
        max_tokens=5,
        temperature=0,
    )
    assert r.choices[0].message.tool_calls is None
