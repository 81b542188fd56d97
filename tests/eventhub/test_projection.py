"""The projections framework: read your writes, snapshots, restarts and rebuilds."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import msgspec

from eventhub.events import Event, NewEvent, StreamAppend
from eventhub.log import EventLog
from eventhub.projection import Projection
from eventhub.store.sqlite import SQLiteStore


class Counter(Projection):
    """Counts events per stream and remembers the last payload of each."""

    name = "counter"
    version = 1
    prefixes: ClassVar[tuple[str, ...]] = ("count:",)

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}
        self.last: dict[str, str] = {}
        self.applied = 0

    def apply(self, event: Event) -> None:
        self.applied += 1
        self.counts[event.stream] = self.counts.get(event.stream, 0) + 1
        self.last[event.stream] = (event.data or b"").decode()

    def snapshot(self) -> bytes:
        return msgspec.json.encode({"counts": self.counts, "last": self.last})

    def restore(self, state: bytes) -> None:
        model = msgspec.json.decode(state)
        self.counts, self.last = model["counts"], model["last"]


class CounterV2(Counter):
    version = 2


async def _fill(log: EventLog, n: int) -> None:
    for i in range(n):
        await log.append(
            StreamAppend(f"count:{i % 3}", [NewEvent("Counted", str(i).encode())]),
            StreamAppend(f"other:{i}", [NewEvent("Ignored")]),
        )


async def test_read_your_writes(tmp_path: Path) -> None:
    counter = Counter()
    log = EventLog(SQLiteStore(str(tmp_path / "p.db")), [counter])
    await log.open()
    try:
        events = await log.append(StreamAppend("count:a", [NewEvent("Counted", b"x")]))
        # applied before append returned: no waiting
        assert counter.counts == {"count:a": 1}
        assert counter.position == events[-1].position
    finally:
        await log.close()


async def test_snapshot_and_restart_equals_rebuild(tmp_path: Path) -> None:
    path = str(tmp_path / "p.db")
    first = Counter()
    log = EventLog(SQLiteStore(path), [first], snapshot_every=7)
    await log.open()
    await _fill(log, 40)
    await log.close()

    restarted = Counter()
    log = EventLog(SQLiteStore(path), [restarted], snapshot_every=7)
    await log.open()
    snap = await log.store.load_snapshot("counter")
    assert snap is not None and snap.position == 80
    assert restarted.applied == 0  # came from the snapshot, nothing re-applied
    await _fill(log, 5)
    await log.close()

    rebuilt = Counter()
    async for event in _iter(path):
        if rebuilt.wants(event):
            rebuilt.apply(event)
    assert (restarted.counts, restarted.last) == (rebuilt.counts, rebuilt.last)


async def _iter(path: str):  # type: ignore[no-untyped-def]
    store = SQLiteStore(path)
    await store.open()
    try:
        async for event in store.iter_all():
            yield event
    finally:
        await store.close()


async def test_snapshots_are_written_every_n_events(tmp_path: Path) -> None:
    log = EventLog(SQLiteStore(str(tmp_path / "p.db")), [Counter()], snapshot_every=10)
    await log.open()
    try:
        await _fill(log, 6)  # 12 events
        await log.projections.snapshot_all()  # flushes the pending write, adds the tail
        snap = await log.store.load_snapshot("counter")
        assert snap is not None and snap.position == 12
    finally:
        await log.close()


async def test_changed_version_rebuilds_from_the_log(tmp_path: Path) -> None:
    path = str(tmp_path / "p.db")
    log = EventLog(SQLiteStore(path), [Counter()])
    await log.open()
    await _fill(log, 9)
    await log.close()

    v2 = CounterV2()
    log = EventLog(SQLiteStore(path), [v2])
    await log.open()
    try:
        assert v2.applied == 9  # ignored the v1 snapshot and folded every count: event
        assert sum(v2.counts.values()) == 9
    finally:
        await log.close()


async def test_stale_snapshot_catches_up(tmp_path: Path) -> None:
    path = str(tmp_path / "p.db")
    log = EventLog(SQLiteStore(path), [Counter()])
    await log.open()
    await _fill(log, 3)
    await log.close()  # snapshot at 6
    store = SQLiteStore(path)
    await store.open()
    await store.append(StreamAppend("count:z", [NewEvent("Counted", b"late")]))  # behind the projections' back
    await store.close()

    again = Counter()
    log = EventLog(SQLiteStore(path), [again])
    await log.open()
    try:
        assert again.applied == 1 and again.last["count:z"] == "late"
    finally:
        await log.close()
