"""Files and fine-tuning jobs as the HTTP routes need them: every check of an upload or a new job
at the edge, each problem named at once (400), nothing written unless all is well. Called from
worker threads (``asyncio.to_thread``): uploads fsync and a new job tokenizes its files.

A new job is checked against everything that could stop it later: the model it names (the base,
or an adapter to continue), its files (each example rendered and tokenized, none over the
context), its hyperparameters, room in the adapter registry, and memory: the training state and
activations of its micro-batches must fit what the weights, the KV cache and the adapter slots
left (engine.training.memory), or it is refused now rather than crashing later.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import time
from typing import Any

from adapters.format import AdapterError, parse_adapter
from engine.training.data import Example
from engine.training.lora import check_targets
from engine.training.memory import TrainingTooLarge, plan_memory
from server.errors import BadRequest, NotFound, TooLarge
from server.fine_tuning.dataset import DatasetError, examples, parse_jsonl
from server.fine_tuning.files import PURPOSES, StoredFile
from server.fine_tuning.jobs import Job, new_id
from server.fine_tuning.manager import FineTuningManager
from server.fine_tuning.params import DEFAULT_TARGETS, SHORT_NAMES, JobRequest, parse_job_request

BASE_LEARNING_RATE = 2e-4  # times learning_rate_multiplier
DEFAULT_EPOCHS = 3
DEFAULT_BATCH = 8
DEFAULT_RANK = 8


class FineTuningService:
    def __init__(self, manager: FineTuningManager, budget: int, max_file_bytes: int) -> None:
        self.manager = manager
        self.files, self.jobs = manager.files, manager.jobs
        self.base = manager.base
        self.budget, self.max_file_bytes = budget, max_file_bytes

    def close(self) -> None:
        """Stop the manager (a running job resumes at the next start), then the database."""
        self.manager.stop()
        self.jobs.db.close()

    # -- files ----------------------------------------------------------------------------------

    def upload(self, filename: str, purpose: str, data: bytes) -> StoredFile:
        if len(data) > self.max_file_bytes:
            raise TooLarge(f"the file is over {self.max_file_bytes} bytes (--max-file-bytes)")
        if purpose not in PURPOSES:
            raise BadRequest(
                f"purpose {purpose!r} is not supported (supported: {', '.join(PURPOSES)})",
                param="purpose",
            )
        try:
            records = parse_jsonl(data, filename or "the file")
        except DatasetError as e:
            raise BadRequest(str(e), param="file") from None
        return self.files.put(filename, purpose, data, len(records))

    def file(self, file_id: str) -> StoredFile:
        found = self.files.get(file_id)
        if found is None:
            raise NotFound(f"no file {file_id!r}", param="file_id")
        return found

    def delete_file(self, file_id: str) -> None:
        self.file(file_id)
        users = [
            j.id
            for j in self.jobs.with_status("validating_files", "queued", "running")
            if file_id in (j.training_file, j.validation_file)
        ]
        if users:
            raise BadRequest(f"the file {file_id} is used by the unfinished job {users[0]}")
        self.files.delete(file_id)

    # -- jobs -----------------------------------------------------------------------------------

    def job(self, job_id: str) -> Job:
        found = self.jobs.get(job_id)
        if found is None:
            raise NotFound(f"no fine-tuning job {job_id!r}", param="fine_tuning_job_id")
        return found

    def cancel(self, job_id: str) -> Job:
        self.job(job_id)
        cancelled = self.manager.cancel(job_id)
        if cancelled is None:
            raise BadRequest(f"the job {job_id} is already {self.job(job_id).status}")
        return cancelled

    def create(self, body: Any) -> Job:
        request, problems = parse_job_request(body, self.base.max_rank)
        if request is None:
            raise _bad(problems)
        parent = self._parent(request, problems)
        data = self._examples(request.training_file, "training_file", problems)
        valid = []
        if request.validation_file is not None:
            valid = self._examples(request.validation_file, "validation_file", problems)
        registry = self.manager.registry
        if len(registry) >= registry.max_adapters:
            problems.append(
                f"{len(registry)} adapters are registered, the limit; delete one "
                "before training another"
            )
        if problems:
            raise _bad(problems)
        job = self._job(request, parent, data, valid, problems)
        if problems:
            raise _bad(problems)
        if parent is not None:
            folder = self.manager.job_dir(job.id) / "parent"
            folder.mkdir(parents=True)
            shutil.copyfile(parent.config_path, folder / "adapter_config.json")
            shutil.copyfile(parent.weights_path, folder / "adapter_model.safetensors")
        self.manager.prepared[job.id] = (data, valid)
        self.jobs.add(job)
        self.jobs.event(job.id, f"Validating training file: {job.training_file}")
        self.manager.wake()
        return job

    def _parent(self, request: JobRequest, problems: list[str]):
        if request.model == self.base.name:
            return None
        version = self.manager.registry.resolve(request.model)
        if version is None:
            problems.append(
                f"model {request.model!r} is neither the base model "
                f"{self.base.name!r} nor a registered adapter"
            )
        elif request.lora.given:
            problems.append("method.lora cannot change the adapter a job continues; leave it out")
        return version

    def _examples(self, file_id: str, field: str, problems: list[str]) -> list[Example]:
        stored = self.files.get(file_id)
        if stored is None:
            problems.append(f"{field} {file_id!r} does not exist")
            return []
        if stored.purpose != "fine-tune":
            problems.append(f"{field} {file_id!r} has purpose {stored.purpose!r}, not fine-tune")
            return []
        try:
            records = parse_jsonl(self.files.read(file_id), field)
            return examples(records, self.base.loaded.tokenizer, self.base.max_len, field)
        except DatasetError as e:
            problems.append(str(e))
            return []

    def _job(
        self,
        request: JobRequest,
        parent,
        data: list[Example],
        valid: list[Example],
        problems: list[str],
    ) -> Job:
        """The job, its defaults filled in and its memory planned (its micro-batches carry
        validation examples too, forward only)."""
        n_epochs = request.n_epochs or DEFAULT_EPOCHS
        batch_size = request.batch_size or min(DEFAULT_BATCH, len(data))
        if batch_size > len(data):
            problems.append(f"batch_size {batch_size} is more than the {len(data)} examples")
        lora, num_params = self._lora(request, parent, problems)
        plan = None
        try:
            plan = plan_memory(
                self.base.loaded.config,
                num_params,
                batch_size,
                max(len(e) for e in data + valid),
                self.budget,
                self.base.dtype_size,
            )
        except TrainingTooLarge as e:
            problems.append(str(e))
        if problems:
            return None
        mult = request.learning_rate_multiplier or 1.0
        return Job(
            id=new_id("ftjob"),
            created_at=int(time.time()),
            model=request.model,
            base_model=self.base.name,
            base_fingerprint=self.base.fingerprint,
            training_file=request.training_file,
            validation_file=request.validation_file,
            hyperparameters={
                "n_epochs": n_epochs,
                "batch_size": batch_size,
                "learning_rate_multiplier": mult,
            },
            lora=lora,
            learning_rate=BASE_LEARNING_RATE * mult,
            micro_batch_size=plan.micro_batch_size,
            checkpoint_layers=plan.checkpoint_layers,
            seed=request.seed if request.seed is not None else random.randrange(2**31),
            suffix=request.suffix,
            parent=None
            if parent is None
            else {"name": parent.name, "version": parent.version, "digest": parent.digest},
            metadata=request.metadata,
        )

    def _lora(self, request: JobRequest, parent, problems: list[str]) -> tuple[dict, int]:
        """The adapter's shape in the job record, and its parameter count."""
        shapes = self.base.shapes
        if parent is not None:
            try:
                modules = parse_adapter(
                    parent.config_path.read_bytes(),
                    parent.weights_path.read_bytes(),
                    self.base.loaded.config,
                    max_rank=self.base.max_rank,
                    max_bytes=1 << 62,
                ).modules
            except (AdapterError, OSError) as e:
                problems.append(f"the adapter {parent.name!r} cannot be continued: {e}")
                return {}, 0
            problems += check_targets(shapes, modules)
            w = next(iter(modules.values()))
            lora = {
                "rank": max(m.rank for m in modules.values()),
                "alpha": w.scale * w.rank,
                "target_modules": sorted({p for _, p in modules}),
                "dropout": 0.0,
            }
            return lora, sum(m.a.size + m.b.size for m in modules.values())
        p = request.lora
        rank = p.rank or min(DEFAULT_RANK, self.base.max_rank)
        targets = p.target_modules or tuple(SHORT_NAMES[t] for t in DEFAULT_TARGETS)
        lora = {
            "rank": rank,
            "alpha": p.alpha or 2.0 * rank,
            "target_modules": list(targets),
            "dropout": p.dropout or 0.0,
        }
        num_params = sum(
            rank * (in_f + out_f) for (_, path), (out_f, in_f) in shapes.items() if path in targets
        )
        return lora, num_params


def _bad(problems: list[str]) -> BadRequest:
    return BadRequest("; ".join(problems))


def fingerprint(config: Any) -> str:
    """A stable id of a model's shape (its ModelConfig)."""
    return hashlib.sha256(repr(config).encode()).hexdigest()[:16]
