"""The projections framework: folding the log into small, disposable read models.

A projection folds events into an in-memory read model and can always be rebuilt from
the log. The node that writes applies each committed batch to every projection before
the append returns (read your writes). Snapshots (model + position) make restarts fast;
a projection whose declared version changed is rebuilt from the log.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from typing import ClassVar

import msgspec

from eventhub.events import Event
from eventhub.store.base import EventStore, Snapshot

log = logging.getLogger(__name__)


class Projection(abc.ABC):
    """A read model folded from the log.

    Subclasses set `name`, bump `version` whenever the model or its fold changes, list
    the stream `prefixes` they read (empty: every stream), and implement `apply`,
    `snapshot` and `restore`. `position` is the last position folded in.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.position = 0

    def wants(self, event: Event) -> bool:
        return not self.prefixes or event.stream.startswith(self.prefixes)

    @abc.abstractmethod
    def apply(self, event: Event) -> None:
        """Fold one event in. Must not fail for events the facet's decisions produced."""

    @abc.abstractmethod
    def snapshot(self) -> bytes:
        """The read model as bytes."""

    @abc.abstractmethod
    def restore(self, state: bytes) -> None:
        """Replace the read model with one from `snapshot`."""

    def view(self) -> object:
        """The read model as JSON-able data, for `eventhub replay` (default: the snapshot
        decoded as JSON; override when the snapshot is not JSON)."""
        return msgspec.json.decode(self.snapshot())


def fold(projections: Iterable[Projection], events: Iterable[Event]) -> None:
    """Apply events (ascending) to the projections that have not seen them yet.

    Projection by projection, each filtering by its stream prefixes inline: this is
    the whole cost of a rebuild besides reading the log.
    """
    batch = events if isinstance(events, list) else list(events)
    if not batch:
        return
    last = batch[-1].position
    for p in projections:
        if last <= p.position:
            continue
        todo = batch if batch[0].position > p.position else [e for e in batch if e.position > p.position]
        if type(p).wants is not Projection.wants:
            wants = p.wants
            todo = [e for e in todo if wants(e)]
        elif p.prefixes:
            prefixes = p.prefixes
            todo = [e for e in todo if e.stream.startswith(prefixes)]
        apply = p.apply
        for event in todo:
            try:
                apply(event)
            except Exception:
                log.exception("projection %s failed at position %d (%s)", p.name, event.position, event.type)
        p.position = last


class Projections:
    """Runs a set of projections over one store: start-up, live folding, snapshots."""

    def __init__(self, store: EventStore, projections: Iterable[Projection], *, snapshot_every: int = 10_000) -> None:
        self.store = store
        self.items = list(projections)
        self.by_name = {p.name: p for p in self.items}
        self.snapshot_every = snapshot_every
        self._snapshotted: dict[str, int] = {}
        self._pending: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Restore snapshots and catch up from the log; return the position reached."""
        for p in self.items:
            snap = await self.store.load_snapshot(p.name)
            if snap is not None and snap.version == p.version:
                p.restore(snap.state)
                p.position = snap.position
            else:
                if snap is not None:
                    log.info("projection %s: version %d -> %d, rebuilding", p.name, snap.version, p.version)
                p.position = 0
            self._snapshotted[p.name] = p.position
        head = await self.store.head()
        start = min((p.position for p in self.items), default=head)
        async for batch in _batches(self.store, start, head):
            fold(self.items, batch)
        for p in self.items:
            p.position = max(p.position, head)
        return head

    def apply(self, events: list[Event]) -> None:
        """Fold a committed batch in (called by the hub, in position order)."""
        fold(self.items, events)
        if events:
            last = events[-1].position
            for p in self.items:
                if last - self._snapshotted.get(p.name, 0) >= self.snapshot_every:
                    self._schedule_snapshot(p)

    def _schedule_snapshot(self, p: Projection) -> None:
        snap = Snapshot(p.name, p.version, p.position, p.snapshot())
        self._snapshotted[p.name] = p.position
        task = asyncio.get_running_loop().create_task(self._save(snap))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _save(self, snap: Snapshot) -> None:
        try:
            await self.store.save_snapshot(snap)
        except Exception:  # a missed snapshot only costs a longer catch-up
            log.warning("snapshot of %s at %d failed", snap.name, snap.position, exc_info=True)

    async def snapshot_all(self) -> None:
        """Write every projection's snapshot now (on shutdown)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        for p in self.items:
            if p.position > self._snapshotted.get(p.name, 0):
                await self._save(Snapshot(p.name, p.version, p.position, p.snapshot()))
                self._snapshotted[p.name] = p.position

    def positions(self) -> dict[str, int]:
        return {p.name: p.position for p in self.items}


async def _batches(store: EventStore, after: int, until: int, size: int = 5000) -> AsyncIterator[list[Event]]:
    while after < until:
        events = await store.read_all(after, size, until=until)
        if not events:
            return
        yield events
        after = events[-1].position


