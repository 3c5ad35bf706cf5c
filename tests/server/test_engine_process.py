"""The engine in a process of its own (the server's default): the same tokens as the engine on a
thread, constraints and statistics crossing the pipe, aborts reaching it, and its death ending
every stream and the server rather than hanging them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import pytest

from engine.async_engine import AsyncEngine
from engine.config import ConfigError, EngineConfig
from engine.engine_process import EngineSpec
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from server.settings import ServerSettings
from server.state import ServerState
from tests.server.fixtures import serving_tiny, write_tiny_model

pytest.importorskip("torch")

MODEL = "tiny"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def both(folder):
    """The same model served twice: the engine in its own process, and on a thread here."""
    with (
        serving_tiny(folder, MODEL, num_blocks=256, engine_process=True) as remote,
        serving_tiny(folder, MODEL, num_blocks=256) as local,
    ):
        yield remote, local


def completion(url: str, **body) -> dict:
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": 16, **body}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def stream_text(url: str, **body) -> tuple[str, str]:
    body = {"model": MODEL, "prompt": "once upon", "max_tokens": 24, "stream": True, **body}
    text, finish = "", None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                finish = choice["finish_reason"] or finish
    return text, finish


def test_the_process_serves_what_the_thread_serves(both):
    (remote, remote_state), (local, _) = both
    assert remote_state.engine.core is None and remote_state.engine.alive
    greedy = dict(temperature=0, ignore_eos=True, logprobs=2)
    a, b = completion(remote, **greedy), completion(local, **greedy)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["choices"][0]["logprobs"] == b["choices"][0]["logprobs"]
    assert a["usage"] == b["usage"]
    seeded = dict(temperature=1.0, seed=7, n=2, ignore_eos=True)
    assert completion(remote, **seeded)["choices"] == completion(local, **seeded)["choices"]
    assert stream_text(remote, temperature=0) == stream_text(local, temperature=0)


def test_a_grammar_is_compiled_again_in_the_engine_process(both):
    (remote, _), (local, _) = both
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "yz"]}},
        "required": ["a", "b"],
        "additionalProperties": False,
    }
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "json please"}],
        "max_tokens": 400,
        "temperature": 1.0,
        "seed": 3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}},
    }
    texts = []
    for url in (remote, local):
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        texts.append(choice["message"]["content"])
    assert texts[0] == texts[1]
    jsonschema.validate(json.loads(texts[0]), schema)


def test_statistics_cross_the_pipe(both):
    (remote, state), _ = both
    before = state.engine.stats.prefix_cache_queries
    completion(remote, prompt="statistics come from the engine process", max_tokens=4)
    deadline = time.monotonic() + 30
    while state.engine.stats.prefix_cache_queries <= before:
        assert time.monotonic() < deadline, f"no statistics came: {state.engine.stats}"
        time.sleep(0.02)
    stats = state.engine.stats
    assert stats.num_kv_blocks == 255 and stats.num_running == 0  # the pool less its null block
    metrics = httpx.get(remote + "/metrics").text
    assert f"candlewick_prefix_cache_queries_total {float(stats.prefix_cache_queries)}" in metrics


def test_an_abort_reaches_the_engine_process(folder):
    spec = EngineSpec(model=str(folder), config=EngineConfig(num_blocks=64, max_loras=0))
    engine = AsyncEngine(None, process=spec)

    async def run() -> list:
        outputs = []
        request = EngineRequest("r", [1, 2, 3], SamplingParams(max_tokens=500, ignore_eos=True))
        async for output in engine.generate(request):
            outputs.append(output)
            if len(outputs) == 1:
                engine.abort("r")
        return outputs

    try:
        assert engine.wait_warm(60) and engine.info.num_blocks == 64
        outputs = asyncio.run(run())
        assert outputs[-1].finish_reason == "abort"
        assert sum(len(o.new_token_ids) for o in outputs) < 500
    finally:
        engine.shutdown()
    assert not engine.alive


def test_a_start_up_error_in_the_engine_process_is_raised_here_as_its_kind(folder, tmp_path):
    settings = ServerSettings(
        model=str(folder), data_dir=tmp_path, embedding_model=str(folder), engine_process=True
    )
    state = ServerState(settings)
    with pytest.raises(ConfigError, match="is not an encoder"):
        state.start()
    assert state.engine is None and not state.loaded


def test_an_engine_process_that_dies_ends_its_streams_and_the_server(folder):
    ended = []
    with serving_tiny(folder, MODEL, num_blocks=256, engine_process=True) as (url, state):
        state.on_load_failed = lambda: ended.append(state.load_error)
        body = {"model": MODEL, "prompt": "a", "max_tokens": 500, "stream": True}
        body["ignore_eos"] = True
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if len(events) == 3:
                        state.engine._thread._process.kill()
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2][6:])["error"]
        assert "the engine process ended (exit code -9)" in error["message"]
        assert ended == ["the engine process ended (exit code -9)"]
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and "exit code -9" in health.json()["error"]
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "a"}, timeout=30)
        assert r.status_code >= 500 or "error" in r.json()


FORGETFUL = """
import sys
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine_process import EngineSpec
spec = EngineSpec(model=sys.argv[1], config=EngineConfig(num_blocks=16, max_loras=0))
engine = AsyncEngine(None, process=spec)
assert engine.wait_warm(60)
print(engine._thread._process.pid, flush=True)
"""


def test_an_interpreter_that_forgets_to_stop_the_engine_still_exits(folder):
    """No ``shutdown``: the exit stops the engine process (multiprocessing's own exit handler
    would otherwise wait forever for a process that ignores SIGTERM)."""
    argv = [sys.executable, "-c", FORGETFUL, str(folder)]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    child = int(out.stdout.split()[-1])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists(), "the engine process outlived its server"
