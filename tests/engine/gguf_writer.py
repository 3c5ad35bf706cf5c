"""Writing a tiny transformers model as a GGUF file, the way llama.cpp's converter lays it out
(tensor names, metadata keys, Q/K rows permuted for llama-style architectures)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

HF_TO_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
PERMUTED_ARCHS = {"llama", "mistral"}


def gguf_name(hf: str) -> str:
    module, param = hf.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, n, rest = module.split(".", 3)
        return f"blk.{n}.{HF_TO_GGUF[rest]}.{param}"
    return f"{HF_TO_GGUF[module]}.{param}"


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: rotate-halves rows to rotate-adjacent-pairs rows."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(
    model,
    arch: str,
    path: Path,
    qtype: gguf.GGMLQuantizationType,
    rope_freqs: np.ndarray | None = None,
    encode: Callable[[str, np.ndarray], tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None,
) -> dict[str, np.ndarray]:
    """Write `model` (transformers) to `path` with every 2-D weight in `qtype`, or as
    `encode(gguf_name, weight)` says (raw blocks and their type) where it is given.

    Returns the state dict as the file's numbers say it (dequantized, back in Hugging Face row
    order): the weights a correct loader computes with.
    """
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if getattr(cfg, "sliding_window", None) and arch == "mistral":
        w.add_sliding_window(cfg.sliding_window)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    effective: dict[str, np.ndarray] = {}
    for name, param in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = param.float().numpy()
        heads = None
        if arch in PERMUTED_ARCHS and ".q_proj." in name:
            heads = cfg.num_attention_heads
        elif arch in PERMUTED_ARCHS and ".k_proj." in name:
            heads = cfg.num_key_value_heads
        stored = permute(data, heads) if heads else data
        if data.ndim == 2:
            kind = qtype
            if encode is None:
                raw = gguf.quants.quantize(stored, qtype)
            else:
                raw, kind = encode(gguf_name(name), stored)
            w.add_tensor(gguf_name(name), raw, raw_dtype=kind)
            stored = gguf.quants.dequantize(raw, kind).reshape(stored.shape)
        else:
            w.add_tensor(gguf_name(name), stored)
        # Back to Hugging Face row order: the permutation is its own inverse's transpose.
        effective[name] = _unpermute(stored, heads) if heads else stored
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return effective


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    return (
        w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )
