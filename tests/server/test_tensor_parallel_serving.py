"""`candlewick serve --tensor-parallel 2` as real processes (two ranks on loopback, ring backend):
the official openai client gets the same greedy text as from one rank, streamed and not, and
under a JSON schema;
/health and /metrics report the ranks; killing a rank turns /health to 503 and ends the server
non-zero within 10 s; ranks that cannot connect fail the start-up with one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import httpx
import openai
import psutil

from tests.server.test_cli_blas import wait_healthy
from tests.server.test_lifecycle import REPO, fails_to_start, free_port, serve, tiny  # noqa: F401

PROMPT = "Once upon a time"


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def completions(port: int) -> tuple[str, ...]:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    model = client.models.list().data[0].id
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=12, temperature=0
    )
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=12,
        temperature=0,
        stream=True,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    structured = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=24,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    )
    content = structured.choices[0].message.content
    assert content.lstrip().startswith('{"n"')  # the schema held (random weights: may not end)
    return whole.choices[0].text, chat.choices[0].message.content, streamed, content


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    return proc.returncode


def test_two_ranks_answer_like_one_then_a_killed_rank_ends_the_server(tiny, tmp_path):  # noqa: F811
    flags = ("--kv-cache-memory", "8MiB")
    port = free_port()
    single = start(serve(tiny, port, tmp_path / "one", *flags))
    try:
        wait_healthy(single, f"http://127.0.0.1:{port}")
        expected = completions(port)
    finally:
        assert stop(single) == 0

    port = free_port()
    tp_flags = ("--tensor-parallel", "2", "--tensor-parallel-timeout", "5")
    server = start(serve(tiny, port, tmp_path / "two", *flags, *tp_flags))
    try:
        health = wait_healthy(server, f"http://127.0.0.1:{port}")
        assert [r["rank"] for r in health["ranks"]] == [0, 1]
        assert all(r["status"] == "ok" for r in health["ranks"])
        got = completions(port)
        assert got == expected
        assert got[1] == got[2]  # streamed = whole
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert "candlewick_tensor_parallel_ranks 2.0" in metrics

        ranks = psutil.Process(server.pid).children()
        (follower,) = [p for p in ranks if p.environ().get("MLX_RANK") == "1"]
        follower.kill()
        killed = time.monotonic()
        seen_503 = None
        while server.poll() is None and time.monotonic() - killed < 10:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                if r.status_code == 503:
                    seen_503 = r.json()
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        _, err = server.communicate(timeout=1)  # ended within the 10 s (or this raises)
        assert server.returncode == 1, err.decode()
        assert seen_503 is not None and seen_503["status"] == "error"
        assert [r["status"] for r in seen_503["ranks"]] == ["error", "error"]
        assert err.decode().splitlines()[-1].startswith("candlewick: error: tensor parallel")
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()


def test_ranks_that_cannot_connect_fail_the_start_with_one_clear_line(tiny, tmp_path):  # noqa: F811
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"], [f"127.0.0.1:{free_port()}"]]))
    env = {**os.environ, "MLX_RANK": "0", "MLX_HOSTFILE": str(hostfile)}
    argv = serve(tiny, free_port(), tmp_path, "--tensor-parallel-timeout", "2")
    line = fails_to_start(argv, env=env)
    assert "the ranks could not connect within 2s (ranks at 127.0.0.1:" in line
