"""MLX affine quantization: which modules are quantized, how, and whether a folder's tensors agree.

One vocabulary for every source. A module path (``model.layers.0.mlp.up_proj``) maps to a
``QuantSpec`` (bits, group size); modules absent from the map stay float. The map comes from
an MLX-quantized folder's ``quantization`` entry (mlx-lm's format: a default ``{group_size,
bits, mode}`` plus per-module overrides, ``false`` meaning "not quantized"), from a
``--quantize`` choice applied to a float model with mlx-lm's default predicate, or from the
blocks a GGUF file already holds.

mlx-lm's rules, kept so its folders load here and ours load there: a linear or embedding module
is quantized when its input width is a multiple of the group size (others stay float and the
config names none of them); a module the config does not name is quantized at the default
setting exactly when its ``.scales`` tensor is present.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from engine.config import ConfigError, ModelConfig
from engine.models.base import CausalLM

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64  # mlx-lm's default for affine
QUANTIZE_CHOICES = {f"q{b}": b for b in AFFINE_BITS}


@dataclass(frozen=True, slots=True)
class QuantSpec:
    """One module's affine quantization: w[r, c] = scales[r, c // g] * q[r, c] + biases[r, c // g]
    with ``bits``-bit unsigned codes q packed into uint32 words along each row."""

    bits: int
    group_size: int
    mode: str = "affine"

    def problems(self) -> list[str]:
        out = []
        if self.mode != "affine":
            out.append(f"mode {self.mode!r} is not supported (supported: affine)")
        if self.bits not in AFFINE_BITS:
            out.append(f"bits {self.bits} is not one MLX takes ({_listed(AFFINE_BITS)})")
        if self.group_size not in GROUP_SIZES:
            out.append(
                f"group_size {self.group_size} is not one MLX takes ({_listed(GROUP_SIZES)})"
            )
        return out

    def fits(self, in_features: int) -> bool:
        return in_features % self.group_size == 0 and (in_features * self.bits) % 32 == 0

    def packed_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        return out_features, in_features * self.bits // 32

    def scales_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        return out_features, in_features // self.group_size

    def as_dict(self) -> dict[str, Any]:
        """The form mlx-lm writes into config.json and passes to ``to_quantized``."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


@dataclass(frozen=True, slots=True)
class QuantScheme:
    """A folder's ``quantization`` entry: the default setting and per-module overrides
    (None: that module is not quantized)."""

    default: QuantSpec
    overrides: Mapping[str, QuantSpec | None]

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = self.default.as_dict()
        for path, spec in self.overrides.items():
            config[path] = spec.as_dict() if spec is not None else False
        return config


def quantize_choice(name: str, group_size: int = DEFAULT_GROUP_SIZE) -> QuantSpec:
    """``q4`` (with a group size) to a spec; a ConfigError names what is wrong."""
    if name not in QUANTIZE_CHOICES:
        raise ConfigError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {name!r}")
    spec = QuantSpec(QUANTIZE_CHOICES[name], group_size)
    if problems := spec.problems():
        raise ConfigError(f"--quantize-group-size: {'; '.join(problems)}")
    return spec


def scheme_from_config(hf: dict[str, Any]) -> QuantScheme | None:
    """The MLX quantization a config.json declares (None: a float model).

    mlx-lm writes the same dict as ``quantization`` and ``quantization_config``; other tools'
    ``quantization_config`` (GPTQ, AWQ, bitsandbytes...) carries a ``quant_method`` instead and
    is refused by name. Every problem is reported at once.
    """
    entry = hf.get("quantization")
    if entry is None:
        other = hf.get("quantization_config")
        if other is None:
            return None
        if not isinstance(other, dict) or "quant_method" in other or "bits" not in other:
            method = other.get("quant_method") if isinstance(other, dict) else other
            raise ConfigError(
                f"config.json quantization_config (quant_method {method!r}) is not MLX's; "
                "candlewick loads MLX affine quantization (mlx-lm's `quantization` entry) only"
            )
        entry = other
    if not isinstance(entry, dict):
        raise ConfigError(f"config.json quantization must be an object, got {entry!r}")
    problems: list[str] = []
    default = _spec(entry, "quantization", problems)
    overrides: dict[str, QuantSpec | None] = {}
    for key, value in entry.items():
        if key in ("bits", "group_size", "mode"):
            continue
        if value is False:
            overrides[key] = None
        elif isinstance(value, dict):
            overrides[key] = _spec(value, f"quantization[{key!r}]", problems)
        else:
            problems.append(f"quantization[{key!r}] must be an object or false, got {value!r}")
    if problems:
        raise ConfigError("config.json: " + "; ".join(problems))
    assert default is not None
    return QuantScheme(default, overrides)


def _spec(entry: dict[str, Any], where: str, problems: list[str]) -> QuantSpec | None:
    missing = [k for k in ("bits", "group_size") if not isinstance(entry.get(k), int)]
    if missing:
        problems.append(f"{where} lacks integer {' and '.join(missing)}")
        return None
    spec = QuantSpec(entry["bits"], entry["group_size"], str(entry.get("mode", "affine")))
    problems.extend(f"{where}: {p}" for p in spec.problems())
    return spec


def quantizable_modules(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Every linear and embedding module of the model: path -> (out_features, in_features).

    The model is built lazily (MLX materializes nothing until evaluated), so this costs no
    memory whatever the model's size.
    """
    shapes = {}
    for path, module in CausalLM(cfg).named_modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            out_f, in_f = module.weight.shape
            shapes[path] = (out_f, in_f)
    return shapes


def default_plan(shapes: Mapping[str, tuple[int, int]], spec: QuantSpec) -> dict[str, QuantSpec]:
    """mlx-lm's default predicate for ``quantize_model``: every linear and embedding whose input
    width the group size divides; the rest (and every norm) stays float."""
    return {path: spec for path, (_, in_f) in shapes.items() if spec.fits(in_f)}


@dataclass(frozen=True, slots=True)
class StoredTensor:
    """What a checkpoint holds under one name, and where (for error messages)."""

    shape: tuple[int, ...]
    dtype: mx.Dtype
    file: str


def stored_plan(
    scheme: QuantScheme,
    shapes: Mapping[str, tuple[int, int]],
    stored: Mapping[str, StoredTensor],
) -> dict[str, QuantSpec]:
    """Which modules of an MLX-quantized checkpoint are quantized, and how; checks that the
    tensors agree with the config and raises a QuantizationError naming every disagreement
    (file, tensor, problem)."""
    problems: list[str] = []
    for path in scheme.overrides:
        if path not in shapes:
            problems.append(f"config.json quantization names {path}, which the model lacks")
    plan: dict[str, QuantSpec] = {}
    for path, (out_f, in_f) in shapes.items():
        weight = stored.get(f"{path}.weight")
        if weight is None:
            continue  # reported as missing when the model is built
        if path in scheme.overrides:
            spec = scheme.overrides[path]
        elif f"{path}.scales" in stored or weight.dtype == mx.uint32:
            spec = scheme.default
        else:
            spec = None
        if spec is None:
            problems.extend(_float_problems(path, weight, stored, (out_f, in_f)))
        else:
            problems.extend(_quantized_problems(path, spec, stored, out_f, in_f))
            plan[path] = spec
    if problems:
        raise QuantizationError(problems)
    return plan


def _float_problems(
    path: str, weight: StoredTensor, stored: Mapping[str, StoredTensor], shape: tuple[int, int]
) -> Iterator[str]:
    if weight.dtype == mx.uint32 or f"{path}.scales" in stored:
        yield (
            f"{weight.file}: {path} is packed (uint32 weight or scales present) but config.json "
            "says it is not quantized"
        )
    elif weight.shape != shape:
        yield f"{weight.file}: {path}.weight has shape {weight.shape}, the model needs {shape}"


def _quantized_problems(
    path: str, spec: QuantSpec, stored: Mapping[str, StoredTensor], out_f: int, in_f: int
) -> Iterator[str]:
    weight = stored[f"{path}.weight"]
    how = f"{spec.bits}-bit, group {spec.group_size}"
    if not spec.fits(in_f):
        yield (
            f"{weight.file}: {path} has {in_f} input features, which {how} quantization "
            "cannot split into whole groups"
        )
        return
    if weight.dtype != mx.uint32:
        yield (
            f"{weight.file}: {path}.weight is {_name(weight.dtype)}, packed {how} weights are "
            "uint32"
        )
    elif weight.shape != spec.packed_shape(out_f, in_f):
        yield (
            f"{weight.file}: {path}.weight has packed shape {weight.shape}, {how} needs "
            f"{spec.packed_shape(out_f, in_f)}"
        )
    for leaf in ("scales", "biases"):
        tensor = stored.get(f"{path}.{leaf}")
        want = spec.scales_shape(out_f, in_f)
        if tensor is None:
            yield f"{weight.file}: {path}.{leaf} is missing ({how} needs {want})"
        elif not mx.issubdtype(tensor.dtype, mx.floating):
            yield f"{tensor.file}: {path}.{leaf} is {_name(tensor.dtype)}, not floating point"
        elif tensor.shape != want:
            yield f"{tensor.file}: {path}.{leaf} has shape {tensor.shape}, {how} needs {want}"


class QuantizationError(ValueError):
    """A checkpoint whose tensors contradict its quantization config; lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("the quantized weights do not match config.json: " + "; ".join(problems))
        self.problems = problems


def quantize_weight(weight: mx.array, spec: QuantSpec) -> dict[str, mx.array]:
    """A float [out, in] weight to MLX's packed weight, scales and biases (mlx-lm's numbers)."""
    packed, scales, biases = mx.quantize(
        weight, group_size=spec.group_size, bits=spec.bits, mode=spec.mode
    )
    return {"weight": packed, "scales": scales, "biases": biases}


def quantize_float_modules(model: nn.Module, spec: QuantSpec) -> dict[str, QuantSpec]:
    """Quantize, in place, the float linear and embedding modules of a built model that mlx-lm's
    default predicate would (e.g. the float tensors of a GGUF file); already quantized modules
    keep their own encoding. Returns the modules quantized."""
    done: dict[str, QuantSpec] = {}

    def predicate(path: str, module: nn.Module) -> dict[str, Any] | bool:
        if isinstance(module, nn.Linear | nn.Embedding) and spec.fits(module.weight.shape[-1]):
            done[path] = spec
            return spec.as_dict()
        return False

    nn.quantize(model, class_predicate=predicate)
    mx.eval(model.parameters())
    return done


def module_specs(model: nn.Module) -> dict[str, QuantSpec]:
    """The quantized modules of a built model (e.g. what the GGUF loader made): path -> spec."""
    return {
        path: QuantSpec(m.bits, m.group_size, m.mode)
        for path, m in model.named_modules()
        if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding)
    }


def _name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def _listed(values: tuple[int, ...]) -> str:
    return ", ".join(str(v) for v in values)
