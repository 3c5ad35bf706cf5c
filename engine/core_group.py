"""Several cores on one engine thread (a decoder's ``EngineCore`` beside an ``EncoderCore``),
taking turns one step each.

Only the engine thread touches MLX, so a chat model and an embedding model served side by side
share it. The group stands wherever one core does (the engine thread drives it the same way):
each ``step()`` runs one step of the next core, in turn, that has work. So while both have
work their steps alternate, and a running stream waits for at most one step of the other core
between two of its own, however many requests the other core has queued: a burst of embeddings
never stalls a chat stream for more than one (token-budgeted) encoder step.
"""

from __future__ import annotations

from typing import Any, Protocol

from engine.outputs import RequestOutput
from engine.stats import EngineStats


class StepCore(Protocol):
    """What the engine thread drives: requests in, one step at a time, outputs out."""

    stats: EngineStats

    def warm_up(self) -> None: ...
    def add_request(self, request: Any) -> None: ...
    def abort_request(self, request_id: str) -> RequestOutput | None: ...
    @property
    def has_work(self) -> bool: ...
    def step(self) -> list[RequestOutput]: ...


class CoreGroup:
    """``routes`` maps each request type to the core that serves it; the first core's
    statistics are the group's (the metrics describe the main model)."""

    def __init__(self, routes: dict[type, StepCore]) -> None:
        if not routes:
            raise ValueError("a core group needs at least one core")
        self.routes = routes
        self.cores: list[StepCore] = list(dict.fromkeys(routes.values()))  # unique, in order
        self._next = 0  # the core whose turn comes first

    @property
    def stats(self) -> EngineStats:
        return self.cores[0].stats

    def warm_up(self) -> None:
        for core in self.cores:
            core.warm_up()

    def add_request(self, request: Any) -> None:
        core = self.routes.get(type(request))
        if core is None:
            raise TypeError(f"no core serves {type(request).__name__}")
        core.add_request(request)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        for core in self.cores:
            if (out := core.abort_request(request_id)) is not None:
                return out
        return None

    @property
    def has_work(self) -> bool:
        return any(core.has_work for core in self.cores)

    def step(self) -> list[RequestOutput]:
        """One step of the next core in turn that has work."""
        for i in range(len(self.cores)):
            index = (self._next + i) % len(self.cores)
            if self.cores[index].has_work:
                self._next = (index + 1) % len(self.cores)
                return self.cores[index].step()
        return []
