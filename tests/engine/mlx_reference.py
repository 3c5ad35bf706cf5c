"""mlx-lm as the reference for MLX quantization: its quantizer writes the folders, its forward
pass gives the logits ours must match."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np


def mlx_quantize(
    src: Path,
    out: Path,
    bits: int,
    group_size: int,
    recipe: str | None = None,
    dtype: mx.Dtype | None = None,
    predicate=None,
) -> Path:
    """mlx-lm's own quantization of the float folder ``src`` (its `quantize_model`, with one of
    its mixed recipes or a ``predicate(path, module)`` if given, after casting to ``dtype`` as
    its convert does), saved as mlx-lm saves it."""
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    model, config = load_model(src)
    if dtype is not None:
        model.set_dtype(dtype)
    if recipe:
        predicate = mixed_quant_predicate_builder(recipe, model, group_size)
    model, config = quantize_model(model, config, group_size, bits, quant_predicate=predicate)
    save_model(out, model)
    save_config(config, out / "config.json")
    return out


def mlx_lm_greedy(
    folder: Path, prompt: list[int], steps: int, dtype: mx.Dtype | None = None
) -> tuple[list[int], list]:
    """mlx-lm's model on ``folder`` (its float tensors, scales and biases cast to ``dtype``):
    greedy tokens and the logits of every forward call."""
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    model, _ = load_model(folder)
    if dtype is not None:
        model.set_dtype(dtype)
    return greedy_with(model, make_prompt_cache(model), prompt, steps)


def greedy_with(model, cache, prompt: list[int], steps: int) -> tuple[list[int], list]:
    logits_seen, tokens = [], []
    logits = model(mx.array([prompt]), cache=cache)
    for _ in range(steps):
        row = np.array(logits[0].astype(mx.float32))
        logits_seen.append(row)
        tokens.append(int(row[-1].argmax()))
        logits = model(mx.array([[tokens[-1]]]), cache=cache)
    return tokens, logits_seen


def assert_logits_match(ours: list[np.ndarray], ref: list[np.ndarray], rtol: float = 1e-4):
    """Every forward call's logits within ``rtol`` of the reference's largest magnitude."""
    for a, b in zip(ours, ref, strict=True):
        scale = float(np.abs(b).max())
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)
