"""The quantized presets of make_model: an MLX-quantized folder that candlewick and mlx-lm load,
holding the float preset's weights quantized."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from engine.loader.hf import load_hf_model
from engine.loader.quantize import QuantSpec
from loadtests.make_model import make_model


def test_quantized_preset_is_the_float_preset_quantized(tmp_path):
    make_model("tiny-q8", tmp_path / "q8", workers=1)
    make_model("tiny", tmp_path / "bf16", workers=1)
    config = json.loads((tmp_path / "q8" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "q8"]  # no leftovers
    stored = load_hf_model(tmp_path / "q8", mx.bfloat16)
    at_load = load_hf_model(tmp_path / "bf16", mx.bfloat16, QuantSpec(8, 64))
    assert isinstance(stored.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    a, b = stored.model.embed_tokens, at_load.model.embed_tokens
    for name in ("weight", "scales", "biases"):
        assert np.array_equal(np.array(getattr(a, name).astype(mx.float32)),
                              np.array(getattr(b, name).astype(mx.float32)))  # fmt: skip


def test_mlx_lm_loads_a_quantized_preset(tmp_path):
    pytest.importorskip("mlx_lm")
    from mlx_lm.utils import load

    make_model("tiny-qwen-q4", tmp_path / "m", workers=1)
    model, _ = load(str(tmp_path / "m"))
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
