"""Admission control: how many sequences may be in the server at once, and draining; and the
lease an admitted request holds until it ends."""

from __future__ import annotations

from dataclasses import dataclass

from adapters.registry import AdapterRegistry
from adapters.types import AdapterVersion
from server.errors import APIError, BadRequest, QueueFull, Unavailable


@dataclass(frozen=True, slots=True)
class AdapterPin:
    """One reference on an adapter version: its files stay, and a hot swap or a delete leaves
    it alone, until the pin is released."""

    registry: AdapterRegistry
    version: AdapterVersion

    def release(self) -> None:
        self.registry.unpin(self.version)


class Lease:
    """Everything an admitted request holds: room for ``n`` sequences, and the adapter version
    its ``model`` names (pinned), if any.

    Released exactly once: ``release`` is idempotent, and every way a request can end calls it
    (its events ending, the response ending, an error before the response started). After it,
    ``Admission.inflight`` no longer counts the request and the adapter is unpinned.
    """

    __slots__ = ("_admission", "_pin", "n", "released")

    def __init__(self, admission: Admission, n: int, pin: AdapterPin | None = None) -> None:
        self._admission, self._pin = admission, pin
        self.n = n
        self.released = False

    @property
    def adapter(self) -> AdapterVersion | None:
        """The adapter version the request runs on (None: the base model)."""
        return self._pin.version if self._pin is not None else None

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self._admission.inflight -= self.n
        if self._pin is not None:
            self._pin.release()

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

    def acquire(self, n: int, pin: AdapterPin | None = None) -> Lease:
        """Room for ``n`` sequences, as a lease that also owns ``pin``.

        The pin is handed over either way: admitted, the lease releases it with the room;
        refused (503, 400, 429), it is released before the error is raised.
        """
        try:
            self._check(n)
        except APIError:
            if pin is not None:
                pin.release()
            raise
        self.inflight += n
        return Lease(self, n, pin)

    def _check(self, n: int) -> None:
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
