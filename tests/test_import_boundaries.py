"""The folders are the architecture: imports run one way. Checked in fresh interpreters, so
nothing another test imported can hide a dependency."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_LOAD_ALL = """
import importlib, json, pkgutil, sys
package = importlib.import_module({package!r})
for info in pkgutil.walk_packages(package.__path__, {package!r} + "."):
    if info.name.split(".")[-1] not in {skip!r}:
        importlib.import_module(info.name)
print(json.dumps(sorted(sys.modules)))
"""


def modules_loaded_by(package: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Every module in sys.modules after importing all of ``package``'s modules."""
    code = _LOAD_ALL.format(package=package, skip=list(skip))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def offenders(modules: list[str], forbidden: tuple[str, ...]) -> list[str]:
    return [m for m in modules if m.split(".")[0] in forbidden]


def test_engine_imports_nothing_from_adapters_server_or_http_libraries():
    loaded = modules_loaded_by("engine")
    assert "engine.engine_core" in loaded and "engine.lora.device" in loaded
    forbidden = ("adapters", "server", "fastapi", "starlette", "pydantic", "prometheus_client")
    assert offenders(loaded, forbidden) == []


def test_metal_kernels_import_no_engine_module():
    # gpu_check is a command-line tool run on a GPU box; it is held to the same rule.
    loaded = modules_loaded_by("metal_kernels")
    assert "metal_kernels.paged_attention.dispatch" in loaded
    assert offenders(loaded, ("engine", "adapters", "server")) == []


def test_the_scheduler_and_its_bookkeeping_need_no_mlx():
    """The batch is decided in pure Python: scheduler, KV block accounting and adapter slots."""
    code = (
        "import json, sys\n"
        "import engine.scheduler, engine.kv_cache.kv_cache_manager, engine.lora.slot_table\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert offenders(json.loads(out.stdout), ("mlx",)) == []
