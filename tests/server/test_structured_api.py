"""Structured output over HTTP with the official openai client: a random-weight model's answers
parse and validate; bad constraints are 400s naming the field; the mask time is a metric."""

from __future__ import annotations

import json
import re
from enum import StrEnum

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.fixtures import serving_tiny, write_tiny_model

pytest.importorskip("torch")
jsonschema = pytest.importorskip("jsonschema")
MODEL = "tiny"


class Size(StrEnum):
    small = "small"
    large = "large"


class Pet(BaseModel):
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=30)
    size: Size
    vaccinated: bool


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny"))
    with serving_tiny(folder, MODEL, num_blocks=512) as served:
        yield served


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_parse_with_a_pydantic_model(client):
    for seed in range(3):
        r = client.chat.completions.parse(
            model=MODEL,
            messages=ask("A pet, please."),
            response_format=Pet,
            temperature=1.0,
            seed=seed,
            max_tokens=400,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Pet), choice.message.content


def test_streamed_json_schema_validates(client):
    schema = {
        "type": "object",
        "properties": {"ids": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}},
        "required": ["ids"],
        "additionalProperties": False,
    }
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ask("ids"),
        response_format={"type": "json_schema", "json_schema": {"name": "ids", "schema": schema}},
        temperature=1.0,
        seed=4,
        max_tokens=300,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), schema)
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and not finishing[0].choices[0].delta.content


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        ({"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}}, r"[0-9]{3}-[a-z]{2}"),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, r"yes|no"),
        ({"guided_choice": ["up", "down"]}, r"up|down"),
        ({"grammar": 'root ::= "v" [0-9] [0-9]'}, r"v[0-9]{2}"),
        ({"json_schema": {"type": "integer", "minimum": 5, "maximum": 9}}, r"[5-9]"),
    ],
    ids=["regex", "choice", "guided_choice", "gbnf", "llama-json-schema"],
)
def test_completions_take_each_kind_of_constraint(client, extra, pattern):
    r = client.completions.create(
        model=MODEL, prompt="x", max_tokens=50, temperature=1.0, seed=1, extra_body=extra
    )
    assert r.choices[0].finish_reason == "stop"
    assert re.fullmatch(pattern, r.choices[0].text), r.choices[0].text


def test_json_object_mode_parses_or_is_cut_by_length(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=ask("json"),
        response_format={"type": "json_object"},
        temperature=1.0,
        seed=2,
        max_tokens=60,
    )
    choice = r.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.finish_reason == "length" and choice.message.content.startswith("{")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"response_format": {"type": "sound"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "json_schema.schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/nope"}},
                }
            },
            "response_format",
        ),
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "not several",
        ),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structural_tag"),
    ],
    ids=["unknown-type", "no-schema", "bad-ref", "bad-regex", "two", "legacy-functions", "tag"],
)
def test_bad_constraints_are_400_naming_the_field(served, body, words):
    url, _ = served
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": MODEL, "messages": ask("x"), "max_tokens": 5, **body},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"


def test_mask_time_is_a_metric(served, client):
    client.completions.create(
        model=MODEL,
        prompt="m",
        max_tokens=10,
        extra_body={"structured_outputs": {"choice": ["abc"]}},
    )
    metrics = httpx.get(f"{served[0]}/metrics", timeout=30).text
    count = re.search(r"^candlewick_structured_mask_seconds_count (\S+)$", metrics, re.M)
    assert count and float(count.group(1)) >= 3
