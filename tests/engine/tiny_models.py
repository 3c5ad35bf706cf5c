"""Tiny random-weight models built with transformers: the reference our forward pass must match."""

from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB = 256

BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    initializer_range=0.15,
    bos_token_id=1,
    eos_token_id=2,
)

# Each entry exercises what makes its architecture different.
ARCHS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(rope_theta=10000.0, tie_word_embeddings=False)),
    "llama3-tied": (
        "LlamaConfig",
        dict(
            rope_theta=500000.0,
            tie_word_embeddings=True,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    "mistral": ("MistralConfig", dict(sliding_window=8, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False, attention_bias=False)),
}


def build_tiny(arch: str, folder: Path, seed: int = 0, **overrides):
    """Write a tiny random model of `arch` to `folder` (config.json + model.safetensors) and
    return the transformers model (float32, eager attention) that wrote it."""
    import torch
    import transformers

    cls_name, extra = ARCHS[arch]
    config = getattr(transformers, cls_name)(**{**BASE, **extra, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Norm weights and biases start at 1 and 0: randomize them so they are really tested.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


def reference_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """transformers' greedy continuation: the tokens and, per forward call, its logits
    (first the prompt's [S, V], then one [1, V] per decode step)."""
    import torch

    logits_seen: list[np.ndarray] = []
    tokens: list[int] = []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(steps):
            logits = out.logits[0].float().numpy()
            logits_seen.append(logits)
            token = int(logits[-1].argmax())
            tokens.append(token)
            out = model(
                torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True
            )
    return tokens, logits_seen


def hf_batch(data) -> dict:
    """Training ``Example``s as transformers takes them: right-padded input ids, attention mask
    and labels (-100 where the example learns nothing)."""
    import torch

    from engine.training.data import collate

    tokens, mask = collate(data)
    attention = [[1] * len(e) + [0] * (tokens.shape[1] - len(e)) for e in data]
    return {
        "input_ids": torch.tensor(tokens, dtype=torch.long),
        "attention_mask": torch.tensor(attention, dtype=torch.long),
        "labels": torch.tensor(np.where(mask > 0, tokens, -100), dtype=torch.long),
    }


def reference_loss(model, data) -> float:
    """transformers' own causal-LM loss of ``model`` (PEFT or not) over ``data``'s target
    tokens: their summed cross-entropy over their count, one forward pass, no dropout."""
    import torch

    n = sum(e.num_learned for e in data)
    model.eval()
    with torch.no_grad():
        return model(**hf_batch(data), num_items_in_batch=torch.tensor(n)).loss.item()
