"""Anthropic's Messages API with the official anthropic client, on a random-weight model: greedy
replies equal /v1/chat/completions' for the same conversation (an adapter's too), a stream puts
together the whole reply, stop sequences and tool calls end the turn as Anthropic says,
tool results render as chat's tool messages, and errors come in Anthropic's shape."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from server.settings import ServerSettings
from server.state import ServerState
from tests.server.fixtures import running_server, write_tiny_model
from tests.server.test_lease import wait_until

anthropic = pytest.importorskip("anthropic")
pytest.importorskip("torch")
jsonschema = pytest.importorskip("jsonschema")

MODEL = "tiny"
KEY = "sesame"
SYSTEM = "You answer briefly."
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "unit": {"enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [{"name": "weather", "description": "The weather in a city.", "input_schema": WEATHER}]
# ChatML that names the tools, writes an assistant's calls as Hermes does (so its replies are read
# with the Hermes parser), and marks a tool's result: what a conversation becomes is visible.
TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t.function.name }} {% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}'
    "\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
OPENAI_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "The weather in a city.",
            "parameters": WEATHER,
        },
    }
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("anthropic")
    folder = write_tiny_model(root / "base")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    settings = ServerSettings(
        model=str(folder),
        data_dir=root / "data",
        served_model_name=MODEL,
        num_blocks=512,
        api_keys=(KEY,),
        adapter_dir=root / "adapters",
        max_loras=1,
        max_lora_rank=8,
    )
    state = ServerState(settings)
    state.start()
    with running_server(settings, state) as url:
        yield url, state


@pytest.fixture(scope="module")
def claude(served):
    return anthropic.Anthropic(base_url=served[0], api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def gpt(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0)


CONVERSATION = [
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": [{"type": "text", "text": "hi"}]},
    {"role": "user", "content": [{"type": "text", "text": "tell"}, {"type": "text", "text": "me"}]},
]
AS_CHAT = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "tell\nme"},
]
# The client no longer sends sampling fields of its own; the API still takes them.
GREEDY = {"temperature": 0}
FINISH = {"length": "max_tokens", "stop": "end_turn"}


def blocks(message) -> list[tuple]:
    """A message's content blocks, compared by what they say (a call's id is new each time)."""
    return [
        (b.type, b.text) if b.type == "text" else (b.type, b.name, b.input) for b in message.content
    ]


def test_greedy_reply_equals_chat_completions(claude, gpt):
    m = claude.messages.create(
        model=MODEL,
        system=[{"type": "text", "text": SYSTEM}],
        messages=CONVERSATION,
        max_tokens=12,
        extra_body=GREEDY,
    )
    c = gpt.chat.completions.create(model=MODEL, messages=AS_CHAT, max_tokens=12, temperature=0)
    assert m.type == "message" and m.role == "assistant" and m.model == MODEL
    assert m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].text == c.choices[0].message.content
    assert m.stop_reason == FINISH[c.choices[0].finish_reason] and m.stop_sequence is None
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == c.usage.prompt_tokens
    assert m.usage.output_tokens == c.usage.completion_tokens
    # count_tokens counts the prompt the reply was written after.
    count = claude.messages.count_tokens(
        model=MODEL, system=SYSTEM, messages=CONVERSATION
    ).input_tokens
    assert count == c.usage.prompt_tokens


def test_stream_puts_together_the_whole_reply(claude):
    kw = dict(model=MODEL, system=SYSTEM, messages=CONVERSATION, max_tokens=20, extra_body=GREEDY)
    whole = claude.messages.create(**kw)
    with claude.messages.stream(**kw) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert blocks(final) == blocks(whole)
    assert (final.stop_reason, final.usage) == (whole.stop_reason, whole.usage)
    # The raw events, in Anthropic's order.
    raw = [e.type for e in claude.messages.create(**kw, stream=True)]
    assert raw[0] == "message_start" and raw[-2:] == ["message_delta", "message_stop"]
    middle = raw[1:-2]
    if whole.content:
        assert middle[0] == "content_block_start" and middle[-1] == "content_block_stop"
        assert set(middle[1:-1]) <= {"content_block_delta"}
    assert "text" in kinds or not whole.content[0].text


def test_stop_sequence_ends_the_turn_where_it_starts(claude):
    kw = dict(model=MODEL, messages=CONVERSATION, max_tokens=24, extra_body=GREEDY)
    text = claude.messages.create(**kw).content[0].text
    assert len(text) >= 6, "the random model must write something to cut"
    stop = text[3:5]
    cut = claude.messages.create(**kw, stop_sequences=["never written \x00", stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.index(stop)]
    with claude.messages.stream(**kw, stop_sequences=[stop]) as stream:
        streamed = stream.get_final_message()
    assert (streamed.stop_reason, streamed.stop_sequence) == ("stop_sequence", stop)
    assert blocks(streamed) == blocks(cut)


def call_kw(sampling: dict | None = None, **extra) -> dict:
    extra.setdefault("max_tokens", 300)
    return dict(
        model=MODEL,
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=TOOLS,
        extra_body=sampling or {"temperature": 1.0, "top_k": 50},
        **extra,
    )


def test_a_forced_tool_is_used_with_valid_input(claude):
    choices = [
        ({"type": "tool", "name": "weather"}, 1),
        ({"type": "any", "disable_parallel_tool_use": True}, 1),
    ]
    for choice, calls in choices:
        m = claude.messages.create(**call_kw(tool_choice=choice))
        assert m.stop_reason == "tool_use", m
        uses = [b for b in m.content if b.type == "tool_use"]
        assert len(uses) == calls
        for use in uses:
            assert use.name == "weather" and use.id.startswith("toolu_")
            jsonschema.validate(use.input, WEATHER)
        assert all(not b.text.strip() for b in m.content if b.type == "text")


def test_streamed_tool_use_equals_its_whole_input(claude):
    kw = call_kw(GREEDY, tool_choice={"type": "tool", "name": "weather"})
    whole = claude.messages.create(**kw)
    with claude.messages.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert blocks(final) == blocks(whole)
    partial = "".join(
        e.delta.partial_json
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    )
    (use,) = [b for b in final.content if b.type == "tool_use"]
    assert json.loads(partial) == use.input


def test_tool_result_round_trip_renders_as_chat_tool_messages(claude, gpt):
    used = claude.messages.create(**call_kw(tool_choice={"type": "tool", "name": "weather"}))
    (use,) = [b for b in used.content if b.type == "tool_use"]
    history = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": [b.model_dump() for b in used.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21"},
                {"type": "text", "text": "and tomorrow?"},
            ],
        },
    ]
    m = claude.messages.create(
        model=MODEL, messages=history, tools=TOOLS, max_tokens=10, extra_body=GREEDY
    )
    call = {"id": "call_1", "type": "function"}
    call["function"] = {"name": "weather", "arguments": json.dumps(use.input)}
    texts = "\n".join(b.text for b in used.content if b.type == "text")
    chat_history = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": texts or None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21"},
        {"role": "user", "content": "and tomorrow?"},
    ]
    c = gpt.chat.completions.create(
        model=MODEL, messages=chat_history, tools=OPENAI_TOOLS, max_tokens=10, temperature=0
    )
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == c.usage.prompt_tokens
    got = "".join(b.text for b in m.content if b.type == "text")
    assert got == (c.choices[0].message.content or "")
    count = claude.messages.count_tokens(model=MODEL, messages=history, tools=TOOLS)
    assert count.input_tokens == c.usage.prompt_tokens


def test_an_adapter_named_by_model_applies(served, claude, gpt):
    peft = pytest.importorskip("peft")
    from tests.server.test_adapters import make_peft, upload

    url, state = served
    base = state.settings.model
    folder = make_peft(base, state.settings.adapter_dir.parent / "peft", 3, ["q_proj", "v_proj"])
    assert peft is not None
    with httpx.Client(base_url=url, headers={"x-api-key": KEY}, timeout=60) as c:
        assert upload(c, "ad", folder).status_code == 201
    try:
        kw = dict(messages=CONVERSATION, max_tokens=12, extra_body=GREEDY)
        m = claude.messages.create(model="ad", **kw)
        b = claude.messages.create(model=MODEL, **kw)
        chat = [{"role": "user", "content": "hello there"}, *AS_CHAT[2:]]
        c = gpt.chat.completions.create(model="ad", messages=chat, max_tokens=12, temperature=0)
        assert m.model == "ad"
        assert m.content[0].text == c.choices[0].message.content
        assert (m.content[0].text, m.usage.output_tokens) != (
            b.content[0].text,
            b.usage.output_tokens,
        )
    finally:
        httpx.delete(f"{url}/v1/adapters/ad", headers={"x-api-key": KEY})


def test_errors_come_in_anthropic_shape_here_and_openai_shape_elsewhere(served, claude):
    url = served[0]
    headers = {"x-api-key": KEY}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    use = {"type": "tool_use", "id": "a", "name": "f", "input": {}}  # only an assistant's
    cases = [
        (body, 400, "max_tokens"),  # required, as Anthropic requires it
        ({**body, "max_tokens": 5, "model": "nope"}, 404, "nope"),
        ({**body, "max_tokens": 5, "tool_choice": {"type": "tool", "name": "x"}}, 400, "x"),
        ({**body, "max_tokens": 5, "temperature": 1.5}, 400, "temperature"),
        (
            {**body, "max_tokens": 5, "messages": [{"role": "user", "content": [use]}]},
            400,
            "tool_use",
        ),
    ]
    for payload, status, word in cases:
        r = httpx.post(f"{url}/v1/messages", json=payload, headers=headers)
        assert r.status_code == status, r.text
        got = r.json()
        assert got["type"] == "error" and set(got["error"]) == {"type", "message"}, got
        assert word in got["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=MODEL, messages=body["messages"], max_tokens=0)
    assert e.value.body["error"]["type"] == "invalid_request_error"
    # Auth: x-api-key or Bearer; a wrong key is a 401 in each route's own shape.
    for path, body_ in (("/v1/messages/count_tokens", body), ("/v1/models", None)):
        for h in ({"x-api-key": KEY}, {"authorization": f"Bearer {KEY}"}):
            r = httpx.request("POST" if body_ else "GET", url + path, json=body_, headers=h)
            assert r.status_code == 200, r.text
    bad = anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad.messages.create(model=MODEL, messages=body["messages"], max_tokens=4)
    assert e.value.body["error"]["type"] == "authentication_error"
    r = httpx.get(f"{url}/v1/models", headers={"x-api-key": "wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert "param" in r.json()["error"]  # OpenAI's shape off Anthropic's routes


def test_tool_choice_none_offers_no_tools(claude):
    kw = dict(model=MODEL, messages=CONVERSATION, max_tokens=12, extra_body=GREEDY)
    plain = claude.messages.create(**kw)
    none = claude.messages.create(**kw, tools=TOOLS, tool_choice={"type": "none"})
    assert blocks(none) == blocks(plain) and none.usage == plain.usage


def aborted(url: str) -> float:
    """How many requests have ended aborted, as /metrics counts them."""
    text = httpx.get(f"{url}/metrics", headers={"x-api-key": KEY}).text
    found = re.search(
        r'candlewick_requests_total\{finish_reason="abort",model="tiny"\} (\S+)', text
    )
    return float(found.group(1)) if found else 0.0


def test_streams_give_their_room_back_finished_or_abandoned(served, claude):
    url, state = served
    before = aborted(url)
    # Sampled from all 260 tokens, the reply runs long: leaving after its first delta aborts it.
    sampled = {"temperature": 1.0, "top_k": 0}
    kw = dict(model=MODEL, messages=CONVERSATION, max_tokens=400, extra_body=sampled)
    with claude.messages.stream(**kw) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                break  # the client leaves midway
    with claude.messages.stream(**{**kw, "extra_body": GREEDY}) as stream:
        stream.until_done()
    wait_until(lambda: state.admission.inflight == 0, "a lease was not released")
    idle = lambda: not (state.engine.stats.num_running or state.engine.stats.num_waiting)  # noqa: E731
    wait_until(idle, "an abandoned request still runs")
    assert aborted(url) == before + 1
