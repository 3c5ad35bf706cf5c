"""Write a Hugging Face model folder with a real architecture's shapes and random weights.

Serving speed depends on shapes, not on what the weights say, so a benchmark of an 8B model needs
neither a download nor a licence: this writes one in a couple of minutes. Both candlewick and
`mlx_lm.server` load the folder, so they run the very same bytes. Weights are normal with a small
std (activations stay finite through every layer; norms are ones), drawn per chunk in float32
and rounded to bfloat16 (round to nearest even) on the way to disk, so memory stays at a few
chunks whatever the model size. The tokenizer is byte-level BPE without merges whose vocabulary
has exactly `vocab_size` entries: 256 byte tokens, ASCII filler tokens, then the special tokens,
so every id the model can sample decodes to text.

    python -m loadtests.make_model --preset llama3-8b --out /tmp/llama3-8b-random
    python -m loadtests.make_model --preset tiny --out /tmp/tiny      # CPU smoke test
    python -m loadtests.make_model --preset llama3-8b-q4 --out /tmp/llama3-8b-q4

A `-q4` / `-q8` preset is the same model MLX-quantized (affine, group 64, mlx-lm's choice of
modules): the bf16 folder is written beside the output, then `candlewick convert` streams it
into the quantized folder and the bf16 one is removed. mlx_lm.server loads it too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import struct
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

MAX_SHARD_BYTES = 5_000_000_000  # Hugging Face's "5GB"
CHUNK = 1 << 23  # elements drawn at once (32 MiB of float32)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_SPECIALS = tuple(
    f"<|{s}|>"
    for s in ("begin_of_text", "end_of_text", "start_header_id", "end_header_id", "eot_id")
)
CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True, slots=True)
class Preset:
    """A model's shape; `extra` is copied into config.json as is (rope scaling, windows)."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rope_theta: float
    max_positions: int
    rms_eps: float
    tied: bool = False
    qkv_bias: bool = False
    extra: tuple[tuple[str, Any], ...] = ()
    quantize: str | None = None  # q4, q8: written MLX-quantized (group 64)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def chatml(self) -> bool:
        return self.model_type == "qwen2"


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
}
LLAMA3_ROPE["original_max_position_embeddings"] = 8192
QWEN_WINDOW = (("use_sliding_window", False), ("sliding_window", 32768), ("max_window_layers", 28))
PRESETS: dict[str, Preset] = {
    "llama3-8b": Preset(
        "llama", 4096, 32, 32, 8, 14336, 128256, 500000.0, 131072, 1e-5,
        extra=(("rope_scaling", LLAMA3_ROPE),),
    ),
    "qwen2.5-1.5b": Preset(
        "qwen2", 1536, 28, 12, 2, 8960, 151936, 1000000.0, 32768, 1e-6,
        tied=True, qkv_bias=True, extra=QWEN_WINDOW,
    ),
    "llama-50m": Preset(  # 58M parameters: the CPU side-by-side's model
        "llama", 512, 8, 8, 4, 1536, 32000, 500000.0, 8192, 1e-5,
    ),
    "tiny": Preset(
        "llama", 64, 2, 4, 2, 128, 512, 500000.0, 16384, 1e-5,
        extra=(("rope_scaling", LLAMA3_ROPE),),
    ),
    "tiny-qwen": Preset(
        "qwen2", 64, 2, 4, 2, 128, 600, 1000000.0, 2048, 1e-6, tied=True, qkv_bias=True,
        extra=QWEN_WINDOW,
    ),
}  # fmt: skip
PRESETS |= {
    f"{name}-{q}": dataclasses.replace(p, quantize=q)
    for name, p in list(PRESETS.items())
    for q in ("q4", "q8")
}


def tensor_shapes(p: Preset) -> dict[str, tuple[int, ...]]:
    """Every weight under its Hugging Face name, in file order."""
    q, kv, h, m = p.heads * p.head_dim, p.kv_heads * p.head_dim, p.hidden, p.intermediate
    layer = {"input_layernorm.weight": (h,), "self_attn.q_proj.weight": (q, h)}
    layer |= {"self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h)}
    if p.qkv_bias:
        layer |= {f"self_attn.{n}_proj.bias": (r,) for n, r in (("q", q), ("k", kv), ("v", kv))}
    layer |= {"self_attn.o_proj.weight": (h, q), "post_attention_layernorm.weight": (h,)}
    layer |= {"mlp.gate_proj.weight": (m, h), "mlp.up_proj.weight": (m, h)}
    layer |= {"mlp.down_proj.weight": (h, m)}
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (p.vocab, h)}
    for i in range(p.layers):
        shapes |= {f"model.layers.{i}.{k}": v for k, v in layer.items()}
    shapes["model.norm.weight"] = (p.hidden,)
    if not p.tied:
        shapes["lm_head.weight"] = (p.vocab, p.hidden)
    return shapes


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even; inputs are finite."""
    bits = x.view(np.uint32)
    out = bits >> 16  # in place from here: this runs over every weight of the model
    out &= 1
    out += 0x7FFF
    out += bits
    out >>= 16
    return out.astype(np.uint16)


def _chunk_bytes(name: str, size: int, start: int, seed: int, std: float) -> bytes:
    if name.endswith("norm.weight"):
        return np.full(size, 0x3F80, dtype="<u2").tobytes()  # bf16 1.0
    rng = np.random.default_rng([seed, start, *name.encode()])
    x = rng.standard_normal(size, dtype=np.float32)
    x *= std
    return to_bf16(x).astype("<u2").tobytes()


def tensor_chunks(
    pool: ThreadPoolExecutor, window: int, name: str, numel: int, seed: int, std: float
) -> Iterator[bytes]:
    """A tensor's bf16 bytes in order, drawn by the pool `window` chunks at a time (so memory
    stays bounded however large the tensor)."""
    starts = list(range(0, numel, CHUNK))
    for w in range(0, len(starts), window):
        futures = [
            pool.submit(_chunk_bytes, name, min(CHUNK, numel - s), s, seed, std)
            for s in starts[w : w + window]
        ]
        for f in futures:
            yield f.result()


def plan_shards(shapes: dict[str, tuple[int, ...]]) -> list[list[str]]:
    """Consecutive tensors grouped into shards of at most MAX_SHARD_BYTES (bf16)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and used + nbytes > MAX_SHARD_BYTES:
            shards, used = [*shards, []], 0
        shards[-1].append(name)
        used += nbytes
    return shards


def write_weights(out: Path, p: Preset, seed: int, std: float, workers: int) -> int:
    """Streams every shard to disk plus the index; returns the total weight bytes."""
    shapes = tensor_shapes(p)
    shards = plan_shards(shapes)
    weight_map: dict[str, str] = {}
    total = 0
    with ThreadPoolExecutor(workers) as pool:
        for n, names in enumerate(shards, 1):
            file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name in names:
                end = offset + 2 * int(np.prod(shapes[name]))
                header[name] = dict(dtype="BF16", shape=shapes[name], data_offsets=[offset, end])
                offset, weight_map[name] = end, file
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
            with open(out / file, "wb") as f:
                f.write(struct.pack("<Q", len(raw)) + raw)
                for name in names:
                    numel = int(np.prod(shapes[name]))
                    for chunk in tensor_chunks(pool, 2 * workers, name, numel, seed, std):
                        f.write(chunk)
            total += offset
            print(f"wrote {file} ({offset / 1e9:.2f} GB)", file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character map, in byte order: id b is byte b."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    unprintable = [b for b in range(256) if b not in printable]
    return [chr(b) if b in printable else chr(256 + unprintable.index(b)) for b in range(256)]


def build_tokenizer(p: Preset) -> Tokenizer:
    """Byte-level BPE, ids: 256 bytes, then filler words ' t<i>', then the special tokens."""
    special = CHATML_SPECIALS if p.chatml else LLAMA3_SPECIALS
    fill = p.vocab - 256 - len(special)
    if fill < 0:
        raise ValueError(f"vocab {p.vocab} is too small for 256 bytes + {len(special)} specials")
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    vocab.update({f"\u0120t{i}": 256 + i for i in range(fill)})  # \u0120: a leading space
    vocab.update({s: 256 + fill + i for i, s in enumerate(special)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    if not p.chatml:
        bos = special[0]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    assert tok.get_vocab_size() == p.vocab
    return tok


def write_configs(out: Path, p: Preset, tok: Tokenizer) -> None:
    ids = tok.get_vocab()
    bos, eos = (None, "<|im_end|>") if p.chatml else ("<|begin_of_text|>", "<|eot_id|>")
    stops = [ids[eos], ids["<|endoftext|>" if p.chatml else "<|end_of_text|>"]]
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[p.model_type]
    config = {
        "architectures": [arch],
        "model_type": p.model_type,
        "hidden_size": p.hidden,
        "num_hidden_layers": p.layers,
        "num_attention_heads": p.heads,
        "num_key_value_heads": p.kv_heads,
        "head_dim": p.head_dim,
        "intermediate_size": p.intermediate,
        "vocab_size": p.vocab,
        "max_position_embeddings": p.max_positions,
        "rms_norm_eps": p.rms_eps,
        "rope_theta": p.rope_theta,
        "tie_word_embeddings": p.tied,
        "hidden_act": "silu",
        "attention_bias": False,  # llama's flag; qwen2 always has Q/K/V biases
        "torch_dtype": "bfloat16",
        "bos_token_id": ids[bos] if bos else None,
        "eos_token_id": stops,
        **dict(p.extra),
    }
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": stops}
    tok_config = {
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": "<|endoftext|>" if p.chatml else None,
        "chat_template": CHATML_TEMPLATE if p.chatml else LLAMA3_TEMPLATE,
        "model_max_length": p.max_positions,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    files = {"config": config, "generation_config": generation, "tokenizer_config": tok_config}
    for name, data in files.items():
        (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))


def make_model(preset: str, out: Path, seed: int = 0, std: float = 0.02, workers: int = 8) -> int:
    """Writes the whole folder; returns the weight bytes. An existing folder is overwritten."""
    p = PRESETS[preset]
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):
        old.unlink()
    if p.quantize is None:
        write_configs(out, p, build_tokenizer(p))
        return write_weights(out, p, seed, std, workers)
    return _make_quantized(p, out, seed, std, workers)


def _make_quantized(p: Preset, out: Path, seed: int, std: float, workers: int) -> int:
    """The float preset beside ``out``, converted into ``out``; returns the weight bytes."""
    from engine.loader.convert import convert
    from engine.loader.quantize import quantize_choice

    float_folder = out.with_name(f"{out.name}.bf16")
    converted = out.with_name(f"{out.name}.converted")
    for tmp in (float_folder, converted):
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        float_folder.mkdir()
        float_p = dataclasses.replace(p, quantize=None)
        write_configs(float_folder, float_p, build_tokenizer(float_p))
        write_weights(float_folder, float_p, seed, std, workers)
        convert(float_folder, converted, quantize_choice(p.quantize))
        for path in converted.iterdir():
            path.replace(out / path.name)
    finally:
        for tmp in (float_folder, converted):
            shutil.rmtree(tmp, ignore_errors=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    return int(index["metadata"]["total_size"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 8, help="drawing threads")
    args = ap.parse_args(argv)
    total = make_model(args.preset, args.out, args.seed, args.std, args.workers)
    kind = PRESETS[args.preset].quantize or "bf16"
    print(f"{args.out}: {args.preset}, {total / 1e9:.2f} GB of {kind} weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
