"""Failing commits: the k-th commit of a real SQLite store fails with an I/O error or a
full disk, for every k up to 20.

`FailingCommits` wraps the store's real writer connection and fails one commit the way
SQLite reports it (`sqlite3.OperationalError` carrying `SQLITE_IOERR` / `SQLITE_FULL`),
either with the transaction still open or after SQLite rolled it back itself. A batch the
store writes as one INSERT in autocommit mode commits in that statement, so that
statement counts as a commit too. Nothing
else is mocked. The callers of that commit must get the error, nothing of it may be
visible, later appends must work, the chain must verify and the file must pass
`PRAGMA integrity_check`. One more case fills the database for real (`max_page_count`).
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from eventhub.clock import ManualClock
from eventhub.errors import StoreFull, StoreUnavailable
from eventhub.events import NO_STREAM, Event
from eventhub.store.base import Snapshot
from eventhub.store.sqlite import SQLiteStore
from tests.store.contract import assert_log_sound, new, to

_COMMIT_SQL = re.compile(r"\s*(COMMIT|END)\b", re.IGNORECASE)
_INSERT_SQL = re.compile(r"\s*INSERT\b", re.IGNORECASE)
_ERRORS = {
    "ioerr": (sqlite3.SQLITE_IOERR, "SQLITE_IOERR", "disk I/O error"),
    "full": (sqlite3.SQLITE_FULL, "SQLITE_FULL", "database or disk is full"),
}


class FailingCommits:
    """Fails the `fail_at`-th real commit of `store`'s writer connection.

    `rolled_back` says whether SQLite already rolled the transaction back when it
    reports the error (it does for some I/O errors) or left it open.
    """

    def __init__(self, store: SQLiteStore, fail_at: int, error: str, rolled_back: bool) -> None:
        conn = store._writer
        assert conn is not None
        self.conn = conn
        self.fail_at = fail_at
        self.code, self.name, self.message = _ERRORS[error]
        self.rolled_back = rolled_back
        self.commits = 0
        self.failed = 0
        real_commit: Callable[[], Awaitable[None]] = conn.commit
        real_execute: Callable[..., Any] = conn.execute

        async def commit() -> None:
            await self._before_commit()
            await real_commit()

        def execute(sql: str, *args: Any, **kwargs: Any) -> Any:
            autocommit = bool(_INSERT_SQL.match(sql)) and not conn.in_transaction
            if not (_COMMIT_SQL.match(sql) or autocommit):
                return real_execute(sql, *args, **kwargs)

            async def run() -> Any:
                await self._before_commit(autocommit)
                return await real_execute(sql, *args, **kwargs)

            return run()

        conn.commit = commit  # type: ignore[method-assign]
        conn.execute = execute  # type: ignore[method-assign]

    async def _before_commit(self, autocommit: bool = False) -> None:
        if not (autocommit or self.conn.in_transaction):
            return  # nothing to commit: sqlite3 does nothing either
        self.commits += 1
        if self.commits != self.fail_at:
            return
        self.failed += 1
        if self.rolled_back:
            await self.conn.rollback()
        exc = sqlite3.OperationalError(self.message)
        exc.sqlite_errorcode = self.code
        exc.sqlite_errorname = self.name
        raise exc


def _integrity_check(path: str) -> list[tuple[str]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()


@pytest.mark.parametrize("rolled_back", [False, True], ids=["open", "rolled-back"])
@pytest.mark.parametrize("error", ["ioerr", "full"])
@pytest.mark.parametrize("k", range(1, 21))
async def test_kth_commit_fails(tmp_path: Path, k: int, error: str, rolled_back: bool) -> None:
    path = str(tmp_path / "events.db")
    store = SQLiteStore(path, clock=ManualClock())
    await store.open()
    heard: list[Event] = []

    async def listener(events: list[Event]) -> None:
        heard.extend(events)

    store.commit_listeners.append(listener)
    fault = FailingCommits(store, k, error, rolled_back)
    account_version = -1
    pending_key: tuple[str, str] | None = None  # a keyed call that failed, to retry as is
    acked: list[Event] = []
    failed_streams: list[str] = []
    errors: list[BaseException] = []
    keyed_failures = 0
    snapshot_rounds: list[int] = []

    for round_no in range(25):
        key, keyed_stream = pending_key or (f"key-{round_no}", f"keyed-{round_no}")
        calls: list[Awaitable[list[Event] | None]] = [
            store.append(to("account", new("Moved", str(round_no).encode()), expected=account_version)),
            store.append(to(keyed_stream, new("Keyed"), expected=NO_STREAM), idempotency_key=key),
            store.append(to(f"once-{round_no}", new("Once"), new("Twice")), to("shared")),
        ]
        if round_no % 4 == 3:
            calls.append(store.save_snapshot(Snapshot("p", 1, round_no, str(round_no).encode())))
        results = await asyncio.gather(*calls, return_exceptions=True)
        pending_key = None
        for i, result in enumerate(results):
            if isinstance(result, BaseException):
                errors.append(result)
                if i == 1:
                    pending_key = (key, keyed_stream)
                    keyed_failures += 1
                elif i == 2:
                    failed_streams.append(f"once-{round_no}")
            elif isinstance(result, list):
                acked += result
            elif i == 3:
                snapshot_rounds.append(round_no)
        if not isinstance(results[0], BaseException):
            account_version += 1
        [alone] = await asyncio.gather(store.append(to("alone", new("Alone"))), return_exceptions=True)
        if isinstance(alone, BaseException):  # a batch of its own: one INSERT, autocommitted
            errors.append(alone)
        else:
            acked += alone

    assert fault.failed == 1, "the k-th commit happened and failed"
    assert errors, "the failed commit's callers got its error"
    for exc in errors:
        assert isinstance(exc, StoreUnavailable)
        assert isinstance(exc, StoreFull) == (error == "full"), exc
        assert "\n" not in str(exc)

    events = await assert_log_sound(store)
    assert sorted(acked, key=lambda e: e.position) == events, "every acknowledged event, once, and nothing else"
    assert heard == events, "listeners never hear of a failed commit"
    for stream in failed_streams:
        assert await store.stream_version(stream) == -1
    assert [e.version for e in await store.read_stream("account")] == list(range(account_version + 1))
    assert len([e for e in events if e.stream.startswith("keyed-")]) == 25 - keyed_failures
    assert len(snapshot_rounds) >= 5
    assert await store.load_snapshot("p") == Snapshot("p", 1, snapshot_rounds[-1], str(snapshot_rounds[-1]).encode())

    [after] = await store.append(to("after"))
    assert after.position == len(events) + 1
    await store.close()
    assert _integrity_check(path) == [("ok",)]

    store = SQLiteStore(path, clock=ManualClock())
    await store.open()
    try:
        assert await assert_log_sound(store) == [*events, after]
    finally:
        await store.close()


async def test_a_really_full_database(tmp_path: Path) -> None:
    """No injection: SQLite's own page limit fills the database mid-append."""
    path = str(tmp_path / "events.db")
    store = SQLiteStore(path, clock=ManualClock())
    await store.open()
    try:
        before = await store.append(to("small", new("E", b"x" * 100)))
        assert store._writer is not None
        [(pages,)] = await store._writer.execute_fetchall("PRAGMA page_count")
        await store._writer.execute(f"PRAGMA max_page_count = {pages + 2}")
        big = [new("Big", bytes([i]) * 4000) for i in range(20)]
        results = await asyncio.gather(
            store.append(to("big", *big)),
            store.append(to("big2", *big)),
            return_exceptions=True,
        )
        for result in results:
            assert isinstance(result, StoreFull), result
            assert "full" in str(result)
        assert await assert_log_sound(store) == before
        await store._writer.execute("PRAGMA max_page_count = 1073741823")
        written = await store.append(to("big", *big))
        assert [e.position for e in written] == list(range(2, 22))
        await assert_log_sound(store)
    finally:
        await store.close()
    assert _integrity_check(path) == [("ok",)]
