"""Quantized bases over HTTP: a LoRA adapter on a q8 base (the base matmul quantized, A/B float)
gives the tokens the same adapter gives on the dequantized base; `--quantize` at load serves what
the converted folder serves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import mlx.core as mx
import mlx.nn as nn
import pytest

from engine.loader.convert import convert
from engine.loader.hf import load_hf_model
from engine.loader.load import load_model
from engine.loader.quantize import QuantSpec
from server.settings import ServerSettings
from server.state import ServerState
from tests.server.fixtures import running_server, write_tiny_model

pytest.importorskip("peft")
pytest.importorskip("torch")

PROMPT = "adapt me"


def dequantized_copy(quantized: Path, out: Path) -> Path:
    """The quantized folder's model as a float folder: every weight dequantized in float32."""
    from loadtests.export_hf import dense_weights

    out.mkdir()
    model = load_hf_model(quantized, mx.float32)
    mx.save_safetensors(str(out / "model.safetensors"), dense_weights(model, mx.float32))
    config = json.loads((quantized / "config.json").read_text())
    del config["quantization"], config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(quantized / name, out / name)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tests.server.test_adapters import make_peft

    root = tmp_path_factory.mktemp("qlora")
    base = write_tiny_model(root / "base")
    q8 = convert(base, root / "q8", QuantSpec(8, 64))
    deq = dequantized_copy(q8, root / "deq")
    adapter = make_peft(base, root / "adapter", 7, ["q_proj", "v_proj", "down_proj"])
    return root, base, q8, deq, adapter


def generate(root: Path, model: Path, adapter: Path | None, loaded=None, **kw) -> str:
    """A greedy completion from a real server on ``model`` (with ``adapter`` uploaded)."""
    settings = ServerSettings(model=str(model), served_model_name="base", num_blocks=64,
                              data_dir=root / f"data-{model.name}", max_loras=2, max_lora_rank=8,
                              **kw)  # fmt: skip
    state = ServerState(settings)
    state.start(loaded)
    with running_server(settings, state) as url, httpx.Client(base_url=url, timeout=60) as c:
        name = "base"
        if adapter is not None:
            files = {
                "config": ("adapter_config.json", (adapter / "adapter_config.json").read_bytes()),
                "weights": ("adapter_model.safetensors",
                            (adapter / "adapter_model.safetensors").read_bytes()),
            }  # fmt: skip
            r = c.post("/v1/adapters", data={"name": "ad"}, files=files)
            assert r.status_code == 201, r.text
            name = "ad"
        body = {"model": name, "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]


def test_adapter_on_q8_base_equals_adapter_on_dequantized_base(world):
    root, _, q8, deq, adapter = world
    loaded = load_model(q8)
    on_q8 = generate(root, q8, adapter, loaded)
    on_deq = generate(root, deq, adapter)
    base_only = generate(root, q8, None)
    assert on_q8 == on_deq
    assert on_q8 != base_only, "the adapter must change the output"
    # The served base kept every projection (7 per layer) and the head quantized.
    modules = [m for _, m in loaded.model.named_modules()]
    assert sum(isinstance(m, nn.QuantizedLinear) for m in modules) == 2 * 7 + 1
    assert not any(type(m) is nn.Linear for m in modules)


def test_quantize_at_load_serves_what_the_converted_folder_serves(world):
    root, base, q8, _, adapter = world
    converted = generate(root, q8, adapter)
    at_load = generate(root, base, adapter, quantize="q8", quantize_group_size=64)
    assert converted == at_load
