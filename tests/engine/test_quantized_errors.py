"""Quantized folders whose tensors contradict their config: one error naming the file, each
tensor and its problem, all at once; `candlewick serve` exits 1 instead of serving."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from engine.config import ConfigError
from engine.loader.hf import load_hf_model
from engine.loader.quantize import QuantizationError, QuantSpec, scheme_from_config
from tests.engine.mlx_reference import mlx_quantize
from tests.engine.tiny_models import build_tiny

pytest.importorskip("torch")
pytest.importorskip("mlx_lm")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("q")
    build_tiny("llama", root / "float")
    return mlx_quantize(root / "float", root / "q4", 4, 64)


def damaged(src: Path, out: Path, edit) -> Path:
    out.mkdir()
    config = json.loads((src / "config.json").read_text())
    weights = mx.load(str(src / "model.safetensors"))
    edit(config, weights)
    (out / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    return out


def test_every_contradiction_is_named_with_its_file(quantized, tmp_path):
    def edit(config, w):
        del w["model.layers.0.mlp.up_proj.scales"]
        w["model.layers.0.mlp.down_proj.weight"] = mx.zeros((64, 8), mx.uint32)
        w["model.layers.1.self_attn.q_proj.biases"] = mx.zeros((64, 3))
        w["model.layers.1.mlp.gate_proj.weight"] = mx.zeros((128, 64))  # float, yet has scales
        config["quantization"]["model.layers.1.mlp.up_proj"] = False  # but stored packed

    folder = damaged(quantized, tmp_path / "bad", edit)
    with pytest.raises(QuantizationError) as e:
        load_hf_model(folder, mx.float32)
    problems = e.value.problems
    assert len(problems) == 5, problems
    assert all(p.startswith("model.safetensors: ") for p in problems)
    message = str(e.value)
    assert (
        "model.layers.0.mlp.up_proj.scales is missing (4-bit, group 64 needs (128, 1))" in message
    )
    assert (
        "model.layers.0.mlp.down_proj.weight has packed shape (64, 8), 4-bit, group 64 needs "
        "(64, 16)" in message
    )
    assert "model.layers.1.self_attn.q_proj.biases has shape (64, 3)" in message
    assert "model.layers.1.mlp.gate_proj.weight is float32, packed 4-bit" in message
    assert "model.layers.1.mlp.up_proj is packed" in message


def test_bad_quantization_config_is_named(quantized, tmp_path):
    def edit(config, _):
        config["quantization"] = {"bits": 7, "group_size": 16, "mode": "mxfp9"}
        config["quantization"]["model.layers.9.mlp.up_proj"] = {"bits": 4}
        config.pop("quantization_config")

    folder = damaged(quantized, tmp_path / "bad", edit)
    with pytest.raises(ConfigError) as e:
        load_hf_model(folder, mx.float32)
    message = str(e.value)
    for part in ("mode 'mxfp9'", "bits 7", "group_size 16", "lacks integer group_size"):
        assert part in message


def test_other_quantization_formats_are_refused_by_name():
    with pytest.raises(ConfigError, match="'gptq'"):
        scheme_from_config({"quantization_config": {"quant_method": "gptq", "bits": 4}})
    assert scheme_from_config({"model_type": "llama"}) is None


def test_an_override_for_a_module_the_model_lacks(quantized, tmp_path):
    def edit(config, _):
        config["quantization"]["model.layers.7.mlp.up_proj"] = {"bits": 4, "group_size": 64}

    folder = damaged(quantized, tmp_path / "bad", edit)
    with pytest.raises(QuantizationError, match=r"names model\.layers\.7\.mlp\.up_proj"):
        load_hf_model(folder, mx.float32)


def test_quantizing_a_quantized_folder_is_refused(quantized):
    with pytest.raises(ConfigError, match="already quantized"):
        load_hf_model(quantized, mx.float32, QuantSpec(8, 64))


def test_serve_exits_1_on_a_contradicting_folder(quantized, tmp_path):
    from tests.server.fixtures import write_tiny_model

    def edit(_, w):
        del w["model.layers.0.mlp.up_proj.biases"]

    folder = damaged(quantized, tmp_path / "bad", edit)
    tok = write_tiny_model(tmp_path / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tok / name).read_bytes())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(folder), "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "model.layers.0.mlp.up_proj.biases is missing" in done.stderr
