"""Parse an uploaded LoRA adapter and check it against the loaded base model.

An upload is untrusted, so it is read completely and checked before anything is stored: the
result is a ``ParsedAdapter`` or one ``AdapterError`` naming every problem at once, so a user
fixes an adapter in one round trip. Two formats, told apart by their config: PEFT (``peft_type``)
and mlx-lm (``lora_parameters``). Reading the config into a plan of modules, ranks and scales
(following PEFT's own matching rules) lives in ``adapters.lora_config``; this module checks the
weights against that plan and the base model.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np

from adapters.lora_config import ADAPTABLE, Plan, read_plan, shorten, show_names
from adapters.safetensors_io import SafetensorsError, read_safetensors
from adapters.types import TARGETABLE, LoRAWeights, ParsedAdapter
from engine.config import ModelConfig

MAX_PROBLEMS = 30  # past this a report stops helping and only grows
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
# Weight names -> (layer, module path inside the layer, A or B).
_KEYS = {
    "peft": re.compile(
        r"base_model\.model\.model\.layers\.(\d{1,9})\.(\w+\.\w+)\.(lora_[AB])(?:\.default)?\.weight"
    ),
    "mlx-lm": re.compile(r"model\.layers\.(\d{1,9})\.(\w+\.\w+)\.(lora_[ab])"),
}


class AdapterError(ValueError):
    """A rejected upload: ``problems`` names every fault; ``status`` is 413 when size is the
    only one, else 400."""

    def __init__(self, problems: list[str], status: int = 400) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems
        self.status = status


def parse_adapter(
    config_bytes: bytes, weights_bytes: bytes, base: ModelConfig, *, max_rank: int, max_bytes: int
) -> ParsedAdapter:
    """Validate an upload against ``base``; raise AdapterError listing every problem."""
    problems: list[str] = []
    size = len(config_bytes) + len(weights_bytes)
    if size > max_bytes:
        problems.append(f"adapter is {size} bytes (config + weights), over the limit {max_bytes}")
    config = _load_config(config_bytes, problems)
    plan = read_plan(config, base, problems) if config is not None else None
    modules: dict[tuple[int, str], LoRAWeights] = {}
    fmt = plan.format if plan else "peft"
    try:
        weights = read_safetensors(weights_bytes)
    except SafetensorsError as e:
        problems.append(f"weights are not a safetensors file: {e}")
    else:
        problems += weights.problems
        if plan is None and any(k.endswith(("lora_a", "lora_b")) for k in weights.tensors):
            fmt = "mlx-lm"
        modules = _collect(weights.tensors, fmt, plan, base, max_rank, problems)
    if problems:
        status = 413 if size > max_bytes and len(problems) == 1 else 400
        if len(problems) > MAX_PROBLEMS:
            problems[MAX_PROBLEMS:] = [f"and {len(problems) - MAX_PROBLEMS} more problems"]
        raise AdapterError(problems, status)
    assert config is not None and modules  # no problems means both were read
    return ParsedAdapter(
        format=fmt,
        rank=max(w.rank for w in modules.values()),
        target_modules=tuple(sorted({m for _, m in modules})),
        modules=modules,
        config=config,
    )


def validate_name(name: str, base_name: str) -> list[str]:
    """Problems with an adapter name; it becomes a file name and a ``model`` id, so it is kept
    to one safe path component that cannot be mistaken for the base model."""
    if not isinstance(name, str) or not name:
        return ["adapter name is empty"]
    problems = []
    if len(name) > 64:
        problems.append(f"adapter name is {len(name)} characters, over the limit of 64")
    if "/" in name or "\\" in name:
        problems.append("adapter name must not contain '/' or '\\'")
    if ".." in name:
        problems.append("adapter name must not contain '..'")
    if name[0] not in _NAME_CHARS or name[0] in "._-":
        problems.append("adapter name must start with a letter or a digit")
    bad = sorted(set(name) - _NAME_CHARS - {"/", "\\"})
    if bad:
        problems.append(f"adapter name has characters other than A-Z a-z 0-9 . _ -: {bad}")
    if name == base_name:
        problems.append(f"adapter name {name!r} is the base model's name")
    return problems


def _load_config(data: bytes, problems: list[str]) -> dict[str, Any] | None:
    try:
        config = json.loads(data)
    except (ValueError, RecursionError) as e:  # includes JSONDecodeError, UnicodeDecodeError
        problems.append(f"adapter_config.json is not JSON: {e}")
        return None
    if not isinstance(config, dict):
        problems.append(f"adapter_config.json is a JSON {type(config).__name__}, not an object")
        return None
    return config


def _collect(
    tensors: dict[str, np.ndarray],
    fmt: str,
    plan: Plan | None,
    base: ModelConfig,
    max_rank: int,
    problems: list[str],
) -> dict[tuple[int, str], LoRAWeights]:
    """Pair each module's A with its B and check the pair against the base model and the plan.
    Faults that repeat across layers are reported once, with the layers they occur in."""
    found: dict[tuple[int, str, str], tuple[str, np.ndarray]] = {}
    stray, twice, bad_values, unknown, beyond = [], [], [], set(), set()
    for key, array in tensors.items():
        if (m := _KEYS[fmt].fullmatch(key)) is None:
            stray.append(key)
        elif m[2] not in TARGETABLE:
            unknown.add(m[2])
        elif int(m[1]) >= base.num_layers:
            beyond.add(int(m[1]))
        elif (slot := (int(m[1]), m[2], m[3])) in found:
            twice.append(f"{shorten(found[slot][0])} and {shorten(key)}")
        else:
            found[slot] = (key, array)
            if not np.isfinite(array).all():
                bad_values.append(key)
    for names, text in (
        (stray, "tensors that are not LoRA weights of a layer's projection"),
        (sorted(unknown), f"weights for unknown modules (adaptable: {ADAPTABLE})"),
        (twice, "tensors given twice"),
        (bad_values, "NaN or Inf values in"),
    ):
        if names:
            problems.append(f"{text}: {show_names(names)}")
    if beyond:
        problems.append(f"weights for {_layers(beyond)}; the base has {base.num_layers} layers")
    if not found:
        problems.append("the weights hold no LoRA tensors")
    a_name, b_name = ("lora_A", "lora_B") if fmt == "peft" else ("lora_a", "lora_b")
    grouped: dict[str, list[int]] = defaultdict(list)  # fault -> layers it occurs in
    modules = {}
    for layer, module in sorted({(layer, module) for layer, module, _ in found}):
        a, b = found.get((layer, module, a_name)), found.get((layer, module, b_name))
        expect = plan.targets.get((layer, module)) if plan else None
        untargeted = plan is not None and expect is None
        faults = [f"weights for {module}, which the config does not target"] if untargeted else []
        if a is None or b is None:
            have, lack = (a_name, b_name) if a else (b_name, a_name)
            faults.append(f"{module} has {have} but no {lack}")
        else:
            lora, pair_faults = _pair(module, a[1], b[1], fmt == "mlx-lm", base, expect, max_rank)
            faults += pair_faults
            if lora is not None:
                modules[(layer, module)] = lora
        for fault in faults:
            grouped[fault].append(layer)
    problems += [f"{fault} ({_layers(layers)})" for fault, layers in grouped.items()]
    if plan and plan.named and (lacking := plan.named - {m for _, m, _ in found}):
        problems.append(f"the config targets {', '.join(sorted(lacking))}, but no weights do")
    return modules


def _pair(
    module: str,
    a: np.ndarray,
    b: np.ndarray,
    transposed: bool,
    base: ModelConfig,
    expect: tuple[int, float] | None,
    max_rank: int,
) -> tuple[LoRAWeights | None, list[str]]:
    """One module's weights in PEFT's orientation (a: [r, in], b: [out, r]) and its faults,
    described in the upload's own orientation (mlx-lm stores a: [in, r], b: [r, out])."""
    names = ("lora_a", "lora_b") if transposed else ("lora_A", "lora_B")
    if a.ndim != 2 or b.ndim != 2:
        return None, [f"{module} {names[0]} and {names[1]} must be 2-D, got {a.shape}, {b.shape}"]
    if transposed:
        a, b = a.T, b.T
    q, kv = base.num_heads * base.head_dim, base.num_kv_heads * base.head_dim
    h, i = base.hidden_size, base.intermediate_size
    features = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip
    fan_in, fan_out = features[module.split(".")[1]]  # [in_features, out_features]
    faults = []
    for name, got, want in (
        (names[0], a.shape, (a.shape[0], fan_in)),
        (names[1], b.shape, (fan_out, b.shape[1])),
    ):
        if got != want:
            order = (lambda s: list(s[::-1])) if transposed else list
            faults.append(f"{module} {name} is {order(got)}, expected {order(want)}")
    rank = a.shape[0]
    if rank != b.shape[1]:
        faults.append(f"{module} {names[0]} has rank {rank} but {names[1]} has rank {b.shape[1]}")
    if expect is not None and rank != expect[0]:
        faults.append(f"{module} has rank {rank}, but the config says {expect[0]}")
    if rank > max_rank:
        faults.append(f"{module} has rank {rank}, over the limit of {max_rank}")
    if faults or expect is None:
        return None, faults
    return LoRAWeights(np.ascontiguousarray(a), np.ascontiguousarray(b), expect[1]), []


def _layers(layers: Iterable[int]) -> str:
    """'layer 3', 'layers 0-31', 'layers 0, 2, 5-7'."""
    ordered, runs = sorted(layers), []
    for i in ordered:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ", ".join(str(s) if s == e else f"{s}-{e}" for s, e in runs)
    return f"layer{'s' if len(ordered) > 1 else ''} {text}"
