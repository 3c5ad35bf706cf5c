"""The interleaved A/B driver against two real servers: every turn measured, in both orders."""

from __future__ import annotations

import json

import pytest

from loadtests import ab_streams
from tests.server.fixtures import serving_tiny, write_tiny_model

pytest.importorskip("torch")


def test_two_servers_take_turns_and_every_run_is_recorded(tmp_path, capsys):
    folder = write_tiny_model(tmp_path / "tiny")
    with (
        serving_tiny(folder, "tiny", num_blocks=128) as (a, _),
        serving_tiny(folder, "tiny", num_blocks=128, engine_process=True) as (b, _),
    ):
        ports = [url.rsplit(":", 1)[1] for url in (a, b)]
        out = tmp_path / "runs.json"
        argv = [f"thread={ports[0]}", f"process={ports[1]}", "--model", "tiny"]
        ab_streams.main([*argv, "--rounds", "2", "--tokens", "12", "--concurrency", "3"])
        ab_streams.main([*argv, "--rounds", "1", "--tokens", "8", "--json", str(out)])
    runs = json.loads(out.read_text())
    assert set(runs) == {"thread", "process"}
    assert all(len(run["ms"]) == 1 and run["ms"][0] > 0 for run in runs.values())
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("thread: one stream ") and "3 streams" in printed[0]
    assert printed[1].startswith("process: one stream ") and "(runs " in printed[1]


def test_a_server_that_answers_an_error_stops_the_comparison(tmp_path):
    folder = write_tiny_model(tmp_path / "tiny")
    with serving_tiny(folder, "tiny", num_blocks=128) as (url, _):
        port = url.rsplit(":", 1)[1]
        with pytest.raises(RuntimeError, match="404"):
            ab_streams.main([f"a={port}", "--model", "no-such-model", "--rounds", "1"])
        with pytest.raises(RuntimeError, match="maximum context length"):  # refused: too long
            ab_streams.main([f"a={port}", "--model", "tiny", "--rounds", "1", "--tokens", "600"])
