"""Server settings: command-line flags, each also readable from a CANDLEWICK_* variable."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.loader.cpu_weights import cpu_weights_choice
from engine.loader.cuda_weights import cuda_weights_choice
from engine.loader.quantize import QuantSpec, quantize_choice


@dataclass(frozen=True, slots=True)
class ServerSettings:
    model: str | None = None  # None: the default model
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    max_queue: int = 256
    max_num_seqs: int = 64
    data_dir: Path = field(default_factory=lambda: Path("~/.candlewick").expanduser())
    kv_cache_memory: int | None = None
    allowed_origins: tuple[str, ...] = ()
    shutdown_grace: float = 30.0
    max_num_batched_tokens: int = 2048
    num_blocks: int | None = None  # fixes the KV pool size (tests, reproducible benchmarks)
    max_request_bytes: int = 32 << 20  # larger JSON bodies get 413
    max_loras: int = 4  # adapters resident on the device at once
    max_lora_rank: int = 16
    max_adapters: int = 64  # adapter names registered at once
    max_adapter_bytes: int = 512 << 20  # one upload (config + weights)
    adapter_dir: Path | None = None  # the only folder /v1/load_lora_adapter may read from
    quantize: str | None = None  # q2..q8: quantize a float model while loading
    quantize_group_size: int = 64
    responses_max_stored: int = 10_000  # stored /v1/responses; the oldest go first beyond it
    cpu_weights: str = "auto"  # auto | dense | quantized: quantized layers on the CPU
    cuda_weights: str = "auto"  # the same on a CUDA GPU (dense in the compute dtype)
    embedding_model: str | None = None  # an encoder served for embeddings beside the model
    embedding_batch_tokens: int = 2048  # tokens of one encoder step
    fine_tuning_memory: int | None = None  # bytes training may plan for (None: half what is left)
    fine_tuning_serve_steps: int = 4  # serving steps between training units while streams run
    max_file_bytes: int = 512 << 20  # one uploaded training file
    engine_process: bool = True  # the engine in a process of its own (False: a thread here)
    tensor_parallel: int = 1  # ranks the model is sharded over (started on this machine)
    tensor_parallel_timeout: float = 30.0  # seconds a rank may stay silent before it is a fault

    def __post_init__(self) -> None:
        problems = []
        if self.max_queue < 0:
            problems.append(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.max_num_batched_tokens < 1:
            problems.append(
                f"--max-num-batched-tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs < 1:
            problems.append(f"--max-num-seqs must be >= 1, got {self.max_num_seqs}")
        if not 0 < self.port < 65536:
            problems.append(f"--port must be in 1..65535, got {self.port}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            problems.append(f"--kv-cache-memory must be positive, got {self.kv_cache_memory}")
        if self.max_loras < 0:
            problems.append(f"--max-loras must be >= 0, got {self.max_loras}")
        if self.max_lora_rank < 1:
            problems.append(f"--max-lora-rank must be >= 1, got {self.max_lora_rank}")
        if self.max_adapter_bytes < 1:
            problems.append(f"--max-adapter-bytes must be >= 1, got {self.max_adapter_bytes}")
        if self.responses_max_stored < 1:
            problems.append(f"--responses-max-stored must be >= 1, got {self.responses_max_stored}")
        if self.embedding_batch_tokens < 1:
            problems.append(
                f"--embedding-batch-tokens must be >= 1, got {self.embedding_batch_tokens}"
            )
        if self.fine_tuning_memory is not None and self.fine_tuning_memory <= 0:
            problems.append(f"--fine-tuning-memory must be positive, got {self.fine_tuning_memory}")
        if self.fine_tuning_serve_steps < 1:
            problems.append(
                f"--fine-tuning-serve-steps must be >= 1, got {self.fine_tuning_serve_steps}"
            )
        if self.max_file_bytes < 1:
            problems.append(f"--max-file-bytes must be >= 1, got {self.max_file_bytes}")
        if self.tensor_parallel < 1:
            problems.append(f"--tensor-parallel must be >= 1, got {self.tensor_parallel}")
        if self.tensor_parallel_timeout <= 0:
            problems.append(
                f"--tensor-parallel-timeout must be positive, got {self.tensor_parallel_timeout}"
            )
        if self.shutdown_grace < 0:
            problems.append(f"--shutdown-grace must be >= 0, got {self.shutdown_grace}")
        if self.quantize is not None:
            try:
                quantize_choice(self.quantize, self.quantize_group_size)
            except ValueError as e:
                problems.append(str(e))
        for check, value in ((cpu_weights_choice, self.cpu_weights),
                             (cuda_weights_choice, self.cuda_weights)):  # fmt: skip
            try:
                check(value)
            except ValueError as e:
                problems.append(str(e))
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def quantize_spec(self) -> QuantSpec | None:
        if self.quantize is None:
            return None
        return quantize_choice(self.quantize, self.quantize_group_size)
