"""Several nodes on one PostgreSQL log: one gap-free order, wake-ups, reconnects, claims.

A node here is a `PostgresStore` of its own (own writer, pool and LISTEN connection) on
the shared database, which is what an eventhub process is to the log.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from eventhub.chain import verify
from eventhub.errors import WrongExpectedVersion
from eventhub.events import NO_STREAM, Event, NewEvent, StreamAppend
from eventhub.log import EventLog
from eventhub.store.postgres import PostgresStore
from tests.store.pg import PgDatabases, pg, pg_run  # noqa: F401  (fixtures)

WRITERS = 32


class Follower:
    """What a subscriber on one node sees: every position, read when a listener says so.

    It reads exactly up to each announced head, never past it, so a position that no
    announcement covered would be missing from `seen` and the test would hang on `until`.
    """

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.seen: list[int] = []
        self.announced: list[int] = []
        self._lock = asyncio.Lock()
        self._moved = asyncio.Event()
        store.head_listeners.append(self.on_head)
        store.commit_listeners.append(self.on_commit)

    async def on_head(self, head: int) -> None:
        self.announced.append(head)
        await self._catch_up(head)

    async def on_commit(self, events: list[Event]) -> None:
        self.announced.append(events[-1].position)
        await self._catch_up(events[-1].position)

    async def _catch_up(self, head: int) -> None:
        async with self._lock:
            last = self.seen[-1] if self.seen else 0
            while last < head:
                events = await self.store.read_all(last, 1000, until=head)
                assert events, f"{head} announced but {last + 1} not readable"
                self.seen.extend(e.position for e in events)
                last = events[-1].position
            self._moved.set()

    async def until(self, head: int, timeout: float = 20) -> None:
        async def reach() -> None:
            while not self.seen or self.seen[-1] < head:
                self._moved.clear()
                await self._moved.wait()

        await asyncio.wait_for(reach(), timeout)


class Tail:
    """A reader that polls the log as fast as it can: it must never see a hole."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.seen: list[int] = []
        self.stop = False

    async def run(self) -> None:
        while not self.stop:
            last = self.seen[-1] if self.seen else 0
            events = await self.store.read_all(last, 500)
            positions = [e.position for e in events]
            assert positions == list(range(last + 1, last + 1 + len(positions))), "saw N+1 before N"
            self.seen.extend(positions)
            if not events:
                await asyncio.sleep(0.001)


@asynccontextmanager
async def nodes(dsn: str, n: int = 2) -> AsyncIterator[list[PostgresStore]]:
    stores = [PostgresStore(dsn) for _ in range(n)]
    for store in stores:
        await store.open()
    try:
        yield stores
    finally:
        for store in stores:
            await store.close()


async def _writer(store: PostgresStore, name: str, appends: int) -> list[int]:
    positions: list[int] = []
    rng = random.Random(name)
    version = NO_STREAM
    for i in range(appends):
        events = [NewEvent("Wrote", f"{name}/{i}/{k}".encode(), {"node": name}) for k in range(rng.choice((1, 1, 2, 3)))]
        committed = await store.append(
            StreamAppend(f"writer:{name}", events, version),
            StreamAppend("shared", [NewEvent("Touched")]),
        )
        version += len(events)
        positions.extend(e.position for e in committed)
    return positions


async def _check_log(store: PostgresStore, acknowledged: list[int]) -> int:
    head = await store.head()
    assert sorted(acknowledged) == list(range(1, head + 1))  # each acknowledged once, nothing else
    result = await verify(store.iter_all(check=False))
    assert result.ok, result.reason
    assert result.head == head
    return head


@pytest.mark.slow
async def test_writers_on_two_nodes_give_both_nodes_one_gap_free_sequence(pg: PgDatabases) -> None:
    async with nodes(await pg.create()) as (a, b):
        followers = [Follower(a), Follower(b)]
        tails = [Tail(a), Tail(b)]
        tail_tasks = asyncio.gather(*(t.run() for t in tails))
        try:
            results = await asyncio.gather(
                *(_writer(node, f"{label}{w}", 60) for label, node in (("a", a), ("b", b)) for w in range(WRITERS))
            )
            head = await _check_log(a, [p for r in results for p in r])
            for follower in followers:
                await follower.until(head)
                assert follower.seen == list(range(1, head + 1))
                assert follower.announced == sorted(follower.announced), "announcements went backwards"
        finally:
            for tail in tails:
                tail.stop = True
            await tail_tasks
        for tail in tails:
            assert tail.seen == list(range(1, len(tail.seen) + 1))
        assert a.listen_reconnects == b.listen_reconnects == 0


@pytest.mark.slow
async def test_subscribers_on_two_event_logs_get_the_same_sequence(pg: PgDatabases) -> None:
    dsn = await pg.create()
    logs = [EventLog(PostgresStore(dsn), window_events=200), EventLog(PostgresStore(dsn), window_events=200)]
    for log in logs:
        await log.open()
    try:
        total = 2 * WRITERS * 10 * 2  # writers × appends × (one writer event + one shared event)

        async def subscriber(log: EventLog) -> list[int]:
            got: list[int] = []
            async for batch in log.hub.subscribe(0):
                got.extend(e.position for e in batch)
                if len(got) >= total:
                    break
            return got

        async def one_event_writer(log: EventLog, name: str) -> None:
            for i in range(10):
                await log.append(
                    StreamAppend(f"writer:{name}", [NewEvent("Wrote")], i - 1 if i else NO_STREAM),
                    StreamAppend("shared", [NewEvent("Touched")]),
                )

        readers = [asyncio.create_task(subscriber(log)) for log in logs]
        await asyncio.gather(*(one_event_writer(log, f"{n}{w}") for n, log in enumerate(logs) for w in range(WRITERS)))
        got = await asyncio.wait_for(asyncio.gather(*readers), 20)
        assert got[0] == got[1] == list(range(1, total + 1))
    finally:
        for log in logs:
            await log.close()


@pytest.mark.slow
async def test_killing_the_listen_connection_loses_nothing(pg: PgDatabases) -> None:
    async with nodes(await pg.create()) as (a, b):
        follower = Follower(a)  # a only hears of b's commits through LISTEN
        writers = asyncio.gather(*(_writer(b, f"b{w}", 60) for w in range(WRITERS)))
        killed = 0
        while not writers.done() and killed < 3:
            await asyncio.sleep(0.05)
            pid = a.listener_pid
            if pid is not None and await pg.terminate(pid):
                killed += 1
        head = await _check_log(b, [p for r in await writers for p in r])
        await follower.until(head)
        assert follower.seen == list(range(1, head + 1))
        assert killed >= 1 and a.listen_reconnects >= 1


async def test_two_nodes_racing_for_100_jobs_claim_each_once(pg: PgDatabases) -> None:
    async with nodes(await pg.create()) as (a, b):
        jobs = [f"job:{i}" for i in range(100)]
        await a.append(*(StreamAppend(job, [NewEvent("JobQueued")], NO_STREAM) for job in jobs))

        async def worker(node: PostgresStore, name: str) -> list[str]:
            won: list[str] = []
            for job in random.Random(name).sample(jobs, len(jobs)):
                version = await node.stream_version(job)
                if version > 0:
                    continue  # someone holds it already
                try:
                    await node.append(StreamAppend(job, [NewEvent("JobClaimed", name.encode())], version))
                except WrongExpectedVersion:
                    continue
                won.append(job)
            return won

        names = [f"{node}-{w}" for node in ("a", "b") for w in range(4)]
        results = await asyncio.gather(*(worker(a if n.startswith("a") else b, n) for n in names))
        claimed = [job for won in results for job in won]
        assert sorted(claimed) == sorted(jobs)  # every job once, none twice
        for job in jobs:
            events = await b.read_stream(job)
            assert [e.type for e in events] == ["JobQueued", "JobClaimed"]
        await _check_log(a, list(range(1, 201)))
