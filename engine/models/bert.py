"""BERT-family encoders (``BertModel``: all-MiniLM, bge, e5, gte): absolute position and
token-type embeddings, post-LayerNorm blocks, GELU, bidirectional attention, no KV cache.

Parameter names are Hugging Face's (``encoder.layer.0.attention.self.query.weight``), so a
folder's safetensors load as they are. A batch arrives packed: every sequence's tokens in one
flat row [T], with no padding, so the projections and the MLP compute only real tokens;
attention alone regroups them per sequence ([B, L], padded keys masked) through the one
attention function every model calls.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine.config import ConfigError
from engine.models.activations import odd_rational
from engine.models.attention import attention, cpu_attention, numpy_softmax_pays
from metal_kernels import cpu_kernels

# erf(x) ≈ x·P(x²)/Q(x²) on [-4, 4] (±1 beyond, in float32): a minimax rational approximation
# (the one Eigen and XLA use for float32 erf), within 5e-7 of erf everywhere.
_ERF_P = (
    -2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
    -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02,
)  # fmt: skip
_ERF_Q = (
    -1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
    -1.42647390514189e-02,
)  # fmt: skip


def _erf(x: mx.array) -> mx.array:
    return odd_rational(x, 4.0, _ERF_P, _ERF_Q)


@mx.compile
def _gelu_rational(x: mx.array) -> mx.array:
    return 0.5 * x * (1.0 + _erf(x * 0.7071067811865476))


def gelu(x: mx.array) -> mx.array:
    """GELU with erf (torch's default). On the CPU, MLX's erf is a scalar loop (0.16 s for
    4096x1536, half of a MiniLM layer's time at batch 64); the rational erf above, compiled into
    one fused loop of multiplies and adds (MLX builds it with the system's g++, or runs the ops
    one by one without it: 0.086 s), takes 0.023 s and stays within 1.4e-6 of the exact GELU.
    Where the CLI preloaded the CPU kernels library, the same rational runs there, built for
    this machine's vector width (``_host``). Other devices use MLX's own."""
    if mx.default_device() != mx.cpu:
        return nn.gelu(x)
    if x.dtype == mx.float32 and (kernel := _host("candlewick_gelu_erf")) is not None:
        (values,) = _host_views(x)
        out = np.empty_like(values)
        kernel(values.ctypes.data, out.ctypes.data, values.size)
        return mx.array(out)
    return _gelu_rational(x)


@functools.cache
def _host(name: str) -> Any | None:
    """The CPU kernels library's ``name`` (``metal_kernels.cpu_kernels``), or None where this
    process has not got it: the CLI compiles and preloads it on Linux."""
    argtypes = {
        "candlewick_gelu_erf": cpu_kernels.GELU_ERF,
        "candlewick_packed_attention": cpu_kernels.PACKED_ATTENTION,
    }[name]
    return cpu_kernels.function(name, argtypes)


def _host_views(*arrays: mx.array) -> list[np.ndarray]:
    """``arrays`` evaluated together (one wait), each as a C-ordered float32 NumPy array (its own
    memory where it can)."""
    mx.eval(*arrays)
    return [np.ascontiguousarray(np.asarray(x), dtype=np.float32) for x in arrays]


_ACTIVATIONS = {
    "gelu": gelu,  # erf, as torch's default
    "gelu_new": nn.gelu_approx,  # tanh approximation
    "gelu_pytorch_tanh": nn.gelu_approx,
    "relu": nn.relu,
}


@dataclass(frozen=True, slots=True)
class EncoderConfig:
    """The shape of a BERT-family encoder, from its config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def config_from_hf(hf: dict[str, Any]) -> EncoderConfig:
    problems = [
        f"config.json lacks {k}"
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        if k not in hf
    ]
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        problems.append(f"hidden_act {act!r} is not supported ({', '.join(_ACTIVATIONS)})")
    position = hf.get("position_embedding_type", "absolute")
    if position != "absolute":
        problems.append(f"position_embedding_type {position!r} is not supported (absolute)")
    if problems:
        raise ConfigError("; ".join(problems))
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    if hidden % heads:
        raise ConfigError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    return EncoderConfig(
        model_type=hf.get("model_type", "bert"),
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        intermediate_size=int(hf.get("intermediate_size", 4 * hidden)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
        type_vocab_size=int(hf.get("type_vocab_size", 2)),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        hidden_act=act,
    )


@dataclass(frozen=True, slots=True)
class PackedBatch:
    """B sequences packed into one row of T tokens, and how attention regroups them.

    ``gather`` [B, L] picks each sequence's rows from the flat row (padding points at row 0
    and is masked); ``scatter`` [T] is each token's index in the flattened [B * L] grid."""

    token_ids: mx.array  # [T] int32
    positions: mx.array  # [T] int32
    gather: mx.array  # [B, L] int32
    key_mask: mx.array  # [B, 1, 1, L] bool
    scatter: mx.array  # [T] int32
    lengths: tuple[int, ...]  # [B]

    @classmethod
    def of(cls, sequences: Sequence[Sequence[int]]) -> PackedBatch:
        lengths = [len(s) for s in sequences]
        width = max(lengths)
        starts = np.cumsum([0, *lengths[:-1]])
        grid = np.arange(width)[None, :]  # [1, L]
        valid = grid < np.asarray(lengths)[:, None]  # [B, L]
        gather = np.where(valid, starts[:, None] + grid, 0)
        scatter = np.concatenate([b * width + np.arange(n) for b, n in enumerate(lengths)])
        return cls(
            token_ids=mx.array(np.concatenate([np.asarray(s) for s in sequences]), mx.int32),
            positions=mx.array(np.concatenate([np.arange(n) for n in lengths]), mx.int32),
            gather=mx.array(gather, mx.int32),
            key_mask=mx.array(valid[:, None, None, :]),
            scatter=mx.array(scatter, mx.int32),
            lengths=tuple(lengths),
        )

    @property
    def starts(self) -> list[int]:
        return np.cumsum([0, *self.lengths[:-1]]).tolist()


class _SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)


class _Output(nn.Module):
    """A projection, then LayerNorm over it plus the residual (BERT's post-norm)."""

    def __init__(self, cfg: EncoderConfig, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(cfg)
        self.output = _Output(cfg, cfg.hidden_size)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim

    def __call__(self, x: mx.array, batch: PackedBatch) -> mx.array:
        # x: [T, hidden]
        B, L = batch.gather.shape
        H, D = self.num_heads, self.head_dim

        def grouped(t: mx.array) -> mx.array:  # [T, H*D] -> [B, H, L, D]
            return t[batch.gather].reshape(B, L, H, D).transpose(0, 2, 1, 3)

        if numpy_softmax_pays(x) and (kernel := _host("candlewick_packed_attention")):
            return self.output(self.packed_on_host(kernel, x, batch), x)
        q, k, v = (grouped(p(x)) for p in (self.self.query, self.self.key, self.self.value))
        if numpy_softmax_pays(q):
            visible = np.asarray(batch.key_mask).reshape(B, 1, 1, 1, L)
            out = cpu_attention(q, k, v, scale=D**-0.5, visible=visible)
        else:
            out = attention(q, k, v, scale=D**-0.5, mask=batch.key_mask)  # [B, H, L, D]
        out = out.transpose(0, 2, 1, 3).reshape(B * L, H * D)[batch.scatter]  # [T, H*D]
        return self.output(out, x)

    def packed_on_host(self, kernel: Any, x: mx.array, batch: PackedBatch) -> mx.array:
        """The attention of ``batch``'s packed rows [T, H*D] by the CPU kernels library: each
        (sequence, head) reads its rows where the projections left them, no regrouping into
        [B, H, L, D] and back, no padding, the softmax in the same pass."""
        H, D = self.num_heads, self.head_dim
        q, k, v = _host_views(*(p(x) for p in (self.self.query, self.self.key, self.self.value)))
        starts = np.asarray(batch.starts, np.int32)
        lens = np.asarray(batch.lengths, np.int32)
        out = np.empty_like(q)
        kernel(
            q.ctypes.data, k.ctypes.data, v.ctypes.data, H * D, starts.ctypes.data,
            lens.ctypes.data, len(lens), H, D, D**-0.5, out.ctypes.data,
        )  # fmt: skip
        return mx.array(out)


class _Intermediate(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.act(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.attention = _Attention(cfg)
        self.intermediate = _Intermediate(cfg)
        self.output = _Output(cfg, cfg.intermediate_size)

    def __call__(self, x: mx.array, batch: PackedBatch) -> mx.array:
        h = self.attention(x, batch)
        return self.output(self.intermediate(h), h)


class _Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.layer = [_Layer(cfg) for _ in range(cfg.num_layers)]


class _Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, batch: PackedBatch) -> mx.array:
        # One sentence per sequence: every token is of type 0.
        h = self.word_embeddings(batch.token_ids) + self.position_embeddings(batch.positions)
        return self.LayerNorm(h + self.token_type_embeddings.weight[0])


class BertModel(nn.Module):
    """``model(batch)``: the final hidden state of every packed token, [T, hidden]."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)

    def __call__(self, batch: PackedBatch) -> mx.array:
        h = self.embeddings(batch)
        for layer in self.encoder.layer:
            h = layer(h, batch)
        return h


# Checkpoint tensors that are not the encoder's: the pooler and masked-LM heads, buffers.
_IGNORED_PREFIXES = ("pooler.", "cls.", "embeddings.position_ids", "embeddings.token_type_ids")


def hf_weight_name(name: str) -> str | None:
    """A checkpoint tensor's name in ``BertModel``, or None when the encoder does not use it
    (``bert.`` prefixes of task models dropped, old ``gamma``/``beta`` LayerNorm names)."""
    name = name.removeprefix("bert.")
    if name.startswith(_IGNORED_PREFIXES):
        return None
    if name.endswith(".gamma"):
        return name.removesuffix(".gamma") + ".weight"
    if name.endswith(".beta"):
        return name.removesuffix(".beta") + ".bias"
    return name
