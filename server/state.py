"""Everything the routes share: the loaded model, the engine, metrics, admission."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx

from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from engine.assembly import assemble, load_models
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.engine_process import EngineSpec
from engine.loader.build import LoadedModel
from engine.loader.encoder import LoadedEncoder
from engine.loader.load import load_embedding_model
from engine.memory import MemoryReading, available_memory
from engine.stats import EngineStats
from engine.training.lora import ProjectionShapes, projection_shapes
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
        """Started, and the engine's warm-up is over (the first request meets no kernel still
        to be built), and the engine still runs."""
        if self.engine is None:
            return self.loaded
        return self.loaded and self.engine.warmed and self.engine.alive

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

        With ``--engine-process`` (the default) and nothing given, the engine loads the model
        in a process of its own (engine.engine_process) and this one keeps only what serving
        needs of it (tokenizer, config); otherwise it loads here and steps on a thread.

        Raises ``ServerStopped`` if ``stop`` came first: the engine is started only under the
        lock ``stop`` takes, so either ``stop`` sees it and stops it or it never starts."""
        s = self.settings
        spec = self._engine_spec()
        if loaded is None and s.engine_process and self.parallel is None:
            engine = AsyncEngine(None, process=spec, on_exit=self._engine_ended)
            info = engine.info
            meta = replace(info.loaded, dtype=getattr(mx, info.dtype_name))
            with self._lifecycle:
                if self.stopped:
                    engine.shutdown()
                    raise ServerStopped("the server stopped while the model was loading")
                self.engine = engine
                if isinstance(meta, LoadedEncoder):
                    self._serve_embeddings_only(meta)
                else:
                    machine = _Machine(
                        info.num_blocks, spec.config.block_size, info.shapes, info.available_memory
                    )
                    self._serve(meta, info.embedding, machine)
        else:
            if loaded is None:
                loaded, embedding = load_models(spec, embedding)
            elif embedding is None and s.embedding_model is not None:
                embedding = load_embedding_model(s.embedding_model, loaded, s.served_model_name)
            with self._lifecycle:
                if self.stopped:
                    raise ServerStopped("the server stopped while the model was loading")
                make_core = EngineCore if self.parallel is None else self.parallel.make_core
                core, background, num_blocks = assemble(loaded, embedding, spec, make_core)
                if isinstance(loaded, LoadedEncoder):
                    self.engine = AsyncEngine(core)
                    self._serve_embeddings_only(loaded)
                else:
                    self.engine = AsyncEngine(core, background, loaded.model)
                    # training runs on one rank only: a sharded model plans none
                    shapes = projection_shapes(loaded.model) if self.parallel is None else {}
                    available = available_memory(MemoryReading.now()).nbytes
                    machine = _Machine(num_blocks, spec.config.block_size, shapes, available)
                    self._serve(loaded, embedding, machine)
        if self.engine is not None:  # outside the lock: stop() may come meanwhile
            self.engine.wait_warm()

    def _engine_spec(self) -> EngineSpec:
        s = self.settings
        config = EngineConfig(
            max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens,
            kv_cache_memory=s.kv_cache_memory,
            num_blocks=s.num_blocks,
            max_loras=s.max_loras,
            max_lora_rank=s.max_lora_rank,
        )
        return EngineSpec(
            model=s.model,
            config=config,
            quantize=s.quantize_spec,
            cpu_weights=s.cpu_weights,
            cuda_weights=s.cuda_weights,
            embedding_model=s.embedding_model,
            served_name=s.served_model_name,
            embedding_batch_tokens=s.embedding_batch_tokens,
            serve_steps=s.fine_tuning_serve_steps,
        )

    def _engine_ended(self, why: str) -> None:
        """The engine process ended unasked: nothing can be served; the server exits."""
        self.load_error = why
        if self.on_load_failed is not None:
            self.on_load_failed()

    def _serve(
        self, loaded: LoadedModel, embedding: LoadedEncoder | None, machine: _Machine
    ) -> None:
        """Everything the routes use, over the started engine."""
        s = self.settings
        if s.max_loras > 0:
            store = AdapterStore(s.data_dir)
            self.registry = AdapterRegistry(store, max_adapters=s.max_adapters)
        self.responses = ResponsesStore(Path(s.data_dir), s.responses_max_stored)
        capacity = (machine.num_blocks - 1) * machine.block_size
        max_model_len = min(loaded.config.max_position_embeddings, capacity)
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
                self.metrics, machine.shapes, loaded.dtype.size, machine.available,
            )  # fmt: skip
        log.info(
            "serving %s (%d KV blocks, max length %d)",
            loaded.name,
            machine.num_blocks,
            max_model_len,
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

    def _serve_embeddings_only(self, loaded: LoadedEncoder) -> None:
        """An encoder as the model: embeddings only (the generation routes answer 400)."""
        s = self.settings
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


@dataclass(frozen=True, slots=True)
class _Machine:
    """What the started engine has, wherever it runs: its KV blocks (and their size), the LoRA
    shapes training plans for, the device memory left."""

    num_blocks: int
    block_size: int
    shapes: ProjectionShapes
    available: int


class ServerStopped(RuntimeError):
    """``start`` found the server already stopped."""
