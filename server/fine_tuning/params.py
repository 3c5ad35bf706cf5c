"""The body of ``POST /v1/fine_tuning/jobs`` checked into a ``JobRequest``: every problem named
with its field, all at once.

OpenAI's fields: ``model``, ``training_file``, ``validation_file``, ``hyperparameters`` (or
``method.supervised.hyperparameters``: ``n_epochs``, ``batch_size``,
``learning_rate_multiplier``, each a value or "auto"), ``suffix``, ``seed``, ``metadata``; ours,
``method.lora``: ``rank``, ``alpha``, ``target_modules``, ``dropout``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.lora.request import TARGETABLE

SHORT_NAMES = {path.split(".")[1]: path for path in TARGETABLE}
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_SUFFIX_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
MAX_SUFFIX = 40


@dataclass(frozen=True, slots=True)
class LoRARequestParams:
    rank: int | None = None
    alpha: float | None = None
    target_modules: tuple[str, ...] | None = None  # module paths from TARGETABLE
    dropout: float | None = None

    @property
    def given(self) -> bool:
        return any(
            v is not None for v in (self.rank, self.alpha, self.target_modules, self.dropout)
        )


@dataclass(frozen=True, slots=True)
class JobRequest:
    model: str
    training_file: str
    validation_file: str | None
    n_epochs: int | None  # None: auto
    batch_size: int | None
    learning_rate_multiplier: float | None
    suffix: str | None
    seed: int | None
    lora: LoRARequestParams
    metadata: dict[str, str] | None


class _Check:
    """Collects problems while reading fields."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def string(self, obj: dict, key: str, name: str, required: bool = False) -> str | None:
        value = obj.get(key)
        if value is None:
            if required:
                self.problems.append(f"{name} is required")
            return None
        if not isinstance(value, str) or not value:
            self.problems.append(f"{name} must be a non-empty string")
            return None
        return value

    def number(
        self,
        obj: dict,
        key: str,
        name: str,
        lo: float,
        hi: float,
        *,
        integer: bool,
        auto: bool = False,
    ) -> Any:
        value = obj.get(key)
        if value is None or (auto and value == "auto"):
            return None
        ok = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok or not lo <= value <= hi:
            kind = "an integer" if integer else "a number"
            also = " or 'auto'" if auto else ""
            self.problems.append(f"{name} must be {kind} in [{lo:g}, {hi:g}]{also}, got {value!r}")
            return None
        return value

    def obj(self, obj: dict, key: str, name: str) -> dict:
        value = obj.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problems.append(f"{name} must be an object")
            return {}
        return value


def parse_job_request(body: Any, max_rank: int) -> tuple[JobRequest | None, list[str]]:
    """The request, or None and every problem with it."""
    c = _Check()
    if not isinstance(body, dict):
        return None, ["the body must be a JSON object"]
    model = c.string(body, "model", "model", required=True)
    training_file = c.string(body, "training_file", "training_file", required=True)
    validation_file = c.string(body, "validation_file", "validation_file")
    method = c.obj(body, "method", "method")
    if method.get("type", "supervised") != "supervised":
        c.problems.append(f"method.type {method.get('type')!r} is not supported (supervised)")
    supervised = c.obj(method, "supervised", "method.supervised")
    hp, where = c.obj(body, "hyperparameters", "hyperparameters"), "hyperparameters"
    nested = c.obj(supervised, "hyperparameters", "method.supervised.hyperparameters")
    if hp and nested:
        c.problems.append("give hyperparameters or method.supervised.hyperparameters, not both")
    elif nested:
        hp, where = nested, "method.supervised.hyperparameters"
    n_epochs = c.number(hp, "n_epochs", f"{where}.n_epochs", 1, 50, integer=True, auto=True)
    batch_size = c.number(hp, "batch_size", f"{where}.batch_size", 1, 256, integer=True, auto=True)
    lr_mult = c.number(
        hp,
        "learning_rate_multiplier",
        f"{where}.learning_rate_multiplier",
        1e-6,
        100,
        integer=False,
        auto=True,
    )
    suffix = _suffix(body.get("suffix"), c.problems)
    seed = c.number(body, "seed", "seed", 0, 2**31 - 1, integer=True)
    lora = _lora(c.obj(method, "lora", "method.lora"), max_rank, c)
    if body.get("integrations"):
        c.problems.append("integrations are not supported")
    metadata = body.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        c.problems.append("metadata must be an object of strings")
    if c.problems:
        return None, c.problems
    return JobRequest(
        model=model,
        training_file=training_file,
        validation_file=validation_file,
        n_epochs=n_epochs,
        batch_size=batch_size,
        learning_rate_multiplier=lr_mult,
        suffix=suffix,
        seed=seed,
        lora=lora,
        metadata=metadata,
    ), []


def _suffix(value: Any, problems: list[str]) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_SUFFIX or set(value) - _SUFFIX_CHARS:
        problems.append(
            f"suffix must be at most {MAX_SUFFIX} characters of A-Z a-z 0-9 . _ -, got {value!r}"
        )
        return None
    return value


def _lora(obj: dict, max_rank: int, c: _Check) -> LoRARequestParams:
    rank = c.number(obj, "rank", "method.lora.rank", 1, max_rank, integer=True)
    alpha = c.number(obj, "alpha", "method.lora.alpha", 1e-6, 1e6, integer=False)
    dropout = c.number(obj, "dropout", "method.lora.dropout", 0, 0.9, integer=False)
    targets = obj.get("target_modules")
    paths = None
    if targets is not None:
        names = targets if isinstance(targets, list) else [targets]
        unknown = [t for t in names if not isinstance(t, str) or t not in SHORT_NAMES]
        if unknown or not names or len(set(names)) != len(names):
            c.problems.append(
                "method.lora.target_modules must be distinct names from "
                f"{', '.join(SHORT_NAMES)}; got {targets!r}"
            )
        else:
            paths = tuple(sorted(SHORT_NAMES[t] for t in names))
    return LoRARequestParams(rank, alpha, paths, dropout)
