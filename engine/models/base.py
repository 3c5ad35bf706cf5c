"""The decoder-only transformer every supported architecture shares.

Module and parameter names follow Hugging Face's (``model.layers.0.self_attn.q_proj.weight``) so
safetensors checkpoints load as they are and GGUF names map onto them in one table. What differs
between Llama, Mistral, Qwen2 and Qwen3 is a field of ``ModelConfig``.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn

from engine.config import ModelConfig, RopeConfig
from engine.models.activations import RMSNorm, swiglu
from engine.models.cache import KVCache, LayerCache


class RoPE(nn.Module):
    """Rotary embedding over the first ``dims`` features, rotating the two halves (the Hugging
    Face layout), at the frequencies ``RopeConfig`` computes (plain, linear or llama3)."""

    def __init__(self, rope: RopeConfig) -> None:
        super().__init__()
        self.dims = rope.dims
        self.config = rope
        # Leading underscore: a constant, not a parameter to load.
        self._freqs = mx.array(1.0 / rope.inv_freq(), dtype=mx.float32)

    def __call__(self, x: mx.array, offset: int | mx.array) -> mx.array:
        # x: [B, H, S, D]
        return mx.fast.rope(
            x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._freqs
        )

    # On the CPU, ``mx.fast.rope`` inserts its composed fallback, which computes the angles'
    # cos and sin again in every call: twice a layer for the same positions. A step's paged
    # cache computes them once (``tables``) and every layer rotates with them (``rotate``), the
    # fallback's arithmetic compiled into one loop.

    def tables(self, positions: mx.array, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """cos and sin [T, 1, 1, dims/2] for rows [T, H, 1, D] at ``positions`` [T]."""
        theta = positions.astype(mx.float32)[:, None, None, None] * mx.reciprocal(self._freqs)
        return mx.cos(theta).astype(dtype), mx.sin(theta).astype(dtype)

    def rotate(self, rows: mx.array, tables: tuple[mx.array, mx.array]) -> mx.array:
        """``self(rows, positions)`` for rows [T, H, 1, D], from ``tables(positions)``."""
        return _rotate_halves(self.dims, rows.shape[-1])(rows, *tables)


@functools.cache
def _rotate_halves(dims: int, width: int):
    half = dims // 2

    @mx.compile
    def rotate(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        x1, x2 = x[..., :half], x[..., half:dims]
        parts = [x1 * cos - x2 * sin, x1 * sin + x2 * cos]
        if dims < width:
            parts.append(x[..., dims:])
        return mx.concatenate(parts, axis=-1)

    return rotate


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, D
        self.scale = D**-0.5
        self.q_proj = nn.Linear(cfg.hidden_size, H * D, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, Hkv * D, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, Hkv * D, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * D, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, eps=cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, eps=cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.rope = RoPE(cfg.rope)

    def __call__(self, x: mx.array, cache: LayerCache) -> mx.array:
        B, S, _ = x.shape  # x: [B, S, hidden]
        q = self.q_proj(x).reshape(B, S, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, S, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, S, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # [B, H(kv), S, D]
        q, k = cache.rotate(self.rope, q), cache.rotate(self.rope, k)
        out = cache.attend(q, k, v, scale=self.scale)  # [B, H, S, D]
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, S, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None) -> None:
        super().__init__()
        self.window = window
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x: mx.array, cache: LayerCache) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    """Hugging Face's inner ``model``: embeddings, the blocks, the final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [TransformerBlock(cfg, w) for w in cfg.layer_windows]
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, tokens: mx.array, cache: list[LayerCache]) -> mx.array:
        # tokens: [B, S] -> hidden: [B, S, hidden]
        h = self.embed_tokens(tokens)
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            h = layer(h, layer_cache)
        return self.norm(h)


class CausalLM(nn.Module):
    """A decoder with its language-model head. ``model(tokens, cache)`` returns logits for every
    position; ``hidden`` and ``logits`` let generation project only the positions it samples."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def hidden(self, tokens: mx.array, cache: list[LayerCache]) -> mx.array:
        return self.model(tokens, cache)

    def logits(self, hidden: mx.array) -> mx.array:
        # hidden: [B, S, hidden] -> [B, S, vocab]
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)

    def __call__(self, tokens: mx.array, cache: list[LayerCache]) -> mx.array:
        return self.logits(self.hidden(tokens, cache))

    def make_cache(self) -> list[KVCache]:
        """A contiguous cache per layer, for one batch of sequences advancing together."""
        return [KVCache(layer.window) for layer in self.model.layers]
