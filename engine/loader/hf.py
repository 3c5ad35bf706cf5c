"""Hugging Face model folders: config.json, safetensors (one file or sharded), tokenizer files.

Float folders, MLX-quantized ones (mlx-lm's `quantization` entry: packed uint32 weights with
scales and biases), and float folders quantized while they load (`--quantize`)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx

from engine.config import ConfigError
from engine.loader.build import LoadedModel, WeightsError, build_model, progress
from engine.loader.quantize import (
    QuantSpec,
    StoredTensor,
    default_plan,
    quantizable_modules,
    quantize_weight,
    scheme_from_config,
    stored_plan,
)
from engine.models.base import CausalLM
from engine.models.registry import config_from_hf
from engine.pooling import PoolingConfig
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


def checkpoint_tensors(folder: Path, tied: bool) -> dict[str, tuple[str, mx.array]]:
    """Every tensor of the checkpoint: name -> (file name, lazy array). MLX reads a tensor's
    bytes only when it is evaluated, so this holds no weights yet.

    A bare decoder's checkpoint (saved without its head, as embedding models such as
    Qwen3-Embedding are: ``layers.0...``, ``embed_tokens.weight``) gets the ``model.`` prefix
    the full model's names have."""
    tensors: dict[str, tuple[str, mx.array]] = {}
    for path in weight_files(folder):
        for name, array in mx.load(str(path)).items():
            if name.endswith(_IGNORED_SUFFIXES) or (tied and name.startswith("lm_head.")):
                continue
            tensors[name] = (path.name, array)
    if tensors and not any(n.startswith(("model.", "lm_head.")) for n in tensors):
        tensors = {f"model.{n}": v for n, v in tensors.items()}
    return tensors


def load_weights(
    tensors: dict[str, tuple[str, mx.array]], dtype: mx.Dtype, quantize: dict[str, QuantSpec]
) -> dict[str, mx.array]:
    """The checkpoint's arrays, float ones cast to ``dtype``; the ``.weight`` of each module in
    ``quantize`` is quantized on the way, one tensor at a time, so peak memory is the quantized
    model plus one float tensor (``tensors`` is emptied as it goes)."""
    weights: dict[str, mx.array] = {}
    for name in progress(list(tensors), desc="loading weights"):
        _, array = tensors.pop(name)
        if mx.issubdtype(array.dtype, mx.floating):
            array = array.astype(dtype)
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module in quantize:
            parts = quantize_weight(array, quantize[module])
            mx.eval(parts)
            weights.update({f"{module}.{k}": v for k, v in parts.items()})
        elif quantize:
            mx.eval(array)
            weights[name] = array
        else:
            weights[name] = array  # evaluated once the model holds it
    return weights


def load_hf_model(folder: Path, dtype: mx.Dtype, quantize: QuantSpec | None = None) -> CausalLM:
    """A float or MLX-quantized folder; ``quantize`` quantizes a float one while it loads
    (mlx-lm's choice of modules)."""
    hf = read_config(folder)
    cfg = config_from_hf(hf)
    scheme = scheme_from_config(hf)
    if scheme is not None and quantize is not None:
        raise ConfigError(
            f"{folder} is already quantized ({scheme.default.bits}-bit); --quantize takes a "
            "float model"
        )
    tensors = checkpoint_tensors(folder, cfg.tie_word_embeddings)
    if "lm_head.weight" not in tensors and PoolingConfig.from_folder(folder, cfg.hidden_size):
        # An embedding model without a head: its logits are never asked for.
        cfg = replace(cfg, tie_word_embeddings=True)
    shapes = quantizable_modules(cfg)
    if scheme is not None:
        stored = {n: StoredTensor(tuple(a.shape), a.dtype, f) for n, (f, a) in tensors.items()}
        plan = stored_plan(scheme, shapes, stored)
        return build_model(cfg, load_weights(tensors, dtype, {}), plan)
    plan = default_plan(shapes, quantize) if quantize is not None else {}
    return build_model(cfg, load_weights(tensors, dtype, plan), plan)


def load_hf(folder: Path, dtype: mx.Dtype, quantize: QuantSpec | None = None) -> LoadedModel:
    model = load_hf_model(folder, dtype, quantize)
    tokenizer = Tokenizer.from_folder(folder)
    return LoadedModel(
        pooling=PoolingConfig.from_folder(folder, model.config.hidden_size),
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
