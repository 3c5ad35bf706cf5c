"""Admission control: how many sequences may be in the server at once, and draining."""

from __future__ import annotations

from collections.abc import Callable

from server.errors import BadRequest, QueueFull, Unavailable


class Lease:
    """Room for ``n`` sequences, given back once (on exit, or ``release``), together with
    whatever else the request holds (``also``: e.g. its adapter pin)."""

    def __init__(self, admission: Admission, n: int) -> None:
        self._admission, self._n = admission, n
        self._also: list[Callable[[], None]] = []

    def also(self, release: Callable[[], None]) -> None:
        self._also.append(release)

    def release(self) -> None:
        if self._n:
            self._admission.inflight -= self._n
            self._n = 0
            for release in self._also:
                release()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Admission:
    """At most ``max_running`` sequences run and ``max_queue`` wait; beyond that a request is
    refused at once with 429 and a Retry-After, never left to time out. While draining for
    shutdown every new request gets 503. Only the event loop touches this object."""

    def __init__(self, max_running: int, max_queue: int) -> None:
        self.limit = max_running + max_queue
        self.max_running = max_running
        self.inflight = 0
        self.draining = False

    def acquire(self, n: int) -> Lease:
        if self.draining:
            raise Unavailable("the server is shutting down")
        if n > self.limit:
            raise BadRequest(
                f"n={n} is more sequences than this server ever holds at once ({self.limit})",
                param="n",
            )
        if self.inflight + n > self.limit:
            raise QueueFull(
                f"the server is at capacity ({self.inflight} sequences in flight, limit "
                f"{self.limit}); retry later",
                retry_after=1,
            )
        self.inflight += n
        return Lease(self, n)
