"""SQLite backend: one file, WAL, `synchronous=FULL`, one group-committing writer."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiosqlite
import msgspec

from eventhub.chain import GENESIS, digest, encode_meta, event_hash
from eventhub.chain import hash_encode as _hash_encode
from eventhub.clock import Clock, SystemClock
from eventhub.errors import (
    EventhubError,
    IdempotencyConflict,
    StoreClosed,
    StoreCorrupt,
    StoreFull,
    StoreUnavailable,
    WrongExpectedVersion,
)
from eventhub.events import ANY, NO_STREAM, STREAM_EXISTS, Event, StreamAppend
from eventhub.store.base import EventStore, Snapshot

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
CREATE INDEX IF NOT EXISTS events_stream_time ON events (stream, recorded_at);
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
_COLUMNS = "position, stream, version, type, data, meta, recorded_at, digest, prev_hash, hash"
_INSERT = f"INSERT INTO events ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)"
_MAX_BATCH_JOBS = 2000
_VERSION_CACHE = 100_000

_decode_meta = msgspec.json.Decoder(dict[str, str]).decode
_fingerprint_encode = msgspec.msgpack.Encoder().encode


class _AppendJob:
    __slots__ = ("appends", "key", "fingerprint", "future")

    def __init__(self, appends: tuple[StreamAppend, ...], key: str | None, future: asyncio.Future[list[Event]]):
        self.appends = appends
        self.key = key
        self.fingerprint = _fingerprint(appends) if key is not None else b""
        self.future = future


class _OpJob:
    __slots__ = ("op", "future")

    def __init__(self, op: Callable[[], Awaitable[Any]], future: asyncio.Future[Any]):
        self.op = op
        self.future = future


def _fingerprint(appends: tuple[StreamAppend, ...]) -> bytes:
    return hashlib.sha256(
        _fingerprint_encode(
            [
                (a.stream, a.expected, [(e.type, digest(e.data), encode_meta(e.meta)) for e in a.events])
                for a in appends
            ]
        )
    ).digest()


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
        self._queue: asyncio.Queue[_AppendJob | _OpJob | None] = asyncio.Queue()
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
            # The writer lets sqlite3 open each write transaction (BEGIN IMMEDIATE) inside
            # the statement that needs it: one thread round trip fewer per commit.
            self._writer = await self._connect("IMMEDIATE")
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
                _fail(job.future, StoreClosed("store closed"))
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
        if len({a.stream for a in appends}) != len(appends):
            raise ValueError("a stream may appear only once per append call")
        future: asyncio.Future[list[Event]] = asyncio.get_running_loop().create_future()
        self._submit(_AppendJob(appends, idempotency_key, future))
        return await future

    async def purge(self, positions: Sequence[int]) -> int:
        if not positions:
            return 0

        async def op() -> int:
            assert self._writer is not None
            total = 0
            for chunk in _chunks(list(positions), 500):
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
        from eventhub.chain import ChainVerifier

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
            rows = [
                (e.position, e.stream, e.version, e.type, e.data, encode_meta(e.meta), e.recorded_at, e.digest, e.prev_hash, e.hash)
                for e in batch
            ]
            try:
                await self._writer.executemany(_INSERT, rows)
            except sqlite3.IntegrityError as exc:
                raise StoreCorrupt(f"imported events collide with stored ones: {exc}") from exc

        await self._run_op(op)
        # The writer caches head, last hash and stream versions; the import moved them.
        await self._run_op(self._reload_head)

    async def _run_op(self, op: Callable[[], Awaitable[T]]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._submit(_OpJob(op, future))
        return await future

    def _submit(self, job: _AppendJob | _OpJob) -> None:
        if self._task is None or self._closing:
            raise StoreClosed("store is not open")
        self._queue.put_nowait(job)

    async def _run_writer(self) -> None:
        pending: _AppendJob | _OpJob | None = None
        while True:
            job = pending if pending is not None else await self._queue.get()
            pending = None
            if job is None:
                return
            if isinstance(job, _OpJob):
                await self._run_op_job(job)
                continue
            batch = [job]
            while len(batch) < _MAX_BATCH_JOBS and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if not isinstance(nxt, _AppendJob):
                    pending = nxt
                    break
                batch.append(nxt)
            try:
                await self._commit(batch)
            except Exception as exc:  # the writer must outlive any one batch
                log.exception("writer failed a batch")
                for j in batch:
                    if not j.future.done():
                        _fail(j.future, exc)
            if pending is None and self._closing and self._queue.empty():
                return

    async def _run_op_job(self, job: _OpJob) -> None:
        assert self._writer is not None
        try:
            try:
                result = await job.op()
                await self._writer.commit()
            except BaseException:
                await self._rollback()
                raise
        except sqlite3.Error as exc:
            _fail(job.future, translate(exc))
        except Exception as exc:
            _fail(job.future, exc)
        else:
            _resolve(job.future, result)

    async def _rollback(self) -> None:
        assert self._writer is not None
        try:
            await self._writer.rollback()
        except sqlite3.Error:
            pass  # no transaction left to roll back (SQLite may have rolled back itself)

    async def _commit(self, batch: list[_AppendJob], retry: bool = True) -> None:
        """Commit a batch in one transaction; answer every job of it.

        Head, last hash and stream versions come from this writer's cache, not from a
        query: the unique keys on position and (stream, version) turn a stale cache
        (another process wrote) into an IntegrityError, after which the cache is
        reloaded and the jobs are retried one by one.
        """
        assert self._writer is not None
        conn = self._writer
        try:
            if not retry:
                # Retrying after a collision: decide under the write lock this time, or
                # another process can commit between the reads and the insert again.
                await conn.execute("BEGIN IMMEDIATE")
                await self._reload_head()
            accepted, replays, refused = await self._decide(batch)
            rows = [row for _, _, job_rows in accepted for row in job_rows]
            if rows:
                await conn.executemany(_INSERT, rows)
                keyed = [(job.key, job.fingerprint, evs[0].position, evs[-1].position) for job, evs, _ in accepted if job.key and evs]
                if keyed:
                    await conn.executemany("INSERT INTO idempotency (key, fingerprint, first, last) VALUES (?,?,?,?)", keyed)
                await conn.commit()
            elif conn.in_transaction:
                await conn.rollback()
        except sqlite3.Error as exc:
            await self._rollback()
            await self._reload_head()
            if isinstance(exc, sqlite3.IntegrityError) and retry:
                # Another process wrote, or one job collided: decide again, job by job.
                for job in batch:
                    await self._commit([job], retry=False)
                return
            err = translate(exc)
            for job in batch:
                if not job.future.done():
                    _fail(job.future, err)
            return
        except BaseException:
            await self._rollback()
            await self._reload_head()
            raise
        committed = [ev for _, evs, _ in accepted for ev in evs]
        if committed:
            last = committed[-1]
            self._head, self._last_hash, self._last_recorded = last.position, last.hash, last.recorded_at
            try:
                await self._notify_commit(committed)
            except Exception:  # the commit is durable; a listener's failure is not the caller's
                log.exception("commit listener failed at position %d", last.position)
        for job, evs, _ in accepted:
            _resolve(job.future, evs)
        for job, error in refused:
            _fail(job.future, error)
        for job, evs in replays:
            if not job.future.done():
                _resolve(job.future, evs)

    async def _decide(
        self, batch: list[_AppendJob]
    ) -> tuple[
        list[tuple[_AppendJob, list[Event], list[tuple[Any, ...]]]],
        list[tuple[_AppendJob, list[Event]]],
        list[tuple[_AppendJob, EventhubError]],
    ]:
        """Check versions and idempotency keys; build the rows of the accepted jobs.

        Returns the accepted jobs with their events and rows, the idempotent replays, and
        the refused jobs with their error; all are answered once the batch commits.
        """
        versions = await self._stream_versions({a.stream for job in batch for a in job.appends})
        known_keys = await self._known_keys([job.key for job in batch if job.key])
        batch_keys: dict[str, tuple[_AppendJob, list[Event]]] = {}
        accepted: list[tuple[_AppendJob, list[Event], list[tuple[Any, ...]]]] = []
        replays: list[tuple[_AppendJob, list[Event]]] = []
        refused: list[tuple[_AppendJob, EventhubError]] = []
        position, prev_hash = self._head, self._last_hash
        now = max(self.clock.now(), self._last_recorded)
        sha256 = hashlib.sha256
        # metas are often one shared dict per batch; ids are stable while the batch lives
        meta_cache: dict[int, bytes] = {}
        for job in batch:
            if job.key:
                if job.key in known_keys:
                    fingerprint, first, last = known_keys[job.key]
                    if fingerprint != job.fingerprint:
                        refused.append((job, IdempotencyConflict(job.key)))
                    else:
                        replays.append((job, await self._read_range(first, last)))
                    continue
                if job.key in batch_keys:
                    original, evs = batch_keys[job.key]
                    if original.fingerprint != job.fingerprint:
                        refused.append((job, IdempotencyConflict(job.key)))
                    else:
                        replays.append((job, evs))
                    continue
            error: EventhubError | None = None
            for a in job.appends:
                actual = versions.get(a.stream, -1)
                if not _matches(a.expected, actual):
                    error = WrongExpectedVersion(a.stream, a.expected, actual)
                    break
            if error is not None:
                refused.append((job, error))
                continue
            events: list[Event] = []
            rows: list[tuple[Any, ...]] = []
            for a in job.appends:
                stream = a.stream
                version = versions.get(stream, -1)
                for new in a.events:
                    # the hot loop of every append: what chain.event_hash does, inlined
                    position += 1
                    version += 1
                    data, meta, type_ = new.data, new.meta, new.type
                    meta_bytes = meta_cache.get(id(meta))
                    if meta_bytes is None:
                        meta_bytes = meta_cache[id(meta)] = encode_meta(meta)
                    d = sha256(data).digest()
                    h = sha256(_hash_encode((prev_hash, position, stream, version, type_, meta_bytes, now, d))).digest()
                    rows.append((position, stream, version, type_, data, meta_bytes, now, d, prev_hash, h))
                    events.append(Event(position, stream, version, type_, data, meta, now, d, prev_hash, h))
                    prev_hash = h
                versions[stream] = version
            if job.key:
                batch_keys[job.key] = (job, events)
            accepted.append((job, events, rows))
        self._remember_versions(versions)
        return accepted, replays, refused

    async def _stream_versions(self, streams: set[str]) -> dict[str, int]:
        assert self._writer is not None
        versions = {s: self._versions[s] for s in streams if s in self._versions}
        missing = [s for s in streams if s not in versions]
        for chunk in _chunks(missing, 500):
            marks = ",".join("?" * len(chunk))
            async with self._writer.execute(
                f"SELECT stream, MAX(version) FROM events WHERE stream IN ({marks}) GROUP BY stream", chunk
            ) as cur:
                for stream, version in await cur.fetchall():
                    versions[stream] = version
        return versions

    def _remember_versions(self, versions: dict[str, int]) -> None:
        # Cached tentatively; a failed commit reloads and clears the cache.
        if len(self._versions) > _VERSION_CACHE:
            self._versions.clear()
        self._versions.update(versions)

    async def _known_keys(self, keys: list[str]) -> dict[str, tuple[bytes, int, int]]:
        assert self._writer is not None
        known: dict[str, tuple[bytes, int, int]] = {}
        for chunk in _chunks(keys, 500):
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
            f"SELECT {_COLUMNS} FROM events WHERE position BETWEEN ? AND ? ORDER BY position", (first, last)
        ) as cur:
            return [_row_event(r, True) for r in await cur.fetchall()]

    # -- reading ----------------------------------------------------------------------

    async def _query(self, sql: str, params: Sequence[Any], check: bool = True) -> list[Event]:
        if self._reader is None:
            raise StoreClosed("store is not open")
        try:
            # One thread hop per query: a cursor left open across an await keeps the
            # reader's snapshot, and reads overlapping that way never see new commits.
            rows = await self._reader.execute_fetchall(sql, params)
        except sqlite3.Error as exc:
            raise translate(exc) from exc
        return [_row_event(r, check) for r in rows]

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
        sql = f"SELECT {_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY position LIMIT ?"
        return await self._query(sql, params, check)

    async def read_stream(
        self, stream: str, from_version: int = 0, limit: int = 1000, *, backward: bool = False
    ) -> list[Event]:
        if backward:
            if from_version < 0:
                sql = f"SELECT {_COLUMNS} FROM events WHERE stream = ? ORDER BY version DESC LIMIT ?"
                return await self._query(sql, (stream, limit))
            sql = f"SELECT {_COLUMNS} FROM events WHERE stream = ? AND version <= ? ORDER BY version DESC LIMIT ?"
        else:
            sql = f"SELECT {_COLUMNS} FROM events WHERE stream = ? AND version >= ? ORDER BY version LIMIT ?"
        return await self._query(sql, (stream, from_version, limit))

    async def read_event(self, position: int) -> Event | None:
        events = await self._query(f"SELECT {_COLUMNS} FROM events WHERE position = ?", (position,))
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
            f"SELECT {_COLUMNS} FROM events WHERE stream = ? AND recorded_at >= ? "
            "ORDER BY recorded_at, version LIMIT 1",
            (stream, recorded_at),
        )
        return events[0] if events else None

    async def last_before(self, stream: str, recorded_at: int) -> Event | None:
        events = await self._query(
            f"SELECT {_COLUMNS} FROM events WHERE stream = ? AND recorded_at < ? "
            "ORDER BY recorded_at DESC, version DESC LIMIT 1",
            (stream, recorded_at),
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


def _resolve(future: asyncio.Future[T], value: T) -> None:
    if not future.done():  # a caller that was cancelled no longer waits
        future.set_result(value)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _matches(expected: int, actual: int) -> bool:
    if expected == ANY:
        return True
    if expected == STREAM_EXISTS:
        return actual >= 0
    if expected == NO_STREAM:
        return actual == -1
    return expected == actual


def _row_event(row: Any, check: bool) -> Event:
    position, stream, version, type_, data, meta_bytes, recorded_at, d, prev_hash, h = row
    if check:
        if data is not None and hashlib.sha256(data).digest() != d:
            raise StoreCorrupt(f"event at position {position} is corrupt: data does not match its digest", position)
        if event_hash(prev_hash, position, stream, version, type_, meta_bytes, recorded_at, d) != h:
            raise StoreCorrupt(f"event at position {position} is corrupt: hash does not match its fields", position)
    try:
        meta = _decode_meta(meta_bytes)
    except (msgspec.DecodeError, TypeError):
        raise StoreCorrupt(f"event at position {position} is corrupt: unreadable meta", position) from None
    return Event(position, stream, version, type_, data, meta, recorded_at, d, prev_hash, h)


def _chunks(items: list[T], size: int) -> list[list[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
