"""SQLite backend: one file, WAL, `synchronous=FULL`, one group-committing writer."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import aiosqlite

from eventhub.chain import GENESIS, ChainVerifier
from eventhub.clock import Clock, SystemClock
from eventhub.errors import EventhubError, StoreClosed, StoreCorrupt, StoreFull, StoreUnavailable
from eventhub.events import Event, StreamAppend
from eventhub.store.base import EventStore, Snapshot
from eventhub.store.batch import COLUMNS, AppendJob, OpJob, chunks, decide, event_row, fail, resolve, row_event, run_writer

log = logging.getLogger(__name__)
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    position    INTEGER PRIMARY KEY,
    stream      TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    type        TEXT    NOT NULL,
    data        BLOB,
    meta        BLOB    NOT NULL,
    recorded_at INTEGER NOT NULL,
    digest      BLOB    NOT NULL,
    prev_hash   BLOB    NOT NULL,
    hash        BLOB    NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS events_stream_version ON events (stream, version);
DROP INDEX IF EXISTS events_stream_time;
CREATE TABLE IF NOT EXISTS idempotency (
    key         TEXT    PRIMARY KEY,
    fingerprint BLOB    NOT NULL,
    first       INTEGER NOT NULL,
    last        INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    name     TEXT    PRIMARY KEY,
    version  INTEGER NOT NULL,
    position INTEGER NOT NULL,
    state    BLOB    NOT NULL
);
"""
_INSERT = f"INSERT INTO events ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)"
# The first version of a stream recorded at or after :t, by binary search over versions
# (recorded_at never decreases along a stream): about 2 log2(n) lookups in the
# (stream, version) index. An index on (stream, recorded_at) would serve it directly, but
# appends touching many streams pay for it at every commit: each stream's entry dirties
# its own index page, which the commit writes to the WAL (about half the commit's time
# with 64 streams per batch, 2026-11-25).
_LOWER_BOUND = """
WITH RECURSIVE search(lo, hi) AS (
    SELECT 0, (SELECT COALESCE(MAX(version), -1) + 1 FROM events WHERE stream = :s)
    UNION ALL
    SELECT
        CASE WHEN (SELECT recorded_at FROM events WHERE stream = :s AND version = (lo + hi) / 2) >= :t
             THEN lo ELSE (lo + hi) / 2 + 1 END,
        CASE WHEN (SELECT recorded_at FROM events WHERE stream = :s AND version = (lo + hi) / 2) >= :t
             THEN (lo + hi) / 2 ELSE hi END
    FROM search WHERE lo < hi
)
SELECT lo FROM search WHERE lo >= hi
"""
_ROWS_PER_INSERT = 500  # 5,000 bound values per statement, well under SQLite's 32,766
_MAX_BATCH_JOBS = 2000
_VERSION_CACHE = 100_000

def translate(exc: BaseException) -> EventhubError:
    """The store error for a sqlite3 error, with a one-line message."""
    name = getattr(exc, "sqlite_errorname", "")
    text = str(exc)
    if name == "SQLITE_FULL" or "full" in text:
        return StoreFull(f"database or disk is full: {text}")
    if name in ("SQLITE_BUSY", "SQLITE_LOCKED") or "locked" in text:
        return StoreUnavailable(f"database is locked by another process: {text}")
    if name.startswith("SQLITE_READONLY") or "readonly" in text:
        return StoreUnavailable(f"database is read-only: {text}")
    if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or "not a database" in text or "malformed" in text:
        return StoreCorrupt(f"database file is corrupt: {text}")
    if name.startswith("SQLITE_CANTOPEN") or "unable to open" in text:
        return StoreUnavailable(f"cannot open database file: {text}")
    return StoreUnavailable(f"database error: {text}")


@functools.lru_cache(maxsize=_ROWS_PER_INSERT)
def _insert_rows(n: int) -> str:
    """One INSERT statement for `n` rows: the writer thread takes the GIL back once per
    statement it steps, so one statement per batch instead of one per row (`executemany`)."""
    return _INSERT + ",(?,?,?,?,?,?,?,?,?,?)" * (n - 1)


class SQLiteStore(EventStore):
    backend = "sqlite"

    def __init__(
        self, path: str, *, clock: Clock | None = None, synchronous: str = "FULL", busy_timeout_ms: int = 5000
    ) -> None:
        super().__init__()
        self.path = path
        self.clock = clock or SystemClock()
        self.synchronous = synchronous.upper()
        self.busy_timeout_ms = busy_timeout_ms
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[AppendJob | OpJob[Any] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._head = 0
        self._last_hash = GENESIS
        self._last_recorded = 0
        self._versions: dict[str, int] = {}

    # -- life cycle -------------------------------------------------------------------

    async def open(self) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise StoreUnavailable(f"cannot open database file: folder {folder} does not exist")
        try:
            # The writer opens its transactions itself (BEGIN IMMEDIATE), so that a batch
            # that fits one INSERT is one statement in autocommit mode: SQLite commits it,
            # fsync included, before the statement returns, one thread round trip in all.
            self._writer = await self._connect(None)
            await self._writer.executescript(_SCHEMA)
            # A read-only file (in a writable folder) opens and reads fine; a write that
            # changes nothing finds that out now, at start, not at the first append.
            await self._writer.execute("DELETE FROM snapshots WHERE 0")
            await self._writer.rollback()
            self._reader = await self._connect(None)
            await self._reload_head()
        except sqlite3.Error as exc:
            await self._close_connections()
            raise translate(exc) from exc
        self._closing = False
        self._task = asyncio.create_task(self._run_writer(), name=f"sqlite-writer:{self.path}")

    async def _connect(self, isolation_level: str | None) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=isolation_level)
        try:
            await conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            mode = await (await conn.execute("PRAGMA journal_mode = WAL")).fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot switch to WAL mode (got {mode})")
            await conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        except BaseException:
            # Not yet ours to close later (not a database, read-only): close it here, or
            # its worker thread (not a daemon) keeps the process alive after the error.
            try:
                await conn.close()
            except sqlite3.Error:
                log.warning("error closing %s", self.path, exc_info=True)
            raise
        return conn

    async def close(self) -> None:
        if self._task is not None:
            self._closing = True
            await self._queue.put(None)
            await self._task
            self._task = None
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job is not None and not job.future.done():
                fail(job.future, StoreClosed("store closed"))
        await self._close_connections()

    async def _close_connections(self) -> None:
        for conn in (self._reader, self._writer):
            if conn is not None:
                try:
                    await conn.close()
                except sqlite3.Error:  # closing a broken file must not hide the first error
                    log.warning("error closing %s", self.path, exc_info=True)
        self._reader = self._writer = None

    async def _reload_head(self) -> None:
        assert self._writer is not None
        row = await (
            await self._writer.execute("SELECT position, hash, recorded_at FROM events ORDER BY position DESC LIMIT 1")
        ).fetchone()
        self._head, self._last_hash, self._last_recorded = row if row else (0, GENESIS, 0)
        self._versions.clear()

    # -- writing ----------------------------------------------------------------------

    async def append(self, *appends: StreamAppend, idempotency_key: str | None = None) -> list[Event]:
        if not appends:
            return []
        if len(appends) > 1 and len({a.stream for a in appends}) != len(appends):
            raise ValueError("a stream may appear only once per append call")
        job = AppendJob(appends, idempotency_key)
        self._submit(job)
        return await job.future

    async def purge(self, positions: Sequence[int]) -> int:
        if not positions:
            return 0

        async def op() -> int:
            assert self._writer is not None
            total = 0
            for chunk in chunks(list(positions), 500):
                marks = ",".join("?" * len(chunk))
                cur = await self._writer.execute(
                    f"UPDATE events SET data = NULL WHERE position IN ({marks}) AND data IS NOT NULL", chunk
                )
                total += cur.rowcount
            return total

        return await self._run_op(op)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        async def op() -> None:
            assert self._writer is not None
            await self._writer.execute(
                "INSERT OR REPLACE INTO snapshots (name, version, position, state) VALUES (?,?,?,?)",
                (snapshot.name, snapshot.version, snapshot.position, snapshot.state),
            )

        await self._run_op(op)

    async def import_events(self, events: Sequence[Event]) -> None:
        batch = list(events)
        if not batch:
            return

        async def op() -> None:
            assert self._writer is not None
            if not self._writer.in_transaction:
                # Read the head inside the write transaction: nothing can land in between.
                await self._writer.execute("BEGIN IMMEDIATE")
            async with self._writer.execute("SELECT position, hash FROM events ORDER BY position DESC LIMIT 1") as cur:
                row = await cur.fetchone()
            verifier = ChainVerifier(row[0], row[1]) if row else ChainVerifier()
            if not verifier.feed(batch):
                r = verifier.result
                raise StoreCorrupt(f"imported event does not continue the log at {r.broken_at}: {r.reason}", r.broken_at)
            try:
                await self._writer.executemany(_INSERT, [event_row(e) for e in batch])
            except sqlite3.IntegrityError as exc:
                raise StoreCorrupt(f"imported events collide with stored ones: {exc}") from exc

        await self._run_op(op)
        # The writer caches head, last hash and stream versions; the import moved them.
        await self._run_op(self._reload_head)

    async def _run_op(self, op: Callable[[], Awaitable[T]]) -> T:
        job = OpJob(op)
        self._submit(job)
        return await job.future

    def _submit(self, job: AppendJob | OpJob[Any]) -> None:
        if self._task is None or self._closing:
            raise StoreClosed("store is not open")
        self._queue.put_nowait(job)

    async def _run_writer(self) -> None:
        await run_writer(self._queue, self._commit, self._run_op_job, lambda: self._closing, _MAX_BATCH_JOBS)

    async def _run_op_job(self, job: OpJob[Any]) -> None:
        assert self._writer is not None
        try:
            try:
                await self._writer.execute("BEGIN IMMEDIATE")
                result = await job.op()
                await self._writer.commit()
            except BaseException:
                await self._rollback()
                raise
        except sqlite3.Error as exc:
            fail(job.future, translate(exc))
        except Exception as exc:
            fail(job.future, exc)
        else:
            resolve(job.future, result)

    async def _rollback(self) -> None:
        assert self._writer is not None
        try:
            await self._writer.rollback()
        except sqlite3.Error:
            pass  # no transaction left to roll back (SQLite may have rolled back itself)

    async def _commit(self, batch: list[AppendJob], retry: bool = True) -> None:
        """Commit a batch in one transaction; answer every job of it once it is durable.

        Head, last hash and stream versions come from this writer's cache, not from a
        query: the unique keys on position and (stream, version) turn a stale cache
        (another process wrote) into an IntegrityError, after which the cache is
        reloaded and the jobs are decided again one by one.
        """
        assert self._writer is not None
        conn = self._writer
        try:
            if not retry:
                # Retrying after a collision: decide under the write lock this time, or
                # another process can commit between the reads and the insert again.
                await conn.execute("BEGIN IMMEDIATE")
                await self._reload_head()
            versions = await self._stream_versions({a.stream for job in batch for a in job.appends})
            known_keys = await self._known_keys([job.key for job in batch if job.key])
            now = max(self.clock.now(), self._last_recorded)
            decision = decide(batch, versions, known_keys, self._head, self._last_hash, now)
            for job, first, last in decision.stored_replays:
                decision.replays.append((job, await self._read_range(first, last)))
            if decision.rows:
                statements = chunks(decision.rows, _ROWS_PER_INSERT)
                alone = len(statements) == 1 and not decision.keys and not conn.in_transaction
                if not alone and not conn.in_transaction:
                    await conn.execute("BEGIN IMMEDIATE")
                for rows in statements:
                    await conn.execute(_insert_rows(len(rows)), [value for row in rows for value in row])
                if decision.keys:
                    await conn.executemany("INSERT INTO idempotency (key, fingerprint, first, last) VALUES (?,?,?,?)", decision.keys)
                if not alone:
                    await conn.commit()
            elif conn.in_transaction:
                await conn.rollback()
        except sqlite3.Error as exc:
            await self._rollback()
            await self._reload_head()
            if isinstance(exc, sqlite3.IntegrityError) and retry:
                for job in batch:
                    await self._commit([job], retry=False)
                return
            err = translate(exc)
            for job in batch:
                fail(job.future, err)
            return
        except BaseException:
            await self._rollback()
            await self._reload_head()
            raise
        committed = decision.events
        if committed:
            last_event = committed[-1]
            self._head, self._last_hash, self._last_recorded = last_event.position, last_event.hash, last_event.recorded_at
            self._remember_versions(decision.versions)
            try:
                await self._notify_commit(committed)
            except Exception:  # the commit is durable; a listener's failure is not the caller's
                log.exception("commit listener failed at position %d", last_event.position)
        decision.answer()

    async def _stream_versions(self, streams: set[str]) -> dict[str, int]:
        assert self._writer is not None
        versions = {s: self._versions[s] for s in streams if s in self._versions}
        missing = [s for s in streams if s not in versions]
        for chunk in chunks(missing, 500):
            marks = ",".join("?" * len(chunk))
            async with self._writer.execute(
                f"SELECT stream, MAX(version) FROM events WHERE stream IN ({marks}) GROUP BY stream", chunk
            ) as cur:
                for stream, version in await cur.fetchall():
                    versions[stream] = version
        return versions

    def _remember_versions(self, versions: dict[str, int]) -> None:
        if len(self._versions) > _VERSION_CACHE:
            self._versions.clear()
        self._versions.update(versions)

    async def _known_keys(self, keys: list[str]) -> dict[str, tuple[bytes, int, int]]:
        assert self._writer is not None
        known: dict[str, tuple[bytes, int, int]] = {}
        for chunk in chunks(keys, 500):
            marks = ",".join("?" * len(chunk))
            async with self._writer.execute(
                f"SELECT key, fingerprint, first, last FROM idempotency WHERE key IN ({marks})", chunk
            ) as cur:
                for key, fingerprint, first, last in await cur.fetchall():
                    known[key] = (fingerprint, first, last)
        return known

    async def _read_range(self, first: int, last: int) -> list[Event]:
        assert self._writer is not None
        async with self._writer.execute(
            f"SELECT {COLUMNS} FROM events WHERE position BETWEEN ? AND ? ORDER BY position", (first, last)
        ) as cur:
            return [row_event(r, True) for r in await cur.fetchall()]

    # -- reading ----------------------------------------------------------------------

    async def _query(self, sql: str, params: Sequence[Any] | Mapping[str, Any], check: bool = True) -> list[Event]:
        if self._reader is None:
            raise StoreClosed("store is not open")
        try:
            # One thread hop per query: a cursor left open across an await keeps the
            # reader's snapshot, and reads overlapping that way never see new commits.
            rows = await self._reader.execute_fetchall(sql, params)
        except sqlite3.Error as exc:
            raise translate(exc) from exc
        return [row_event(r, check) for r in rows]

    async def read_all(
        self,
        after: int = 0,
        limit: int = 1000,
        *,
        until: int | None = None,
        stream_prefix: str | None = None,
        stream: str | None = None,
        types: Sequence[str] | None = None,
        check: bool = True,
    ) -> list[Event]:
        where = ["position > ?"]
        params: list[Any] = [after]
        if until is not None:
            where.append("position <= ?")
            params.append(until)
        if stream is not None:
            where.append("stream = ?")
            params.append(stream)
        if stream_prefix:
            where.append("substr(stream, 1, ?) = ?")
            params += [len(stream_prefix), stream_prefix]
        if types:
            where.append(f"type IN ({','.join('?' * len(types))})")
            params += list(types)
        params.append(limit)
        sql = f"SELECT {COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY position LIMIT ?"
        return await self._query(sql, params, check)

    async def read_stream(
        self, stream: str, from_version: int = 0, limit: int = 1000, *, backward: bool = False
    ) -> list[Event]:
        if backward:
            if from_version < 0:
                sql = f"SELECT {COLUMNS} FROM events WHERE stream = ? ORDER BY version DESC LIMIT ?"
                return await self._query(sql, (stream, limit))
            sql = f"SELECT {COLUMNS} FROM events WHERE stream = ? AND version <= ? ORDER BY version DESC LIMIT ?"
        else:
            sql = f"SELECT {COLUMNS} FROM events WHERE stream = ? AND version >= ? ORDER BY version LIMIT ?"
        return await self._query(sql, (stream, from_version, limit))

    async def read_event(self, position: int) -> Event | None:
        events = await self._query(f"SELECT {COLUMNS} FROM events WHERE position = ?", (position,))
        return events[0] if events else None

    async def head(self) -> int:
        if self._reader is None:
            raise StoreClosed("store is not open")
        try:
            [row] = await self._reader.execute_fetchall("SELECT MAX(position) FROM events")
        except sqlite3.Error as exc:
            raise translate(exc) from exc
        return int(row[0]) if row and row[0] is not None else 0

    async def stream_version(self, stream: str) -> int:
        if self._reader is None:
            raise StoreClosed("store is not open")
        try:
            [row] = await self._reader.execute_fetchall("SELECT MAX(version) FROM events WHERE stream = ?", (stream,))
        except sqlite3.Error as exc:
            raise translate(exc) from exc
        return int(row[0]) if row and row[0] is not None else -1

    async def first_at_or_after(self, stream: str, recorded_at: int) -> Event | None:
        events = await self._query(
            f"SELECT {COLUMNS} FROM events WHERE stream = :s AND version = ({_LOWER_BOUND})",
            {"s": stream, "t": recorded_at},
        )
        return events[0] if events else None

    async def last_before(self, stream: str, recorded_at: int) -> Event | None:
        events = await self._query(
            f"SELECT {COLUMNS} FROM events WHERE stream = :s AND version = ({_LOWER_BOUND}) - 1",
            {"s": stream, "t": recorded_at},
        )
        return events[0] if events else None

    async def load_snapshot(self, name: str) -> Snapshot | None:
        if self._reader is None:
            raise StoreClosed("store is not open")
        try:
            rows = await self._reader.execute_fetchall(
                "SELECT name, version, position, state FROM snapshots WHERE name = ?", (name,)
            )
            row = next(iter(rows), None)
        except sqlite3.Error as exc:
            raise translate(exc) from exc
        return Snapshot(*row) if row else None

