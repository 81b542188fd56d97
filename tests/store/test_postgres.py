"""The PostgreSQL backend: the shared store suite, plus what only this backend has.

Each store gets an empty database of its own (see `tests/store/pg.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import msgspec
import pytest

from eventhub.chain import GENESIS, verify
from eventhub.clock import Clock, ManualClock
from eventhub.errors import StoreClosed, StoreCorrupt, StoreFull, StoreUnavailable
from eventhub.events import NO_STREAM, Event, NewEvent, StreamAppend
from eventhub.store import store_from_url
from eventhub.store.base import EventStore
from eventhub.store.postgres import _APPEND_LOCK, CHANNEL, PostgresStore, translate
from tests.store.contract import StoreContract
from tests.store.pg import PgDatabases, dsn_for, pg, pg_run  # noqa: F401  (fixtures)


def _one(stream: str, data: bytes = b"x", expected: int = -2) -> StreamAppend:
    return StreamAppend(stream, [NewEvent("Wrote", data, {"content-type": "text/plain"})], expected)


async def _opened(dsn: str, **kw: Any) -> PostgresStore:
    store = PostgresStore(dsn, **kw)
    await store.open()
    return store


@asynccontextmanager
async def _store(dsn: str, **kw: Any) -> AsyncIterator[PostgresStore]:
    store = await _opened(dsn, **kw)
    try:
        yield store
    finally:
        await store.close()


class TestPostgresStore(StoreContract):
    @pytest.fixture(autouse=True)
    def _databases(self, pg: PgDatabases) -> None:
        self.pg = pg

    async def make_store(self, clock: Clock) -> EventStore:
        return PostgresStore(await self.pg.create(), clock=clock)

    async def reopen(self, store: EventStore) -> EventStore:
        assert isinstance(store, PostgresStore)
        return PostgresStore(store.dsn, clock=store.clock)


# -- what the suite cannot see: construction, several stores on one database ---------------


async def test_store_from_url_picks_postgres(pg: PgDatabases) -> None:
    store = store_from_url(await pg.create(), clock=ManualClock())
    assert isinstance(store, PostgresStore) and store.backend == "postgres"
    async with store:
        [event] = await store.append(_one("a", b"hello", NO_STREAM))
        assert (event.position, event.version, event.prev_hash) == (1, 0, GENESIS)
        assert await store.read_event(1) == event


async def test_two_nodes_open_a_fresh_database_at_once(pg: PgDatabases) -> None:
    dsn = await pg.create()
    a, b = PostgresStore(dsn), PostgresStore(dsn)
    await asyncio.gather(a.open(), b.open())
    try:
        await asyncio.gather(a.append(_one("x")), b.append(_one("y")))
        assert await a.head() == await b.head() == 2
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_nul_in_a_name_is_refused_without_failing_the_batch(pg: PgDatabases) -> None:
    async with _store(await pg.create()) as store:
        good = [asyncio.ensure_future(store.append(_one(f"s{i}"))) for i in range(3)]
        with pytest.raises(ValueError, match="NUL"):
            await store.append(_one("bad\x00name"))
        assert [len(await g) for g in good] == [1, 1, 1]


async def test_a_caller_that_gives_up_does_not_break_its_batch(pg: PgDatabases) -> None:
    async with _store(await pg.create()) as store:
        calls = [asyncio.ensure_future(store.append(_one(f"s{i}"))) for i in range(5)]
        await asyncio.sleep(0)  # all five are queued
        calls[2].cancel()
        done = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(done[2], asyncio.CancelledError)
        assert all(isinstance(d, list) for i, d in enumerate(done) if i != 2)
        [event] = await store.append(_one("after"))
        assert (await verify(store.iter_all(check=False))).ok and event.position in (5, 6)


# -- every event read is checked against its own hash -------------------------------------


@pytest.mark.parametrize(
    "tamper",
    [
        "UPDATE events SET data = '\\x79'::bytea WHERE position = 2",
        "UPDATE events SET type = 'Forged' WHERE position = 2",
        "UPDATE events SET recorded_at = recorded_at + 1 WHERE position = 2",
        "UPDATE events SET meta = convert_to('{\"content-type\":\"text/html\"}', 'UTF8') WHERE position = 2",
    ],
)
async def test_a_changed_byte_is_reported_at_its_position(pg: PgDatabases, tamper: str) -> None:
    dsn = await pg.create()
    async with _store(dsn) as store:
        await store.append(_one("a"), _one("b"), _one("c"))
        await pg.execute(dsn, tamper)
        with pytest.raises(StoreCorrupt) as info:
            await store.read_event(2)
        assert info.value.position == 2
        with pytest.raises(StoreCorrupt):
            await store.read_all()
        with pytest.raises(StoreCorrupt):
            await store.read_stream("b")
        assert [e.position for e in await store.read_all(check=False)] == [1, 2, 3]
        result = await verify(store.iter_all(check=False))
        assert result.broken_at == 2


# -- driver errors become store errors ----------------------------------------------------


async def test_unreachable_server_is_unavailable() -> None:
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/none", connect_timeout=2)
    with pytest.raises(StoreUnavailable, match="unreachable"):
        await store.open()


async def test_missing_database_is_unavailable(pg: PgDatabases) -> None:
    store = PostgresStore(dsn_for("eventhub_test_does_not_exist"))
    with pytest.raises(StoreUnavailable, match="does not exist"):
        await store.open()


async def test_read_only_database_is_unavailable(pg: PgDatabases) -> None:
    dsn = await pg.create()
    async with _store(dsn) as store:
        await store.append(_one("a"))
    name = dsn.rsplit("/", 1)[1]
    await pg.admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    with pytest.raises(StoreUnavailable, match="read-only"):
        await PostgresStore(dsn).open()


async def test_read_only_while_serving_fails_the_append_alone(pg: PgDatabases) -> None:
    dsn = await pg.create()
    async with _store(dsn) as store:
        await store.append(_one("a"))
        assert store._conn is not None
        await store._conn.execute("SET default_transaction_read_only = on")
        with pytest.raises(StoreUnavailable, match="read-only"):
            await store.append(_one("a"))
        await store._conn.execute("SET default_transaction_read_only = off")
        [event] = await store.append(_one("a"))
        assert event.position == 2
        assert (await verify(store.iter_all(check=False))).ok


@pytest.mark.parametrize(
    ("exc", "kind", "words"),
    [
        (asyncpg.exceptions.DiskFullError("could not extend file: No space left on device"), StoreFull, "full"),
        (asyncpg.exceptions.ReadOnlySQLTransactionError("read-only transaction"), StoreUnavailable, "read-only"),
        (asyncpg.exceptions.DataCorruptedError("invalid page in block 0"), StoreCorrupt, "corrupt"),
        (asyncpg.exceptions.IndexCorruptedError("index is corrupt"), StoreCorrupt, "corrupt"),
        (asyncpg.exceptions.AdminShutdownError("terminating connection"), StoreUnavailable, "unreachable"),
        (asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"), StoreUnavailable, "unreachable"),
        (ConnectionRefusedError(111, "Connection refused"), StoreUnavailable, "unreachable"),
        (asyncpg.exceptions.TooManyConnectionsError("too many clients"), StoreUnavailable, "resources"),
        (asyncpg.exceptions.InvalidCatalogNameError('database "x" does not exist'), StoreUnavailable, "exist"),
    ],
)
def test_driver_errors_are_translated(exc: BaseException, kind: type[Exception], words: str) -> None:
    err = translate(exc)
    assert type(err) is kind
    assert words in str(err) and "\n" not in str(err)


async def test_writer_reconnects_after_its_connection_is_killed(pg: PgDatabases) -> None:
    dsn = await pg.create()
    async with _store(dsn) as store:
        await store.append(_one("a"))
        assert store._conn is not None
        await pg.terminate(store._conn.get_server_pid())
        outcome: list[object] = []
        for _ in range(3):  # the first may still meet the dead socket
            try:
                outcome.append(await store.append(_one("a")))
                break
            except StoreUnavailable as exc:
                outcome.append(exc)
        assert isinstance(outcome[-1], list)
        result = await verify(store.iter_all(check=False))
        assert result.ok and result.head == await store.head() == 2


async def test_a_commit_cut_off_mid_transaction_fails_and_leaves_nothing(pg: PgDatabases) -> None:
    dsn = await pg.create()
    async with _store(dsn) as store:
        await store.append(_one("a"))
        assert store._conn is not None
        writer_pid = store._conn.get_server_pid()
        blocker = await asyncpg.connect(dsn)  # another node, holding the append lock
        try:
            await blocker.execute(f"BEGIN; SELECT pg_advisory_xact_lock({_APPEND_LOCK})")
            pending = asyncio.gather(*(store.append(_one(f"s{i}")) for i in range(5)), return_exceptions=True)
            for _ in range(500):
                state = await pg.admin.fetchval("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", writer_pid)
                if state == "Lock":
                    break
                await asyncio.sleep(0.01)
            assert state == "Lock"  # the writer waits for the lock inside its transaction
            assert await pg.terminate(writer_pid)
            await asyncio.sleep(0.1)
            await blocker.execute("ROLLBACK")
            results = await pending
        finally:
            await blocker.close()
        failed = [r for r in results if isinstance(r, BaseException)]
        assert failed and all(isinstance(r, StoreUnavailable) for r in failed)
        committed = [e for r in results if isinstance(r, list) for e in r]
        assert [e.position for e in committed] == list(range(2, 2 + len(committed)))
        [event] = await store.append(_one("b"))
        assert event.position == 2 + len(committed)
        assert [e.position for e in await store.read_all()] == list(range(1, event.position + 1))
        assert (await verify(store.iter_all(check=False))).ok


async def test_every_connection_killed_at_once_is_survived(pg: PgDatabases) -> None:
    dsn = await pg.create()
    async with _store(dsn) as store:
        await store.append(_one("a"))
        await asyncio.gather(*(store.read_all() for _ in range(8)))  # fill the pool
        name = dsn.rsplit("/", 1)[1]
        killed = await pg.admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1", name
        )
        assert killed >= 3  # writer, listener, pool
        await asyncio.sleep(0.1)
        assert len(await store.read_all()) == 1
        for _ in range(3):
            try:
                await store.append(_one("a"))
                break
            except StoreUnavailable:
                pass
        assert await store.head() == 2
        for _ in range(100):
            if store.listen_reconnects:
                break
            await asyncio.sleep(0.05)
        assert store.listen_reconnects == 1


# -- LISTEN/NOTIFY -------------------------------------------------------------------------


async def test_notify_payload_is_the_head_position_only(pg: PgDatabases) -> None:
    dsn = await pg.create()
    heard: asyncio.Queue[str] = asyncio.Queue()
    async with _store(dsn) as store:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.add_listener(CHANNEL, lambda *args: heard.put_nowait(args[-1]))
            await store.append(StreamAppend("big", [NewEvent("Big", b"x" * 20_000)] * 3))
            assert await asyncio.wait_for(heard.get(), 5) == "3"
        finally:
            await conn.close()


async def test_head_listeners_hear_other_nodes_not_their_own(pg: PgDatabases) -> None:
    dsn = await pg.create()
    a, b = await _opened(dsn), await _opened(dsn)
    heads_a: list[int] = []
    commits_a: list[int] = []
    arrived = asyncio.Event()

    async def on_head(head: int) -> None:
        heads_a.append(head)
        arrived.set()

    async def on_commit(events: list[Event]) -> None:
        commits_a.extend(e.position for e in events)

    a.head_listeners.append(on_head)
    a.commit_listeners.append(on_commit)
    try:
        await a.append(_one("a"))
        await b.append(_one("b"))
        await asyncio.wait_for(arrived.wait(), 5)
        await asyncio.sleep(0.05)  # a's own NOTIFY has had time to come back too
        assert heads_a == [2] and commits_a == [1]
        # b commits 3, a commits 4 before hearing of 3: a's listeners still hear of 3 first
        await b.append(_one("b"))
        await a.append(_one("a"))
        await asyncio.sleep(0.05)
        assert heads_a == [2, 3] and commits_a == [1, 4]
    finally:
        await a.close()
        await b.close()


async def test_killed_listen_connection_reconnects_and_catches_up(pg: PgDatabases) -> None:
    dsn = await pg.create()
    a, b = await _opened(dsn), await _opened(dsn)
    heads: asyncio.Queue[int] = asyncio.Queue()

    async def on_head(head: int) -> None:
        heads.put_nowait(head)

    a.head_listeners.append(on_head)
    try:
        pid = a.listener_pid
        assert pid is not None
        assert await pg.terminate(pid)
        await b.append(_one("b"))  # may be committed while a listens to nobody
        assert await asyncio.wait_for(heads.get(), 10) == 1
        assert a.listen_reconnects == 1 and a.listener_pid not in (None, pid)
        await b.append(_one("b"))
        assert await asyncio.wait_for(heads.get(), 5) == 2
    finally:
        await a.close()
        await b.close()


async def test_close_is_prompt_and_fails_later_calls(pg: PgDatabases) -> None:
    dsn = await pg.create()
    store = await _opened(dsn)
    await store.append(_one("a"))
    await asyncio.wait_for(store.close(), 5)
    with pytest.raises(StoreClosed):
        await store.read_all()
    with pytest.raises(StoreClosed):
        await store.purge([1])


# -- import_events -------------------------------------------------------------------------


async def _source_events(pg: PgDatabases, n: int) -> list[Event]:
    async with _store(await pg.create(), clock=ManualClock()) as src:
        for i in range(n):
            await src.append(_one(f"s{i % 3}", str(i).encode()))
        await src.purge([2])
        return await src.read_all()


async def test_import_events_keeps_positions_and_hashes(pg: PgDatabases) -> None:
    events = await _source_events(pg, 6)
    async with _store(await pg.create()) as dst:
        heads: list[int] = []

        async def on_head(head: int) -> None:
            heads.append(head)

        dst.head_listeners.append(on_head)
        await dst.import_events(events[:4])
        await dst.import_events(events[4:])
        assert await dst.read_all() == events
        assert (await dst.read_event(2)).purged  # type: ignore[union-attr]
        [next_event] = await dst.append(_one("s0"))
        assert next_event.position == 7 and next_event.prev_hash == events[-1].hash
        assert next_event.version == 2
        assert (await verify(dst.iter_all(check=False))).ok


async def test_import_events_refuses_what_does_not_continue_the_head(pg: PgDatabases) -> None:
    events = await _source_events(pg, 4)
    async with _store(await pg.create()) as dst:
        with pytest.raises(StoreCorrupt):
            await dst.import_events(events[1:])  # skips position 1
        await dst.import_events(events[:2])
        with pytest.raises(StoreCorrupt):
            await dst.import_events(events[:2])  # already there
        forged = msgspec.structs.replace(events[2], type="Forged")
        with pytest.raises(StoreCorrupt):
            await dst.import_events([forged])
        assert await dst.head() == 2
        await dst.import_events(events[2:])
        assert await dst.read_all() == events
