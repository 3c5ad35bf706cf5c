"""A LoRA adapter served on a quantized base made dense at load gives the tokens it gives on the
base kept quantized: the slots wrap the dense projections as they wrap the quantized ones."""

from __future__ import annotations

import mlx.nn as nn
import pytest

from engine.loader.cpu_weights import quantized_layers
from engine.loader.load import load_model
from engine.lora.layers import LoRALinear
from tests.server.test_quantized_serving import generate, world  # noqa: F401  (the fixture)

pytest.importorskip("peft")
pytest.importorskip("torch")


def test_adapter_on_a_dense_at_load_base_equals_it_on_the_quantized_base(world):  # noqa: F811
    root, _, q8, _, adapter = world
    dense = load_model(q8, cpu_weights="dense")
    assert not quantized_layers(dense.model)
    on_dense = generate(root, q8, adapter, dense)
    on_quantized = generate(root, q8, adapter, cpu_weights="quantized")
    on_auto = generate(root, q8, adapter, cpu_weights="auto")  # loaded by the server: dense
    assert on_dense == on_quantized == on_auto
    assert on_dense != generate(root, q8, None, dense), "the adapter must change the output"
    # The adapter slots wrapped the dense projections.
    q_proj = dense.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALinear) and type(q_proj.base) is nn.Linear
