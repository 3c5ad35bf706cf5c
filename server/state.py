"""Everything the routes share: the loaded model, the engine, metrics, admission."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from engine.async_engine import AsyncEngine
from engine.background import Background, InterleavePolicy
from engine.config import ConfigError, EngineConfig
from engine.core_group import CoreGroup, StepCore
from engine.encoder_core import EncoderCore, EncodeRequest
from engine.engine_core import EngineCore
from engine.loader.build import LoadedModel
from engine.loader.encoder import LoadedEncoder
from engine.loader.load import load_model
from engine.request import EngineRequest
from engine.stats import EngineStats
from server.adapter_service import AdapterService
from server.admission import Admission
from server.embeddings import Embedder
from server.fine_tuning.service import FineTuningService
from server.fine_tuning.setup import start_fine_tuning
from server.metrics import ServerMetrics
from server.responses_store import ResponsesStore
from server.serving import Serving
from server.settings import ServerSettings

if TYPE_CHECKING:
    from server.tensor_parallel import Parallel

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ServerState:
    """Set up once; ``serving`` is None until the model is loaded (``/health`` says 503)."""

    settings: ServerSettings
    metrics: ServerMetrics | None = None
    admission: Admission | None = None
    serving: Serving | None = None
    engine: AsyncEngine | None = None
    registry: AdapterRegistry | None = None
    adapters: AdapterService | None = None
    responses: ResponsesStore | None = None  # stored /v1/responses
    embedders: dict[str, Embedder] = field(default_factory=dict)  # embedding models by name
    fine_tuning: FineTuningService | None = None  # files and jobs (needs LoRA: --max-loras)
    started: float = field(default_factory=time.time)
    load_error: str | None = None
    on_load_failed: Callable[[], None] | None = None  # e.g. stop the server: nothing to serve
    stopped: bool = False  # set by stop(); a load still running then starts nothing
    parallel: Parallel | None = None  # rank 0 of a tensor-parallel group, if sharded
    _lifecycle: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = ServerMetrics(self.snapshot)

    @property
    def loaded(self) -> bool:
        """The model has loaded and its engine runs (perhaps still warming up)."""
        return self.serving is not None or bool(self.embedders)

    @property
    def ready(self) -> bool:
        """Started, and the engine's warm-up is over: the first request meets no kernel
        still to be built."""
        return self.loaded and (self.engine is None or self.engine.warmed)

    def snapshot(self) -> EngineStats:
        """The engine's latest published statistics (a frozen snapshot; any thread may read)."""
        return self.engine.stats if self.engine is not None else EngineStats()

    def start(
        self,
        loaded: LoadedModel | LoadedEncoder | None = None,
        embedding: LoadedEncoder | None = None,
    ) -> None:
        """Load the model and the embedding model beside it, if any (unless given), and start
        the engine, and wait for its warm-up; called once, off the loop.

        Raises ``ServerStopped`` if ``stop`` came first: the engine thread is started only
        under the lock ``stop`` takes, so either ``stop`` sees it and joins it or it never
        starts."""
        s = self.settings
        loaded = loaded or load_model(
            s.model,
            quantize=s.quantize_spec,
            cpu_weights=s.cpu_weights,
            cuda_weights=s.cuda_weights,
            kv_cache_memory=s.kv_cache_memory,
        )
        if embedding is None and s.embedding_model is not None:
            embedding = load_embedding_model(s.embedding_model, loaded, s.served_model_name)
        with self._lifecycle:
            if self.stopped:
                raise ServerStopped("the server stopped while the model was loading")
            if isinstance(loaded, LoadedEncoder):
                self._start_embeddings_only(loaded)
            else:
                self._start_engine(loaded, embedding)
        if self.engine is not None:  # outside the lock: stop() may come meanwhile
            self.engine.wait_warm()

    def _start_engine(self, loaded: LoadedModel, embedding: LoadedEncoder | None = None) -> None:
        s = self.settings
        config = EngineConfig(
            max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens,
            kv_cache_memory=s.kv_cache_memory,
            num_blocks=s.num_blocks,
            max_loras=s.max_loras,
            max_lora_rank=s.max_lora_rank,
        )
        if s.max_loras > 0:
            store = AdapterStore(s.data_dir)
            self.registry = AdapterRegistry(store, max_adapters=s.max_adapters)
        if self.parallel is not None:
            core = self.parallel.make_core(loaded.model, config, loaded.dtype)
        else:
            core = EngineCore(loaded.model, config, loaded.dtype)
        self.responses = ResponsesStore(Path(s.data_dir), s.responses_max_stored)
        capacity = (core.num_blocks - 1) * config.block_size
        max_model_len = min(loaded.config.max_position_embeddings, capacity)
        encoder = self._encoder_core(embedding) if embedding is not None else None
        cores = {EngineRequest: core} | ({EncodeRequest: encoder} if encoder else {})
        policy = InterleavePolicy(serve_steps=s.fine_tuning_serve_steps)
        self.engine = AsyncEngine(CoreGroup(cores) if encoder else core, Background(policy))
        self.admission = Admission(s.max_num_seqs, s.max_queue)
        self.serving = Serving(
            engine=self.engine,
            loaded=loaded,
            metrics=self.metrics,
            admission=self.admission,
            max_model_len=max_model_len,
            served_name=s.served_model_name or loaded.name,
            generation_defaults=loaded.generation_defaults,
            registry=self.registry,
            max_lora_rank=s.max_lora_rank,
        )
        if self.registry is not None:
            self.adapters = AdapterService(
                self.registry,
                loaded.config,
                self.serving.served_name,
                s.max_lora_rank,
                s.max_adapter_bytes,
                s.adapter_dir,
            )
        if self.registry is not None and self.parallel is None:  # training runs on one rank
            self.fine_tuning = start_fine_tuning(
                s, self.engine, self.registry, loaded, self.serving.served_name, max_model_len,
                self.metrics,
            )  # fmt: skip
        log.info(
            "serving %s (%d KV blocks, max length %d)", loaded.name, core.num_blocks, max_model_len
        )
        shared = dict(engine=self.engine, metrics=self.metrics, admission=self.admission)
        if loaded.pooling is not None:
            name = self.serving.served_name
            self.embedders[name] = Embedder.for_decoder(loaded, name, max_model_len, **shared)
        if embedding is not None:
            self.embedders[embedding.name] = Embedder.for_encoder(
                embedding, embedding.name, **shared
            )
            self.serving.embedding_models = frozenset({embedding.name})

    def _encoder_core(self, loaded: LoadedEncoder) -> StepCore:
        return EncoderCore(loaded.model, loaded.pooling, self.settings.embedding_batch_tokens)

    def _start_embeddings_only(self, loaded: LoadedEncoder) -> None:
        """An encoder as the model: embeddings only (the generation routes answer 400)."""
        s = self.settings
        self.engine = AsyncEngine(self._encoder_core(loaded))
        self.admission = Admission(s.max_num_seqs, s.max_queue)
        name = s.served_model_name or loaded.name
        shared = dict(engine=self.engine, metrics=self.metrics, admission=self.admission)
        self.embedders[name] = Embedder.for_encoder(loaded, name, **shared)
        log.info("serving %s for embeddings (max length %d)", name, loaded.max_length)

    def stop(self) -> None:
        """Stop the engine thread (joined: no MLX work outlives it) and close the adapter
        store. Safe to call twice, and while ``start`` is still loading."""
        with self._lifecycle:
            self.stopped = True
            engine, registry, responses = self.engine, self.registry, self.responses
            fine_tuning = self.fine_tuning
        if fine_tuning is not None:
            fine_tuning.close()
        if engine is not None:
            engine.shutdown()
        if registry is not None:
            registry.store.close()
        if responses is not None:
            responses.close()


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


class ServerStopped(RuntimeError):
    """``start`` found the server already stopped."""
