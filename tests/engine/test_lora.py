"""LoRA in the engine against PEFT: the same adapters on the same tiny base give the same greedy
tokens, alone and mixed with other adapters and the base model in one batch."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from adapters.lora_request import lora_request
from adapters.types import AdapterVersion
from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.loader.hf import load_hf_model
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from tests.engine.test_engine import run
from tests.engine.tiny_models import VOCAB, build_tiny, reference_greedy

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

STEPS = 10
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "attn-r4": dict(r=4, lora_alpha=8, target_modules=ATTN),
    "mlp-r8-rslora": dict(r=8, lora_alpha=16, target_modules=MLP, use_rslora=True),
    "all-r2": dict(r=2, lora_alpha=5, target_modules=ATTN + MLP),
    "qv-pattern": dict(
        r=4,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 6},
        alpha_pattern={"v_proj": 3},
    ),
}


def make_adapter(base_folder: Path, out: Path, seed: int, **lora_kwargs) -> AdapterVersion:
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    config = peft.LoraConfig(init_lora_weights=False, **lora_kwargs)
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    peft_model.save_pretrained(out)
    weights = out / "adapter_model.safetensors"
    config_path = out / "adapter_config.json"
    return AdapterVersion(
        name=out.name,
        version=1,
        digest="sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest(),
        config_digest="sha256:" + hashlib.sha256(config_path.read_bytes()).hexdigest(),
        rank=lora_kwargs["r"],
        target_modules=tuple(lora_kwargs["target_modules"]),
        created=time.time(),
        weights_path=weights,
        config_path=config_path,
    )


def peft_greedy(base_folder: Path, adapter: Path | None, prompt: list[int]) -> list[int]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter)
    model.eval()
    return reference_greedy(model, prompt, STEPS)[0]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    base = root / "base"
    build_tiny(request.param, base)
    versions = {
        name: make_adapter(base, root / name, seed=i, **kw)
        for i, (name, kw) in enumerate(ADAPTERS.items())
    }
    prompt = np.random.default_rng(9).integers(3, VOCAB, size=10).tolist()
    expected = {
        name: peft_greedy(base, v.weights_path.parent, prompt) for name, v in versions.items()
    }
    expected["base"] = peft_greedy(base, None, prompt)
    return base, versions, prompt, expected


def engine_requests(versions, prompt, names, config, copies=1):
    params = SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True)
    reqs = []
    for c in range(copies):
        for name in names:
            v = versions.get(name)
            lora = lora_request(v, config, max_rank=8) if v else None
            reqs.append(EngineRequest(f"{name}#{c}", prompt, params, lora=lora))
    return reqs


def test_adapters_really_change_the_output(setup):
    _, _, _, expected = setup
    for name in ADAPTERS:
        assert expected[name] != expected["base"], name


@pytest.mark.parametrize("max_loras", [4, 1])
def test_mixed_batch_equals_peft(setup, max_loras):
    base, versions, prompt, expected = setup
    model = load_hf_model(base, mx.float32)
    core = EngineCore(
        model,
        EngineConfig(num_blocks=256, block_size=4, max_loras=max_loras, max_lora_rank=8),
        mx.float32,
    )
    names = ["base", *ADAPTERS]
    tokens, _ = run(core, engine_requests(versions, prompt, names, model.config, copies=2))
    for rid, got in tokens.items():
        assert got == expected[rid.split("#")[0]], rid
    slots = core.scheduler.slots
    assert slots.resident <= max_loras and core.stats.adapters_loaded == slots.resident
    assert all(r == 0 for r in slots.refs)
    assert core.kv.num_free_blocks == core.num_blocks - 1
    if max_loras == 1:
        assert core.stats.adapter_loads > 1  # slots were reused across adapters


def test_adapter_digest_keeps_kv_blocks_apart(setup):
    base, versions, prompt, _ = setup
    model = load_hf_model(base, mx.float32)
    core = EngineCore(
        model, EngineConfig(num_blocks=256, block_size=4, max_loras=2, max_lora_rank=8), mx.float32
    )
    long_prompt = prompt * 3
    run(core, engine_requests(versions, long_prompt, ["base"], model.config))
    hits = core.kv.prefix_cache_stats.hits
    run(core, engine_requests(versions, long_prompt, ["attn-r4"], model.config))
    assert core.kv.prefix_cache_stats.hits == hits  # no sharing across adapters
    run(core, engine_requests(versions, long_prompt, ["attn-r4"], model.config))
    assert core.kv.prefix_cache_stats.hits > hits  # the same adapter shares its own blocks
