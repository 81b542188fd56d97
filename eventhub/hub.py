"""Subscriptions: catch-up-then-live reads of the log, fanned out from one shared window.

The hub ingests committed events strictly in position order (from the local writer, or
by reading the store when another node's commit is announced), applies them to the
projections, and keeps the most recent ones in a bounded window that every subscriber
reads from. A subscriber is only a cursor: it reads the window when it is close to the
head and the store when it has fallen behind, so a slow subscriber costs nobody else
anything and each new event is read from the store at most once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Sequence

from eventhub.events import Event
from eventhub.store.base import EventStore

log = logging.getLogger(__name__)

Applier = Callable[[list[Event]], None]


class EventFilter:
    """Which events a subscriber wants: one stream, a stream prefix, and/or some types."""

    __slots__ = ("stream", "prefix", "types")

    def __init__(self, stream: str | None = None, prefix: str | None = None, types: Sequence[str] | None = None):
        self.stream = stream
        self.prefix = prefix or None
        self.types = frozenset(types) if types else None

    def __call__(self, event: Event) -> bool:
        if self.stream is not None and event.stream != self.stream:
            return False
        if self.prefix is not None and not event.stream.startswith(self.prefix):
            return False
        return self.types is None or event.type in self.types


class Hub:
    """Ordered ingestion, a shared window of recent events, and waiting subscribers."""

    def __init__(self, store: EventStore, *, window_events: int = 10_000, window_bytes: int = 64 << 20) -> None:
        self.store = store
        self.window_events = window_events
        self.window_bytes = window_bytes
        self.head = 0
        self.appliers: list[Applier] = []
        self._window: list[Event] = []
        self._window_start = 1  # position of _window[0]
        self._window_size = 0
        self._lock = asyncio.Lock()
        # one future per exact stream, one per (prefix, types) filter, one for everyone
        # else: a commit wakes only the subscribers that can care about it (a worker that
        # wants one kind of event sleeps through every channel insert)
        self._stream_waiters: dict[str, asyncio.Future[None]] = {}
        self._filter_waiters: dict[tuple[str | None, frozenset[str] | None], asyncio.Future[None]] = {}
        self._any_waiter: asyncio.Future[None] | None = None

    def start(self, head: int) -> None:
        """Begin live ingestion after `head` (projections have caught up to it)."""
        self.head = head
        self._window.clear()
        self._window_start = head + 1
        self._window_size = 0

    # -- ingestion --------------------------------------------------------------------

    async def committed(self, events: list[Event]) -> None:
        """The local writer committed `events` (contiguous, ascending)."""
        if not events:
            return
        if events[0].position == self.head + 1 and not self._lock.locked():
            self._ingest(events)
            return
        async with self._lock:
            await self._fill(events[0].position - 1)
            fresh = [e for e in events if e.position > self.head]
            if fresh:
                self._ingest(fresh)

    async def advance(self, head: int) -> None:
        """Another node committed up to `head`: read what this node has not seen."""
        async with self._lock:
            await self._fill(head)

    async def _fill(self, until: int) -> None:
        while self.head < until:
            events = await self.store.read_all(self.head, 5000, until=until)
            if not events:
                log.warning("hub: positions %d..%d announced but not readable", self.head + 1, until)
                return
            self._ingest(events)

    def _ingest(self, events: list[Event]) -> None:
        for apply in self.appliers:
            apply(events)
        self._window.extend(events)
        self._window_size += sum([len(e.data or b"") for e in events])
        self.head = events[-1].position
        self._trim()
        self._wake(events)

    def _trim(self) -> None:
        window = self._window
        drop = max(len(window) - self.window_events, 0)
        size = self._window_size - sum([len(e.data or b"") for e in window[:drop]]) if drop else self._window_size
        while size > self.window_bytes and drop < len(window) - 1:
            data = window[drop].data
            size -= len(data) if data is not None else 0
            drop += 1
        if drop:
            del window[:drop]
            self._window_start += drop
            self._window_size = size

    def _wake(self, events: list[Event]) -> None:
        waiter = self._any_waiter
        if waiter is not None:
            self._any_waiter = None
            if not waiter.done():
                waiter.set_result(None)
        if self._stream_waiters:
            for stream in {e.stream for e in events}:
                w = self._stream_waiters.pop(stream, None)
                if w is not None and not w.done():
                    w.set_result(None)
        if self._filter_waiters:
            kinds = {(e.stream, e.type) for e in events}
            for key in [k for k in self._filter_waiters if _concerns(k, kinds)]:
                w = self._filter_waiters.pop(key)
                if not w.done():
                    w.set_result(None)

    # -- waiting ----------------------------------------------------------------------

    def _filter_waiter(self, flt: EventFilter) -> asyncio.Future[None]:
        if flt.stream is not None or (flt.prefix is None and flt.types is None):
            return self._waiter(flt.stream)
        key = (flt.prefix, flt.types)
        w = self._filter_waiters.get(key)
        if w is None:
            w = self._filter_waiters[key] = asyncio.get_running_loop().create_future()
        return w

    def _waiter(self, stream: str | None) -> asyncio.Future[None]:
        if stream is None:
            if self._any_waiter is None:
                self._any_waiter = asyncio.get_running_loop().create_future()
            return self._any_waiter
        w = self._stream_waiters.get(stream)
        if w is None:
            w = self._stream_waiters[stream] = asyncio.get_running_loop().create_future()
        return w

    async def wait_for(self, position: int, timeout: float | None = None) -> bool:
        """Wait until this node has ingested `position`; False on timeout."""
        if self.head >= position:
            return True
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self.head < position:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            try:
                await asyncio.wait_for(asyncio.shield(self._waiter(None)), remaining)
            except TimeoutError:
                return self.head >= position
        return True

    async def wait_change(self, stream: str | None, timeout: float | None) -> bool:
        """Wait for the next commit touching `stream` (any stream when None); False on timeout.

        Check the read model first, then call this without awaiting anything in between,
        so no commit can slip past unseen.
        """
        try:
            await asyncio.wait_for(asyncio.shield(self._waiter(stream)), timeout)
        except TimeoutError:
            return False
        return True

    # -- subscribing ------------------------------------------------------------------

    def window_after(self, after: int) -> list[Event] | None:
        """Window events past `after`, or None when `after` has fallen out of the window."""
        if after + 1 < self._window_start:
            return None
        return self._window[after + 1 - self._window_start :]

    async def subscribe(self, after: int = 0, filter: EventFilter | None = None, batch: int = 1000) -> AsyncGenerator[list[Event], None]:
        """Batches of matching events with position > `after`, catch-up then live, forever.

        No gap and no duplicate: the cursor is the last position examined, whether the
        event matched or not, and moves from the store to the window without skipping.
        """
        flt = filter or EventFilter()
        cursor = after
        while True:
            head = self.head
            if cursor < head:
                recent = self.window_after(cursor)
                if recent is None:
                    events = await self.store.read_all(
                        cursor, batch, until=head, stream=flt.stream, stream_prefix=flt.prefix,
                        types=sorted(flt.types) if flt.types else None,
                    )
                    cursor = events[-1].position if len(events) == batch else head
                else:
                    recent = recent[: head - cursor]
                    events = [e for e in recent if flt(e)]
                    cursor = head
                if events:
                    yield events
                continue
            # shielded: a cancelled subscriber must not cancel the future others share
            await asyncio.shield(self._filter_waiter(flt))


def _concerns(key: tuple[str | None, frozenset[str] | None], kinds: set[tuple[str, str]]) -> bool:
    """Whether a commit of these (stream, type) pairs concerns a (prefix, types) filter."""
    prefix, types = key
    return any((prefix is None or s.startswith(prefix)) and (types is None or t in types) for s, t in kinds)
