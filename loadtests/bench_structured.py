"""What structured output costs: 16 streams with half of them under a JSON schema against the
same 16 streams unconstrained, on the engine alone, on one model.

Each load is 16 requests of 100-token prompts and 64 output tokens (temperature 1, seeded, EOS
ignored where unconstrained; a constrained request ends when its schema does, so its tokens are
counted as produced). The schema asks for a long array of short strings, so constrained rows
run most of their 64 tokens. Reported: output tokens per second of each load (wall time from
submit to the last token, prefill included), their ratio, and the mask time per constrained
token (the engine's own histogram). Loads alternate over `--repeats` rounds on a shared machine;
the best round of each is reported with every round kept in the JSON.

    python -m loadtests.bench_structured --repeats 3 --json structured.json
    python -m loadtests.bench_structured --model path/to/folder-or.gguf
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.loader.load import default_model_path, load_model
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from engine.structured.grammar import GrammarCompiler, GrammarSpec

SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {"type": "string", "maxLength": 12},
            "minItems": 30,
            "maxItems": 60,
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}


def run_load(
    core,
    loaded,
    compiler,
    constrained: int,
    streams: int,
    prompt_len: int,
    max_tokens: int,
    seed: int,
):
    rng = np.random.default_rng(seed)
    vocab = loaded.config.vocab_size
    eos = frozenset(loaded.tokenizer.eos_token_ids) | frozenset(loaded.config.eos_token_ids)
    spec = GrammarSpec.json_schema(SCHEMA)
    start = time.perf_counter()
    for i in range(streams):
        prompt = rng.integers(100, min(vocab, 20000), size=prompt_len).tolist()
        masked = i % 2 == 0 and constrained > i // 2
        params = SamplingParams(
            max_tokens=max_tokens, temperature=1.0, seed=seed * 100 + i, ignore_eos=not masked
        )
        core.add_request(
            EngineRequest(
                f"r{seed}-{i}",
                prompt,
                params,
                eos_token_ids=eos,
                constraint=compiler.constraint(spec) if masked else None,
            )
        )
    tokens = 0
    while core.has_work:
        for out in core.step():
            assert out.error is None, out.error
            tokens += len(out.new_token_ids)
    return tokens, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="a folder or .gguf (default: the default model)")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    loaded = load_model(args.model or default_model_path())
    # No prefix caching: both loads use the same prompts, and neither may reuse the other's.
    config = EngineConfig(max_num_seqs=args.streams, enable_prefix_caching=False)
    core = EngineCore(loaded.model, config, loaded.dtype)
    eos = sorted(frozenset(loaded.tokenizer.eos_token_ids) | frozenset(loaded.config.eos_token_ids))
    t = time.perf_counter()
    compiler = GrammarCompiler(loaded.tokenizer.backend.to_str(), loaded.config.vocab_size, eos)
    compiler.constraint(GrammarSpec.json_schema(SCHEMA))
    setup_s = time.perf_counter() - t
    run_load(core, loaded, compiler, 0, 4, 16, 8, seed=999)  # warm-up
    rounds = []
    for r in range(args.repeats):
        row = {}
        for name, constrained in (("free", 0), ("half", args.streams // 2)):
            before = core.stats.mask_seconds
            tokens, wall = run_load(
                core, loaded, compiler, constrained, args.streams, args.prompt_tokens,
                args.max_tokens, seed=r,
            )  # fmt: skip
            after = core.stats.mask_seconds
            masks = after.count - before.count
            row[name] = {
                "tokens": tokens,
                "wall_s": wall,
                "tok_s": tokens / wall,
                "masks": masks,
                "mask_us": 1e6 * (after.total - before.total) / masks if masks else None,
            }
        rounds.append(row)
        free, half = row["free"]["tok_s"], row["half"]["tok_s"]
        print(
            f"round {r}: free {free:.1f} tok/s, half constrained {half:.1f} tok/s "
            f"({half / free:.2f}x), mask {row['half']['mask_us']:.0f} us/token",
            flush=True,
        )
    best = {k: max(rounds, key=lambda row: row[k]["tok_s"])[k] for k in ("free", "half")}
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "model": str(loaded.path),
        "grammar_setup_s": setup_s,
        "best": best,
        "ratio": best["half"]["tok_s"] / best["free"]["tok_s"],
        "rounds": rounds,
        "loadavg": os.getloadavg(),
    }
    print(json.dumps({k: result[k] for k in ("best", "ratio", "grammar_setup_s")}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
