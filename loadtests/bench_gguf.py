"""Decode throughput of GGUF files through `EngineCore`, at 1 and 16 streams (CPU).

Each file is loaded with `load_model` (quantized blocks kept quantized) and run with the
workload of `loadtests.bench_engine`: random prompts of `--prompt-len` ids, `--max-tokens`
greedy tokens per stream, EOS ignored, after an untimed warm-up. Decode tok/s is the tokens after
each stream's first over the time after the prefill. Also printed: the model's parameter bytes
against the file's.

    python -m loadtests.bench_gguf FILE.gguf [FILE.gguf ...] --batches 1,16 --max-tokens 32
    python -m loadtests.bench_gguf --layers     # one projection per weight format, in ms

`--layers` times one 2816 x 1024 projection (an FFN matrix of a 1B-class model) per format and
batch: MLX's quantized matmul for the group-32 formats (with float32 or float16 scales and
activations: the cost of keeping K-quant scales float32), the sub-block layers of Q6_K/Q3_K/Q2_K
(dequantize, then a float32 matmul), and a dense float32 matmul.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from engine.loader.load import load_model
from engine.models.quantized import FORMATS, SubBlockLinear
from loadtests.bench_engine import Workload, candlewick, measure


def median_ms(fn, n: int = 15) -> float:
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[n // 2]


def _affine(q: mx.array, scales: mx.array, biases: mx.array, bits: int):
    return lambda x: mx.quantized_matmul(
        x, q, scales, biases, transpose=True, group_size=32, bits=bits
    )


def _sub_block_layer(fmt, rows: int, cols: int, rng: np.random.Generator) -> SubBlockLinear:
    layer = SubBlockLinear(cols, rows, fmt)
    scales = mx.array(rng.integers(0, 256, size=(rows, cols // 16), dtype=np.uint8))
    d = mx.array(np.full(layer.d.shape, 1e-4, dtype=np.float16))
    arrays = {
        "weight": mx.array(rng.integers(0, 2**32, size=layer.weight.shape, dtype=np.uint32)),
        "scales": mx.view(scales, fmt.scales_dtype),
        "d": d,
    }
    layer.update({**arrays, "dmin": d} if fmt.has_min else arrays)
    return layer


def layer_table(rows: int = 2816, cols: int = 1024, batches: tuple[int, ...] = (1, 16)) -> None:
    rng = np.random.default_rng(0)
    w = mx.array(0.05 * rng.standard_normal((rows, cols)).astype(np.float32))
    cases: dict[str, tuple[mx.Dtype, Any]] = {}
    dtypes = [(mx.float32, mx.float32), (mx.float16, mx.float32), (mx.float32, mx.float16)]
    for bits in (4, 5, 8):
        q, s, b = mx.quantize(w, group_size=32, bits=bits)
        for sd, xd in [*dtypes, (mx.float16, mx.float16)]:
            name = f"affine {bits}-bit, scales {sd}, x {xd}".replace("mlx.core.", "")
            cases[name] = (xd, _affine(q, s.astype(sd), b.astype(sd), bits))
    for fmt in FORMATS.values():
        cases[f"{fmt.name} sub-block layer"] = (mx.float32, _sub_block_layer(fmt, rows, cols, rng))
    cases["dense float32 matmul"] = (mx.float32, lambda x: x @ w.T)
    print(f"| {rows} x {cols} projection | " + " | ".join(f"{b} rows, ms" for b in batches) + " |")
    print("|---|" + "---:|" * len(batches))
    for name, (xd, fn) in cases.items():
        ms = []
        for b in batches:
            x = mx.array(rng.standard_normal((b, cols)).astype(np.float32)).astype(xd)
            ms.append(
                median_ms(lambda x=x, fn=fn: mx.eval(fn(x)), 3 if "x float16" in name else 15)
            )
        print(f"| {name} | " + " | ".join(f"{t:.1f}" for t in ms) + " |", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", type=Path, nargs="*")
    p.add_argument("--layers", action="store_true", help="time one projection per format")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per file and batch (best)")
    args = p.parse_args(argv)
    mx.set_default_device(mx.cpu)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"mlx {mx.__version__}, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    if args.layers:
        layer_table()
    if not args.files:
        return
    print("| file | MiB | params / file | streams | decode tok/s | total tok/s | prefill s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for path in args.files:
        loaded = load_model(path)
        params = sum(v.nbytes for _, v in tree_flatten(loaded.model.parameters()))
        size = path.stat().st_size
        special = set(loaded.tokenizer.all_special_ids)
        vocab = [i for i in range(loaded.config.vocab_size) if i not in special]
        for batch in (int(b) for b in args.batches.split(",")):
            work = Workload(batch, args.prompt_len, args.max_tokens, seed=0)
            runs = []
            for repeat in range(args.repeats):
                generate, profile = candlewick(loaded, work)
                runs.append(measure(path.name, generate, work, vocab, profile, repeat))
            best = max(runs, key=lambda r: r.decode_tokens_per_s)
            print(
                f"| {path.name} | {size / 2**20:.1f} | {params / size:.3f} | {batch} | "
                f"{best.decode_tokens_per_s:.1f} | {best.tokens_per_s:.1f} | "
                f"{best.prefill_s:.2f} |",
                flush=True,
            )
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
