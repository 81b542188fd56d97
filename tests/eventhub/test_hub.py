"""Subscriptions: catch-up then live, no gap, no duplicate, bounded window, slow subscribers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventhub.events import Event, NewEvent, StreamAppend
from eventhub.hub import EventFilter
from eventhub.log import EventLog
from eventhub.store.sqlite import SQLiteStore


async def _open(path: Path, window_events: int = 10_000, window_bytes: int = 64 << 20) -> EventLog:
    log = EventLog(SQLiteStore(str(path)), window_events=window_events, window_bytes=window_bytes)
    await log.open()
    return log


async def _collect(log: EventLog, after: int, n: int, flt: EventFilter | None = None) -> list[Event]:
    got: list[Event] = []
    async for batch in log.hub.subscribe(after, flt):
        got.extend(batch)
        if len(got) >= n:
            return got
    return got


async def _write(log: EventLog, stream: str, n: int) -> None:
    for i in range(n):
        await log.append(StreamAppend(stream, [NewEvent("Wrote", str(i).encode())]))


async def test_catch_up_then_live_with_concurrent_writers(tmp_path: Path) -> None:
    log = await _open(tmp_path / "h.db", window_events=50)
    try:
        await asyncio.gather(*(_write(log, f"s{w}", 30) for w in range(4)))  # 120 before subscribing
        reader = asyncio.create_task(_collect(log, 0, 360))
        await asyncio.gather(*(_write(log, f"s{w}", 60) for w in range(4)))  # 240 while it reads
        got = await asyncio.wait_for(reader, 30)
        assert [e.position for e in got] == list(range(1, 361))
    finally:
        await log.close()


async def test_filters_by_stream_prefix_and_type(tmp_path: Path) -> None:
    log = await _open(tmp_path / "h.db")
    try:
        await log.append(StreamAppend("a:1", [NewEvent("X"), NewEvent("Y")]), StreamAppend("b:1", [NewEvent("X")]))
        only_a = await _collect(log, 0, 2, EventFilter(prefix="a:"))
        assert [(e.stream, e.type) for e in only_a] == [("a:1", "X"), ("a:1", "Y")]
        only_x = await _collect(log, 0, 2, EventFilter(types=["X"]))
        assert [e.stream for e in only_x] == ["a:1", "b:1"]
        exact = asyncio.create_task(_collect(log, log.head, 1, EventFilter(stream="b:1")))
        await asyncio.sleep(0)
        await log.append(StreamAppend("a:1", [NewEvent("X")]))
        await log.append(StreamAppend("b:1", [NewEvent("Z")]))
        assert [e.type for e in await asyncio.wait_for(exact, 5)] == ["Z"]
    finally:
        await log.close()


async def test_a_filtered_subscriber_sleeps_through_commits_it_does_not_want(tmp_path: Path) -> None:
    log = await _open(tmp_path / "h.db", window_events=5)
    try:
        wanted = EventFilter(prefix="export:", types=["Requested"])
        reader = asyncio.create_task(_collect(log, 0, 2, wanted))
        await asyncio.sleep(0)
        [waiter] = log.hub._filter_waiters.values()
        await _write(log, "channel:c:0", 20)  # other streams: more than the window holds
        await log.append(StreamAppend("export:1", [NewEvent("Claimed")]))  # the prefix, another type
        assert not waiter.done()
        await log.append(StreamAppend("export:1", [NewEvent("Requested", b"1")]))
        assert waiter.done()
        await _write(log, "channel:c:0", 3)
        await log.append(StreamAppend("export:2", [NewEvent("Requested", b"2")]))
        got = await asyncio.wait_for(reader, 5)
        assert [(e.stream, e.data) for e in got] == [("export:1", b"1"), ("export:2", b"2")]
    finally:
        await log.close()


async def test_subscriber_behind_the_window_reads_the_store(tmp_path: Path) -> None:
    log = await _open(tmp_path / "h.db", window_events=10)
    try:
        await _write(log, "s", 100)
        assert log.hub.window_after(0) is None
        got = await _collect(log, 5, 95)
        assert [e.position for e in got] == list(range(6, 101))
    finally:
        await log.close()


async def test_window_is_bounded_by_bytes(tmp_path: Path) -> None:
    log = await _open(tmp_path / "h.db", window_bytes=1000)
    try:
        for _ in range(10):
            await log.append(StreamAppend("big", [NewEvent("Blob", b"x" * 400)]))
        assert sum(len(e.data or b"") for e in log.hub.window_after(log.head - 2) or []) <= 1000
        assert log.hub.window_after(0) is None
    finally:
        await log.close()


async def test_a_stalled_subscriber_blocks_nobody(tmp_path: Path) -> None:
    log = await _open(tmp_path / "h.db", window_events=20)
    try:
        stalled = log.hub.subscribe(0)
        await _write(log, "s", 1)
        first = await stalled.__anext__()  # takes one batch, then never reads again
        assert first[0].position == 1
        await asyncio.wait_for(_write(log, "s", 200), 30)
        live = await _collect(log, 150, 51)
        assert live[-1].position == 201
        rest = await stalled.__anext__()  # it resumes from the store, no gap
        assert rest[0].position == 2
        await stalled.aclose()
    finally:
        await log.close()


async def test_cancelled_subscriber_does_not_break_others(tmp_path: Path) -> None:
    log = await _open(tmp_path / "h.db")
    try:
        victim = asyncio.create_task(_collect(log, 0, 1, EventFilter(stream="s")))
        survivor = asyncio.create_task(_collect(log, 0, 1, EventFilter(stream="s")))
        await asyncio.sleep(0)
        victim.cancel()
        await log.append(StreamAppend("s", [NewEvent("X")]))
        assert len(await asyncio.wait_for(survivor, 5)) == 1
    finally:
        await log.close()


async def test_wait_for_position(tmp_path: Path) -> None:
    log = await _open(tmp_path / "h.db")
    try:
        assert await log.wait_for(0)
        assert not await log.wait_for(1, timeout=0.01)
        waiter = asyncio.create_task(log.wait_for(2, timeout=10))
        await _write(log, "s", 2)
        assert await waiter
    finally:
        await log.close()


async def test_ten_thousand_idle_subscribers_stay_small(tmp_path: Path) -> None:
    import tracemalloc

    log = await _open(tmp_path / "h.db")
    try:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        gens = [log.hub.subscribe(0, EventFilter(stream=f"c:{i % 100}")) for i in range(10_000)]
        tasks = [asyncio.ensure_future(g.__anext__()) for g in gens]
        await asyncio.sleep(0)
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert used < 40 * 1024 * 1024, used  # a few KB each, mostly the task and generator frames
        await log.append(StreamAppend("c:7", [NewEvent("X")]))
        done, _ = await asyncio.wait(tasks, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 100
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for g in gens:
            await g.aclose()
    finally:
        await log.close()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    writers=st.integers(1, 5),
    per_writer=st.integers(1, 30),
    start_after=st.integers(0, 20),
    window=st.integers(1, 40),
)
def test_every_event_exactly_once_in_order(tmp_path_factory: pytest.TempPathFactory, writers: int, per_writer: int, start_after: int, window: int) -> None:
    async def scenario() -> None:
        log = await _open(tmp_path_factory.mktemp("p") / "h.db", window_events=window)
        try:
            await _write(log, "pre", 20)
            total = 20 + writers * per_writer
            reader = asyncio.create_task(_collect(log, start_after, total - start_after))
            await asyncio.gather(*(_write(log, f"w{w}", per_writer) for w in range(writers)))
            got = await asyncio.wait_for(reader, 30)
            assert [e.position for e in got] == list(range(start_after + 1, total + 1))
        finally:
            await log.close()

    asyncio.run(scenario())
