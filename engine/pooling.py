"""How an embedding model turns its final hidden states into one vector: the pooling and
normalization its folder's sentence-transformers files name (``modules.json``,
``1_Pooling/config.json``). Pure data: the device arithmetic is ``engine.models.pooling``.

The scheduler's requests carry a ``PoolingConfig``, so this module imports no MLX.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import ConfigError


class PoolingMode(enum.Enum):
    """sentence-transformers' pooling modes (one at a time)."""

    CLS = "cls"  # the first token's state
    MEAN = "mean"  # the mean over the tokens
    MAX = "max"  # the elementwise maximum over the tokens
    MEAN_SQRT_LEN = "mean_sqrt_len_tokens"  # the sum over the tokens / sqrt(their number)
    WEIGHTED_MEAN = "weightedmean"  # token i (from 1) weighs i
    LAST = "lasttoken"  # the last token's state

    @property
    def needs_every_token(self) -> bool:
        """Whether every token's hidden state enters the vector (so a prompt whose prefix is
        served from the KV cache, whose states were never computed, cannot be pooled)."""
        return self is not PoolingMode.LAST


# The legacy boolean keys of 1_Pooling/config.json, each naming one mode.
_LEGACY_KEYS = {
    "pooling_mode_cls_token": PoolingMode.CLS,
    "pooling_mode_mean_tokens": PoolingMode.MEAN,
    "pooling_mode_max_tokens": PoolingMode.MAX,
    "pooling_mode_mean_sqrt_len_tokens": PoolingMode.MEAN_SQRT_LEN,
    "pooling_mode_weightedmean_tokens": PoolingMode.WEIGHTED_MEAN,
    "pooling_mode_lasttoken": PoolingMode.LAST,
}

# modules.json entries we run, by the last part of their type name.
_TRANSFORMER, _POOLING, _NORMALIZE = "Transformer", "Pooling", "Normalize"


@dataclass(frozen=True, slots=True)
class PoolingConfig:
    """One embedding per input: ``mode`` over the final hidden states, then an L2
    normalization when ``normalize``.

    ``max_length``: the longest input in tokens (sentence-transformers' ``max_seq_length``),
    None to let the model's own limit decide. ``dimensions``: the output sizes a request may
    ask for (``dimensions``, Matryoshka truncation); empty when the model allows none."""

    mode: PoolingMode
    normalize: bool = False
    max_length: int | None = None
    dimensions: tuple[int, ...] = ()

    @classmethod
    def from_folder(cls, folder: Path, hidden_size: int) -> PoolingConfig | None:
        """The folder's sentence-transformers pipeline, or None when it has none
        (no ``modules.json``). Modules we cannot run are a ``ConfigError`` naming them."""
        modules = _read(folder / "modules.json")
        if modules is None:
            return None
        if not isinstance(modules, list):
            raise ConfigError(f"{folder / 'modules.json'} is not a list of modules")
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        unknown = [t for t, k in zip(modules, kinds, strict=True) if k not in _KNOWN]
        if unknown:
            names = ", ".join(str(m.get("type")) for m in unknown)
            raise ConfigError(
                f"{folder.name}: sentence-transformers modules not supported: {names}"
            )
        if kinds.count(_POOLING) != 1 or kinds[0] != _TRANSFORMER:
            raise ConfigError(
                f"{folder.name}/modules.json: expected a Transformer then one Pooling module, "
                f"got {', '.join(kinds)}"
            )
        pooling = modules[kinds.index(_POOLING)]
        pooling_dir = folder / str(pooling.get("path", ""))
        mode = _pooling_mode(_read(pooling_dir / "config.json") or {}, pooling_dir)
        normalize = _NORMALIZE in kinds[kinds.index(_POOLING) :]
        st = _read(folder / "sentence_bert_config.json") or {}
        max_length = st.get("max_seq_length")
        return cls(
            mode=mode,
            normalize=normalize,
            max_length=int(max_length) if max_length else None,
            dimensions=_matryoshka(_read(folder / "config.json") or {}, hidden_size),
        )


_KNOWN = (_TRANSFORMER, _POOLING, _NORMALIZE)


def _pooling_mode(config: dict[str, Any], where: Path) -> PoolingMode:
    """sentence-transformers 5's legacy booleans or 6's ``pooling_mode`` (mean by default)."""
    named = config.get("pooling_mode")
    if named is None:
        legacy = [mode for key, mode in _LEGACY_KEYS.items() if config.get(key)]
        named = [m.value for m in legacy] or "mean"
    if isinstance(named, list):
        if len(named) != 1:
            raise ConfigError(
                f"{where}: pooling modes {', '.join(map(str, named))} at once are not supported"
            )
        named = named[0]
    try:
        return PoolingMode(named)
    except ValueError:
        known = ", ".join(m.value for m in PoolingMode)
        raise ConfigError(f"{where}: pooling mode {named!r} is not one of {known}") from None


def _matryoshka(hf: dict[str, Any], hidden_size: int) -> tuple[int, ...]:
    """The sizes ``dimensions`` may ask for, as vLLM reads them from config.json:
    ``matryoshka_dimensions`` lists them; ``is_matryoshka`` allows any size up to the full one."""
    listed = hf.get("matryoshka_dimensions")
    if listed:
        return tuple(sorted(int(d) for d in listed if 0 < int(d) <= hidden_size))
    if hf.get("is_matryoshka"):
        return tuple(range(1, hidden_size + 1))
    return ()


def _read(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
