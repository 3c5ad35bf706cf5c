"""Parse an uploaded LoRA adapter and check it against the loaded base model.

An upload is untrusted, so it is read completely and checked before anything is stored: the
result is a ``ParsedAdapter`` or one ``AdapterError`` naming every problem at once, so a user
fixes an adapter in one round trip. Two formats, told apart by their config: PEFT (``peft_type``)
and mlx-lm (``lora_parameters``). Which projections a PEFT config adapts, and with which rank and
alpha, follows PEFT's own rules (peft 0.21 ``check_target_module_exists`` and
``get_pattern_key``), so an upload adapts here exactly the modules it adapts under PEFT.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from re import _parser  # the stdlib's own regex parser: the one way to see a pattern's shape
from typing import Any

import numpy as np

from adapters.safetensors_io import SafetensorsError, read_safetensors
from adapters.types import TARGETABLE, LoRAWeights, ParsedAdapter
from engine.config import ModelConfig

MAX_PROBLEMS = 30  # past this a report stops helping and only grows
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
_SHORT = ", ".join(m.split(".")[1] for m in TARGETABLE)
# Weight names -> (layer, module path inside the layer, A or B).
_KEYS = {
    "peft": re.compile(
        r"base_model\.model\.model\.layers\.(\d{1,9})\.(\w+\.\w+)\.(lora_[AB])(?:\.default)?\.weight"
    ),
    "mlx-lm": re.compile(r"model\.layers\.(\d{1,9})\.(\w+\.\w+)\.(lora_[ab])"),
}
# PEFT options that change the forward pass beyond W x + s B A x.
_PEFT_UNSUPPORTED = (
    *("use_dora", "lora_bias", "use_qalora", "use_bdlora", "alora_invocation_tokens"),
    *("arrow_config", "velora_config", "kasa_config", "monteclora_config", "target_parameters"),
    *("trainable_token_indices", "layer_replication", "modules_to_save"),
)
# Initializations that rewrite the base weights: such an adapter only fits that rewritten base.
_BASE_CHANGING_INIT = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")
_show = reprlib.repr  # bounded: uploaded values can be huge
_REPEATS = ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
_MAX_PATTERN_KEYS = 32
_KINDS: dict[str, Callable[[Any], bool]] = {
    "a positive integer": lambda v: type(v) is int and 0 < v < 2**31,
    "an integer": lambda v: type(v) is int and abs(v) < 2**31,
    "a finite number": lambda v: type(v) in (int, float) and abs(v) < 1e300,  # not NaN/Inf
    "true or false": lambda v: type(v) is bool,
    "an object": lambda v: type(v) is dict,
    "a list of strings": lambda v: type(v) is list and all(type(x) is str for x in v),
    "a list of integers": lambda v: type(v) is list and all(type(x) is int for x in v),
}


class AdapterError(ValueError):
    """A rejected upload: ``problems`` names every fault; ``status`` is 413 when size is the
    only one, else 400."""

    def __init__(self, problems: list[str], status: int = 400) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems
        self.status = status


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a config asks for: (rank, scale) of every adapted (layer, module), and the module
    paths it names (None: whatever the weights hold)."""

    format: str
    targets: dict[tuple[int, str], tuple[int, float]]
    named: frozenset[str] | None


def parse_adapter(
    config_bytes: bytes, weights_bytes: bytes, base: ModelConfig, *, max_rank: int, max_bytes: int
) -> ParsedAdapter:
    """Validate an upload against ``base``; raise AdapterError listing every problem."""
    problems: list[str] = []
    size = len(config_bytes) + len(weights_bytes)
    if size > max_bytes:
        problems.append(f"adapter is {size} bytes (config + weights), over the limit {max_bytes}")
    config = _load_config(config_bytes, problems)
    plan = _plan(config, base, problems) if config is not None else None
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


def _plan(config: dict[str, Any], base: ModelConfig, problems: list[str]) -> _Plan | None:
    if "lora_parameters" in config or "fine_tune_type" in config:
        return _mlx_plan(config, base, problems)
    if "peft_type" in config:
        return _peft_plan(config, base, problems)
    problems.append("adapter_config.json is neither PEFT (peft_type) nor mlx-lm (lora_parameters)")
    return None


def _peft_plan(cfg: dict[str, Any], base: ModelConfig, problems: list[str]) -> _Plan | None:
    """PEFT LoraLayer semantics: scale = alpha / r (rsLoRA: alpha / sqrt(r)), with r and alpha
    per module from rank_pattern / alpha_pattern. Options that change the forward are refused."""
    before = len(problems)
    r = _field(cfg, "r", "a positive integer", problems)
    alpha = _field(cfg, "lora_alpha", "a finite number", problems)
    rslora = _field(cfg, "use_rslora", "true or false", problems, default=False)
    ranks = _patterns(cfg, "rank_pattern", "a positive integer", problems)
    alphas = _patterns(cfg, "alpha_pattern", "a finite number", problems)
    match = _peft_matcher(cfg, base, problems)
    usable = len(problems) == before
    # PEFT turns fan_in_fan_out off for nn.Linear (with a warning), so either value is fine.
    _field(cfg, "fan_in_fan_out", "true or false", problems, default=False)
    if cfg.get("peft_type") != "LORA":
        problems.append(f'peft_type must be "LORA", got {_show(cfg.get("peft_type"))}')
    if cfg.get("bias", "none") not in ("none", None):
        problems.append(f'bias must be "none", got {_show(cfg.get("bias"))}')
    problems += [
        f"{k} is set: candlewick serves plain LoRA" for k in _PEFT_UNSUPPORTED if cfg.get(k)
    ]
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INIT):
        problems.append(
            f"init_lora_weights {_show(init)} rewrites the base weights; convert it first"
        )
    if not usable or match is None:
        return None
    targets = {}
    for layer in range(base.num_layers):
        for module in TARGETABLE:
            name = f"model.layers.{layer}.{module}"
            if match(name):
                rank = ranks.get(_pattern_key(ranks, name), r)
                a = float(alphas.get(_pattern_key(alphas, name), alpha))
                targets[(layer, module)] = (rank, a / math.sqrt(rank) if rslora else a / rank)
    if not targets:
        problems.append("adapter_config.json targets no projection of the base model")
    return _Plan("peft", targets, frozenset(m for _, m in targets))


def _pattern_key(patterns: dict[str, Any], name: str) -> str:
    """peft.utils.other.get_pattern_key: the first key, in config order, for which
    ``re.match(rf"(.*\\.)?({key})$", name)`` succeeds, else ``name`` itself."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", name)), name)


def _peft_matcher(
    cfg: dict[str, Any], base: ModelConfig, problems: list[str]
) -> Callable[[str], bool] | None:
    """PEFT's check_target_module_exists over our projections' full names
    (``model.layers.{i}.self_attn.q_proj``), after checking each option's type."""
    targets, layers = cfg.get("target_modules"), cfg.get("layers_to_transform")
    layers_pattern, exclude = cfg.get("layers_pattern"), cfg.get("exclude_modules")
    names = [f"model.layers.{i}.{m}" for i in range(base.num_layers) for m in TARGETABLE]
    before = len(problems)
    if isinstance(targets, str):
        valid = _regex(targets, "target_modules", problems)
        if valid and not any(re.fullmatch(targets, n) for n in names):
            problems.append(f"target_modules {targets!r} matches no projection ({_SHORT})")
        if layers is not None or layers_pattern is not None:
            problems.append("layers_to_transform and layers_pattern need a list target_modules")
    elif _KINDS["a list of strings"](targets) and targets:
        unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if unknown:
            problems.append(f"unknown target modules {_names(unknown)} (adaptable: {_SHORT})")
    else:
        problems.append(f"target_modules must be a list of names or a regex, got {_show(targets)}")
    layer_list = [layers] if type(layers) is int else layers
    if layers is not None and not _KINDS["a list of integers"](layer_list):
        problems.append(f"layers_to_transform must be a list of integers, got {_show(layers)}")
    elif outside := [i for i in layer_list or [] if not 0 <= i < base.num_layers]:
        problems.append(
            f"layers_to_transform names layers {outside}; the base has {base.num_layers}"
        )
    for key, value in (("layers_pattern", layers_pattern), ("exclude_modules", exclude)):
        if value is not None and not (type(value) is str or _KINDS["a list of strings"](value)):
            problems.append(f"{key} must be a string or a list of strings, got {_show(value)}")
        elif value is not None:
            for p in [value] if type(value) is str else value:
                _regex(p if key == "exclude_modules" else _layer_regex(p), key, problems)
    if len(problems) > before:
        return None

    def match(name: str) -> bool:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif exclude and (name in exclude or any(name.endswith("." + e) for e in exclude)):
            return False
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        if name in targets:  # an exact full name skips the layer filter, as in PEFT
            return True
        if not any(name.endswith("." + t) for t in targets):
            return False
        if layers is None or layers == []:
            return True
        if not layers_pattern:
            found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        else:
            pats = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
            found = next((m for p in pats if (m := re.match(_layer_regex(p), name))), None)
        if found is None:
            return False
        index = int(found["idx"])
        return index == layers if isinstance(layers, int) else index in layers

    return match


def _layer_regex(layers_pattern: str) -> str:
    """PEFT's regex for the layer index after a ``layers_pattern`` segment (first index wins)."""
    return rf"(?:^|.*?\.){layers_pattern}\.(?P<idx>\d+)\."


def _mlx_plan(cfg: dict[str, Any], base: ModelConfig, problems: list[str]) -> _Plan | None:
    """mlx-lm's linear_to_lora_layers: ``keys`` (module paths inside a layer; absent: every
    linear) in the last ``num_layers`` layers (0 or negative: all), one rank and scale."""
    before = len(problems)
    if cfg.get("fine_tune_type", "lora") != "lora":
        problems.append(f"fine_tune_type {_show(cfg['fine_tune_type'])} is not supported (lora)")
    count = _field(cfg, "num_layers", "an integer", problems)
    params = _field(cfg, "lora_parameters", "an object", problems) or {}
    where = "lora_parameters"
    rank = _field(params, "rank", "a positive integer", problems, where=where)
    scale = _field(params, "scale", "a finite number", problems, where=where)
    _field(params, "dropout", "a finite number", problems, default=0.0, where=where)
    keys = _field(params, "keys", "a list of strings", problems, default=None, where=where)
    if unknown := [k for k in keys or [] if k not in TARGETABLE]:
        problems.append(
            f"unknown target modules {_names(unknown)} (adaptable: {', '.join(TARGETABLE)})"
        )
    elif keys == []:
        problems.append("lora_parameters.keys is empty")
    if count is not None and count > base.num_layers:
        problems.append(f"num_layers is {count}, but the base model has {base.num_layers}")
    if len(problems) > before:
        return None
    first = base.num_layers - count if 0 < count < base.num_layers else 0
    modules = keys or TARGETABLE
    targets = {(i, m): (rank, float(scale)) for i in range(first, base.num_layers) for m in modules}
    return _Plan("mlx-lm", targets, frozenset(keys) if keys else None)


def _collect(
    tensors: dict[str, np.ndarray],
    fmt: str,
    plan: _Plan | None,
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
            twice.append(f"{_short(found[slot][0])} and {_short(key)}")
        else:
            found[slot] = (key, array)
            if not np.isfinite(array).all():
                bad_values.append(key)
    for names, text in (
        (stray, "tensors that are not LoRA weights of a layer's projection"),
        (sorted(unknown), f"weights for unknown modules (adaptable: {_SHORT})"),
        (twice, "tensors given twice"),
        (bad_values, "NaN or Inf values in"),
    ):
        if names:
            problems.append(f"{text}: {_names(names)}")
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


def _field(
    cfg: dict[str, Any],
    key: str,
    kind: str,
    problems: list[str],
    *,
    default: Any = ...,
    where: str = "adapter_config.json",
) -> Any:
    """``cfg[key]`` if it is ``kind``; a missing or null key is ``default`` or a problem."""
    value = cfg.get(key)
    if value is None:
        if default is ...:
            problems.append(f"{where} lacks {key}")
            return None
        return default
    if not _KINDS[kind](value):
        problems.append(f"{where}.{key} must be {kind}, got {_show(value)}")
        return None
    return value


def _patterns(cfg: dict[str, Any], key: str, kind: str, problems: list[str]) -> dict[str, Any]:
    """rank_pattern / alpha_pattern: {key regex: value}; null or absent is empty."""
    value = cfg.get(key) or {}
    if type(value) is not dict:
        problems.append(f"{key} must be an object, got {_show(value)}")
        return {}
    if len(value) > _MAX_PATTERN_KEYS:
        problems.append(f"{key} has {len(value)} keys, over the limit of {_MAX_PATTERN_KEYS}")
        return {}
    for pattern, v in value.items():
        if not _KINDS[kind](v):
            problems.append(f"{key}[{_show(pattern)}] must be {kind}, got {_show(v)}")
        _regex(rf"(.*\.)?({pattern})$", f"{key} key", problems)
    return value


def _regex(pattern: str, what: str, problems: list[str]) -> bool:
    """Whether ``pattern`` compiles and cannot backtrack for long (else a problem)."""
    try:
        reason = _slow_regex(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        reason = f"is not a valid regex: {e}"
    if reason:
        problems.append(f"{what} {_show(pattern)} {reason}")
    return reason is None


def _slow_regex(pattern: str) -> str | None:
    """Why matching ``pattern`` could take long, else None.

    Python's regex engine backtracks: a repeat inside a repeat, like ``(.*)*x``, takes
    exponential time, and k repeats in a row take ~n^k steps. Every PEFT pattern runs against
    every projection name (~35 characters), so at most 3 repeats, none nested, bound one
    upload's matching to about a second even on a 128-layer model.
    """
    if len(pattern) > 256:
        return "is longer than 256 characters"
    repeats = 0

    def walk(items: Any, inside: bool) -> str | None:
        nonlocal repeats
        for op, av in items:
            kind = str(op)
            if inside and (kind in _REPEATS or kind == "BRANCH"):
                return "nests a repeat or an alternation inside a repeat"
            repeating = kind in _REPEATS and av[1] > 1
            repeats += repeating
            for sub in _subpatterns(av):
                if reason := walk(sub, inside or repeating):
                    return reason
        return None

    reason = walk(_parser.parse(pattern), False)
    return reason or ("has more than 3 repeats" if repeats > 3 else None)


def _subpatterns(av: Any) -> Iterator[Any]:
    if isinstance(av, _parser.SubPattern):
        yield av
    elif isinstance(av, tuple | list):
        for item in av:
            yield from _subpatterns(item)


_show = reprlib.repr  # a bounded repr: uploaded values can be huge


def _names(names: list[str]) -> str:
    shown = ", ".join(_short(n, 250) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _short(name: str, limit: int = 120) -> str:
    return name if len(name) <= limit else name[: limit - 3] + "..."


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
