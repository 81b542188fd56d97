"""The store contract: what every backend of the log promises.

A store is the log itself. It appends events atomically with optimistic concurrency,
reads them back by position, by stream and by time, erases payloads on request, and
keeps projection snapshots beside the log. Every event it returns has been checked
against its own hash; a mismatch raises `StoreCorrupt` naming the position, it is
never served as data.

Backends (`sqlite.py`, `postgres.py`) implement this class; `tests/store/contract.py`
is the behavioural suite every backend runs.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import msgspec

from eventhub.events import Event, StreamAppend

CommitListener = Callable[[list[Event]], Awaitable[None]]
"""Called by the store's writer with each committed batch, in position order, after
the commit is durable and before any caller of that batch is answered."""

HeadListener = Callable[[int], Awaitable[None]]
"""Called when another node committed up to a head position (shared backends only)."""


class Snapshot(msgspec.Struct, frozen=True):
    """A projection's read model as of `position`, written by projection `version`."""

    name: str
    version: int
    position: int
    state: bytes


class EventStore(abc.ABC):
    """An append-only log of events. Open it before use and close it after."""

    backend: str = "abstract"

    def __init__(self) -> None:
        self.commit_listeners: list[CommitListener] = []
        self.head_listeners: list[HeadListener] = []

    # -- life cycle -------------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None:
        """Create the schema if needed and start the writer.

        Raises `StoreUnavailable` (locked, read-only, unreachable) or `StoreCorrupt`
        (not a database) with a one-line message.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish in-flight commits, stop the writer and release connections.

        Appends still queued after the writer stops fail with `StoreClosed`.
        """

    async def __aenter__(self) -> EventStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- writing ----------------------------------------------------------------------

    @abc.abstractmethod
    async def append(self, *appends: StreamAppend, idempotency_key: str | None = None) -> list[Event]:
        """Append the events of one or more streams atomically; return them as committed.

        Each `StreamAppend` carries the version its stream is expected to have (`ANY`,
        `NO_STREAM`, `STREAM_EXISTS`, or exact). A mismatch raises
        `WrongExpectedVersion(stream, expected, actual)` and nothing of the call is
        written. Appends to one stream racing with the same expected version: exactly
        one wins. A stream may appear only once per call.

        Concurrent calls are group-committed: one writer commits everything queued while
        the previous commit was in flight in one transaction, and answers each caller
        only after that transaction is durable. A call that conflicts or fails does not
        fail the calls it was batched with.

        With an `idempotency_key`, a retry carrying the same events returns the
        originally committed events and writes nothing; the same key with different
        events raises `IdempotencyConflict`.

        Raises `StoreUnavailable` / `StoreFull` when the commit cannot be made durable;
        then nothing of the call is visible.
        """

    @abc.abstractmethod
    async def purge(self, positions: Sequence[int]) -> int:
        """Erase the payloads of these events; return how many were erased now.

        The events stay in the log with their digests, so the chain still verifies.
        """

    @abc.abstractmethod
    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Store a projection snapshot, replacing the previous one of that name."""

    async def import_events(self, events: Sequence[Event]) -> None:
        """Append already-hashed events verbatim, in one transaction (for copying a log).

        Positions, versions, `recorded_at`, digests and hashes are kept as given, and a
        purged event stays purged. The events must continue this log: the first one's
        `position` is `head + 1` and its `prev_hash` the hash at the head, each next one
        follows the one before, and each passes its own hash check. Otherwise nothing is
        written and `StoreCorrupt` names the first offending position (an event that
        collides with a stored one also raises `StoreCorrupt`).

        Goes through the writer queue like an append, so it never interleaves with a
        commit. Commit listeners are not called; a shared backend announces the new head
        to other nodes as for a commit. Backends that cannot import raise
        `NotImplementedError`.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot import events")

    # -- reading ----------------------------------------------------------------------

    @abc.abstractmethod
    async def read_all(
        self,
        after: int = 0,
        limit: int = 1000,
        *,
        until: int | None = None,
        stream_prefix: str | None = None,
        stream: str | None = None,
        types: Sequence[str] | None = None,
        check: bool = True,
    ) -> list[Event]:
        """Events with `after < position <= until`, ascending, at most `limit`.

        Optionally only streams starting with `stream_prefix`, exactly `stream`, or of the
        given `types`. `check=False` skips the per-event hash check (for `verify`, which
        reports breaks itself).
        """

    @abc.abstractmethod
    async def read_stream(
        self, stream: str, from_version: int = 0, limit: int = 1000, *, backward: bool = False
    ) -> list[Event]:
        """Events of one stream from `from_version` (inclusive), forward or backward.

        Backward with `from_version=-1` starts at the stream's last event.
        """

    @abc.abstractmethod
    async def read_event(self, position: int) -> Event | None:
        """The event at `position`, or None."""

    @abc.abstractmethod
    async def head(self) -> int:
        """The last committed position (0 for an empty log)."""

    @abc.abstractmethod
    async def stream_version(self, stream: str) -> int:
        """The version of the stream's last event, or -1 when the stream does not exist."""

    @abc.abstractmethod
    async def first_at_or_after(self, stream: str, recorded_at: int) -> Event | None:
        """The stream's first event recorded at or after `recorded_at` (UTC micros)."""

    @abc.abstractmethod
    async def last_before(self, stream: str, recorded_at: int) -> Event | None:
        """The stream's last event recorded strictly before `recorded_at` (UTC micros)."""

    @abc.abstractmethod
    async def load_snapshot(self, name: str) -> Snapshot | None:
        """The latest snapshot of that projection, or None."""

    # -- shared helpers ---------------------------------------------------------------

    async def iter_all(
        self,
        after: int = 0,
        *,
        until: int | None = None,
        batch: int = 5000,
        stream_prefix: str | None = None,
        types: Sequence[str] | None = None,
        check: bool = True,
    ) -> AsyncIterator[Event]:
        """Every event after `after` (up to `until`), read in batches."""
        while True:
            events = await self.read_all(
                after, batch, until=until, stream_prefix=stream_prefix, types=types, check=check
            )
            for event in events:
                yield event
            if len(events) < batch:
                return
            after = events[-1].position

    async def _notify_commit(self, events: list[Event]) -> None:
        for listener in self.commit_listeners:
            await listener(events)

    async def _notify_head(self, head: int) -> None:
        for listener in self.head_listeners:
            await listener(head)
