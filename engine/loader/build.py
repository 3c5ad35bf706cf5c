"""Weights (from either file format) into a ready model."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path
from tqdm import tqdm

from engine.config import ModelConfig
from engine.loader.quantize import QuantSpec
from engine.models.base import CausalLM
from engine.models.quantized import FORMATS, sub_block_module
from engine.pooling import PoolingConfig
from engine.tokenizer import Tokenizer

T = TypeVar("T")


class WeightsError(ValueError):
    """Checkpoint tensors that do not fit the model they claim to be; names every problem."""


@dataclass(slots=True)
class LoadedModel:
    """A model ready to run, with what serving it needs to know."""

    model: CausalLM
    tokenizer: Tokenizer
    config: ModelConfig
    name: str  # the id clients see, e.g. the folder name or the GGUF file stem
    path: Path
    dtype: mx.Dtype
    # Sampling defaults the model ships (generation_config.json), used where a request is silent.
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    # An embedding model's pooling (its sentence-transformers files); None: a generative model.
    pooling: PoolingConfig | None = None


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Show a progress bar on a terminal; stay silent in logs and tests."""
    yield from tqdm(items, desc=desc, total=total, unit="tensor", disable=not sys.stderr.isatty())


def build_model(
    cfg: ModelConfig,
    weights: dict[str, mx.array],
    quantized: Mapping[str, QuantSpec],
    sub_blocks: dict[str, str] | None = None,
) -> CausalLM:
    """Instantiate the transformer and load ``weights`` (Hugging Face names) into it.

    ``quantized`` maps a module path (``model.layers.0.mlp.up_proj``) to the affine setting of
    its weight (bits, group size); those modules become quantized layers (``QuantizedLinear``,
    or ``QuantizedEmbedding``, whose ``as_linear`` serves a tied head) whose
    ``weight``/``scales``/``biases`` come from ``weights``. ``sub_blocks`` maps a module path to
    a 16-element sub-block format (``Q6_K``, ``Q3_K``, ``Q2_K``): see engine.models.quantized.
    The rest stay float.
    """
    model = CausalLM(cfg)
    if quantized:
        nn.quantize(
            model,
            class_predicate=lambda path, _: (
                quantized[path].as_dict() if path in quantized else False
            ),
        )
    if sub_blocks:
        model.update_modules(
            tree_map_with_path(
                lambda path, m: (
                    sub_block_module(m, FORMATS[sub_blocks[path]]) if path in sub_blocks else m
                ),
                model.leaf_modules(),
                is_leaf=nn.Module.is_module,
            )
        )
    load_checked(model, weights)
    return model


def load_checked(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Load ``weights`` into ``model`` (evaluated, in eval mode) after checking that they fit
    it: every missing, unexpected or misshapen tensor is named in one ``WeightsError``."""
    expected = dict(_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [
        f"{k} has shape {tuple(weights[k].shape)}, the model needs {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(weights))
        if weights[k].shape != expected[k].shape
    ]
    problems = (
        ([f"missing tensors: {', '.join(missing)}"] if missing else [])
        + ([f"unexpected tensors: {', '.join(unexpected)}"] if unexpected else [])
        + wrong
    )
    if problems:
        raise WeightsError("; ".join(problems))
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    mx.eval(model.parameters())


def _flatten(tree: dict | list | mx.array, prefix: str = "") -> Iterator[tuple[str, mx.array]]:
    if isinstance(tree, mx.array):
        yield prefix, tree
        return
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in items:
        yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))
