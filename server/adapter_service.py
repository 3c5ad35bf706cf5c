"""Adapter registration as the HTTP routes need it: validate the upload against the base model,
store it, point its name at the new version, describe versions in the wire shape."""

from __future__ import annotations

from pathlib import Path

from adapters.format import AdapterError, parse_adapter, validate_name
from adapters.registry import AdapterRegistry, RegistryFull
from adapters.types import AdapterVersion
from engine.config import ModelConfig
from server.errors import APIError, BadRequest, Forbidden, NotFound, TooLarge


class AdapterService:
    """Called from worker threads (``asyncio.to_thread``) for registration, which writes and
    fsyncs files; the registry it wraps is thread-safe."""

    def __init__(
        self,
        registry: AdapterRegistry,
        base: ModelConfig,
        base_name: str,
        max_rank: int,
        max_bytes: int,
        adapter_dir: Path | None,
    ) -> None:
        self.registry = registry
        self.base, self.base_name = base, base_name
        self.max_rank, self.max_bytes = max_rank, max_bytes
        self.adapter_dir = adapter_dir.resolve() if adapter_dir else None

    def register(self, name: str, config: bytes, weights: bytes) -> AdapterVersion:
        """Every problem with the name and the files reported at once; nothing changes unless
        all is well."""
        name_problems = validate_name(name, self.base_name)
        try:
            parsed = parse_adapter(
                config, weights, self.base, max_rank=self.max_rank, max_bytes=self.max_bytes
            )
        except AdapterError as e:
            # 413 only when size is the one thing wrong.
            too_large = e.status == 413 and not name_problems
            raise (TooLarge if too_large else BadRequest)(
                "; ".join(name_problems + e.problems)
            ) from None
        if name_problems:
            raise BadRequest("; ".join(name_problems), param="name")
        meta = {"rank": parsed.rank, "target_modules": list(parsed.target_modules)}
        try:
            return self.registry.register(name, config, weights, meta)
        except RegistryFull as e:
            raise APIError(str(e)) from None

    def unregister(self, name: str) -> AdapterVersion:
        version = self.registry.unregister(name)
        if version is None:
            raise NotFound(f"the adapter {name!r} does not exist", code="adapter_not_found")
        return version

    def get(self, name: str) -> AdapterVersion:
        version = self.registry.resolve(name)
        if version is None:
            raise NotFound(f"the adapter {name!r} does not exist", code="adapter_not_found")
        return version

    def describe(self, v: AdapterVersion) -> dict:
        return {
            "id": v.name,
            "object": "adapter",
            "version": v.version,
            "digest": v.digest,
            "parent": self.base_name,
            "rank": v.rank,
            "target_modules": list(v.target_modules),
            "created": int(v.created),
        }

    def allowed_folder(self, path: Path) -> Path:
        """``path`` resolved, if it lies inside --adapter-dir; 403 otherwise."""
        if self.adapter_dir is None:
            raise Forbidden("loading adapters from paths is off (start with --adapter-dir DIR)")
        resolved = (self.adapter_dir / path).resolve() if not path.is_absolute() else path.resolve()
        if not resolved.is_relative_to(self.adapter_dir):
            raise Forbidden(f"{path} is outside the adapter directory")
        if not resolved.is_dir():
            raise NotFound(f"no adapter folder at {path}")
        return resolved

    def read_folder(self, folder: Path) -> tuple[bytes, bytes]:
        config = folder / "adapter_config.json"
        weights = next(
            (folder / n for n in ("adapter_model.safetensors", "adapters.safetensors")
             if (folder / n).is_file()),
            None,
        )  # fmt: skip
        missing = [n for n, p in (("adapter_config.json", config), ("weights", weights))
                   if p is None or not p.is_file()]  # fmt: skip
        if missing:
            raise BadRequest(f"{folder.name} lacks {', '.join(missing)}")
        size = config.stat().st_size + weights.stat().st_size
        if size > self.max_bytes:
            raise TooLarge(f"the adapter is {size} bytes; the limit is {self.max_bytes}")
        return config.read_bytes(), weights.read_bytes()
