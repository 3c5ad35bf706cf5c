"""Quantized layers made dense on the CPU at load: the same numbers, so the same tokens.

Oracles: the file's own weights as gguf-py's `gguf.quants.dequantize` (llama.cpp's
dequantization) reads them, which the dense weights must EQUAL; the quantized model's greedy
tokens and logits, which the dense model must give (logits within float32 rounding: the matmul
order differs); the exact float64 forward in the K-quant fixtures' `.ref.json`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from mlx.utils import tree_flatten

from engine.loader.cpu_weights import (
    DENSE_RAM_SHARE,
    QUANTIZED_TYPES,
    apply_cpu_weights,
    cpu_weights_choice,
    layer_bytes,
    plan_cpu_weights,
    quantized_layers,
)
from engine.loader.gguf import load_gguf_model, unpermute_rows
from engine.loader.load import load_model
from engine.loader.quantize import QuantSpec
from tests.engine.gguf_writer import gguf_name, write_gguf
from tests.engine.test_models_vs_transformers import our_greedy
from tests.engine.tiny_models import VOCAB, build_tiny

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"  # the shared test data beside the repository
KQUANTS = SHARED / "models" / "kquants"
STORIES = SHARED / "models" / "stories260K" / "stories260K.gguf"
PROMPT = [1, 17, 42, 99, 5, 200, 31, 64, 7, 150]
GIB = 1 << 30


def params(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def assert_same_run(dense: nn.Module, quantized: nn.Module, prompt: list[int], steps: int):
    tokens_d, logits_d = our_greedy(dense, prompt, steps)
    tokens_q, logits_q = our_greedy(quantized, prompt, steps)
    assert tokens_d == tokens_q
    for d, q in zip(logits_d, logits_q, strict=True):
        np.testing.assert_allclose(d, q, rtol=0, atol=2e-5 * max(1.0, float(np.abs(q).max())))


def file_weights(path: Path, n_heads: int, n_kv_heads: int) -> dict[str, np.ndarray]:
    """Every 2-D tensor of a llama GGUF, dequantized by gguf-py, under its GGUF name, with the
    Q/K rows back in Hugging Face order."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        if w.ndim != 2:
            continue
        if t.name.endswith("attn_q.weight"):
            w = w[unpermute_rows(n_heads, w.shape[0])]
        elif t.name.endswith("attn_k.weight"):
            w = w[unpermute_rows(n_kv_heads, w.shape[0])]
        out[t.name] = w.astype(np.float32)
    return out


def assert_dense_equals_file(dense: nn.Module, path: Path, n_heads: int, n_kv_heads: int):
    ref = file_weights(path, n_heads, n_kv_heads)
    ours = params(dense)
    checked = 0
    for name, w in ours.items():
        if w.ndim != 2:
            continue
        assert ours[name].dtype == np.float32, name
        assert np.array_equal(w, ref[gguf_name(name)]), name
        checked += 1
    assert checked == len(ref)  # every matrix of the file, the tied head's included once


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_dense_at_load_equals_the_files_numbers_and_the_quantized_run(qtype, tmp_path):
    pytest.importorskip("torch")
    hf = build_tiny("llama3-tied", tmp_path / "hf")
    write_gguf(hf, "llama", tmp_path / "m.gguf", qtype)
    quantized = load_tiny(tmp_path / "m.gguf", "quantized")
    dense = load_tiny(tmp_path / "m.gguf", "dense")

    assert len(quantized_layers(quantized)) == 2 * 7 + 1  # projections and the embedding
    assert quantized_layers(dense) == {}
    assert type(dense.model.embed_tokens) is nn.Embedding  # serves the tied head too
    assert type(dense.model.layers[1].mlp.down_proj) is nn.Linear
    cfg = hf.config
    assert_dense_equals_file(
        dense, tmp_path / "m.gguf", cfg.num_attention_heads, cfg.num_key_value_heads
    )
    prompt = np.random.default_rng(3).integers(3, VOCAB, size=12).tolist()
    assert_same_run(dense, quantized, prompt, 16)


def load_tiny(path: Path, mode: str, **kw) -> nn.Module:
    """A tokenizer-less GGUF of our own, through the same step ``load_model`` takes."""
    model, _ = load_gguf_model(path, mx.float32)
    apply_cpu_weights(model, mode, mx.float32, **kw)
    return model


def kquant(name: str) -> Path:
    path = KQUANTS / f"kq-tiny-llama.{name}.gguf"
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared K-quant fixtures are not beside the repo)")
    return path


@pytest.mark.parametrize("name", ["Q4_K_M", "Q6_K", "Q3_K_M", "Q2_K", "Q5_1"])
def test_k_quant_fixtures_dense_at_load_equal_the_file_and_the_oracle(name):
    """Sub-block layers (Q6_K, Q3_K, Q2_K) and affine ones (Q4_K, Q5_K, Q5_1) alike."""
    path = kquant(name)
    quantized = load_model(path, mx.float32, cpu_weights="quantized")
    dense = load_model(path, mx.float32, cpu_weights="dense")
    assert quantized_layers(quantized.model) and not quantized_layers(dense.model)
    cfg = dense.config
    assert_dense_equals_file(dense.model, path, cfg.num_heads, cfg.num_kv_heads)

    refs = json.loads(Path(f"{path}.ref.json").read_text())
    for prompt_name, ref in refs["prompts"].items():
        oracle = ref["oracle"]
        tokens, logits = our_greedy(dense.model, ref["prompt_ids"], len(oracle["ids"]))
        assert tokens == oracle["ids"], prompt_name
        np.testing.assert_allclose(logits[0][-1], oracle["prompt_logits"], rtol=0, atol=1e-3)
        assert_same_run(dense.model, quantized.model, ref["prompt_ids"], len(oracle["ids"]))


def test_stories260k_quantized_at_load_then_dense_runs_the_same():
    if not STORIES.is_file():
        pytest.skip(f"{STORIES} is absent (the shared test models are not beside the repo)")
    spec = QuantSpec(8, 32)
    quantized = load_model(STORIES, quantize=spec, cpu_weights="quantized")
    dense = load_model(STORIES, quantize=spec, cpu_weights="dense")
    assert quantized_layers(quantized.model) and not quantized_layers(dense.model)
    bos = dense.tokenizer.bos_token_id
    assert_same_run(dense.model, quantized.model, [bos], 64)
    # auto keeps what the user asked to quantize quantized
    auto = load_model(STORIES, quantize=spec, cpu_weights="auto")
    assert len(quantized_layers(auto.model)) == len(quantized_layers(quantized.model))


# --- the choice -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def q4_model(tmp_path_factory):
    """A tiny Q4_1 GGUF (random weights) loaded kept quantized."""
    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("q4")
    write_gguf(build_tiny("llama", tmp / "hf"), "llama", tmp / "m.gguf", Q.Q4_1)
    return tmp / "m.gguf"


def test_layer_bytes_count_the_quantized_and_the_dense_sizes(q4_model):
    model = load_tiny(q4_model, "quantized")
    layers = quantized_layers(model)
    now, dense = layer_bytes(layers)
    expected_dense = sum(
        4 * m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits for m in layers.values()
    )
    assert dense == expected_dense
    densified = load_tiny(q4_model, "dense")
    dense_params = params(densified)
    assert dense == sum(dense_params[f"{p}.weight"].nbytes for p in layers)
    assert 0 < now < dense


def test_auto_is_dense_on_the_cpu_when_it_fits_and_quantized_when_it_does_not(q4_model):
    model = load_tiny(q4_model, "quantized")
    now, dense = layer_bytes(quantized_layers(model))
    growth = dense - now

    def plan(**kw):
        return plan_cpu_weights(model, "auto", is_cpu=True, **kw)

    assert plan(free_ram=64 * GIB).dense
    # The default KV budget (half the RAM, at most 2 GiB) comes first, then the share of the
    # rest: under 4 GiB that is a quarter of the RAM.
    assert plan(free_ram=int(2 * growth / DENSE_RAM_SHARE)).dense
    assert not plan(free_ram=int(2 * growth / DENSE_RAM_SHARE) - 8).dense
    large = plan(free_ram=64 * GIB)
    assert f"{DENSE_RAM_SHARE:g} of the 64.00 GiB available RAM less 2.00 GiB" in large.reason
    small = plan(free_ram=3 * growth)  # half goes to the KV cache; half of the rest < growth
    assert not small.dense and "dense float32 adds" in small.reason
    # A KV budget the user set is kept free: with it the dense copy no longer fits.
    assert plan(free_ram=8 * GIB, kv_cache_memory=GIB).dense
    capped = plan(free_ram=8 * GIB, kv_cache_memory=8 * GIB - growth)
    assert not capped.dense and "--kv-cache-memory" in capped.reason
    assert not plan(free_ram=64 * GIB, quantized_on_request=True).dense
    # The forced choices, and GPUs, which always keep quantized weights.
    assert plan_cpu_weights(model, "dense", is_cpu=True, free_ram=0).dense
    assert not plan_cpu_weights(model, "quantized", is_cpu=True, free_ram=64 * GIB).dense
    assert not plan_cpu_weights(model, "dense", is_cpu=False, free_ram=None).dense
    assert not plan_cpu_weights(model, "auto", is_cpu=False, free_ram=None).dense


def test_auto_at_load_goes_dense_and_a_kv_cap_keeps_it_quantized_saying_why(q4_model, caplog):
    assert mx.default_device() == mx.cpu
    caplog.set_level(logging.INFO, logger="engine.loader.cpu_weights")
    dense = load_tiny(q4_model, "auto")
    assert not quantized_layers(dense)
    assert "made dense" in caplog.text
    caplog.clear()
    # A KV budget of a petabyte leaves no room: the layers stay quantized, with a warning.
    kept = load_tiny(q4_model, "auto", kv_cache_memory=1 << 50)
    assert all(isinstance(m, QUANTIZED_TYPES) for m in quantized_layers(kept).values())
    assert len(quantized_layers(kept)) == 2 * 7 + 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "stay quantized" in warnings[0].getMessage()
    assert "--kv-cache-memory" in warnings[0].getMessage()


# --- the setting ------------------------------------------------------------------------------


def test_the_setting_is_validated_with_a_clear_error(q4_model, tmp_path):
    from server.settings import ServerSettings

    for ok in ("auto", "dense", "quantized", "DENSE", None, ""):
        assert cpu_weights_choice(ok) in ("auto", "dense", "quantized")
    with pytest.raises(
        ValueError, match=r"--cpu-weights .* one of auto, dense, quantized, got 'fast'"
    ):
        cpu_weights_choice("fast")
    with pytest.raises(ValueError, match="--cpu-weights"):
        ServerSettings(cpu_weights="fast")
    assert ServerSettings().cpu_weights == "auto"
    # A bad value fails before anything loads (the path does not even exist).
    with pytest.raises(ValueError, match="--cpu-weights"):
        load_model(tmp_path / "absent.gguf", cpu_weights="fp32")


def test_the_flag_and_its_environment_variable(monkeypatch, capsys):
    from server.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.cpu_weights == "auto"
    args = build_parser().parse_args(["serve", "--cpu-weights", "quantized"])
    assert args.cpu_weights == "quantized"
    assert build_parser().parse_args(["generate", "--prompt", "x"]).cpu_weights == "auto"
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "--cpu-weights", "fast"])
    assert e.value.code == 2
    assert "one of auto, dense, quantized, got 'fast'" in capsys.readouterr().err
    monkeypatch.setenv("CANDLEWICK_CPU_WEIGHTS", "dense")
    assert build_parser().parse_args(["serve"]).cpu_weights == "dense"
    monkeypatch.setenv("CANDLEWICK_CPU_WEIGHTS", "turbo")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve"])
    assert "got 'turbo'" in capsys.readouterr().err
