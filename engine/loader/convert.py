"""`candlewick convert`: a float folder or a GGUF file written as an MLX-quantized folder.

The result is what mlx-lm's convert writes (config.json with `quantization`, safetensors shards
with `model.safetensors.index.json`, the tokenizer and template files), so mlx-lm, candlewick
and the thousands of tools that read mlx-lm's folders load it.

A float folder is streamed: one tensor is read, cast, quantized with mlx-lm's default choice of
modules and written into the current shard, so memory stays near one shard plus one tensor. A
GGUF file goes through the GGUF loader (it is already quantized, hence small): every block type
the loader re-encodes exactly as MLX's affine layout is written as it came, with its own bits
and group size as a per-module entry; `--quantize` then quantizes only the float tensors left.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from engine.loader.build import progress
from engine.loader.gguf import load_gguf
from engine.loader.hf import checkpoint_tensors, read_config, weight_files
from engine.loader.hf_metadata import metadata_files
from engine.loader.load import default_model_path
from engine.loader.quantize import (
    QuantScheme,
    QuantSpec,
    default_plan,
    module_specs,
    quantizable_modules,
    quantize_float_modules,
    quantize_weight,
    scheme_from_config,
)
from engine.models.registry import config_from_hf

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
MAX_SHARD_BYTES = 5 << 30  # mlx-lm's shard size
# Files of a source folder that describe the weights (rewritten here), not the tokenizer.
_WEIGHT_FILES = ("config.json", "model.safetensors.index.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


class ConvertError(ValueError):
    """A conversion that cannot run as asked; the message says why."""


def convert(
    src: str | Path | None,
    out: str | Path,
    quantize: QuantSpec | None,
    dtype: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write ``src`` (a float Hugging Face folder, a .gguf file, None for the default model) to
    the new folder ``out`` as an MLX-quantized model; returns ``out``.

    ``dtype`` (float16, bfloat16, float32) is the dtype of float tensors, scales and biases;
    default: the folder's ``torch_dtype``, or float16 for GGUF (exact for its block constants).
    """
    src = Path(src).expanduser() if src is not None else default_model_path()
    out = Path(out).expanduser()
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"{out} already exists and is not an empty folder")
    if not src.exists():
        raise ConvertError(f"{src} does not exist")
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        if src.is_dir():
            _from_folder(src, partial, quantize, dtype, max_shard_bytes)
        elif src.suffix == ".gguf":
            _from_gguf(src, partial, quantize, dtype or "float16", max_shard_bytes)
        else:
            raise ConvertError(f"{src} is neither a Hugging Face model folder nor a .gguf file")
        if out.exists():
            out.rmdir()
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def _from_folder(
    src: Path, out: Path, spec: QuantSpec | None, dtype: str | None, max_shard_bytes: int
) -> None:
    hf = read_config(src)
    if scheme_from_config(hf) is not None:
        raise ConvertError(f"{src} is already MLX-quantized")
    if spec is None:
        raise ConvertError(f"{src} is a float model: pass --quantize (q2..q8)")
    cfg = config_from_hf(hf)
    dtype = dtype or hf.get("torch_dtype") or hf.get("dtype")
    target = DTYPES.get(dtype)  # None: keep each tensor's own dtype, as mlx-lm does
    plan = default_plan(quantizable_modules(cfg), spec)
    tensors = checkpoint_tensors(src, cfg.tie_word_embeddings)

    def stream() -> Iterator[tuple[str, mx.array]]:
        for name in progress(list(tensors), desc=f"converting {src.name}"):
            _, array = tensors.pop(name)
            if target is not None and mx.issubdtype(array.dtype, mx.floating):
                array = array.astype(target)
            module, _, leaf = name.rpartition(".")
            if leaf == "weight" and module in plan:
                for part, value in quantize_weight(array, plan[module]).items():
                    yield f"{module}.{part}", value
            else:
                yield name, array

    write_shards(out, stream(), max_shard_bytes)
    config = {k: v for k, v in hf.items() if k not in ("quantization", "quantization_config")}
    if target is not None:
        config["torch_dtype"] = dtype
    _write_config(out, config, QuantScheme(spec, {}))
    sources = set(weight_files(src))
    for path in sorted(src.iterdir()):
        if path.is_file() and path not in sources and _is_tokenizer_file(path):
            shutil.copy2(path, out / path.name)


def _from_gguf(
    src: Path, out: Path, spec: QuantSpec | None, dtype: str, max_shard_bytes: int
) -> None:
    loaded = load_gguf(src, DTYPES[dtype])
    if spec is not None:
        quantize_float_modules(loaded.model, spec)
    specs = module_specs(loaded.model)
    if not specs:
        raise ConvertError(f"{src} holds no quantized tensors: pass --quantize (q2..q8)")
    # The most common setting is the default; the others are per-module entries.
    default = spec or Counter(specs.values()).most_common(1)[0][0]
    scheme = QuantScheme(default, {p: s for p, s in specs.items() if s != default})
    files = metadata_files(loaded, dtype)
    weights = tree_flatten(loaded.model.parameters())
    write_shards(out, progress(weights, desc=f"writing {src.stem}"), max_shard_bytes)
    _write_config(out, files.pop("config.json"), scheme)
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    loaded.tokenizer.backend.save(str(out / "tokenizer.json"))


def _is_tokenizer_file(path: Path) -> bool:
    return path.name not in _WEIGHT_FILES and not path.name.endswith(_WEIGHT_SUFFIXES)


def _write_config(out: Path, config: dict[str, Any], scheme: QuantScheme) -> None:
    """mlx-lm writes the same entry twice (`quantization_config` for Hugging Face's tools)."""
    entry = scheme.to_config()
    config = {**config, "quantization": entry, "quantization_config": entry}
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


@dataclass(slots=True)
class _Shard:
    tensors: dict[str, mx.array] = field(default_factory=dict)
    nbytes: int = 0


def write_shards(out: Path, tensors: Iterator[tuple[str, mx.array]], max_shard_bytes: int) -> None:
    """Tensors into `model-0000i-of-0000n.safetensors` files of at most ``max_shard_bytes``
    (a larger tensor gets a file of its own) plus the index; one shard is in memory at a time."""
    written: list[list[str]] = []  # the names in each shard written so far
    shard = _Shard()
    total = 0

    def flush() -> None:
        if shard.tensors:
            mx.save_safetensors(
                str(out / f"shard-{len(written):05d}.tmp.safetensors"),
                shard.tensors,
                metadata={"format": "mlx"},
            )
            written.append(list(shard.tensors))
            shard.tensors, shard.nbytes = {}, 0

    for name, value in tensors:
        mx.eval(value)
        if shard.tensors and shard.nbytes + value.nbytes > max_shard_bytes:
            flush()
        shard.tensors[name] = value
        shard.nbytes += value.nbytes
        total += value.nbytes
    flush()
    if not written:
        raise ConvertError("the model has no tensors to write")
    weight_map: dict[str, str] = {}
    for i, names in enumerate(written):
        final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        (out / f"shard-{i:05d}.tmp.safetensors").rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4) + "\n")
