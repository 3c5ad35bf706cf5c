"""Hugging Face metadata for a model candlewick loaded: config.json, tokenizer_config.json and
generation_config.json, written so that transformers, mlx-lm and candlewick itself read back the
same model. A field Hugging Face's terms cannot express fails instead of describing a different
model."""

from __future__ import annotations

from typing import Any

from engine.config import ModelConfig
from engine.loader.build import LoadedModel
from engine.loader.gguf_metadata import open_gguf, read_metadata
from engine.models.registry import config_from_hf

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


class ExportError(ValueError):
    """A model this exporter cannot write as an equivalent Hugging Face folder."""


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


def metadata_files(loaded: LoadedModel, dtype_name: str) -> dict[str, dict[str, Any]]:
    """The three JSON files of a folder holding ``loaded``, by file name; checks that the
    config reads back as the same model."""
    special = special_token_ids(loaded)
    config = hf_config(loaded.config, dtype_name, special)
    if config_from_hf(config) != loaded.config:
        raise ExportError(
            f"config.json would describe a different model:\n  {config_from_hf(config)}\n"
            f"  instead of\n  {loaded.config}"
        )
    return {
        "config.json": config,
        "tokenizer_config.json": tokenizer_config(loaded, special),
        "generation_config.json": generation_config(loaded, special),
    }
