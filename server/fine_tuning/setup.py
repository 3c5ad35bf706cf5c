"""Fine-tuning put together for a started server: its database and folders under the data dir,
the manager thread (which resumes jobs a restart interrupted), the memory left for training,
and its metrics."""

from __future__ import annotations

from pathlib import Path

from adapters.registry import AdapterRegistry
from engine.async_engine import AsyncEngine
from engine.loader.build import LoadedModel
from engine.training.lora import ProjectionShapes
from server.fine_tuning.db import Database
from server.fine_tuning.files import FileStore
from server.fine_tuning.jobs import JobStore
from server.fine_tuning.manager import Base, FineTuningManager
from server.fine_tuning.metrics import FineTuningCollector
from server.fine_tuning.service import FineTuningService, fingerprint
from server.metrics import ServerMetrics
from server.settings import ServerSettings

# Of what the device has left once the engine has started, the share training may plan for
# when --fine-tuning-memory is not set (the rest is headroom for serving's activations).
TRAINING_SHARE = 0.5


def start_fine_tuning(
    settings: ServerSettings,
    engine: AsyncEngine,
    registry: AdapterRegistry,
    loaded: LoadedModel,
    served_name: str,
    max_model_len: int,
    metrics: ServerMetrics,
    shapes: ProjectionShapes,
    dtype_size: int,
    available: int,
) -> FineTuningService:
    """``shapes`` and ``dtype_size``: the served model's, as training plans for it; ``available``:
    the bytes the device has left once the engine has started."""
    folder = Path(settings.data_dir) / "fine_tuning"
    db = Database(folder / "index.sqlite3")
    base = Base(loaded, served_name, fingerprint(loaded.config), max_model_len,
                settings.max_lora_rank, shapes, dtype_size)  # fmt: skip
    manager = FineTuningManager(
        JobStore(db), FileStore(db, folder / "files"), folder, engine, registry, base
    )
    budget = settings.fine_tuning_memory
    if budget is None:
        budget = int(available * TRAINING_SHARE)
    metrics.registry.register(FineTuningCollector(manager))
    manager.start()
    return FineTuningService(manager, budget, settings.max_file_bytes)
