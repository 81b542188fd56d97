"""Copying a log between stores: verbatim, verified, resumable, and never onto another log."""

from __future__ import annotations

import io
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from eventhub.chain import verify
from eventhub.clock import ManualClock
from eventhub.copy import CopyRefused, copy_log, text_progress
from eventhub.errors import StoreCorrupt
from eventhub.events import NO_STREAM, Event, NewEvent, StreamAppend
from eventhub.store.base import EventStore
from eventhub.store.postgres import PostgresStore
from eventhub.store.sqlite import SQLiteStore
from tests.store.pg import PgDatabases, pg, pg_run  # noqa: F401  (fixtures)


@asynccontextmanager
async def _open(*stores: EventStore) -> AsyncIterator[None]:
    opened: list[EventStore] = []
    try:
        for store in stores:
            await store.open()
            opened.append(store)
        yield
    finally:
        for store in opened:
            await store.close()


class _Interrupted(Exception):
    pass


async def _fill(store: EventStore, clock: ManualClock, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        clock.advance(0.001 * (i % 3))
        await store.append(
            StreamAppend(f"channel:{i % 4}", [NewEvent("ItemInserted", f"item {i}".encode(), {"content-type": "text/plain"})]),
            StreamAppend(f"build:{i}", [NewEvent("BuildQueued", b"{}"), NewEvent("StepStarted", bytes(range(i % 256)))], NO_STREAM),
        )


async def _everything(store: EventStore) -> list[Event]:
    return [e async for e in store.iter_all(batch=97)]


async def test_sqlite_to_postgres_to_sqlite_is_identical(tmp_path: Path, pg: PgDatabases) -> None:
    clock = ManualClock()
    src = SQLiteStore(str(tmp_path / "src.db"), clock=clock)
    mid = PostgresStore(await pg.create(), clock=clock)
    back = SQLiteStore(str(tmp_path / "back.db"), clock=clock)
    async with _open(src, mid, back):
        await _fill(src, clock, 40)
        await src.purge([5, 6, 77])
        original = await _everything(src)
        assert len(original) == 120 and sum(e.purged for e in original) == 3

        seen: list[tuple[int, int]] = []
        first = await copy_log(src, mid, progress=lambda done, total: seen.append((done, total)), batch=50)
        assert (first.head, first.copied, first.skipped) == (120, 120, 0)
        assert seen == [(0, 120), (50, 120), (100, 120), (120, 120)]
        second = await copy_log(mid, back)
        assert second.chain == first.chain == original[-1].hash

        for store in (mid, back):
            assert await _everything(store) == original
            assert await store.stream_version("channel:1") == 9
            assert (await verify(store.iter_all(check=False))).ok

        # The copies are live logs: appends continue the same chain.
        clock.advance(1)
        [after_mid] = await mid.append(StreamAppend("channel:1", [NewEvent("ItemInserted")], 9))
        [after_back] = await back.append(StreamAppend("channel:1", [NewEvent("ItemInserted")], 9))
        assert after_mid.position == after_back.position == 121
        assert after_mid.prev_hash == after_back.prev_hash == original[-1].hash
        assert (await verify(back.iter_all(check=False))).ok


async def test_running_again_resumes(tmp_path: Path, pg: PgDatabases) -> None:
    clock = ManualClock()
    src = SQLiteStore(str(tmp_path / "src.db"), clock=clock)
    dst = PostgresStore(await pg.create(), clock=clock)
    async with _open(src, dst):
        await _fill(src, clock, 20)

        def interrupt(done: int, total: int) -> None:
            if done >= 20:
                raise _Interrupted  # the operator stops it mid-way

        with pytest.raises(_Interrupted):
            await copy_log(src, dst, progress=interrupt, batch=10)
        assert await dst.head() == 20

        resumed = await copy_log(src, dst, batch=10)
        assert (resumed.copied, resumed.skipped) == (40, 20)
        again = await copy_log(src, dst)
        assert (again.copied, again.skipped, again.head) == (0, 60, 60)

        await _fill(src, clock, 5, start=20)  # the source grew meanwhile
        more = await copy_log(src, dst)
        assert (more.copied, more.skipped) == (15, 60)
        assert await _everything(dst) == await _everything(src)


async def test_a_divergent_target_is_refused(tmp_path: Path, pg: PgDatabases) -> None:
    src = SQLiteStore(str(tmp_path / "src.db"), clock=ManualClock())
    other = PostgresStore(await pg.create(), clock=ManualClock(start=1_800_000_000_000_000))
    longer = SQLiteStore(str(tmp_path / "longer.db"), clock=ManualClock())
    async with _open(src, other, longer):
        await _fill(src, ManualClock(), 4)
        await _fill(other, ManualClock(), 2)  # same shape, other times: other hashes
        before = await _everything(other)
        with pytest.raises(CopyRefused, match="diverges"):
            await copy_log(src, other)
        assert await _everything(other) == before

        await copy_log(src, longer)
        await longer.append(StreamAppend("extra", [NewEvent("X")]))
        with pytest.raises(CopyRefused, match="more than"):
            await copy_log(src, longer)


async def test_a_broken_source_chain_stops_the_copy_at_the_break(tmp_path: Path, pg: PgDatabases) -> None:
    path = tmp_path / "src.db"
    src = SQLiteStore(str(path), clock=ManualClock())
    async with _open(src):
        await _fill(src, ManualClock(), 10)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE events SET data = x'00' WHERE position = 15")
    conn.close()
    src = SQLiteStore(str(path))
    dst = PostgresStore(await pg.create())
    async with _open(src, dst):
        with pytest.raises(StoreCorrupt) as info:
            await copy_log(src, dst, batch=10)
        assert info.value.position == 15
        assert await dst.head() == 10
        assert (await verify(dst.iter_all(check=False))).ok


def test_text_progress_draws_one_line() -> None:
    out = io.StringIO()
    show = text_progress(out, width=10, every=0)
    show(0, 200)
    show(50, 200)
    show(200, 200)
    assert out.getvalue() == (
        "\r[..........] 0/200 (0%)\r[##........] 50/200 (25%)\r[##########] 200/200 (100%)\n"
    )
