"""MLX-quantized folders written by mlx-lm itself, and float folders quantized while loading:
our logits against mlx-lm's forward pass on the same folder, for every architecture."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from engine.loader.hf import load_hf_model
from engine.loader.quantize import QuantSpec
from tests.engine.mlx_reference import assert_logits_match, mlx_lm_greedy, mlx_quantize
from tests.engine.test_models_vs_transformers import our_greedy
from tests.engine.tiny_models import VOCAB, build_tiny

pytest.importorskip("torch")
pytest.importorskip("mlx_lm")

STEPS = 16
# mlx-lm's llama ignores a sliding window the config does not spell as layer_types; a window
# wider than the test's sequences keeps the comparison about quantization.
# Its llama3 RoPE differs from transformers' at this tiny config's scale, so the tied-head case
# is a plain llama with tied embeddings.
OVERRIDES = {"mistral": {"sliding_window": 64}, "tied": {"tie_word_embeddings": True}}

CASES = [
    # (tiny architecture, bits, group size, mlx-lm recipe)
    ("llama", 4, 64, None),
    ("tied", 8, 32, None),  # a quantized tied head: the embedding's as_linear
    ("mistral", 6, 64, None),
    ("qwen2", 3, 32, None),
    ("qwen3", 5, 128, None),  # 64-wide inputs do not fit group 128: those stay float
    ("qwen2", 2, 64, None),
    ("llama", 3, 64, "mixed_3_6"),  # per-module overrides: 6-bit v/down/lm_head, 3-bit rest
]


def prompt() -> list[int]:
    return np.random.default_rng(3).integers(3, VOCAB, size=12).tolist()


@pytest.mark.parametrize(("arch", "bits", "group", "recipe"), CASES, ids=str)
def test_mlx_lm_quantized_folder_matches_mlx_lm(arch, bits, group, recipe, tmp_path):
    build_tiny("llama" if arch == "tied" else arch, tmp_path / "float", **OVERRIDES.get(arch, {}))
    folder = mlx_quantize(tmp_path / "float", tmp_path / "q", bits, group, recipe)
    ref_tokens, ref_logits = mlx_lm_greedy(folder, prompt(), STEPS)

    model = load_hf_model(folder, mx.float32)
    tokens, logits = our_greedy(model, prompt(), STEPS)

    assert len(set(ref_tokens)) > 2, "degenerate reference: the test would prove little"
    assert_logits_match(logits, ref_logits)
    assert tokens == ref_tokens
    # Kept quantized in memory, at the setting mlx-lm chose per module.
    layer = model.model.layers[0]
    if group == 128:  # 64-wide inputs stay float, 128-wide ones are quantized
        assert isinstance(model.model.embed_tokens, nn.Embedding)
        assert isinstance(layer.mlp.up_proj, nn.Linear)
        quantized = layer.mlp.down_proj
    else:
        assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
        quantized = layer.mlp.up_proj
    assert isinstance(quantized, nn.QuantizedLinear)
    assert (quantized.bits, quantized.group_size) == (bits, group)
    if recipe:
        # The recipe gives the last layer's v/down projections and the head 6 bits.
        last = model.model.layers[-1]
        assert last.mlp.down_proj.bits == 6 and last.self_attn.v_proj.bits == 6
        assert layer.mlp.down_proj.bits == 3 and model.lm_head.bits == 6


def test_bfloat16_scales_load_as_mlx_lm_reads_them(tmp_path):
    """Published MLX folders store scales and biases in bfloat16; on the CPU we compute in
    float32, so the reference is mlx-lm's model on the same folder cast to float32."""
    build_tiny("qwen3", tmp_path / "float")
    folder = mlx_quantize(tmp_path / "float", tmp_path / "q", 4, 32, dtype=mx.bfloat16)
    assert mx.load(str(folder / "model.safetensors"))["model.norm.weight"].dtype == mx.bfloat16
    ref_tokens, ref_logits = mlx_lm_greedy(folder, prompt(), STEPS, dtype=mx.float32)
    tokens, logits = our_greedy(load_hf_model(folder, mx.float32), prompt(), STEPS)
    assert_logits_match(logits, ref_logits)
    assert tokens == ref_tokens


def test_modules_marked_false_stay_float(tmp_path):
    """Mixed recipes of other tools map modules to `false`; mlx-lm reads that as "float"."""
    import json

    build_tiny("qwen2", tmp_path / "float")
    folder = mlx_quantize(
        tmp_path / "float", tmp_path / "q", 4, 64, predicate=lambda p, _: "down_proj" not in p
    )
    config = json.loads((folder / "config.json").read_text())
    for i in range(2):
        config["quantization"][f"model.layers.{i}.mlp.down_proj"] = False
    (folder / "config.json").write_text(json.dumps(config))
    ref_tokens, ref_logits = mlx_lm_greedy(folder, prompt(), STEPS)
    model = load_hf_model(folder, mx.float32)
    tokens, logits = our_greedy(model, prompt(), STEPS)
    assert_logits_match(logits, ref_logits)
    assert tokens == ref_tokens
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[1].mlp.up_proj, nn.QuantizedLinear)


def test_a_quantization_config_alone_is_read(tmp_path):
    """Folders that kept only Hugging Face's spelling (`quantization_config`) load the same."""
    import json

    build_tiny("llama", tmp_path / "float")
    folder = mlx_quantize(tmp_path / "float", tmp_path / "q", 4, 64)
    both = our_greedy(load_hf_model(folder, mx.float32), prompt(), 4)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization"]
    (folder / "config.json").write_text(json.dumps(config))
    alone = our_greedy(load_hf_model(folder, mx.float32), prompt(), 4)
    assert both[0] == alone[0]
    assert all(np.array_equal(a, b) for a, b in zip(both[1], alone[1], strict=True))


@pytest.mark.parametrize(("arch", "bits", "group"), [("llama", 4, 64), ("qwen2", 8, 32)])
def test_quantize_at_load_equals_mlx_lm_quantize_model(arch, bits, group, tmp_path):
    build_tiny(arch, tmp_path / "float")
    folder = mlx_quantize(tmp_path / "float", tmp_path / "q", bits, group)
    stored = load_hf_model(folder, mx.float32)
    at_load = load_hf_model(tmp_path / "float", mx.float32, QuantSpec(bits, group))

    ours = dict(_flat(at_load.parameters()))
    theirs = dict(_flat(stored.parameters()))
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert np.array_equal(np.array(ours[name]), np.array(value)), name
    tokens_a, logits_a = our_greedy(at_load, prompt(), 8)
    tokens_b, logits_b = our_greedy(stored, prompt(), 8)
    assert tokens_a == tokens_b
    for a, b in zip(logits_a, logits_b, strict=True):
        assert np.array_equal(a, b)


def _flat(tree, prefix=""):
    from mlx.utils import tree_flatten

    return tree_flatten(tree, prefix)


def test_quantize_at_load_streams_one_tensor_at_a_time(tmp_path):
    """Peak memory while loading is the quantized model plus one float tensor, not the float
    model: each tensor is read, quantized and released before the next."""
    from mlx.utils import tree_flatten

    build_tiny("llama", tmp_path, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
               vocab_size=4096)  # fmt: skip
    float_bytes = (tmp_path / "model.safetensors").stat().st_size
    largest = 4096 * 256 * 4  # the float32 embedding (and head)
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    model = load_hf_model(tmp_path, mx.float32, QuantSpec(4, 64))
    peak = mx.get_peak_memory() - before
    quantized = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert quantized < float_bytes / 6
    assert peak <= quantized + 1.1 * largest, (peak, quantized, largest)
