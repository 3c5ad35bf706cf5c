"""Encoder model folders (the BERT family): config.json, safetensors, tokenizer files and the
sentence-transformers pipeline that says how to pool them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from engine.loader.build import load_checked, progress
from engine.loader.hf import weight_files
from engine.models import bert
from engine.pooling import PoolingConfig, PoolingMode
from engine.tokenizer import Tokenizer

ENCODER_TYPES = {"bert": bert}


def is_encoder(hf: dict[str, Any]) -> bool:
    """Whether a config.json describes an encoder we serve for embeddings."""
    return hf.get("model_type") in ENCODER_TYPES


@dataclass(slots=True)
class LoadedEncoder:
    """An encoder ready to embed, with what serving it needs to know."""

    model: bert.BertModel
    tokenizer: Tokenizer
    config: bert.EncoderConfig
    pooling: PoolingConfig
    name: str
    path: Path
    dtype: mx.Dtype

    @property
    def max_length(self) -> int:
        """The longest input in tokens: sentence-transformers' max_seq_length, within the
        position table."""
        limit = self.config.max_position_embeddings
        return min(self.pooling.max_length or limit, limit)


def load_encoder(folder: Path, hf: dict[str, Any], dtype: mx.Dtype) -> LoadedEncoder:
    module = ENCODER_TYPES[hf["model_type"]]
    cfg = module.config_from_hf(hf)
    # Without sentence-transformers files an encoder embeds by its first ([CLS]) token.
    pooling = PoolingConfig.from_folder(folder, cfg.hidden_size) or PoolingConfig(PoolingMode.CLS)
    model = module.BertModel(cfg)
    weights = {}
    for path in weight_files(folder):
        for name, array in progress(mx.load(str(path)).items(), desc="loading weights"):
            renamed = module.hf_weight_name(name)
            if renamed is not None:
                floating = mx.issubdtype(array.dtype, mx.floating)
                weights[renamed] = array.astype(dtype) if floating else array
    load_checked(model, weights)
    return LoadedEncoder(
        model=model,
        tokenizer=Tokenizer.from_folder(folder),
        config=cfg,
        pooling=pooling,
        name=folder.name,
        path=folder,
        dtype=dtype,
    )
