"""Perplexity and weight memory of the default model quantized by candlewick, beside mlx-lm's.

The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) is dequantized exactly to a float32
Hugging Face folder; that float model is the reference. candlewick then quantizes the folder
while loading (q8 and q4, group 64, mlx-lm's choice of modules; also q4 with group 32), and
mlx-lm's own
`quantize_model` quantizes the same folder, which mlx-lm's forward pass then scores. Every model
reads the same text (tests/data/prose.txt, prose written for this repository) as one sequence;
perplexity is exp of the mean negative log-likelihood of each token given the ones before it.

Memory is the bytes of the model's parameters as loaded for a GPU (float16: MLX's own affine
scales and biases in float16, norms float16), quantized against float.

    python -m loadtests.perplexity [--tokens N] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from engine.loader.hf import load_hf_model
from engine.loader.quantize import QuantSpec
from engine.tokenizer import Tokenizer
from loadtests.export_hf import export

TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "prose.txt"


def perplexity(logits: mx.array, tokens: list[int]) -> float:
    """exp(mean NLL) of tokens[1:] under logits [1, S, V] computed from tokens[:-1] onward."""
    logprobs = nn.log_softmax(logits[0, :-1].astype(mx.float32), axis=-1)  # [S-1, V]
    target = mx.array(tokens[1:])[:, None]
    nll = -mx.take_along_axis(logprobs, target, axis=-1).mean()
    return math.exp(float(nll))


def ours(model, tokens: list[int]) -> float:
    return perplexity(model(mx.array([tokens]), model.make_cache()), tokens)


def mlx_lm_ppl(folder: Path, tokens: list[int]) -> float:
    from mlx_lm.utils import load_model

    model, _ = load_model(folder)
    return perplexity(model(mx.array([tokens])), tokens)


def mlx_lm_quantized(float_folder: Path, out: Path, bits: int, group_size: int) -> Path:
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    model, config = load_model(float_folder)
    model, config = quantize_model(model, config, group_size, bits)
    save_model(out, model)
    save_config(config, out / "config.json")
    return out


def weight_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def measure(work: Path, max_tokens: int | None = None, with_mlx_lm: bool = True) -> dict:
    float_folder = export(None, work / "float", "float32")
    tokens = Tokenizer.from_folder(float_folder).encode(TEXT.read_text())[:max_tokens]
    result: dict = {"tokens": len(tokens), "ppl": {}, "weight_bytes": {}}
    ppl = result["ppl"]
    ppl["float32"] = ours(load_hf_model(float_folder, mx.float32), tokens)
    for bits in (8, 4):
        model = load_hf_model(float_folder, mx.float32, QuantSpec(bits, 64))
        ppl[f"candlewick q{bits}"] = ours(model, tokens)
        if with_mlx_lm:
            folder = mlx_lm_quantized(float_folder, work / f"mlx-q{bits}", bits, 64)
            ppl[f"mlx-lm q{bits}"] = mlx_lm_ppl(folder, tokens)
    # Group 32 is the GGUF's own block: q4 then lands back on most of Q4_1's grid.
    ppl["candlewick q4 g32"] = ours(
        load_hf_model(float_folder, mx.float32, QuantSpec(4, 32)), tokens
    )
    size = result["weight_bytes"]
    size["float16"] = weight_bytes(load_hf_model(float_folder, mx.float16))
    for bits in (8, 4):
        size[f"q{bits}"] = weight_bytes(
            load_hf_model(float_folder, mx.float16, QuantSpec(bits, 64))
        )
    result["q4_over_float16"] = size["q4"] / size["float16"]
    result["q8_over_float16"] = size["q8"] / size["float16"]
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=None, help="score only the first N tokens")
    ap.add_argument("--out", type=Path, help="also write the figures as JSON")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp), args.tokens)
    base = result["ppl"]["float32"]
    print(f"{result['tokens']} tokens of {TEXT.name}")
    for name, value in result["ppl"].items():
        print(f"  {name:>14}: perplexity {value:8.4f} ({100 * (value / base - 1):+.2f}%)")
    for name, value in result["weight_bytes"].items():
        print(f"  {name:>14}: {value / 1e6:8.2f} MB of weights")
    print(f"  q4 / float16 bytes: {result['q4_over_float16']:.4f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
