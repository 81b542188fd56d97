"""The SQLite store: the shared contract, plus what only a file on disk can get wrong.

Pragmas, group commit, a byte changed behind the store's back, a file that is not a
database, a read-only file, a database locked by another connection, and two stores
(as two processes would) writing one file.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from eventhub.chain import verify
from eventhub.clock import Clock, ManualClock
from eventhub.errors import StoreCorrupt, StoreUnavailable, WrongExpectedVersion
from eventhub.events import NO_STREAM, Event
from eventhub.store.base import EventStore
from eventhub.store.sqlite import SQLiteStore
from tests.store.contract import StoreContract, assert_log_sound, new, to

ROOT = Path(__file__).resolve().parents[2]


class TestSQLiteStore(StoreContract):
    @pytest.fixture(autouse=True)
    def _directory(self, tmp_path: Path) -> None:
        self.directory = tmp_path
        self.made = 0

    async def make_store(self, clock: Clock) -> EventStore:
        self.made += 1
        return SQLiteStore(str(self.directory / f"log{self.made}.db"), clock=clock)

    async def reopen(self, store: EventStore) -> EventStore:
        assert isinstance(store, SQLiteStore)
        return SQLiteStore(store.path, clock=store.clock)


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "events.db")


@pytest.fixture
async def store(db_path: str) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(db_path, clock=ManualClock())
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message
    return message


# -- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(("synchronous", "level"), [("FULL", 2), ("normal", 1)])
async def test_wal_and_synchronous_on_every_connection(db_path: str, synchronous: str, level: int) -> None:
    store = SQLiteStore(db_path, synchronous=synchronous)
    await store.open()
    try:
        for conn in (store._writer, store._reader):
            assert conn is not None
            assert await (await conn.execute("PRAGMA journal_mode")).fetchone() == ("wal",)
            assert await (await conn.execute("PRAGMA synchronous")).fetchone() == (level,)
    finally:
        await store.close()
    with sqlite3.connect(db_path) as plain:  # WAL is a property of the file
        assert plain.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    plain.close()


async def test_default_is_synchronous_full(db_path: str) -> None:
    store = SQLiteStore(db_path)
    await store.open()
    try:
        assert store._writer is not None
        assert await (await store._writer.execute("PRAGMA synchronous")).fetchone() == (2,)
    finally:
        await store.close()


async def test_gathered_appends_commit_as_one_batch(store: SQLiteStore) -> None:
    batches: list[list[Event]] = []

    async def listener(events: list[Event]) -> None:
        batches.append(events)

    store.commit_listeners.append(listener)
    await store.append(to("taken"))
    batches.clear()
    results = await asyncio.gather(
        *(store.append(to(f"s{i}")) for i in range(20)),
        store.append(to("taken", expected=NO_STREAM)),
        return_exceptions=True,
    )
    assert isinstance(results[-1], WrongExpectedVersion)
    assert len(batches) == 1 and len(batches[0]) == 20


# -- corruption -------------------------------------------------------------------------


def _flip_byte_in_file(path: str, marker: bytes) -> None:
    raw = bytearray(Path(path).read_bytes())
    assert raw.count(marker) == 1, "the payload should be stored once, in its table page"
    raw[raw.index(marker) + len(marker) // 2] ^= 0x01
    Path(path).write_bytes(bytes(raw))


def _update(path: str, sql: str, *params: object) -> None:
    conn = sqlite3.connect(path)
    try:
        with conn:
            assert conn.execute(sql, params).rowcount == 1
    finally:
        conn.close()


@pytest.mark.parametrize("damage", ["data-byte-in-file", "type", "recorded_at", "prev_hash", "hash"])
async def test_a_changed_event_is_reported_at_its_position(db_path: str, damage: str) -> None:
    marker = b"payload-of-the-seventh-event"
    store = SQLiteStore(db_path, clock=ManualClock())
    await store.open()
    for i in range(1, 13):
        await store.append(to(f"s{i % 3}", new("E", marker if i == 7 else f"event {i}".encode())))
    victim = await store.read_event(7)
    assert victim is not None
    await store.close()
    assert not os.path.exists(db_path + "-wal"), "closing checkpoints the WAL into the file"

    if damage == "data-byte-in-file":
        _flip_byte_in_file(db_path, marker)
    elif damage == "type":
        _update(db_path, "UPDATE events SET type = 'F' WHERE position = 7")
    elif damage == "recorded_at":
        _update(db_path, "UPDATE events SET recorded_at = recorded_at + 1 WHERE position = 7")
    elif damage == "prev_hash":
        _update(db_path, "UPDATE events SET prev_hash = ? WHERE position = 7", bytes(32))
    else:
        _update(db_path, "UPDATE events SET hash = ? WHERE position = 7", bytes(32))

    store = SQLiteStore(db_path, clock=ManualClock())
    await store.open()
    try:
        reads = [
            store.read_event(7),
            store.read_all(),
            store.read_all(6, 1),
            store.read_stream(victim.stream),
            store.read_stream(victim.stream, -1, backward=True),
        ]
        for read in reads:
            with pytest.raises(StoreCorrupt) as info:
                await read
            assert info.value.position == 7
            assert "7" in _one_line(info.value)
        assert (await store.read_event(6)) is not None
        assert len(await store.read_all(7)) == 5
        result = await verify(store.iter_all(check=False))
        assert result.broken_at == 7, (result.broken_at, result.reason)
    finally:
        await store.close()


async def _assert_open_fails(path: str, error: type[Exception]) -> str:
    before = set(threading.enumerate())
    store = SQLiteStore(path)
    with pytest.raises(error) as info:
        await store.open()
    # a half-opened connection must not keep its worker thread (the process would hang);
    # only threads this open started count, others may come and go meanwhile
    for _ in range(100):
        if not set(threading.enumerate()) - before:
            break
        await asyncio.sleep(0.01)
    assert not set(threading.enumerate()) - before
    with pytest.raises(StoreUnavailable):
        await store.append(to("s"))
    return _one_line(info.value)


@pytest.mark.parametrize(
    "content",
    [b"this is not a database\n" * 300, b"SQLite format 3\x00" + bytes(range(256)) * 16],
    ids=["text", "bad-header"],
)
async def test_a_file_that_is_not_a_database(db_path: str, content: bytes) -> None:
    Path(db_path).write_bytes(content)
    message = await _assert_open_fails(db_path, StoreCorrupt)
    assert "corrupt" in message
    assert Path(db_path).read_bytes() == content, "the store must not overwrite what it cannot read"


async def test_a_missing_directory_is_unavailable(tmp_path: Path) -> None:
    message = await _assert_open_fails(str(tmp_path / "no" / "such" / "dir" / "events.db"), StoreUnavailable)
    assert "open" in message


# -- read-only --------------------------------------------------------------------------

_OPEN_AND_APPEND = """
import asyncio, json, sys
from eventhub.events import NewEvent, StreamAppend
from eventhub.store.sqlite import SQLiteStore

async def main() -> None:
    store = SQLiteStore(sys.argv[1])
    try:
        await store.open()
    except Exception as exc:
        print(json.dumps({"at": "open", "error": type(exc).__name__, "message": str(exc)}))
        return
    try:
        await store.append(StreamAppend("s", [NewEvent("E")]))
        print(json.dumps({"at": "append", "error": None, "message": ""}))
    except Exception as exc:
        print(json.dumps({"at": "append", "error": type(exc).__name__, "message": str(exc)}))
    finally:
        await store.close()

asyncio.run(main())
"""


def _without_override(argv: list[str]) -> list[str]:
    """Run `argv` so that file modes bind it, as they bind any user but root.

    Root ignores file modes through two capabilities; dropping them (setpriv, util-linux)
    leaves a process that is still the files' owner, so a 0444 file is read-only to it
    for real, as it is to the service's user in production.
    """
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and setpriv is missing: root would ignore the read-only mode")
    drop = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}", *argv]


@pytest.mark.parametrize("folder_writable", [True, False], ids=["folder-rw", "folder-ro"])
async def test_a_read_only_file_is_unavailable_at_open(tmp_path: Path, folder_writable: bool) -> None:
    path = tmp_path / "events.db"
    store = SQLiteStore(str(path))
    await store.open()
    await store.append(to("s"))
    await store.close()
    path.chmod(0o444)
    if not folder_writable:
        tmp_path.chmod(0o555)
    try:
        done = subprocess.run(
            _without_override([sys.executable, "-c", _OPEN_AND_APPEND, str(path)]),
            capture_output=True,
            text=True,
            timeout=30,  # a leaked connection thread would keep the child alive: fail, not hang
            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"},
        )
    finally:
        tmp_path.chmod(0o755)
        path.chmod(0o644)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert outcome["at"] == "open" and outcome["error"] == "StoreUnavailable", outcome
    assert "read-only" in outcome["message"] and "\n" not in outcome["message"]
    check = SQLiteStore(str(path))
    await check.open()
    try:
        assert len(await assert_log_sound(check)) == 1
    finally:
        await check.close()


# -- locked -----------------------------------------------------------------------------


async def test_a_locked_database_makes_appends_unavailable(db_path: str) -> None:
    store = SQLiteStore(db_path, clock=ManualClock(), busy_timeout_ms=100)
    await store.open()
    try:
        await store.append(to("s"))
        other = sqlite3.connect(db_path, isolation_level=None, timeout=0)
        try:
            other.execute("BEGIN EXCLUSIVE")
            started = time.monotonic()
            results = await asyncio.gather(*(store.append(to(f"t{i}")) for i in range(3)), return_exceptions=True)
            assert time.monotonic() - started < 3
            for result in results:
                assert isinstance(result, StoreUnavailable), result
                assert "locked" in _one_line(result)
            assert len(await store.read_all()) == 1  # readers are not blocked in WAL mode
            with pytest.raises(StoreUnavailable):
                await store.purge([1])
        finally:
            other.execute("ROLLBACK")
            other.close()
        [event] = await store.append(to("s", expected=0))
        assert event.position == 2
        assert len(await assert_log_sound(store)) == 2
    finally:
        await store.close()


async def test_opening_a_database_locked_before_its_schema_exists(db_path: str) -> None:
    other = sqlite3.connect(db_path, isolation_level=None, timeout=0)
    try:
        other.execute("BEGIN EXCLUSIVE")
        other.execute("CREATE TABLE unrelated (x)")
        store = SQLiteStore(db_path, busy_timeout_ms=100)
        with pytest.raises(StoreUnavailable) as info:
            await store.open()
        assert "locked" in _one_line(info.value)
        await store.close()
    finally:
        other.execute("ROLLBACK")
        other.close()


# -- two writers on one file ------------------------------------------------------------


async def test_two_stores_on_one_file_stay_consistent(db_path: str) -> None:
    """Two processes on one file: each store's cached head and versions go stale."""
    a = SQLiteStore(db_path, clock=ManualClock())
    b = SQLiteStore(db_path, clock=ManualClock())
    await a.open()
    await b.open()
    try:
        await a.append(to("s", expected=NO_STREAM))
        with pytest.raises(WrongExpectedVersion) as info:
            await b.append(to("s", expected=NO_STREAM))
        assert info.value.actual == 0
        [e1] = await b.append(to("s", expected=0))
        with pytest.raises(WrongExpectedVersion) as info:
            await a.append(to("s", expected=0))  # a's cache still says 0
        assert info.value.actual == 1
        for i in range(10):
            writer = (a, b)[i % 2]
            await asyncio.gather(*(writer.append(to(f"w{i}.{j}")) for j in range(3)))
        for _ in range(10):  # both writers at once: a retried decision must not collide again
            await asyncio.gather(*(store.append(to("shared")) for store in (a, b) for _ in range(5)))
        for store in (a, b):
            events = await assert_log_sound(store)
            assert len(events) == 2 + 30 + 100
            assert events[1] == e1
    finally:
        await a.close()
        await b.close()
