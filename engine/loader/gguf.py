"""GGUF files (arch llama, mistral, qwen2, qwen3): config from metadata, tensors renamed to
Hugging Face's names, quantized blocks (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, the K-quants Q2_K..Q6_K) kept
quantized and exact, tokenizer and chat template embedded."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as Q

from engine.config import ConfigError, ModelConfig, RopeConfig
from engine.loader.build import LoadedModel, WeightsError, build_model, progress
from engine.loader.gguf_metadata import open_gguf, read_metadata
from engine.loader.gguf_tensors import (
    AffineQuantized,
    Quantized,
    SubBlockQuantized,
    check_types,
    tensor_to_mlx,
)
from engine.loader.quantize import QuantSpec
from engine.models.registry import architecture
from engine.tokenizer import Tokenizer

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL = re.compile(r"(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if unknown."""
    if m := _BLOCK.match(gguf_name):
        module = _BLOCK_NAMES.get(m.group(2))
        return module and f"model.layers.{m.group(1)}.{module}.{m.group(3)}"
    if m := _GLOBAL.match(gguf_name):
        module = _GLOBAL_NAMES.get(m.group(1))
        return module and f"{module}.{m.group(2)}"
    return None


def config_from_gguf(
    meta: dict[str, Any], tensor_names: set[str], freq_factors: tuple
) -> ModelConfig:
    arch = meta.get("general.architecture", "")
    architecture(arch)  # a clear error for an architecture we do not run

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ConfigError(f"GGUF metadata lacks {arch}.{name}")
        return value

    num_heads = int(key("attention.head_count"))
    kv = key("attention.head_count_kv", num_heads)
    if isinstance(kv, list):
        raise ConfigError("per-layer attention.head_count_kv is not supported")
    hidden = int(key("embedding_length"))
    head_dim = int(key("attention.key_length", hidden // num_heads))
    rope = RopeConfig(
        theta=float(key("rope.freq_base", 10000.0)),
        dims=int(key("rope.dimension_count", head_dim)),
        freq_factors=freq_factors,
    )
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling == "linear":
        rope = RopeConfig(
            theta=rope.theta,
            dims=rope.dims,
            scaling="linear",
            factor=float(key("rope.scaling.factor")),
            freq_factors=freq_factors,
        )
    elif scaling not in (None, "none"):
        raise ConfigError(f"GGUF rope scaling type {scaling!r} is not supported")
    layers = int(key("block_count"))
    window = meta.get(f"{arch}.attention.sliding_window")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        model_type=arch,
        vocab_size=len(meta.get("tokenizer.ggml.tokens") or []) or int(key("vocab_size")),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=num_heads,
        num_kv_heads=int(kv),
        head_dim=head_dim,
        intermediate_size=int(key("feed_forward_length")),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope=rope,
        max_position_embeddings=int(key("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        o_bias="blk.0.attn_output.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        layer_windows=(int(window),) * layers if window else (),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def unpermute_rows(n_heads: int, rows: int) -> np.ndarray:
    """Row order that turns llama.cpp's Q/K layout (rotate adjacent pairs) back into Hugging
    Face's (rotate halves): within each head, rows (i, j) of shape [D/2, 2] become [2, D/2]."""
    return np.arange(rows).reshape(n_heads, rows // n_heads // 2, 2).transpose(0, 2, 1).reshape(-1)


def load_gguf_model(path: Path, dtype: mx.Dtype) -> tuple[Any, dict[str, Any]]:
    """The model and the file's metadata (which also carries the tokenizer)."""
    reader = open_gguf(path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    freq_factors: tuple = ()
    if "rope_freqs.weight" in names:
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        freq_factors = tuple(float(x) for x in np.asarray(t.data, dtype=np.float64).reshape(-1))
    cfg = config_from_gguf(meta, names, freq_factors)
    check_types(path.name, reader.tensors)  # before any tensor is converted
    permuted = architecture(cfg.model_type).GGUF_QK_PERMUTED
    weights: dict[str, mx.array] = {}
    specs: dict[str, QuantSpec] = {}
    sub_blocks: dict[str, str] = {}  # module -> Q6_K / Q3_K / Q2_K
    unknown = []
    for tensor in progress(reader.tensors, desc=f"loading {path.name}", total=len(names)):
        if tensor.name == "rope_freqs.weight":
            continue
        name = hf_name(tensor.name)
        if name is None:
            unknown.append(tensor.name)
            continue
        value = tensor_to_mlx(tensor, dtype)
        if permuted and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads
            value = _take_rows(value, unpermute_rows(heads, value.shape[0]))
        module = name.rpartition(".")[0]
        if isinstance(value, AffineQuantized):
            specs[module] = QuantSpec(value.bits, value.group_size)
            weights[f"{module}.weight"] = value.weight
            weights[f"{module}.scales"] = value.scales
            weights[f"{module}.biases"] = value.biases
        elif isinstance(value, SubBlockQuantized):
            sub_blocks[module] = value.fmt.name
            weights.update({f"{module}.{k}": v for k, v in value.arrays().items()})
        else:
            weights[name] = value
    if unknown:
        raise WeightsError(
            f"{path.name} has tensors candlewick does not know: {', '.join(unknown)}"
        )
    return build_model(cfg, weights, specs, sub_blocks=sub_blocks), meta


def _take_rows(value: mx.array | Quantized, rows: np.ndarray) -> mx.array | Quantized:
    if isinstance(value, (AffineQuantized, SubBlockQuantized)):
        return value.take_rows(rows)
    return value[mx.array(rows)]


K_QUANTS = frozenset({Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q3_K, Q.Q2_K})


def activation_dtype(tensors: list, dtype: mx.Dtype) -> mx.Dtype:
    """float32 for a file with K-quant tensors, else `dtype`.

    Q4_K/Q5_K scales and biases are float32 (the only exact choice), and a quantized matmul or
    embedding with float32 scales returns float32 whatever the activations' dtype; Q6_K/Q3_K/
    Q2_K layers compute in float32 and their embedding rows come out float32. So from the
    embedding on such a model computes in float32 anyway; saying so makes the KV cache and every
    layer agree instead of mixing float16 keys with float32 queries. On the CPU (float32
    already) this changes nothing; on a GPU it costs float32 activations and KV cache.
    """
    if any(t.tensor_type in K_QUANTS for t in tensors):
        return mx.float32
    return dtype


def load_gguf(path: Path, dtype: mx.Dtype) -> LoadedModel:
    dtype = activation_dtype(open_gguf(path).tensors, dtype)
    model, meta = load_gguf_model(path, dtype)
    return LoadedModel(
        model=model,
        tokenizer=Tokenizer.from_gguf(meta),
        config=model.config,
        name=path.stem,
        path=path,
        dtype=dtype,
    )
