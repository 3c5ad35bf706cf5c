"""Decode speed of the default model as shipped (Q4_1 GGUF), as float32, and quantized by
candlewick while loading (q8, q4; group 64), on `EngineCore` at 1 and 16 streams.

Same harness as `loadtests.bench_engine` (random prompts, greedy, EOS ignored, an untimed
warm-up of the same shape first); decode tok/s counts the tokens after each sequence's first
over the time after the last prefill.

    python -m loadtests.bench_quantized [--batches 1,16] [--max-tokens 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from engine.loader.build import LoadedModel
from engine.loader.load import load_model
from engine.loader.quantize import QuantSpec
from loadtests.bench_engine import Workload, candlewick, environment, measure
from loadtests.export_hf import export


def variants(float_folder: Path) -> dict[str, LoadedModel]:
    return {
        "gguf Q4_1": load_model(None),
        "float32": load_model(float_folder),
        "q8 (at load)": load_model(float_folder, quantize=QuantSpec(8, 64)),
        "q4 (at load)": load_model(float_folder, quantize=QuantSpec(4, 64)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = variants(export(None, Path(tmp) / "float", "float32"))
        vocab = list(range(100, 40000))
        for batch in (int(b) for b in args.batches.split(",")):
            work = Workload(batch, args.prompt_len, args.max_tokens, seed=0)
            for name, loaded in models.items():
                generate, profile = candlewick(loaded, work)
                r = measure(name, generate, work, vocab, profile)
                rows.append({"model": name, "streams": batch,
                             "decode_tok_s": round(r.decode_tokens_per_s, 2),
                             "loadavg_1m": r.loadavg_1m})  # fmt: skip
                print(f"{name:>14} {batch:>3} streams: {r.decode_tokens_per_s:8.2f} decode tok/s"
                      f" (load average {r.loadavg_1m:.1f})", flush=True)  # fmt: skip
    if args.json:
        report = {"environment": environment(), "device": str(mx.default_device()), "rows": rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
