"""The HTTP API end to end: a real uvicorn on a loopback port, driven by the official openai
client and httpx."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest

from engine.generate import GenerationSettings, generate_tokens
from server.state import ServerState
from tests.server.fixtures import serving_tiny, write_tiny_model

pytest.importorskip("torch")

MODEL = "tiny"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def served(folder):
    with serving_tiny(folder, MODEL, num_blocks=256) as served:
        yield served


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


def reference_text(state: ServerState, prompt: str, n: int) -> str:
    loaded = state.serving.loaded
    ids = loaded.tokenizer.encode(prompt)
    tokens = list(generate_tokens(loaded.model, ids, GenerationSettings(max_tokens=n)))
    return loaded.tokenizer.decode(tokens, skip_special_tokens=True)


def test_completion_matches_the_engine_reference(client, served):
    r = client.completions.create(
        model=MODEL,
        prompt="hello there",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == reference_text(served[1], "hello there", 12)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len("hello there") and r.usage.completion_tokens == 12
    assert r.system_fingerprint and r.created > 0


def test_chat_non_stream_and_stream_agree(client):
    messages = [{"role": "user", "content": "say something"}]
    full = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_n2_shares_the_prompt_blocks(client):
    prompt = "a long shared prompt " * 4
    r = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=6,
        temperature=0,
        n=2,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.choices[0].text == r.choices[1].text
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens_details.cached_tokens > 0


def test_logprobs_shapes(client):
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        tops = [t.logprob for t in item.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert item.logprob == pytest.approx(tops[0])  # greedy picks the most likely
    comp = client.completions.create(
        model=MODEL,
        prompt="x",
        max_tokens=3,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(t) <= 2 for t in lp.top_logprobs)


def test_stop_strings_cut_the_text_even_across_tokens(client, served):
    text = reference_text(served[1], "stop test", 24)
    stop = text[6:9]  # three bytes: three tokens of this byte-level vocabulary
    expected = text[: text.find(stop)]
    r = client.completions.create(
        model=MODEL,
        prompt="stop test",
        max_tokens=24,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = list(
        client.completions.create(
            model=MODEL,
            prompt="stop test",
            max_tokens=24,
            temperature=0,
            stop=[stop],
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    pieces = [c.choices[0].text for c in streamed if c.choices]
    assert "".join(pieces) == expected
    assert all(stop not in p for p in pieces)
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_seed_reproduces_alone_and_under_concurrency(served):
    url = served[0]
    body = {
        "model": MODEL,
        "prompt": "seeded",
        "max_tokens": 12,
        "temperature": 1.0,
        "seed": 42,
        "ignore_eos": True,
    }

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            alone = (await c.post("/v1/completions", json=body)).json()["choices"][0]["text"]
            others = [{**body, "seed": s, "prompt": f"other {s}"} for s in range(5)]
            results = await asyncio.gather(
                *(c.post("/v1/completions", json=b) for b in [*others[:2], body, *others[2:]])
            )
            return alone, results[2].json()["choices"][0]["text"]

    alone, together = asyncio.run(main())
    assert alone == together


def test_prompt_as_token_ids_and_tokenize_routes(client, served):
    url = served[0]
    ids = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": "hi!"}).json()
    assert ids["tokens"] == list(b"hi!") and ids["count"] == 3 and ids["max_model_len"] > 0
    chat = httpx.post(f"{url}/tokenize", json={"messages": [{"role": "user", "content": "a"}]})
    assert chat.json()["tokens"][0] == 256  # <|im_start|>
    text = httpx.post(f"{url}/detokenize", json={"tokens": ids["tokens"]}).json()
    assert text == {"prompt": "hi!"}
    by_ids = client.completions.create(
        model=MODEL,
        prompt=ids["tokens"],
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    by_text = client.completions.create(
        model=MODEL, prompt="hi!", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(served[0] + "/health").status_code == 200


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_bad_requests_are_openai_shaped_and_name_every_field(served):
    url = served[0]
    r = httpx.post(
        f"{url}/v1/chat/completions", json={"model": MODEL, "temperature": 9, "top_p": 0}
    )
    assert r.status_code == 400
    message = error_of(r)["message"]
    for field in ("messages", "temperature", "top_p"):
        assert field in message
    r = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x" * 600})
    assert r.status_code == 400
    assert re.search(r"512 tokens.*600 tokens", error_of(r)["message"])
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": [9999]})
    assert r.status_code == 400 and "9999" in error_of(r)["message"]


def test_disconnect_frees_the_request_at_once(served):
    url, state = served
    body = {
        "model": MODEL,
        "prompt": "long",
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
    }
    with (
        httpx.Client(base_url=url, timeout=30) as c,
        c.stream("POST", "/v1/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        assert state.engine.core.kv.usage > 0  # it is running and holds blocks
    core = state.engine.core
    deadline = time.monotonic() + 10
    while core.has_work or core.kv.usage > 0:
        assert time.monotonic() < deadline, "the aborted request still holds KV blocks"
        time.sleep(0.01)
    metrics = httpx.get(url + "/metrics").text
    assert "candlewick_num_requests_running 0.0" in metrics
    assert "candlewick_kv_cache_usage_ratio 0.0" in metrics


SPEC_METRICS = {
    "candlewick_time_to_first_token_seconds": "histogram",
    "candlewick_inter_token_latency_seconds": "histogram",
    "candlewick_e2e_request_latency_seconds": "histogram",
    "candlewick_request_queue_time_seconds": "histogram",
    "candlewick_num_requests_running": "gauge",
    "candlewick_num_requests_waiting": "gauge",
    "candlewick_kv_cache_usage_ratio": "gauge",
    "candlewick_adapters_loaded": "gauge",
    "candlewick_prompt_tokens_total": "counter",
    "candlewick_generation_tokens_total": "counter",
    "candlewick_requests_total": "counter",
    "candlewick_prefix_cache_queries_total": "counter",
    "candlewick_prefix_cache_hits_total": "counter",
    "candlewick_preemptions_total": "counter",
    "candlewick_adapter_swaps_total": "counter",
}


def test_every_spec_metric_is_exposed_with_its_type(client, served):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=3, temperature=0)
    text = httpx.get(served[0] + "/metrics").text
    for name, kind in SPEC_METRICS.items():
        assert f"# TYPE {name} {kind}" in text, name
    for name in ("candlewick_prompt_tokens_total", "candlewick_generation_tokens_total"):
        assert re.search(rf'^{name}{{model="{MODEL}"}} [1-9]', text, re.M), name
    assert re.search(rf'candlewick_requests_total{{finish_reason="\w+",model="{MODEL}"}}', text)
    assert re.search(
        rf'candlewick_time_to_first_token_seconds_count{{model="{MODEL}"}} [1-9]', text
    )


def test_a_batch_of_prompts_is_n_choices_of_each_in_order(client):
    prompts = ["hello there", "a b c", "Hi"]
    kw = dict(model=MODEL, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    alone = [client.completions.create(prompt=p, **kw) for p in prompts]
    r = client.completions.create(prompt=prompts, n=2, **kw)
    assert [c.index for c in r.choices] == list(range(6))
    for i, c in enumerate(r.choices):
        assert c.text == alone[i // 2].choices[0].text, i
    assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    stream = client.completions.create(prompt=prompts, stream=True, **kw)
    texts = ["", "", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [a.choices[0].text for a in alone]
    ids = client.completions.create(prompt=[[72, 105], [97, 32, 98]], **kw)
    assert ids.choices[0].text == alone[2].choices[0].text and len(ids.choices) == 2
