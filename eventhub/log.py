"""The log as a node runs it: a store, its projections and its hub, wired in one order.

`append` goes to the store; the store's writer hands each durable batch to the hub,
which folds it into the projections and wakes subscribers, and only then answers the
callers. So a read after an append on this node sees it.
"""

from __future__ import annotations

from collections.abc import Iterable

from eventhub.events import Event, StreamAppend
from eventhub.hub import Hub
from eventhub.projection import Projection, Projections
from eventhub.store.base import EventStore


class EventLog:
    def __init__(
        self,
        store: EventStore,
        projections: Iterable[Projection] = (),
        *,
        snapshot_every: int = 10_000,
        window_events: int = 10_000,
        window_bytes: int = 64 << 20,
    ) -> None:
        self.store = store
        self.projections = Projections(store, projections, snapshot_every=snapshot_every)
        self.hub = Hub(store, window_events=window_events, window_bytes=window_bytes)

    async def open(self) -> None:
        await self.store.open()
        try:
            head = await self.projections.start()
        except BaseException:
            await self.store.close()
            raise
        self.hub.start(head)
        self.hub.appliers.append(self.projections.apply)
        self.store.commit_listeners.append(self.hub.committed)
        self.store.head_listeners.append(self.hub.advance)
        # another node may have committed while we caught up
        await self.hub.advance(await self.store.head())

    async def close(self) -> None:
        try:
            await self.projections.snapshot_all()
        finally:
            await self.store.close()

    async def append(self, *appends: StreamAppend, idempotency_key: str | None = None) -> list[Event]:
        return await self.store.append(*appends, idempotency_key=idempotency_key)

    async def wait_for(self, position: int, timeout: float | None = None) -> bool:
        return await self.hub.wait_for(position, timeout)

    @property
    def head(self) -> int:
        return self.hub.head
