"""GGUF models: the same tiny transformers model, written as GGUF with quantized weights, gives
the logits of its dequantized weights; and the real stories260K and SmolLM2 files."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from engine.loader.gguf import load_gguf_model, unpermute_rows
from tests.engine.gguf_writer import permute, write_gguf
from tests.engine.test_models_vs_transformers import assert_close, our_greedy
from tests.engine.tiny_models import VOCAB, build_tiny, reference_greedy

pytest.importorskip("torch")

CASES = [
    ("llama", "llama", Q.Q8_0),
    ("llama3-tied", "llama", Q.Q4_1),
    ("mistral", "mistral", Q.Q4_0),
    ("qwen2", "qwen2", Q.Q4_0),
    ("qwen3", "qwen3", Q.Q8_0),
    ("llama", "llama", Q.F16),
]


@pytest.mark.parametrize(("tiny", "arch", "qtype"), CASES, ids=lambda c: getattr(c, "name", c))
def test_quantized_gguf_matches_its_dequantized_weights(tiny, arch, qtype, tmp_path):
    import torch

    hf_model = build_tiny(tiny, tmp_path / "hf")
    rope_freqs = None
    if tiny == "llama3-tied":
        from engine.config import rope_from_hf

        scaled = rope_from_hf(hf_model.config.to_dict(), hf_model.config.head_dim)
        plain = rope_from_hf({"rope_theta": scaled.theta}, hf_model.config.head_dim)
        rope_freqs = plain.inv_freq() / scaled.inv_freq()
    effective = write_gguf(hf_model, arch, tmp_path / "m.gguf", qtype, rope_freqs)
    with torch.no_grad():
        state = {k: torch.from_numpy(v) for k, v in effective.items()}
        hf_model.load_state_dict(state, strict=False)
    prompt = np.random.default_rng(2).integers(3, VOCAB, size=12).tolist()
    ref_tokens, ref_logits = reference_greedy(hf_model, prompt, 32)

    model, _ = load_gguf_model(tmp_path / "m.gguf", mx.float32)
    tokens, logits = our_greedy(model, prompt, 32)

    quantized = qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1)
    assert ("scales" in model.model.layers[0].mlp.up_proj) == quantized
    for ours, ref in zip(logits, ref_logits, strict=True):
        assert_close(ours, ref)
    assert tokens == ref_tokens


def test_unpermute_rows_inverts_the_converter():
    w = np.arange(2 * 8 * 3).reshape(16, 3)
    assert np.array_equal(permute(w, 2)[unpermute_rows(2, 16)], w)
