"""Loading Hugging Face folders and GGUF files: shards, tied embeddings, and clear errors."""

from __future__ import annotations

import json
import shutil

import gguf
import mlx.core as mx
import numpy as np
import pytest

from engine.config import ConfigError
from engine.generate import GenerationSettings, generate_tokens
from engine.loader.build import WeightsError
from engine.loader.gguf import load_gguf_model
from engine.loader.gguf_tensors import UnsupportedTensorType
from engine.loader.hf import load_hf_model
from engine.loader.load import ModelNotFound, load_model
from tests.engine.tiny_models import build_tiny

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    build_tiny("llama", folder)
    return folder


def greedy(model, n=8):
    return list(generate_tokens(model, [5, 6, 7], GenerationSettings(max_tokens=n)))


def test_sharded_checkpoint_loads_the_same(tiny_llama, tmp_path):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    assert greedy(load_hf_model(tmp_path, mx.float32)) == greedy(
        load_hf_model(tiny_llama, mx.float32)
    )


def test_tied_checkpoint_needs_no_lm_head(tmp_path):
    build_tiny("qwen2", tmp_path)
    model = load_hf_model(tmp_path, mx.float32)
    assert "lm_head" not in model


def test_missing_and_misshapen_tensors_are_all_named(tiny_llama, tmp_path):
    shutil.copy(tiny_llama / "config.json", tmp_path / "config.json")
    weights = mx.load(str(tiny_llama / "model.safetensors"))
    del weights["model.norm.weight"]
    weights["model.layers.0.mlp.up_proj.weight"] = mx.zeros((3, 3))
    weights["model.layers.0.extra.weight"] = mx.zeros((1,))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    with pytest.raises(WeightsError) as e:
        load_hf_model(tmp_path, mx.float32)
    message = str(e.value)
    assert "model.norm.weight" in message
    assert "model.layers.0.extra.weight" in message
    assert "model.layers.0.mlp.up_proj.weight has shape (3, 3)" in message


def test_unsupported_architecture_is_named(tiny_llama, tmp_path):
    config = json.loads((tiny_llama / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="gpt_neox"):
        load_hf_model(tmp_path, mx.float32)


def test_unsupported_rope_scaling_is_named(tiny_llama, tmp_path):
    config = json.loads((tiny_llama / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="yarn"):
        load_hf_model(tmp_path, mx.float32)


def test_missing_paths_are_clear(tmp_path):
    with pytest.raises(ModelNotFound, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFound, match="neither"):
        load_model(tmp_path / "weights.bin")
    with pytest.raises(ConfigError, match=r"config\.json"):
        load_model(tmp_path)


def test_iq_quant_tensor_names_tensor_and_type(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(256)
    w.add_feed_forward_length(256)
    w.add_head_count(2)
    w.add_vocab_size(256)
    block = np.zeros((256, 136), dtype=np.uint8)  # IQ4_XS: 136 bytes per 256 values
    w.add_tensor("token_embd.weight", block, raw_dtype=gguf.GGMLQuantizationType.IQ4_XS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedTensorType, match=r"token_embd\.weight.*IQ4_XS"):
        load_gguf_model(tmp_path / "k.gguf", mx.float32)
