"""LoRA weights out as PEFT's two files: ``adapter_config.json`` and ``adapter_model.safetensors``
(keys ``base_model.model.model.layers.N.<module>.lora_A.weight`` [r, in] and ``lora_B`` [out, r]),
which PEFT loads as they are and ``parse_adapter`` reads back to the same modules.

The config says each module's rank and scale in PEFT's terms: the most common (rank, scale) as
``r`` / ``lora_alpha`` (alpha = scale · r), any other module's in ``rank_pattern`` /
``alpha_pattern`` under its full name; ``target_modules`` are short names when every layer has
them, else the full module names.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping

import numpy as np

from adapters.safetensors_io import write_safetensors
from adapters.types import LoRAWeights


def peft_files(
    modules: Mapping[tuple[int, str], LoRAWeights], num_layers: int, base_model: str
) -> tuple[bytes, bytes]:
    """(config bytes, weights bytes) of ``modules``."""
    shapes = Counter((w.rank, w.scale) for w in modules.values())
    (rank, scale), _ = shapes.most_common(1)[0]
    rank_pattern, alpha_pattern = {}, {}
    for (i, path), w in sorted(modules.items()):
        if (w.rank, w.scale) != (rank, scale):
            rank_pattern[f"model.layers.{i}.{path}"] = w.rank
            alpha_pattern[f"model.layers.{i}.{path}"] = w.scale * w.rank
    paths = sorted({path for _, path in modules})
    everywhere = all((i, p) in modules for p in paths for i in range(num_layers))
    if everywhere:
        targets = [p.split(".")[1] for p in paths]
    else:
        targets = [f"model.layers.{i}.{p}" for i, p in sorted(modules)]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": scale * rank,
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    tensors: dict[str, np.ndarray] = {}
    for (i, path), w in sorted(modules.items()):
        prefix = f"base_model.model.model.layers.{i}.{path}"
        tensors[f"{prefix}.lora_A.weight"] = np.asarray(w.a, np.float32)
        tensors[f"{prefix}.lora_B.weight"] = np.asarray(w.b, np.float32)
    return json.dumps(config, indent=2).encode(), write_safetensors(tensors)
