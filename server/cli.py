"""The `candlewick` command line."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
import secrets
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.loader.quantize import QuantSpec


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
    _quantize_flags(gen, default=None, group_default="64")
    _weights_flags(gen)
    gen.set_defaults(run=run_generate)

    srv = commands.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    env = _env
    srv.add_argument(
        "--model",
        default=env("MODEL"),
        help="a Hugging Face model folder or a .gguf file (default: SmolLM2)",
    )
    srv.add_argument(
        "--served-model-name",
        default=env("SERVED_MODEL_NAME"),
        help="the id in /v1/models (default: folder name or GGUF file stem)",
    )
    srv.add_argument("--host", default=env("HOST", "127.0.0.1"))
    srv.add_argument("--port", type=int, default=env("PORT", "8000"))
    srv.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        default=None,
        help="require Authorization: Bearer KEY (repeatable; env CANDLEWICK_API_KEY, "
        "comma-separated)",
    )
    srv.add_argument("--max-queue", type=int, default=env("MAX_QUEUE", "256"))
    srv.add_argument("--max-num-seqs", type=int, default=env("MAX_NUM_SEQS", "64"))
    srv.add_argument(
        "--max-num-batched-tokens", type=int, default=int(env("MAX_NUM_BATCHED_TOKENS", "2048"))
    )
    srv.add_argument("--data-dir", default=env("DATA_DIR", "~/.candlewick"))
    srv.add_argument(
        "--kv-cache-memory",
        type=_bytes,
        default=env("KV_CACHE_MEMORY"),
        help="bytes for the KV cache, e.g. 2GiB (default: a share of free memory)",
    )
    srv.add_argument(
        "--allowed-origins",
        default=env("ALLOWED_ORIGINS", ""),
        help="comma-separated CORS origins (default: CORS off)",
    )
    srv.add_argument(
        "--max-loras",
        type=int,
        default=env("MAX_LORAS", "4"),
        help="LoRA adapters resident on the device at once (0 turns LoRA off)",
    )
    srv.add_argument("--max-lora-rank", type=int, default=env("MAX_LORA_RANK", "16"))
    srv.add_argument(
        "--max-adapters",
        type=int,
        default=env("MAX_ADAPTERS", "64"),
        help="adapter names registered at once",
    )
    srv.add_argument(
        "--responses-max-stored",
        type=int,
        default=env("RESPONSES_MAX_STORED", "10000"),
        help="stored /v1/responses kept; beyond it the oldest go first",
    )
    srv.add_argument("--max-adapter-bytes", type=_bytes, default=env("MAX_ADAPTER_BYTES", "512MiB"))
    srv.add_argument(
        "--adapter-dir",
        default=env("ADAPTER_DIR"),
        help="the only folder /v1/load_lora_adapter may read adapters from",
    )
    srv.add_argument("--shutdown-grace", type=float, default=env("SHUTDOWN_GRACE", "30"))
    srv.add_argument(
        "--embedding-model",
        default=env("EMBEDDING_MODEL"),
        help="an encoder model folder (BERT family) served for /v1/embeddings beside --model",
    )
    srv.add_argument(
        "--embedding-batch-tokens",
        type=int,
        default=env("EMBEDDING_BATCH_TOKENS", "2048"),
        help="input tokens an encoder embeds per engine step (default 2048)",
    )
    srv.add_argument(
        "--fine-tuning-memory",
        type=_bytes,
        default=env("FINE_TUNING_MEMORY"),
        help="bytes a fine-tuning job may plan for (default: half of what the device has left "
        "once the model and the KV cache are in place)",
    )
    srv.add_argument(
        "--fine-tuning-serve-steps",
        type=int,
        default=env("FINE_TUNING_SERVE_STEPS", "4"),
        help="while requests run, serving steps between two units of training, at least",
    )
    srv.add_argument("--max-file-bytes", type=_bytes, default=env("MAX_FILE_BYTES", "512MiB"))
    srv.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=_flag(env("ENGINE_PROCESS", "1")),
        help="run the engine in a process of its own, beside the HTTP server's (default); "
        "--no-engine-process steps it on a thread of the server's process",
    )
    srv.add_argument(
        "--tensor-parallel",
        type=int,
        default=env("TENSOR_PARALLEL", "1"),
        help="shard the model over N ranks started on this machine (ring backend on loopback); "
        "across machines, start the ranks with mlx.launch instead",
    )
    srv.add_argument(
        "--tensor-parallel-timeout",
        type=float,
        default=env("TENSOR_PARALLEL_TIMEOUT", "30"),
        help="seconds a rank may take to connect, or stay silent, before the server gives up",
    )
    _quantize_flags(srv, default=env("QUANTIZE"), group_default=env("QUANTIZE_GROUP_SIZE", "64"))
    _weights_flags(srv)
    srv.set_defaults(run=run_serve)

    conv = commands.add_parser(
        "convert", help="write a float folder or a .gguf file as an MLX-quantized folder"
    )
    conv.add_argument(
        "--model", help="a float Hugging Face folder or a .gguf file (default: SmolLM2)"
    )
    conv.add_argument("--out", required=True, help="the folder to write (must not exist)")
    conv.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        help="float tensors, scales and biases (default: the folder's torch_dtype; float16 "
        "for GGUF)",
    )
    _quantize_flags(conv, default=None, group_default="64")
    conv.set_defaults(run=run_convert)
    return parser


def _quantize_flags(p: argparse.ArgumentParser, default: str | None, group_default: str) -> None:
    p.add_argument(
        "--quantize",
        choices=("q2", "q3", "q4", "q5", "q6", "q8"),
        default=default,
        help="quantize the float weights to this many bits (MLX affine, mlx-lm's choice of "
        "modules) while loading",
    )
    p.add_argument(
        "--quantize-group-size",
        type=int,
        choices=(32, 64, 128),
        default=group_default,
        help="weights sharing one scale and bias (default 64, as mlx-lm)",
    )


WEIGHTS_HELP = {
    "cpu": "on the CPU, run quantized layers as their exact float32 dequantization (dense: "
    "several times faster for prompts and batches, about 4-8x the memory of 4/8-bit weights) or "
    "keep them quantized; auto (default) is dense when it fits the RAM left after the KV cache",
    "cuda": "on a CUDA GPU, run quantized layers as dense copies in the compute dtype (dense: no "
    "first-use kernel compiles, fast under batching; 2-4x the memory of 8/4-bit weights) or keep "
    "them quantized; auto (default) is dense when it fits the memory left after the KV cache. "
    "Metal always keeps quantized weights",
}


def _weights_flags(p: argparse.ArgumentParser) -> None:
    for device, help_text in WEIGHTS_HELP.items():
        p.add_argument(
            f"--{device}-weights",
            type=_weights_choice(device),
            default=_env(f"{device.upper()}_WEIGHTS", "auto"),
            metavar="{auto,dense,quantized}",
            help=help_text,
        )


def _weights_choice(device: str) -> Callable[[str], str]:
    """The checker of ``--cpu-weights`` or ``--cuda-weights`` (imported when used: MLX must not
    load before the BLAS is chosen)."""

    def check(text: str) -> str:
        module = importlib.import_module(f"engine.loader.{device}_weights")
        try:
            return getattr(module, f"{device}_weights_choice")(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    check.__name__ = f"--{device}-weights"
    return check


def _quantize_spec(args: argparse.Namespace) -> QuantSpec | None:
    from engine.loader.quantize import quantize_choice

    return quantize_choice(args.quantize, args.quantize_group_size) if args.quantize else None


def _env(name: str, default: str | None = None) -> str | None:
    """CANDLEWICK_<name>; empty counts as unset. Returned as text: argparse applies each
    option's type to it, so a bad value is a usage error naming the option, not a traceback."""
    return os.environ.get(f"CANDLEWICK_{name}") or default


def _flag(text: str) -> bool:
    """An on/off environment value: 0, false, no and off (any case) are off."""
    return text.strip().lower() not in ("0", "false", "no", "off")


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 10**6,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 10**9,
    "gib": 1 << 30,
}


def _bytes(text: str | None) -> int | None:
    """'2GiB', '512m', '1000000' -> bytes."""
    if text is None or text == "":
        return None
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 2GiB, 512MB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def run_serve(args: argparse.Namespace) -> int:
    from server.serve import serve
    from server.settings import ServerSettings

    keys = list(args.api_keys or [])
    if not keys and _env("API_KEY"):
        keys = [k for k in _env("API_KEY").split(",") if k]
    settings = ServerSettings(
        model=args.model,
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        api_keys=tuple(keys),
        max_queue=args.max_queue,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        data_dir=Path(args.data_dir).expanduser(),
        kv_cache_memory=args.kv_cache_memory,
        allowed_origins=tuple(o for o in args.allowed_origins.split(",") if o),
        shutdown_grace=args.shutdown_grace,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        max_adapters=args.max_adapters,
        max_adapter_bytes=args.max_adapter_bytes,
        responses_max_stored=args.responses_max_stored,
        adapter_dir=Path(args.adapter_dir).expanduser() if args.adapter_dir else None,
        quantize=args.quantize,
        quantize_group_size=args.quantize_group_size,
        cpu_weights=args.cpu_weights,
        cuda_weights=args.cuda_weights,
        embedding_model=args.embedding_model,
        embedding_batch_tokens=args.embedding_batch_tokens,
        fine_tuning_memory=args.fine_tuning_memory,
        fine_tuning_serve_steps=args.fine_tuning_serve_steps,
        max_file_bytes=args.max_file_bytes,
        engine_process=args.engine_process,
        tensor_parallel=args.tensor_parallel,
        tensor_parallel_timeout=args.tensor_parallel_timeout,
    )
    return serve(settings)


def run_generate(args: argparse.Namespace) -> int:
    from engine.detokenizer import IncrementalDetokenizer
    from engine.generate import GenerationSettings, generate_tokens
    from engine.loader.encoder import LoadedEncoder
    from engine.loader.load import load_model

    # Built before loading so bad settings fail at once; the stop tokens come from the model.
    settings = GenerationSettings(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed if args.seed is not None else secrets.randbits(63),
    )
    loaded = load_model(
        args.model,
        quantize=_quantize_spec(args),
        cpu_weights=args.cpu_weights,
        cuda_weights=args.cuda_weights,
    )
    if isinstance(loaded, LoadedEncoder):
        raise ValueError(f"{loaded.name} is an encoder: serve it and use /v1/embeddings")
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


def _use_real_blas() -> None:
    """On Linux, run this command again with a real BLAS preloaded under MLX (once), then say
    which BLAS runs and how fast. Only for the process's own command line (argv is None)."""
    from engine import cpu_blas

    cpu_blas.reexec_with_blas()
    report = cpu_blas.check()
    if report is not None:
        print(report.summary(), file=sys.stderr, flush=True)


def run_convert(args: argparse.Namespace) -> int:
    from engine.loader.convert import convert

    out = convert(args.model, args.out, _quantize_spec(args), args.dtype)
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if argv is None and args.command in ("serve", "generate"):
            _use_real_blas()
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:
        # Bad input (a missing model, an unsupported config, a template error): a message, not
        # a traceback.
        print(f"candlewick: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug: its traceback for a report, then the one-line summary
        traceback.print_exc()
        print(f"candlewick: error: unexpected {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
