"""Decode throughput of GGUF files through `EngineCore`, at 1 and 16 streams (CPU).

Each file is loaded with `load_model` (quantized blocks kept quantized) and run with the
workload of `loadtests.bench_engine`: random prompts of `--prompt-len` ids, `--max-tokens`
greedy tokens per stream, EOS ignored, after an untimed warm-up. Decode tok/s is the tokens after
each stream's first over the time after the prefill. Also printed: the model's parameter bytes
against the file's.

    python -m loadtests.bench_gguf FILE.gguf [FILE.gguf ...] --batches 1,16 --max-tokens 32
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from engine.loader.load import load_model
from loadtests.bench_engine import Workload, candlewick, measure


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per file and batch (best)")
    args = p.parse_args(argv)
    mx.set_default_device(mx.cpu)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"mlx {mx.__version__}, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
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
