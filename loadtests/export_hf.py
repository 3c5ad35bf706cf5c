"""Write a GGUF model as a Hugging Face folder, so other engines can run the very same weights.

Benchmarks against mlx-lm (or transformers) need both systems to run identical numbers; mlx-lm
cannot read llama.cpp's Q4_1 blocks, so we hand it a folder instead. The folder is built from
what `engine.loader.load_model` made of the GGUF: tensors already carry Hugging Face names and
layout (llama.cpp's Q/K row permutation undone), and quantized layers are dequantized in float32,
which reproduces llama.cpp's `d * q + m` exactly. A bfloat16 export rounds those values once.

    python -m loadtests.export_hf --out /tmp/smollm2-hf [--model PATH] [--dtype float32|bfloat16]

The written config.json is read back through candlewick's own config parser and must describe
the same model, so a field we cannot express in Hugging Face's terms fails the export instead of
silently producing a different model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from engine.loader.gguf_tensors import AffineQuantized
from engine.loader.hf_metadata import ExportError, metadata_files
from engine.loader.load import load_model

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}


def dense_weights(model: nn.Module, dtype: mx.Dtype) -> dict[str, mx.array]:
    """Every parameter under its Hugging Face name, quantized layers dequantized.

    A quantized module's `weight`/`scales`/`biases` become one dense `weight` [out, in].
    """
    quantized = {
        path: module
        for path, module in model.named_modules()
        if isinstance(module, nn.QuantizedLinear | nn.QuantizedEmbedding)
    }
    weights: dict[str, mx.array] = {}
    for name, value in tree_flatten(model.parameters()):
        module, _, leaf = name.rpartition(".")
        if module in quantized:
            if leaf != "weight":
                continue  # scales / biases: folded into the dense weight below
            q = quantized[module]
            value = AffineQuantized(
                q.weight, q.scales, q.biases, bits=q.bits, group_size=q.group_size
            ).dequantize()
        weights[name] = value.astype(dtype)
    return weights


def export(model_path: Path | None, out: Path, dtype_name: str = "float32") -> Path:
    """Write `model_path` (None: the default model) to the folder `out`; returns `out`."""
    if dtype_name not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype_name!r}")
    # Load in float32 so dequantization is exact; the export dtype rounds once at the end.
    loaded = load_model(model_path, dtype=mx.float32)
    files = metadata_files(loaded, dtype_name)
    out.mkdir(parents=True, exist_ok=True)
    weights = dense_weights(loaded.model, DTYPES[dtype_name])
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    loaded.tokenizer.backend.save(str(out / "tokenizer.json"))
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_argument(
        "--model", type=Path, help="a .gguf file (default: the SmolLM2-135M-Instruct Q4_1 model)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args(argv)
    out = export(args.model, args.out, args.dtype)
    print(f"wrote {out} ({args.dtype})")


if __name__ == "__main__":
    main()
