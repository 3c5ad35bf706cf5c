"""OpenAI's Responses API with the official openai client on a random-weight model. The oracle is
/v1/chat/completions: the same conversation at temperature 0 gives the same text, token counts
and tool calls; a stream's events add up to the whole response; a stored response continues its
conversation after a restart; the store keeps the newest ``--responses-max-stored``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest

from server.responses_store import ResponsesStore
from server.settings import ServerSettings
from server.state import ServerState
from tests.server.fixtures import running_server, write_tiny_model
from tests.server.test_adapters import make_peft, upload
from tests.server.test_tools_api import BROKEN, WEATHER

pytest.importorskip("torch")
jsonschema = pytest.importorskip("jsonschema")
MODEL = "tiny"
TOOLS = [{"type": "function", "name": "weather", "parameters": WEATHER}]
CHAT_TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": WEATHER}}]


def settings_for(folder, **kw) -> ServerSettings:
    kw.setdefault("data_dir", folder / "data")
    return ServerSettings(model=str(folder), served_model_name=MODEL, num_blocks=512, **kw)


@contextmanager
def started(settings: ServerSettings) -> Iterator[tuple[str, ServerState]]:
    state = ServerState(settings)
    state.start()
    with running_server(settings, state) as url:
        yield url, state


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def served(model):
    with started(settings_for(model)) as server:
        yield server


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


def chat(client, messages, n=12, **kw):
    r = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=n, **kw
    )
    return r


def test_text_equals_chat_completions(client):
    got = client.responses.create(
        model=MODEL, instructions="be brief", input="hello there", temperature=0,
        max_output_tokens=12,
    )  # fmt: skip
    ref = chat(client, [{"role": "system", "content": "be brief"},
                        {"role": "user", "content": "hello there"}])  # fmt: skip
    assert got.object == "response" and got.model == MODEL
    assert got.output_text == ref.choices[0].message.content
    (item,) = got.output
    assert item.type == "message" and item.content[0].type == "output_text"
    assert got.usage.input_tokens == ref.usage.prompt_tokens
    assert got.usage.output_tokens == ref.usage.completion_tokens
    assert got.usage.total_tokens == ref.usage.total_tokens
    if ref.choices[0].finish_reason == "length":
        assert got.status == "incomplete"
        assert got.incomplete_details.reason == "max_output_tokens"
    else:
        assert got.status == "completed" and got.incomplete_details is None
    # The same input as items with input_text parts (two parts join with a newline).
    items = client.responses.create(
        model=MODEL, instructions="be brief", temperature=0, max_output_tokens=12,
        input=[{"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "hello"}, {"type": "input_text", "text": "there"}]}],
    )  # fmt: skip
    ref2 = chat(client, [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "hello\nthere"}])  # fmt: skip
    assert items.output_text == ref2.choices[0].message.content


def test_max_output_tokens_cuts_it_incomplete(client):
    got = client.responses.create(model=MODEL, input="count", temperature=0, max_output_tokens=1)
    ref = chat(client, [{"role": "user", "content": "count"}], n=1)
    assert got.output_text == ref.choices[0].message.content
    assert ref.choices[0].finish_reason == "length", "the random model ended at once"
    assert got.status == "incomplete" and got.incomplete_details.reason == "max_output_tokens"
    assert got.usage.output_tokens == 1


def test_stream_events_add_up_to_the_whole_response(client):
    fmt = {"type": "json_schema", "name": "weather", "schema": WEATHER}
    kw = dict(model=MODEL, input="tell me", temperature=0, max_output_tokens=200,
              text={"format": fmt})  # fmt: skip
    whole = client.responses.create(**kw)
    assert whole.status == "completed"  # the grammar ends it
    with client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    assert types[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == final.output_text == events[-4].text
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.status == "completed" and final.id == events[0].response.id
    assert client.responses.retrieve(final.id).output_text == final.output_text  # stored too


def test_a_stream_cut_by_max_output_tokens_ends_incomplete(client):
    kw = dict(model=MODEL, input="tell me", temperature=0, max_output_tokens=6)
    whole = client.responses.create(**kw)
    assert whole.status == "incomplete"
    with client.responses.create(**kw, stream=True) as stream:
        events = list(stream)
    assert events[-1].type == "response.incomplete"
    last = events[-1].response
    assert last.status == "incomplete" and last.incomplete_details.reason == "max_output_tokens"
    assert last.output_text == whole.output_text and last.usage.output_tokens == 6


def test_function_call_round_trip(client):
    first = client.responses.create(
        model=MODEL, input="weather in Paris?", tools=TOOLS, temperature=0,
        tool_choice={"type": "function", "name": "weather"}, max_output_tokens=200,
    )  # fmt: skip
    (call,) = first.output
    assert call.type == "function_call" and call.name == "weather"
    assert call.call_id.startswith("call_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    named = {"type": "function", "function": {"name": "weather"}}
    ref = chat(client, [{"role": "user", "content": "weather in Paris?"}], n=200,
               tools=CHAT_TOOLS, tool_choice=named)  # fmt: skip
    (ref_call,) = ref.choices[0].message.tool_calls
    assert (call.name, call.arguments) == (ref_call.function.name, ref_call.function.arguments)

    # The call's output goes back, continuing the stored conversation.
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21"}
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, input=[output], tools=TOOLS,
        tool_choice="none", temperature=0, max_output_tokens=12,
    )  # fmt: skip
    history = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": call.call_id,
         "type": "function", "function": {"name": "weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny, 21"},
    ]  # fmt: skip
    ref2 = chat(client, history, tools=CHAT_TOOLS, tool_choice="none")
    assert second.output_text == ref2.choices[0].message.content
    assert second.usage.input_tokens == ref2.usage.prompt_tokens
    # The same history sent as items (store off) is the same prompt.
    items = [{"role": "user", "content": "weather in Paris?"},
             {"type": "function_call", "call_id": call.call_id, "name": "weather",
              "arguments": call.arguments}, output]  # fmt: skip
    third = client.responses.create(
        model=MODEL, input=items, tools=TOOLS, tool_choice="none", temperature=0,
        max_output_tokens=12, store=False,
    )  # fmt: skip
    assert third.output_text == second.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(third.id)


def test_streamed_function_call_equals_the_whole_one(client):
    kw = dict(model=MODEL, input="weather?", tools=TOOLS, tool_choice="required",
              parallel_tool_calls=False, temperature=0, max_output_tokens=200)  # fmt: skip
    whole = client.responses.create(**kw)
    with client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    (w,) = whole.output
    assert args == done.arguments == w.arguments == final.output[0].arguments
    assert final.output[0].name == w.name == "weather"
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_text_format_json_schema(client):
    fmt = {"type": "json_schema", "name": "weather", "schema": WEATHER, "strict": True}
    got = client.responses.create(
        model=MODEL, input="weather", text={"format": fmt}, temperature=0, max_output_tokens=200
    )
    jsonschema.validate(json.loads(got.output_text), WEATHER)
    ref = chat(client, [{"role": "user", "content": "weather"}], n=200, response_format={
        "type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}})  # fmt: skip
    assert got.output_text == ref.choices[0].message.content
    assert got.text.format.type == "json_schema"
    obj = client.responses.create(
        model=MODEL, input="x", text={"format": {"type": "json_object"}}, max_output_tokens=60,
        temperature=0,
    )  # fmt: skip
    ref = chat(client, [{"role": "user", "content": "x"}], n=60,
               response_format={"type": "json_object"})  # fmt: skip
    assert obj.output_text == ref.choices[0].message.content and obj.output_text.startswith("{")


def test_stored_response_get_delete_and_cancel_errors(served, client):
    r = client.responses.create(
        model=MODEL, input="hi", max_output_tokens=4, metadata={"k": "v"}, temperature=0
    )
    got = client.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump() and got.metadata == {"k": "v"}
    url = served[0]
    assert httpx.post(f"{url}/v1/responses/{r.id}/cancel").status_code == 400  # finished
    deleted = httpx.delete(f"{url}/v1/responses/{r.id}").json()
    assert deleted == {"id": r.id, "object": "response", "deleted": True}
    assert httpx.get(f"{url}/v1/responses/{r.id}").status_code == 404
    assert httpx.delete(f"{url}/v1/responses/{r.id}").status_code == 404
    assert httpx.post(f"{url}/v1/responses/nope/cancel").status_code == 404
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.responses.create(model=MODEL, input="x", previous_response_id="nope")


def test_cancel_stops_a_running_stream(served, client):
    url = served[0]
    # A grammar that cannot end before 400 characters: the run is still going when cancelled.
    long = {"type": "object", "properties": {"s": {"type": "string", "minLength": 400}},
            "required": ["s"]}  # fmt: skip
    fmt = {"type": "json_schema", "name": "long", "schema": long}
    body = {"model": MODEL, "input": "go", "max_output_tokens": 450, "stream": True,
            "text": {"format": fmt}}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/responses", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = (json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: "))
        first = next(lines)
        rid = first["response"]["id"]
        running = httpx.get(f"{url}/v1/responses/{rid}").json()
        assert running["status"] == "in_progress"
        cancelled = httpx.post(f"{url}/v1/responses/{rid}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        rest = list(lines)
    last = rest[-1]["response"]
    assert last["status"] == "cancelled" and last["usage"]["output_tokens"] < 400
    text = "".join(e["delta"] for e in rest if e["type"] == "response.output_text.delta")
    assert last["output"][0]["content"][0]["text"] == text
    assert client.responses.retrieve(rid).status == "cancelled"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input[0].content"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}}, "text.format"),
        ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": 3}]}, "tools"),
        (
            {"input": "x", "tools": [{"type": "function", "name": "f", "parameters": BROKEN}]},
            "tools[0].parameters",
        ),
        ({"input": "x", "tool_choice": {"type": "function", "name": "nope"}}, "nope"),
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ],
    ids=[
        "item-type",
        "image",
        "schema-missing",
        "bad-tool",
        "broken-schema",
        "unknown-tool",
        "background",
        "metadata",
    ],
)
def test_bad_requests_are_400_naming_the_field(served, body, words):
    r = httpx.post(f"{served[0]}/v1/responses", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]


def test_previous_response_id_continues_after_a_restart(model, tmp_path):
    settings = settings_for(model, data_dir=tmp_path / "data")
    with started(settings) as (url, _):
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        first = c.responses.create(model=MODEL, input="one", temperature=0, max_output_tokens=8)
    with started(settings) as (url, _):
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert c.responses.retrieve(first.id).output_text == first.output_text
        second = c.responses.create(
            model=MODEL, previous_response_id=first.id, input="two", temperature=0,
            max_output_tokens=8,
        )  # fmt: skip
        ref = chat(c, [{"role": "user", "content": "one"},
                       {"role": "assistant", "content": first.output_text},
                       {"role": "user", "content": "two"}], n=8)  # fmt: skip
        assert second.output_text == ref.choices[0].message.content
        assert second.previous_response_id == first.id


def test_store_keeps_the_newest_and_survives_reopening(tmp_path):
    store = ResponsesStore(tmp_path, max_stored=2)
    for i in range(3):
        store.put(f"r{i}", {"id": f"r{i}"}, [{"role": "user", "content": str(i)}])
    assert store.get("r0") is None and store.count() == 2
    store.close()
    again = ResponsesStore(tmp_path, max_stored=2)
    assert again.get("r2") == ({"id": "r2"}, [{"role": "user", "content": "2"}])
    assert again.delete("r1") and not again.delete("r1")
    assert again.count() == 1
    again.close()


def test_an_adapter_named_by_model_applies(served, model, client, tmp_path):
    adapter = make_peft(model, tmp_path / "qv", 3, ["q_proj", "v_proj"])
    with httpx.Client(base_url=served[0], timeout=60) as c:
        assert upload(c, "qv", adapter).status_code in (200, 201)
        try:
            texts = {}
            for name in ("qv", MODEL):
                got = client.responses.create(
                    model=name, input="hello", temperature=0, max_output_tokens=12
                )
                ref = client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": "hello"}], temperature=0,
                    max_tokens=12,
                )  # fmt: skip
                assert got.model == name and got.output_text == ref.choices[0].message.content
                texts[name] = got.output_text
            assert texts["qv"] != texts[MODEL], "the adapter must change the output"
        finally:
            c.delete("/v1/adapters/qv")


def test_the_retention_flag_reaches_the_settings():
    from server.cli import build_parser

    args = build_parser().parse_args(["serve", "--responses-max-stored", "3"])
    assert args.responses_max_stored == 3
    with pytest.raises(ValueError, match="--responses-max-stored"):
        ServerSettings(responses_max_stored=0)
