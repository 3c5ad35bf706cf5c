"""Write a random llama GGUF in llama.cpp's Q4_K_M or Q8_0 layout, for speed and memory runs.

Speed depends on shapes and tensor types, not on what the weights say, and llama.cpp's quantizer
is not needed: K-quant blocks are random bytes with tame f16 super-block scales (every bit
pattern is a valid block), Q8_0 blocks come from `gguf.quants.quantize` of random normals. The
Q4_K_M recipe follows llama.cpp's for a model whose rows are multiples of 256: Q4_K everywhere,
Q6_K for `output` and for `attn_v` / `ffn_down` in the layers its `use_more_bits` rule picks.
The tokenizer (and its vocabulary size) is copied from another GGUF file, by default the shared
tiny K-quant fixture (vocabulary 512).

    python -m loadtests.make_kquant_gguf --out /tmp/kq-large.Q4_K_M.gguf --recipe Q4_K_M
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from tests.engine.kquant_blocks import random_blocks

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[2] / "shared/models/kquants"


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's rule for the layers whose attn_v and ffn_down get Q6_K in Q4_K_M."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_type(name: str, layers: int, recipe: str) -> T:
    if recipe == "Q8_0":
        return T.Q8_0
    if name == "output.weight":
        return T.Q6_K
    parts = name.split(".")
    if parts[0] == "blk" and parts[2] in ("attn_v", "ffn_down"):
        return T.Q6_K if use_more_bits(int(parts[1]), layers) else T.Q4_K
    return T.Q4_K


def copy_tokenizer(writer: gguf.GGUFWriter, source: Path) -> int:
    """Every `tokenizer.*` key of `source`; returns its vocabulary size."""
    reader = gguf.GGUFReader(source)
    vocab = 0
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        value = field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub_type)
        if name == "tokenizer.ggml.tokens":
            vocab = len(value)
    return vocab


def write(out: Path, recipe: str, hidden: int, intermediate: int, layers: int, heads: int,
          kv_heads: int, tokenizer_from: Path, seed: int = 0) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(out), "llama")
    vocab = copy_tokenizer(w, tokenizer_from)
    w.add_block_count(layers)
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(intermediate)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    shapes = {"token_embd.weight": (vocab, hidden), "output.weight": (vocab, hidden)}
    for i in range(layers):
        shapes |= {
            f"blk.{i}.attn_q.weight": (heads * head_dim, hidden),
            f"blk.{i}.attn_k.weight": (kv_heads * head_dim, hidden),
            f"blk.{i}.attn_v.weight": (kv_heads * head_dim, hidden),
            f"blk.{i}.attn_output.weight": (hidden, heads * head_dim),
            f"blk.{i}.ffn_gate.weight": (intermediate, hidden),
            f"blk.{i}.ffn_up.weight": (intermediate, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, intermediate),
        }
    for name, (rows, cols) in shapes.items():
        kind = tensor_type(name, layers, recipe)
        if kind == T.Q8_0:
            dense = (0.05 * rng.standard_normal((rows, cols))).astype(np.float32)
            w.add_tensor(name, gguf.quants.quantize(dense, kind), raw_dtype=kind)
        else:
            w.add_tensor(name, random_blocks(kind, rows, cols, rng), raw_dtype=kind)
    norms = ["output_norm.weight"] + [
        f"blk.{i}.{n}_norm.weight" for i in range(layers) for n in ("attn", "ffn")
    ]
    for name in norms:
        w.add_tensor(name, np.ones(hidden, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--recipe", choices=("Q4_K_M", "Q8_0"), default="Q4_K_M")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument(
        "--tokenizer-from", type=Path, default=DEFAULT_TOKENIZER / "kq-tiny-llama.F32.gguf"
    )
    a = p.parse_args(argv)
    write(a.out, a.recipe, a.hidden, a.intermediate, a.layers, a.heads, a.kv_heads,
          a.tokenizer_from)  # fmt: skip
    print(f"wrote {a.out} ({a.out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
