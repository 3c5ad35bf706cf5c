"""Read a PEFT or mlx-lm adapter config into a plan: which projections of the base model it
adapts (modules and layers), and with which rank and scale.

PEFT configs follow peft 0.21.2's own matching semantics (``check_target_module_exists`` for
target_modules / layers_to_transform / layers_pattern / exclude_modules, ``get_pattern_key`` for
rank_pattern / alpha_pattern), so an upload adapts here exactly the modules it adapts under
PEFT; mlx-lm configs follow ``linear_to_lora_layers``. Uploaded regexes are checked to compile
and to be unable to backtrack for long before any of them runs. Every fault is appended to a
``problems`` list, so a caller can report them all at once.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from re import _parser  # the stdlib's own regex parser: the one way to see a pattern's shape
from typing import Any

from adapters.types import TARGETABLE
from engine.config import ModelConfig

show = reprlib.repr  # a bounded repr: uploaded values can be huge
ADAPTABLE = ", ".join(m.split(".")[1] for m in TARGETABLE)  # short names, for messages

# PEFT options that change the forward pass beyond W x + s B A x.
_PEFT_UNSUPPORTED = (
    *("use_dora", "lora_bias", "use_qalora", "use_bdlora", "alora_invocation_tokens"),
    *("arrow_config", "velora_config", "kasa_config", "monteclora_config", "target_parameters"),
    *("trainable_token_indices", "layer_replication", "modules_to_save"),
)
# Initializations that rewrite the base weights: such an adapter only fits that rewritten base.
_BASE_CHANGING_INIT = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")
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


@dataclass(frozen=True, slots=True)
class Plan:
    """What a config asks for: (rank, scale) of every adapted (layer, module), and the module
    paths it names (None: whatever the weights hold)."""

    format: str
    targets: dict[tuple[int, str], tuple[int, float]]
    named: frozenset[str] | None


def read_plan(config: dict[str, Any], base: ModelConfig, problems: list[str]) -> Plan | None:
    """The plan of a PEFT or mlx-lm config, or None (with its faults added to ``problems``)."""
    if "lora_parameters" in config or "fine_tune_type" in config:
        return _mlx_plan(config, base, problems)
    if "peft_type" in config:
        return _peft_plan(config, base, problems)
    problems.append("adapter_config.json is neither PEFT (peft_type) nor mlx-lm (lora_parameters)")
    return None


def _peft_plan(cfg: dict[str, Any], base: ModelConfig, problems: list[str]) -> Plan | None:
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
        problems.append(f'peft_type must be "LORA", got {show(cfg.get("peft_type"))}')
    if cfg.get("bias", "none") not in ("none", None):
        problems.append(f'bias must be "none", got {show(cfg.get("bias"))}')
    problems += [
        f"{k} is set: candlewick serves plain LoRA" for k in _PEFT_UNSUPPORTED if cfg.get(k)
    ]
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INIT):
        problems.append(
            f"init_lora_weights {show(init)} rewrites the base weights; convert it first"
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
    return Plan("peft", targets, frozenset(m for _, m in targets))


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
            problems.append(f"target_modules {targets!r} matches no projection ({ADAPTABLE})")
        if layers is not None or layers_pattern is not None:
            problems.append("layers_to_transform and layers_pattern need a list target_modules")
    elif _KINDS["a list of strings"](targets) and targets:
        unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if unknown:
            problems.append(
                f"unknown target modules {show_names(unknown)} (adaptable: {ADAPTABLE})"
            )
    else:
        problems.append(f"target_modules must be a list of names or a regex, got {show(targets)}")
    layer_list = [layers] if type(layers) is int else layers
    if layers is not None and not _KINDS["a list of integers"](layer_list):
        problems.append(f"layers_to_transform must be a list of integers, got {show(layers)}")
    elif outside := [i for i in layer_list or [] if not 0 <= i < base.num_layers]:
        problems.append(
            f"layers_to_transform names layers {outside}; the base has {base.num_layers}"
        )
    for key, value in (("layers_pattern", layers_pattern), ("exclude_modules", exclude)):
        if value is not None and not (type(value) is str or _KINDS["a list of strings"](value)):
            problems.append(f"{key} must be a string or a list of strings, got {show(value)}")
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


def _mlx_plan(cfg: dict[str, Any], base: ModelConfig, problems: list[str]) -> Plan | None:
    """mlx-lm's linear_to_lora_layers: ``keys`` (module paths inside a layer; absent: every
    linear) in the last ``num_layers`` layers (0 or negative: all), one rank and scale."""
    before = len(problems)
    if cfg.get("fine_tune_type", "lora") != "lora":
        problems.append(f"fine_tune_type {show(cfg['fine_tune_type'])} is not supported (lora)")
    count = _field(cfg, "num_layers", "an integer", problems)
    params = _field(cfg, "lora_parameters", "an object", problems) or {}
    where = "lora_parameters"
    rank = _field(params, "rank", "a positive integer", problems, where=where)
    scale = _field(params, "scale", "a finite number", problems, where=where)
    _field(params, "dropout", "a finite number", problems, default=0.0, where=where)
    keys = _field(params, "keys", "a list of strings", problems, default=None, where=where)
    if unknown := [k for k in keys or [] if k not in TARGETABLE]:
        problems.append(
            f"unknown target modules {show_names(unknown)} (adaptable: {', '.join(TARGETABLE)})"
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
    return Plan("mlx-lm", targets, frozenset(keys) if keys else None)


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
        problems.append(f"{where}.{key} must be {kind}, got {show(value)}")
        return None
    return value


def _patterns(cfg: dict[str, Any], key: str, kind: str, problems: list[str]) -> dict[str, Any]:
    """rank_pattern / alpha_pattern: {key regex: value}; null or absent is empty."""
    value = cfg.get(key) or {}
    if type(value) is not dict:
        problems.append(f"{key} must be an object, got {show(value)}")
        return {}
    if len(value) > _MAX_PATTERN_KEYS:
        problems.append(f"{key} has {len(value)} keys, over the limit of {_MAX_PATTERN_KEYS}")
        return {}
    for pattern, v in value.items():
        if not _KINDS[kind](v):
            problems.append(f"{key}[{show(pattern)}] must be {kind}, got {show(v)}")
        _regex(rf"(.*\.)?({pattern})$", f"{key} key", problems)
    return value


def _regex(pattern: str, what: str, problems: list[str]) -> bool:
    """Whether ``pattern`` compiles and cannot backtrack for long (else a problem)."""
    try:
        reason = _slow_regex(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        reason = f"is not a valid regex: {e}"
    if reason:
        problems.append(f"{what} {show(pattern)} {reason}")
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


def show_names(names: list[str]) -> str:
    shown = ", ".join(shorten(n, 250) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def shorten(name: str, limit: int = 120) -> str:
    return name if len(name) <= limit else name[: limit - 3] + "..."
