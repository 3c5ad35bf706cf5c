"""The `candlewick` command line."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="candlewick",
        description="OpenAI-compatible LLM server on MLX with many LoRA adapters on one base model",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="complete one prompt and print it as it streams")
    gen.add_argument(
        "--model",
        help="a Hugging Face model folder or a .gguf file (default: SmolLM2-135M-Instruct)",
    )
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user message through the model's chat template",
    )
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(run=run_generate)
    return parser


def run_generate(args: argparse.Namespace) -> int:
    from engine.detokenizer import IncrementalDetokenizer
    from engine.generate import GenerationSettings, generate_tokens
    from engine.loader.load import load_model

    # Built before loading so bad settings fail at once; the stop tokens come from the model.
    settings = GenerationSettings(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    loaded = load_model(args.model)
    tokenizer = loaded.tokenizer
    if args.chat:
        prompt = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt = tokenizer.encode(args.prompt)
    stops = frozenset(tokenizer.eos_token_ids) | frozenset(loaded.config.eos_token_ids)
    settings = dataclasses.replace(settings, stop_token_ids=stops)
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    out = sys.stdout
    for token in generate_tokens(loaded.model, prompt, settings):
        out.write(detok.add(token))
        out.flush()
    out.write(detok.flush() + "\n")
    out.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:
        # Bad input (a missing model, an unsupported config, a template error): a message, not
        # a traceback.
        print(f"candlewick: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
