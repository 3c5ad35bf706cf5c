"""Write a GGUF model as a Hugging Face folder, so other engines can run the very same weights.

Benchmarks against mlx-lm (or transformers) need both systems to run identical numbers; mlx-lm
cannot read llama.cpp's Q4_1 blocks, so we hand it a folder instead. The folder is built from
what `engine.loader.load_model` made of the GGUF: tensors already carry Hugging Face names and
layout (llama.cpp's Q/K row permutation undone), and quantized layers are dequantized in float32,
which reproduces llama.cpp's `d * q + m` exactly. A bfloat16 export rounds those values once.

    python -m loadtests.export_hf --out /tmp/smollm2-hf [--model PATH] [--dtype float32|bfloat16]

The written config.json is read back through candlewick's own config parser and must describe
the same model, so a field we cannot express in Hugging Face's terms fails the export instead of
silently producing a different model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from engine.config import ModelConfig
from engine.loader.build import LoadedModel
from engine.loader.gguf_metadata import open_gguf, read_metadata
from engine.loader.gguf_tensors import AffineQuantized
from engine.loader.load import load_model
from engine.models.registry import config_from_hf

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


class ExportError(ValueError):
    """A model this exporter cannot write as an equivalent Hugging Face folder."""


def dense_weights(model: nn.Module, dtype: mx.Dtype) -> dict[str, mx.array]:
    """Every parameter under its Hugging Face name, quantized layers dequantized.

    A quantized module's `weight`/`scales`/`biases` become one dense `weight` [out, in].
    """
    quantized = {
        path: module
        for path, module in model.named_modules()
        if isinstance(module, nn.QuantizedLinear | nn.QuantizedEmbedding)
    }
    weights: dict[str, mx.array] = {}
    for name, value in tree_flatten(model.parameters()):
        module, _, leaf = name.rpartition(".")
        if module in quantized:
            if leaf != "weight":
                continue  # scales / biases: folded into the dense weight below
            q = quantized[module]
            value = AffineQuantized(
                q.weight, q.scales, q.biases, bits=q.bits, group_size=q.group_size
            ).dequantize()
        weights[name] = value.astype(dtype)
    return weights


def hf_config(cfg: ModelConfig, dtype_name: str, special: dict[str, int]) -> dict[str, Any]:
    """config.json for `cfg` (transformers 4 spelling, which transformers 5 still reads)."""
    if cfg.model_type not in ARCHITECTURES:
        raise ExportError(f"no Hugging Face architecture known for model_type {cfg.model_type!r}")
    rope = cfg.rope
    if rope.freq_factors:
        raise ExportError(
            "the GGUF stores per-frequency RoPE factors (rope_freqs), which config.json cannot "
            "express exactly"
        )
    windows = {w for w in cfg.layer_windows if w is not None}
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": rope.theta,
        "rope_scaling": (
            {"rope_type": "linear", "factor": rope.factor} if rope.scaling == "linear" else None
        ),
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.qkv_bias,
        "mlp_bias": cfg.mlp_bias,
        "torch_dtype": dtype_name,
        **special,
    }
    if rope.dims != cfg.head_dim:
        config["partial_rotary_factor"] = rope.dims / cfg.head_dim
    if windows:
        config["sliding_window"] = max(windows)
        config["use_sliding_window"] = True
    return config


def special_token_ids(loaded: LoadedModel) -> dict[str, int]:
    """bos/eos (from the engine's tokenizer) and pad/unk (from the GGUF metadata, if any)."""
    tok = loaded.tokenizer
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    if loaded.path.suffix == ".gguf":
        meta = read_metadata(open_gguf(loaded.path))
        ids["pad_token_id"] = meta.get("tokenizer.ggml.padding_token_id")
        ids["unk_token_id"] = meta.get("tokenizer.ggml.unknown_token_id")
    return {k: int(v) for k, v in ids.items() if v is not None}


def tokenizer_config(loaded: LoadedModel, special: dict[str, int]) -> dict[str, Any]:
    """tokenizer_config.json; the add_*_token flags state what tokenizer.json already does."""
    inner = loaded.tokenizer.backend
    added = inner.encode("", add_special_tokens=True).ids
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": "bos_token_id" in special and added[:1] == [special["bos_token_id"]],
        "add_eos_token": "eos_token_id" in special and added[-1:] == [special["eos_token_id"]],
        "clean_up_tokenization_spaces": False,
        "model_max_length": loaded.config.max_position_embeddings,
    }
    for name in ("bos", "eos", "pad", "unk"):
        if f"{name}_token_id" in special:
            config[f"{name}_token"] = inner.id_to_token(special[f"{name}_token_id"])
    if loaded.tokenizer.chat_template is not None:
        config["chat_template"] = loaded.tokenizer.chat_template
    return config


def generation_config(loaded: LoadedModel, special: dict[str, int]) -> dict[str, Any]:
    """Every id that ends generation (EOS plus end-of-turn tokens the GGUF names)."""
    eos = sorted(loaded.tokenizer.eos_token_ids)
    config: dict[str, Any] = {k: v for k, v in special.items() if k != "unk_token_id"}
    config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return config


def export(model_path: Path | None, out: Path, dtype_name: str = "float32") -> Path:
    """Write `model_path` (None: the default model) to the folder `out`; returns `out`."""
    if dtype_name not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype_name!r}")
    # Load in float32 so dequantization is exact; the export dtype rounds once at the end.
    loaded = load_model(model_path, dtype=mx.float32)
    special = special_token_ids(loaded)
    config = hf_config(loaded.config, dtype_name, special)
    if config_from_hf(config) != loaded.config:
        raise ExportError(
            f"config.json would describe a different model:\n  {config_from_hf(config)}\n"
            f"  instead of\n  {loaded.config}"
        )
    out.mkdir(parents=True, exist_ok=True)
    weights = dense_weights(loaded.model, DTYPES[dtype_name])
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    loaded.tokenizer.backend.save(str(out / "tokenizer.json"))
    files = {
        "config.json": config,
        "tokenizer_config.json": tokenizer_config(loaded, special),
        "generation_config.json": generation_config(loaded, special),
    }
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_argument(
        "--model", type=Path, help="a .gguf file (default: the SmolLM2-135M-Instruct Q4_1 model)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args(argv)
    out = export(args.model, args.out, args.dtype)
    print(f"wrote {out} ({args.dtype})")


if __name__ == "__main__":
    main()
