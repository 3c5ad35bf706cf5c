"""The llama.cpp comparison starts candlewick as a newcomer would and llama-server with one slot
per stream on the same file (the runs themselves need a llama-server binary: by hand only)."""

from __future__ import annotations

import argparse
from pathlib import Path

from loadtests import bench_llama_cpp


def test_candlewick_starts_with_nothing_set_by_hand(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/x/libopenblas.so")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    monkeypatch.setenv("CANDLEWICK_BLAS_PRELOADED", "system")
    monkeypatch.setenv("HOME", "/home/someone")
    env = bench_llama_cpp.newcomer_env()
    assert env["HOME"] == "/home/someone"
    assert not {"LD_PRELOAD", "OPENBLAS_NUM_THREADS", "CANDLEWICK_BLAS_PRELOADED"} & set(env)
    argv = bench_llama_cpp.candlewick_argv(8123, Path("/tmp/d"))
    assert argv[1:] == ["-m", "server.cli", "serve", "--port", "8123", "--data-dir", "/tmp/d"]


def test_llama_server_gets_a_slot_per_stream_and_the_whole_context():
    args = argparse.Namespace(llama_server=Path("/opt/llama-server"), threads=2, ctx=512)
    argv = bench_llama_cpp.llama_argv(args, Path("/m/model.gguf"), 9000, 16)
    assert argv[0] == "/opt/llama-server"
    flags = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert flags == {
        "-m": "/m/model.gguf", "--port": "9000", "--host": "127.0.0.1", "--threads": "2",
        "-np": "16", "-c": "8192", "--alias": "default",
    }  # fmt: skip
