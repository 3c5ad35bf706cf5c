"""Tiny random-weight embedding models written with transformers, with the sentence-transformers
files that say how to pool them; and the pooling those files mean, computed with torch (the
reference our engine must match)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.engine.tiny_models import VOCAB, build_tiny


def write_pooling(folder: Path, mode: str, normalize: bool = True, **config) -> Path:
    """modules.json (Transformer, Pooling, and Normalize if asked) and 1_Pooling/config.json
    in sentence-transformers 6's spelling (``pooling_mode``)."""
    kinds = ["Transformer", "Pooling"] + (["Normalize"] if normalize else [])
    paths = ["", "1_Pooling", "2_Normalize"]
    modules = [
        {"idx": i, "name": str(i), "path": paths[i], "type": f"sentence_transformers.models.{k}"}
        for i, k in enumerate(kinds)
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": mode, **config}))
    return folder


def write_word_tokenizer(folder: Path, vocab_size: int = VOCAB) -> Path:
    """A tokenizer.json whose words are ``w0`` .. ``w{vocab_size - 1}``, one id each."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


def build_tiny_decoder_embedder(folder: Path, mode: str, seed: int = 0):
    """A tiny Qwen3 saved as embedding models ship: the bare decoder (no head, names without
    ``model.``), with a pooling config. Returns the transformers decoder (float32)."""
    full = build_tiny("qwen3", folder / "full", seed=seed)
    full.model.save_pretrained(folder, safe_serialization=True)
    write_pooling(folder, mode)
    write_word_tokenizer(folder)
    return full.model


def build_tiny_bert(folder: Path, seed: int = 0, hidden_act: str = "gelu", **overrides):
    """A tiny random ``BertModel`` (float32) with non-trivial LayerNorms and biases; returns it."""
    import torch
    import transformers

    config = transformers.BertConfig(
        vocab_size=300,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        hidden_act=hidden_act,
        **overrides,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.BertModel(config, add_pooling_layer=True).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    write_word_tokenizer(folder, config.vocab_size)
    return model


def reference_pool(hidden: np.ndarray, mode: str, normalize: bool = True) -> np.ndarray:
    """One sequence's final hidden states [S, D] pooled as sentence-transformers does."""
    n = hidden.shape[0]
    if mode == "cls":
        v = hidden[0]
    elif mode == "lasttoken":
        v = hidden[-1]
    elif mode == "max":
        v = hidden.max(axis=0)
    elif mode == "mean":
        v = hidden.mean(axis=0)
    elif mode == "mean_sqrt_len_tokens":
        v = hidden.sum(axis=0) / np.sqrt(n)
    elif mode == "weightedmean":
        w = np.arange(1, n + 1, dtype=np.float64)[:, None]
        v = (hidden * w).sum(axis=0) / w.sum()
    else:
        raise ValueError(mode)
    return v / np.linalg.norm(v) if normalize else v


def hidden_states(model, ids: list[int]) -> np.ndarray:
    """A transformers model's last hidden state for one sequence, [S, D] float64."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return out.last_hidden_state[0].double().numpy()
