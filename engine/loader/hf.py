"""Hugging Face model folders: config.json, safetensors (one file or sharded), tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx

from engine.config import ConfigError
from engine.loader.build import LoadedModel, WeightsError, build_model, progress
from engine.models.base import CausalLM
from engine.models.registry import config_from_hf
from engine.tokenizer import Tokenizer

# Buffers some exporters save that are not weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder} has no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors shards, from the index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / s for s in shards]
        absent = [str(f.name) for f in files if not f.is_file()]
        if absent:
            raise WeightsError(f"{index.name} names shards that are absent: {', '.join(absent)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{folder} has no *.safetensors files")
    return files


def load_weights(folder: Path, dtype: mx.Dtype, tied: bool) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for path in progress(weight_files(folder), desc="loading weights"):
        for name, array in mx.load(str(path)).items():
            if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                continue
            weights[name] = (
                array.astype(dtype) if mx.issubdtype(array.dtype, mx.floating) else array
            )
    return weights


def load_hf_model(folder: Path, dtype: mx.Dtype) -> CausalLM:
    cfg = config_from_hf(read_config(folder))
    return build_model(cfg, load_weights(folder, dtype, cfg.tie_word_embeddings), {})


def load_hf(folder: Path, dtype: mx.Dtype) -> LoadedModel:
    model = load_hf_model(folder, dtype)
    tokenizer = Tokenizer.from_folder(folder)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=model.config,
        name=folder.name,
        path=folder,
        dtype=dtype,
        generation_defaults=generation_defaults(folder),
    )


def generation_defaults(folder: Path) -> dict[str, Any]:
    """The sampling fields of generation_config.json (temperature, top_p, ...), if any."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    return {k: config[k] for k in keys if config.get(k) is not None}
