"""The thread that runs fine-tuning jobs: one at a time on the engine, the rest queued.

It moves each job through its states, hands the engine each job's ``TrainingRun`` (run in units
between serving steps, engine.background, in whichever process the engine runs), and turns
what the work reports into the job's events, checkpoints and, at the end, a registered adapter
version: the next request naming
``ft:<base>:<suffix>:<job id>`` is served by it, with no restart. Each checkpoint is registered
too, as ``ft:<base>:<suffix>:<job id>:ckpt-step-<N>``, and servable at once; a job keeps its
newest ``KEEP_CHECKPOINTS`` (older ones leave the list, the adapter registry and the disk), and
a checkpoint never takes the registry's last free place, which is the job's model's.
Everything here that writes (SQLite, checkpoint files, the adapter store) runs on this thread,
never the engine's.

A restart finds the jobs that were running: each goes back to the queue and resumes from its
last checkpoint (weights, AdamW state, step; the data order follows from the seed), or fails
with the reason when it cannot (its training file is gone, the server serves another model).
A finished job's adapter is in the adapter store, which keeps it across restarts.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.format import parse_adapter
from adapters.peft_export import peft_files
from adapters.registry import AdapterRegistry
from adapters.safetensors_io import read_safetensors, write_safetensors
from engine.async_engine import AsyncEngine
from engine.background import Cancellable
from engine.loader.build import LoadedModel
from engine.lora.request import LoRAWeights
from engine.training.data import Example
from engine.training.lora import LoRASpec, ProjectionShapes, init_lora
from engine.training.trainer import TrainingConfig
from engine.training.work import (
    Checkpointed,
    Failed,
    Finished,
    Started,
    StepDone,
    Stopped,
    TrainingEvent,
    TrainingRun,
)
from server.fine_tuning.dataset import DatasetError, examples, parse_jsonl
from server.fine_tuning.files import FileStore
from server.fine_tuning.jobs import Job, JobStore, new_id

log = logging.getLogger(__name__)

KEEP_STATES = 2  # resume states kept per job (the newest)
KEEP_CHECKPOINTS = 3  # checkpoints kept per job (the newest), as OpenAI keeps the last three
VALIDATE_EVERY = 10  # steps between validation losses on a sampled batch (and at checkpoints)
_STOP = object()


@dataclass(slots=True)
class TrainingNumbers:
    """What the metrics show of training (written by the manager's thread only)."""

    tokens_total: int = 0
    tokens_per_second: float = 0.0
    step_loss: float | None = None
    steps_total: int = 0


@dataclass(frozen=True, slots=True)
class Base:
    """The served model jobs train: its id, a fingerprint of its shape, what limits examples."""

    loaded: LoadedModel  # its weights may be in the engine's process (``model`` None here)
    name: str
    fingerprint: str
    max_len: int
    max_rank: int
    shapes: ProjectionShapes  # what LoRA weights for it must fit
    dtype_size: int  # bytes of one element of its compute dtype


class FineTuningManager:
    def __init__(
        self,
        jobs: JobStore,
        files: FileStore,
        folder: Path,
        engine: AsyncEngine,
        registry: AdapterRegistry,
        base: Base,
    ) -> None:
        self.jobs, self.files, self.folder = jobs, files, folder
        self.engine, self.registry, self.base = engine, registry, base
        self.numbers = TrainingNumbers()
        # Training and validation examples, tokenized at creation, used at start.
        self.prepared: dict[str, tuple[list[Example], list[Example]]] = {}
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._current: tuple[str, Cancellable] | None = None
        self._thread = threading.Thread(target=self._run, name="candlewick-fine-tuning")

    def start(self) -> None:
        self._recover()
        self._thread.start()
        self.wake()  # jobs left queued or validating by an earlier run

    def wake(self) -> None:
        self._inbox.put(None)

    def stop(self) -> None:
        """End the thread; a running job stays ``running`` and resumes at the next start."""
        current = self._current
        if current is not None:
            current[1].cancel()
        self._inbox.put(_STOP)
        if self._thread.ident is not None:
            self._thread.join(30)

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a job that has not finished (None if it had)."""
        job = self.jobs.update(job_id, status="cancelled")
        if job is None:
            return None
        self.jobs.event(job_id, "Fine-tuning job cancelled")
        current = self._current
        if current is not None and current[0] == job_id:
            current[1].cancel()
        self.prepared.pop(job_id, None)
        self.wake()
        return job

    def job_dir(self, job_id: str) -> Path:
        return self.folder / "jobs" / job_id

    # -- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._inbox.get()
            if item is _STOP:
                return
            try:
                if item is not None:
                    self._handle(*item)
                self._advance()
            except Exception:
                log.exception("fine-tuning bookkeeping failed")

    def _recover(self) -> None:
        for job in self.jobs.with_status("running"):
            if job.base_fingerprint != self.base.fingerprint:
                continue  # failed by _advance, with the reason
            found = self.jobs.last_checkpoint(job.id)
            where = f"its checkpoint at step {found[0]}" if found else "the beginning"
            self.jobs.update(job.id, status="queued")
            self.jobs.event(job.id, f"The server restarted; the job resumes from {where}")

    def _advance(self) -> None:
        """Check new jobs, then start the oldest queued one if none runs."""
        for job in self.jobs.with_status("validating_files", "queued", "running"):
            if job.base_fingerprint != self.base.fingerprint:
                reason = (
                    f"the server now serves {self.base.name!r}, not the model "
                    f"{job.base_model!r} this job trains"
                )
                self._fail(job.id, "base_model_changed", reason)
            elif job.status == "validating_files":
                self.jobs.update(job.id, status="queued")
                self.jobs.event(job.id, "Files validated, the job is queued")
        if self._current is not None:
            return
        queued = self.jobs.with_status("queued")
        if queued:
            self._start(queued[0])

    def _start(self, job: Job) -> None:
        try:
            run = self._training_run(job)
        except (DatasetError, OSError, ValueError) as e:
            self._fail(job.id, "invalid_training_file", str(e))
            return
        self.jobs.update(job.id, status="running")
        work = self.engine.start_training(run, lambda ev: self._inbox.put((job.id, ev)))
        self._current = (job.id, work)

    def _training_run(self, job: Job) -> TrainingRun:
        prepared = self.prepared.pop(job.id, None)
        if prepared is None:
            valid = job.validation_file
            prepared = (
                self._read_examples(job.training_file, "training"),
                self._read_examples(valid, "validation") if valid is not None else [],
            )
        data, valid = prepared
        lora = job.lora
        if job.parent is not None:
            parent = self.job_dir(job.id) / "parent"
            initial = parse_adapter(
                (parent / "adapter_config.json").read_bytes(),
                (parent / "adapter_model.safetensors").read_bytes(),
                self.base.loaded.config,
                max_rank=self.base.max_rank,
                max_bytes=1 << 62,
            ).modules
        else:
            spec = LoRASpec(lora["rank"], lora["alpha"], tuple(lora["target_modules"]))
            initial = init_lora(self.base.shapes, spec, job.seed)
        hp = job.hyperparameters
        config = TrainingConfig(
            learning_rate=job.learning_rate,
            n_epochs=hp["n_epochs"],
            batch_size=hp["batch_size"],
            micro_batch_size=job.micro_batch_size,
            dropout=lora["dropout"],
            seed=job.seed,
            checkpoint_layers=job.checkpoint_layers,
        )
        resume = None
        if (found := self.jobs.last_checkpoint(job.id)) is not None:
            step, folder = found
            state = read_safetensors((self.folder / folder / "state.safetensors").read_bytes())
            resume = {**state.tensors, "step": step}
        return TrainingRun(
            data, initial, config, resume, validation=valid, validate_every=VALIDATE_EVERY
        )

    def _read_examples(self, file_id: str, kind: str) -> list[Example]:
        if self.files.get(file_id) is None:
            raise ValueError(f"the {kind} file {file_id} was deleted")
        field = f"{kind}_file"
        records = parse_jsonl(self.files.read(file_id), field)
        return examples(records, self.base.loaded.tokenizer, self.base.max_len, field)

    # -- what the work reports ------------------------------------------------------------------

    def _handle(self, job_id: str, event: TrainingEvent) -> None:
        current = self._current
        if current is None or current[0] != job_id:
            return  # a work that was already let go
        if isinstance(event, Started):
            self.jobs.update(job_id, total_steps=event.total_steps)
            self.jobs.event(
                job_id, f"Fine-tuning started at step {event.step} of {event.total_steps}"
            )
        elif isinstance(event, StepDone):
            self._step_done(job_id, event)
        elif isinstance(event, Checkpointed):
            self._checkpoint(job_id, event)
        elif isinstance(event, Finished):
            self._finish(job_id, event.weights)
        elif isinstance(event, Failed):
            self._fail(job_id, "training_failed", event.error)
        if isinstance(event, Finished | Failed | Stopped):
            self._current = None

    def _step_done(self, job_id: str, event: StepDone) -> None:
        r = event.report
        n = self.numbers
        n.tokens_total += r.tokens
        n.steps_total += 1
        n.tokens_per_second = r.tokens / r.seconds if r.seconds > 0 else 0.0
        n.step_loss = r.loss
        job = self.jobs.get(job_id)
        self.jobs.update(job_id, trained_tokens=job.trained_tokens + r.tokens)
        data = {
            "step": r.step,
            "total_steps": r.total_steps,
            "train_loss": r.loss,
            "learning_rate": r.learning_rate,
            "tokens": r.tokens,
            "tokens_per_second": n.tokens_per_second,
        }
        message = f"Step {r.step}/{r.total_steps}: training loss={r.loss:.4f}"
        if event.valid_loss is not None:
            data["valid_loss"] = event.valid_loss
            message += f", validation loss={event.valid_loss:.4f}"
        if event.full_valid_loss is not None:
            data["full_valid_loss"] = event.full_valid_loss
            message += f", full validation loss={event.full_valid_loss:.4f}"
        self.jobs.event(job_id, message, data=data)

    def _checkpoint(self, job_id: str, event: Checkpointed) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.final:
            return
        relative = Path("jobs") / job_id / f"step-{event.step:06d}"
        config, weights = self._peft(event.weights)
        _write_folder(
            self.folder / relative,
            {
                "adapter_config.json": config,
                "adapter_model.safetensors": weights,
                "state.safetensors": write_safetensors(
                    {k: v for k, v in event.state.items() if k != "step"}
                ),
            },
        )
        events, _ = self.jobs.events(job_id, 1, None)  # the step's own (StepDone comes first)
        step_data = events[0]["data"] if events else {}
        name = f"{self.model_name(job)}:ckpt-step-{event.step}"
        body = {
            "id": new_id("ftckpt"),
            "object": "fine_tuning.job.checkpoint",
            "created_at": int(time.time()),
            "fine_tuned_model_checkpoint": name,
            "fine_tuning_job_id": job_id,
            "metrics": {
                "step": event.step,
                **{k: step_data.get(k) for k in ("train_loss", "valid_loss", "full_valid_loss")},
            },
            "step_number": event.step,
        }
        served = self._serve_checkpoint(job_id, name, config, weights, _meta(event.weights))
        self.jobs.add_checkpoint(job_id, event.step, str(relative), body)
        self.jobs.event(
            job_id, f"Checkpoint created at step {event.step}" + (f": {name}" if served else "")
        )
        states = sorted((self.folder / "jobs" / job_id).glob("step-*/state.safetensors"))
        for old in states[:-KEEP_STATES]:
            old.unlink(missing_ok=True)
        for old in self.jobs.all_checkpoints(job_id)[:-KEEP_CHECKPOINTS]:
            self.registry.unregister(old["fine_tuned_model_checkpoint"])
            self.jobs.delete_checkpoint(old["id"])
            folder = self.job_dir(job_id) / f"step-{old['step_number']:06d}"
            shutil.rmtree(folder, ignore_errors=True)

    def _serve_checkpoint(
        self, job_id: str, name: str, config: bytes, weights: bytes, meta: dict
    ) -> bool:
        """Register a checkpoint's adapter under its name, unless that would take the
        registry's last free place (the job's model needs it); an event says why not."""
        registry = self.registry
        if registry.resolve(name) is None and len(registry) >= registry.max_adapters - 1:
            reason = (
                f"{len(registry)} adapters are registered and the last of the "
                f"{registry.max_adapters} places (--max-adapters) is kept for the job's model"
            )
        else:
            try:
                registry.register(name, config, weights, meta)
                return True
            except Exception as e:
                reason = f"{type(e).__name__}: {e}"
        self.jobs.event(job_id, f"The checkpoint {name} is saved but not served: {reason}",
                        level="warn")  # fmt: skip
        return False

    def _finish(self, job_id: str, modules: dict[tuple[int, str], LoRAWeights]) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.final:
            return
        name = self.model_name(job)
        config, weights = self._peft(modules)
        try:
            self.registry.register(name, config, weights, _meta(modules))
        except Exception as e:
            self._fail(job_id, "registration_failed", f"{type(e).__name__}: {e}")
            return
        self.jobs.update(job_id, status="succeeded", fine_tuned_model=name)
        self.jobs.event(job_id, f"New fine-tuned model created: {name}")
        self.jobs.event(job_id, "The job has successfully completed")
        shutil.rmtree(self.job_dir(job_id) / "parent", ignore_errors=True)
        for state in self.job_dir(job_id).glob("step-*/state.safetensors"):
            state.unlink(missing_ok=True)

    def _fail(self, job_id: str, code: str, message: str) -> None:
        if self.jobs.update(
            job_id, status="failed", error={"code": code, "message": message, "param": None}
        ):
            self.jobs.event(job_id, f"Fine-tuning failed: {message}", level="error")
        self.prepared.pop(job_id, None)

    def model_name(self, job: Job) -> str:
        return f"ft:{self.base.name}:{job.suffix or ''}:{job.id}"

    def _peft(self, modules: dict[tuple[int, str], LoRAWeights]) -> tuple[bytes, bytes]:
        return peft_files(modules, self.base.loaded.config.num_layers, self.base.name)


def _meta(modules: dict[tuple[int, str], LoRAWeights]) -> dict:
    """What the adapter store records of an adapter beside its files."""
    return {
        "rank": max(w.rank for w in modules.values()),
        "target_modules": sorted({p for _, p in modules}),
    }


def _write_folder(path: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into a fresh folder at ``path``, whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, data in files.items():
        with open(tmp / name, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
