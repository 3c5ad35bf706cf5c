"""The engine put together from a loaded model, the same way in the server's process and in
an engine process of its own: the decoder's core (beside an encoder's, if one is served), the
background policy training runs under, and the KV blocks it got."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import mlx.core as mx

from engine.background import Background, InterleavePolicy
from engine.config import EngineConfig
from engine.core_group import CoreGroup, StepCore
from engine.encoder_core import EncoderCore, EncodeRequest
from engine.engine_core import EngineCore
from engine.loader.build import LoadedModel
from engine.loader.encoder import LoadedEncoder
from engine.loader.load import load_embedding_model, load_model
from engine.models.base import CausalLM
from engine.request import EngineRequest

if TYPE_CHECKING:
    from engine.engine_process import EngineSpec

MakeCore = Callable[[CausalLM, EngineConfig, mx.Dtype], EngineCore]


def load_models(
    spec: EngineSpec, embedding: LoadedEncoder | None = None
) -> tuple[LoadedModel | LoadedEncoder, LoadedEncoder | None]:
    """The model the spec names, and the encoder beside it if one is served (``embedding``, when
    already loaded)."""
    loaded = load_model(
        spec.model,
        quantize=spec.quantize,
        cpu_weights=spec.cpu_weights,
        cuda_weights=spec.cuda_weights,
        kv_cache_memory=spec.config.kv_cache_memory,
    )
    if embedding is None and spec.embedding_model is not None:
        embedding = load_embedding_model(spec.embedding_model, loaded, spec.served_name)
    return loaded, embedding


def assemble(
    loaded: LoadedModel | LoadedEncoder,
    embedding: LoadedEncoder | None,
    spec: EngineSpec,
    make_core: MakeCore = EngineCore,
) -> tuple[StepCore, Background | None, int]:
    """(the core the engine thread steps, its background work, the decoder's KV blocks; 0 for
    an encoder alone). ``make_core``: how the decoder's core is made (a tensor-parallel leader's
    differs)."""
    if isinstance(loaded, LoadedEncoder):
        return encoder_core(loaded, spec.embedding_batch_tokens), None, 0
    core = make_core(loaded.model, spec.config, loaded.dtype)
    background = Background(InterleavePolicy(serve_steps=spec.serve_steps))
    if embedding is None:
        return core, background, core.num_blocks
    encoder = encoder_core(embedding, spec.embedding_batch_tokens)
    group = CoreGroup({EngineRequest: core, EncodeRequest: encoder})
    return group, background, core.num_blocks


def encoder_core(loaded: LoadedEncoder, batch_tokens: int) -> EncoderCore:
    return EncoderCore(loaded.model, loaded.pooling, batch_tokens)
