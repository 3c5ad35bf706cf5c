"""What a model is, independent of the file it came from.

A Hugging Face ``config.json`` and a GGUF file's metadata both become one ``ModelConfig``; the
transformer in ``models/base.py`` is built from it alone. Architectures differ here, by
configuration, never by copies of the forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class ConfigError(ValueError):
    """A model configuration candlewick cannot run; the message names the field."""


@dataclass(frozen=True, slots=True)
class RopeConfig:
    """Rotary position embedding: which dimensions rotate and at which frequencies.

    ``scaling`` is None (plain RoPE), ``"linear"`` or ``"llama3"``; the rest are that scaling's
    parameters as Hugging Face names them.
    """

    theta: float = 10000.0
    dims: int = 0
    scaling: str | None = None
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # Per-pair divisors of the frequencies, as GGUF files store llama3 scaling (rope_freqs).
    freq_factors: tuple[float, ...] = ()

    def inv_freq(self) -> np.ndarray:
        """Per-pair angular frequency, float64 [dims/2], as transformers computes it."""
        inv = 1.0 / (self.theta ** (np.arange(0, self.dims, 2, dtype=np.float64) / self.dims))
        if self.freq_factors:
            inv = inv / np.asarray(self.freq_factors, dtype=np.float64)
        if self.scaling is None:
            return inv
        if self.scaling == "linear":
            return inv / self.factor
        # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between
        # interpolated smoothly.
        old = self.original_max_position_embeddings
        low_wavelen = old / self.low_freq_factor
        high_wavelen = old / self.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
        smooth = (old / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The shape and options of a decoder-only transformer.

    ``layer_windows[i]`` is the sliding attention window of layer ``i`` (None: full attention);
    a token attends to itself and the ``window - 1`` tokens before it.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    layer_windows: tuple[int | None, ...] = field(default=())
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if self.num_heads % max(self.num_kv_heads, 1):
            problems.append(
                f"num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if len(self.layer_windows) not in (0, self.num_layers):
            problems.append(f"{len(self.layer_windows)} layer windows for {self.num_layers} layers")
        if problems:
            raise ConfigError("; ".join(problems))
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (None,) * self.num_layers)

    @property
    def sliding_window(self) -> int | None:
        """The largest window any layer uses (None if every layer attends fully)."""
        windows = [w for w in self.layer_windows if w is not None]
        return max(windows) if windows else None


def rope_from_hf(hf: dict[str, Any], head_dim: int) -> RopeConfig:
    """RoPE settings from a config.json, in either transformers 4 (`rope_theta` +
    `rope_scaling`) or transformers 5 (`rope_parameters`) spelling."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    params = {**legacy, **params}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    dims = int(head_dim * float(hf.get("partial_rotary_factor", 1.0)))
    if kind in (None, "default"):
        return RopeConfig(theta=theta, dims=dims)
    if kind == "linear":
        return RopeConfig(theta=theta, dims=dims, scaling="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeConfig(
            theta=theta,
            dims=dims,
            scaling="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings", 8192)
            ),
        )
    raise ConfigError(
        f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)"
    )


def common_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """The fields every supported architecture reads the same way from config.json."""
    missing = [
        k
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        if k not in hf
    ]
    if missing:
        raise ConfigError(f"config.json lacks {', '.join(missing)}")
    num_heads = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or hf["hidden_size"] // num_heads)
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return dict(
        model_type=hf.get("model_type", ""),
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        intermediate_size=int(hf["intermediate_size"]),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=rope_from_hf(hf, head_dim),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        eos_token_ids=eos_ids,
    )


def layer_windows_from_hf(hf: dict[str, Any], window: int | None) -> tuple[int | None, ...]:
    """Per-layer windows: transformers 5's `layer_types` where present, else one for all."""
    n = int(hf["num_hidden_layers"])
    if window is None:
        return (None,) * n
    types = hf.get("layer_types")
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (int(window),) * n


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How the serving engine batches and caches.

    ``max_num_batched_tokens`` is the token budget of one step (decode tokens plus prefill
    chunks); ``long_prefill_chunk`` caps one request's prefill per step so a long prompt never
    stalls the running decodes. ``kv_cache_memory`` (bytes) sizes the block pool; None takes a
    fraction of free memory (on the CPU capped at 2 GiB; ask for more explicitly).
    """

    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    long_prefill_chunk: int = 512
    kv_cache_memory: int | None = None
    kv_cache_memory_fraction: float = 0.5
    num_blocks: int | None = None  # overrides the memory sizing (tests)
    enable_prefix_caching: bool = True
    max_loras: int = 0  # adapter slots on the device (0: no LoRA support built)
    max_lora_rank: int = 16
    # Overlap building step N+1 with the device computing step N. None: by device, on a GPU
    # yes, on the CPU no (engine.engine_core.EngineCore says why).
    pipelined: bool | None = None
    seed: int = 0  # of the sampler's own key stream (requests without a seed draw from it)

    def __post_init__(self) -> None:
        problems = []
        if self.max_loras < 0:
            problems.append(f"max_loras must be >= 0, got {self.max_loras}")
        for name in (
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "long_prefill_chunk",
            "max_lora_rank",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            problems.append(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if self.num_blocks is not None and self.num_blocks < 2:
            problems.append(f"num_blocks must be at least 2, got {self.num_blocks}")
        if problems:
            raise ConfigError("; ".join(problems))
