"""PostgreSQL backend: several eventhub nodes share one log in one database (asyncpg)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias, TypeVar

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information

from eventhub.chain import GENESIS, ChainVerifier
from eventhub.clock import Clock, SystemClock
from eventhub.errors import EventhubError, StoreClosed, StoreCorrupt, StoreFull, StoreUnavailable
from eventhub.events import Event, StreamAppend
from eventhub.store.base import EventStore, Snapshot
from eventhub.store.batch import COLUMNS, AppendJob, OpJob, Row, decide, event_row, fail, resolve, row_event, run_writer
from eventhub.store.pg_listen import HeadListener

log = logging.getLogger(__name__)
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    position    bigint      PRIMARY KEY,
    stream      text        COLLATE "C" NOT NULL,
    version     bigint      NOT NULL,
    type        text        NOT NULL,
    data        bytea,
    meta        bytea       NOT NULL,
    recorded_at bigint      NOT NULL,
    digest      bytea       NOT NULL,
    prev_hash   bytea       NOT NULL,
    hash        bytea       NOT NULL,
    CONSTRAINT events_stream_version UNIQUE (stream, version)
);
CREATE INDEX IF NOT EXISTS events_stream_time ON events (stream, recorded_at);
CREATE TABLE IF NOT EXISTS idempotency (
    key         text        PRIMARY KEY,
    fingerprint bytea       NOT NULL,
    first       bigint      NOT NULL,
    last        bigint      NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    name        text        PRIMARY KEY,
    version     bigint      NOT NULL,
    position    bigint      NOT NULL,
    state       bytea       NOT NULL
);
"""
CHANNEL = "eventhub_commits"
# Advisory lock keys: fixed numbers, so that every node (and every version) agrees.
_APPEND_LOCK = int.from_bytes(hashlib.sha256(b"eventhub:append").digest()[:8], "big", signed=True)
_SCHEMA_LOCK = int.from_bytes(hashlib.sha256(b"eventhub:schema").digest()[:8], "big", signed=True)

# Every writing transaction takes the append lock first, and only then reads the head,
# the stream versions and the idempotency keys it decides against. Why a lock:
#
# - Commit order must equal position order, across nodes. A sequence would hand out
#   N+1 to B while A, holding N, is still in flight: a reader would see N+1 before N,
#   and a subscriber that moved past N+1 would never get N. Positions computed from the
#   head under one lock are committed strictly one transaction after the other, so the
#   committed log is always a gap-free prefix.
# - Without the lock, two nodes reading the same head would build the same positions
#   (and the same prev_hash) and one would fail on the primary key only after waiting
#   for the other's commit: a retry storm under load. With it, writers of different
#   nodes queue on the lock and each decides against the latest committed state, so
#   an expected-version conflict is reported as a conflict, not as a failed batch.
# - The head must be read in a statement that starts after the lock is granted. In
#   READ COMMITTED each statement takes a fresh snapshot, and PostgreSQL releases
#   transaction locks only after the commit is visible, so the next statement sees the
#   previous holder's rows. Under REPEATABLE READ (snapshot from the first statement)
#   or in the lock's own statement the head would be stale. Hence the explicit level.
#
# The lock is transaction-scoped (`pg_advisory_xact_lock`): it cannot outlive a
# rollback or a dropped connection, as a session lock could. It is per database, so
# two logs in two databases do not contend.
_BEGIN_LOCKED = f"BEGIN ISOLATION LEVEL READ COMMITTED; SELECT pg_advisory_xact_lock({_APPEND_LOCK})"
_LOCK = f"SELECT pg_advisory_xact_lock({_APPEND_LOCK})"
_HEAD = "SELECT position, hash, recorded_at FROM events ORDER BY position DESC LIMIT 1"
_INSERT = (
    f"INSERT INTO events ({COLUMNS}) SELECT * FROM unnest("
    "$1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::bytea[], "
    "$6::bytea[], $7::bigint[], $8::bytea[], $9::bytea[], $10::bytea[])"
)
# One index probe per stream (max over the unique index), not a scan of long streams.
_VERSIONS = "SELECT s, (SELECT max(version) FROM events WHERE stream = s) FROM unnest($1::text[]) AS s"
_MAX_BATCH_JOBS = 2000
_VERSION_CACHE = 100_000

Conn: TypeAlias = asyncpg.Connection
Record: TypeAlias = asyncpg.Record
Op = Callable[[Conn], Awaitable[Any]]
# InternalClientError: asyncpg's protocol state after the server dropped the connection
# in the middle of an exchange ("another operation is in progress").
_DRIVER_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    asyncio.TimeoutError,
)
_CONNECTION_LOST = (
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.InterfaceError,
    ConnectionError,
)
_READ_ATTEMPTS = 3
# Errors that one job of a batch can cause; the others are retried without it.
_JOB_ERRORS = (asyncpg.IntegrityConstraintViolationError, asyncpg.exceptions.DataError)


def translate(exc: BaseException) -> EventhubError:
    """The store error for an asyncpg or OS error, with a one-line message."""
    if isinstance(exc, EventhubError):
        return exc
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, asyncpg.exceptions.DiskFullError):
        return StoreFull(f"database disk is full: {text}")
    if isinstance(exc, asyncpg.exceptions.InsufficientResourcesError):
        return StoreUnavailable(f"database is out of resources: {text}")
    if isinstance(exc, asyncpg.exceptions.ReadOnlySQLTransactionError):
        return StoreUnavailable(f"database is read-only: {text}")
    if isinstance(exc, (asyncpg.exceptions.DataCorruptedError, asyncpg.exceptions.IndexCorruptedError)):
        return StoreCorrupt(f"database is corrupt: {text}")
    if isinstance(exc, asyncpg.exceptions.InvalidCatalogNameError):
        return StoreUnavailable(f"database does not exist: {text}")
    if isinstance(exc, asyncpg.exceptions.InvalidAuthorizationSpecificationError):
        return StoreUnavailable(f"database refused the connection: {text}")
    if isinstance(exc, asyncpg.exceptions.LockNotAvailableError):
        return StoreUnavailable(f"database is locked: {text}")
    if isinstance(
        exc,
        (
            OSError,
            asyncio.TimeoutError,
            asyncpg.InterfaceError,
            asyncpg.exceptions.InternalClientError,
            asyncpg.exceptions.PostgresConnectionError,
            asyncpg.exceptions.OperatorInterventionError,
        ),
    ):
        return StoreUnavailable(f"database is unreachable: {text}")
    return StoreUnavailable(f"database error: {text}")


class PostgresStore(EventStore):
    backend = "postgres"

    def __init__(
        self,
        dsn: str,
        *,
        clock: Clock | None = None,
        pool_size: int = 4,
        listen: bool = True,
        keepalive: float = 5.0,
        connect_timeout: float = 10.0,
    ) -> None:
        super().__init__()
        self.dsn = dsn
        self.clock = clock or SystemClock()
        self.pool_size = pool_size
        self.listen = listen
        self.connect_timeout = connect_timeout
        self._conn: Conn | None = None
        self._pool: asyncpg.Pool | None = None
        self._queue: asyncio.Queue[AppendJob | OpJob[Any] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # The head as of this node's last commit; the version cache is valid only while
        # the head read under the lock still equals it (no other node wrote since).
        self._head = -1
        self._versions: dict[str, int] = {}
        # Head announcements to local listeners: `_announced` only grows, and is never
        # advanced past a commit of ours that is in flight (`_quiet` is clear meanwhile).
        self._announced = 0
        self._pending_head = 0
        self._announce_lock = asyncio.Lock()
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._head_signal = asyncio.Event()
        self._listener = HeadListener(
            self._connect, self._signal_head,
            channel=CHANNEL, keepalive=keepalive, errors=_DRIVER_ERRORS, describe=translate,
        )
        self._listen_task: asyncio.Task[None] | None = None
        self._dispatch_task: asyncio.Task[None] | None = None

    # -- life cycle -------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self._conn = await self._connect()
            async with self._conn.transaction():
                # Nodes starting together would race on CREATE ... IF NOT EXISTS.
                await self._conn.execute(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})")
                await self._conn.execute(_SCHEMA)
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=self.pool_size,
                timeout=self.connect_timeout,
                server_settings=_SERVER_SETTINGS,
            )
            if self.listen:
                await self._listener.start()
            head = await self._conn.fetchval("SELECT coalesce(max(position), 0) FROM events")
        except _DRIVER_ERRORS as exc:
            await self._close_connections()
            raise translate(exc) from exc
        self._announced = self._pending_head = int(head)
        self._forget()
        self._closing = False
        self._task = asyncio.create_task(self._run_writer(), name="postgres-writer")
        if self.listen:
            self._listen_task = asyncio.create_task(self._listener.run(), name="postgres-listener")
            self._dispatch_task = asyncio.create_task(self._run_dispatcher(), name="postgres-head-dispatch")

    async def _connect(self) -> Conn:
        conn: Conn = await asyncpg.connect(
            self.dsn, timeout=self.connect_timeout, server_settings=_SERVER_SETTINGS
        )
        return conn

    async def close(self) -> None:
        if self._task is not None:
            self._closing = True
            await self._queue.put(None)
            await self._task
            self._task = None
        self._closing = True
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job is not None and not job.future.done():
                fail(job.future, StoreClosed("store closed"))
        for task in (self._listen_task, self._dispatch_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._listen_task = self._dispatch_task = None
        await self._close_connections()

    async def _close_connections(self) -> None:
        await self._listener.close(self.connect_timeout)
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), self.connect_timeout)
            except _DRIVER_ERRORS:  # a dead server must not hang close
                conn.terminate()
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), self.connect_timeout)
            except _DRIVER_ERRORS:
                self._pool.terminate()
            self._pool = None

    @property
    def listener_pid(self) -> int | None:
        """The server process id of the LISTEN connection (for tests and diagnostics)."""
        return self._listener.pid

    @property
    def listen_reconnects(self) -> int:
        """How often the LISTEN connection was re-established."""
        return self._listener.reconnects

    # -- writing ----------------------------------------------------------------------

    async def append(self, *appends: StreamAppend, idempotency_key: str | None = None) -> list[Event]:
        if not appends:
            return []
        if len(appends) > 1 and len({a.stream for a in appends}) != len(appends):
            raise ValueError("a stream may appear only once per append call")
        for a in appends:
            # PostgreSQL text cannot hold NUL; refuse here rather than fail a whole batch.
            if "\x00" in a.stream or any("\x00" in e.type for e in a.events):
                raise ValueError(f"stream names and event types must not contain NUL: {a.stream!r}")
        job = AppendJob(appends, idempotency_key)
        self._submit(job)
        return await job.future

    async def purge(self, positions: Sequence[int]) -> int:
        if not positions:
            return 0

        async def op(conn: Conn) -> int:
            status = await conn.execute(
                "UPDATE events SET data = NULL WHERE position = ANY($1::bigint[]) AND data IS NOT NULL",
                list(positions),
            )
            return int(status.split()[-1])

        result: int = await self._run_op(op)
        return result

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        async def op(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO snapshots (name, version, position, state) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (name) DO UPDATE SET version = excluded.version, "
                "position = excluded.position, state = excluded.state",
                snapshot.name,
                snapshot.version,
                snapshot.position,
                snapshot.state,
            )

        await self._run_op(op)

    async def import_events(self, events: Sequence[Event]) -> None:
        batch = list(events)
        if not batch:
            return

        async def op(conn: Conn) -> None:
            await conn.execute(_LOCK)
            row = await conn.fetchrow(_HEAD)
            head, head_hash = (row[0], row[1]) if row else (0, GENESIS)
            verifier = ChainVerifier(head, head_hash)
            if not verifier.feed(batch):
                r = verifier.result
                raise StoreCorrupt(f"imported event does not continue the log at {r.broken_at}: {r.reason}", r.broken_at)
            try:
                await conn.execute(_INSERT, *_columns([event_row(e) for e in batch]))
            except asyncpg.IntegrityConstraintViolationError as exc:
                raise StoreCorrupt(f"imported events collide with stored ones: {exc}") from exc
            # Other nodes (and this one's head listeners) learn of the import like of a commit.
            await conn.execute(f"NOTIFY {CHANNEL}, '{batch[-1].position}'")

        await self._run_op(op)

    async def _run_op(self, op: Op) -> Any:
        job: OpJob[Any] = OpJob(op)
        self._submit(job)
        return await job.future

    def _submit(self, job: AppendJob | OpJob[Any]) -> None:
        if self._task is None or self._closing:
            raise StoreClosed("store is not open")
        self._queue.put_nowait(job)

    async def _writer_conn(self) -> Conn:
        if self._conn is None or self._conn.is_closed():
            self._conn = None
            self._conn = await self._connect()
            self._forget()
        return self._conn

    def _forget(self) -> None:
        self._head = -1
        self._versions.clear()

    async def _run_writer(self) -> None:
        await run_writer(self._queue, self._commit, self._run_op_job, lambda: self._closing, _MAX_BATCH_JOBS)

    async def _run_op_job(self, job: OpJob[Any]) -> None:
        try:
            conn = await self._writer_conn()
            await conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
            try:
                result = await job.op(conn)
                await conn.execute("COMMIT")
            except BaseException:
                await self._rollback(conn)
                raise
        except _DRIVER_ERRORS as exc:
            self._forget()
            fail(job.future, translate(exc))
        except Exception as exc:
            self._forget()
            fail(job.future, exc)
        else:
            resolve(job.future, result)

    async def _rollback(self, conn: Conn) -> None:
        if conn.is_closed():
            self._conn = None
            return
        try:
            await conn.execute("ROLLBACK")
        except _DRIVER_ERRORS:
            # A connection we cannot roll back is of no further use; the server aborts
            # its transaction (and frees the lock) when the socket goes.
            conn.terminate()
            self._conn = None

    async def _commit(self, batch: list[AppendJob]) -> None:
        """Commit a batch in one transaction; answer every job of it."""
        try:
            conn = await self._writer_conn()
        except _DRIVER_ERRORS as exc:
            err = translate(exc)
            for job in batch:
                fail(job.future, err)
            return
        committed: list[Event] = []
        try:
            await conn.execute(_BEGIN_LOCKED)
            row = await conn.fetchrow(_HEAD)
            head, last_hash, last_recorded = (row[0], row[1], row[2]) if row else (0, GENESIS, 0)
            if head != self._head:
                self._versions.clear()  # another node (or an import) wrote since our last commit
            versions = await self._stream_versions(conn, {a.stream for job in batch for a in job.appends})
            known_keys = await self._known_keys(conn, [job.key for job in batch if job.key])
            decision = decide(batch, versions, known_keys, head, last_hash, max(self.clock.now(), last_recorded))
            for job, first, last in decision.stored_replays:
                decision.replays.append((job, await self._read_range(conn, first, last)))
            committed = decision.events
            if committed:
                await conn.execute(_INSERT, *_columns(decision.rows))
                if decision.keys:
                    await conn.executemany(
                        "INSERT INTO idempotency (key, fingerprint, first, last) VALUES ($1, $2, $3, $4)", decision.keys
                    )
                # Delivered to every listening session at commit, in commit order. The
                # payload is the head only: NOTIFY payloads are capped at 8000 bytes, and
                # listeners read the events from the log anyway.
                self._quiet.clear()
                await conn.execute(f"NOTIFY {CHANNEL}, '{committed[-1].position}'; COMMIT")
            else:
                await conn.execute("COMMIT")
        except _DRIVER_ERRORS as exc:
            self._quiet.set()
            await self._rollback(conn)
            self._forget()
            if isinstance(exc, _JOB_ERRORS) and len(batch) > 1:
                # One job collided with something outside our view, or carried something
                # the server refused: the server rolled back, so isolate it and retry.
                for job in batch:
                    if not job.future.done():
                        await self._commit([job])
                return
            err = translate(exc)
            for job in batch:
                fail(job.future, err)
            return
        except BaseException:
            self._quiet.set()
            await self._rollback(conn)
            self._forget()
            raise
        try:
            if committed:
                self._head = committed[-1].position
                self._remember_versions(decision.versions)
                await self._announce_commit(committed)
        finally:
            self._quiet.set()
        decision.answer()

    async def _announce_commit(self, committed: list[Event]) -> None:
        async with self._announce_lock:
            first = committed[0].position
            if first - 1 > self._announced:
                # Other nodes committed right before us and their NOTIFY has not reached
                # us yet: tell head listeners first, so that nothing is skipped.
                self._announced = first - 1
                try:
                    await self._notify_head(first - 1)
                except Exception:
                    log.exception("head listener failed at position %d", first - 1)
            self._announced = max(self._announced, committed[-1].position)
            try:
                await self._notify_commit(committed)
            except Exception:  # the commit is durable; a listener's failure is not the caller's
                log.exception("commit listener failed at position %d", committed[-1].position)

    async def _stream_versions(self, conn: Conn, streams: set[str]) -> dict[str, int]:
        versions = {s: self._versions[s] for s in streams if s in self._versions}
        missing = [s for s in streams if s not in versions]
        if missing:
            for stream, version in await conn.fetch(_VERSIONS, missing):
                if version is not None:
                    versions[stream] = version
        return versions

    def _remember_versions(self, versions: dict[str, int]) -> None:
        # Only after a commit: a failed one calls `_forget` instead.
        if len(self._versions) > _VERSION_CACHE:
            self._versions.clear()
        self._versions.update(versions)

    async def _known_keys(self, conn: Conn, keys: list[str]) -> dict[str, tuple[bytes, int, int]]:
        if not keys:
            return {}
        rows = await conn.fetch("SELECT key, fingerprint, first, last FROM idempotency WHERE key = ANY($1::text[])", keys)
        return {key: (fingerprint, first, last) for key, fingerprint, first, last in rows}

    async def _read_range(self, conn: Conn, first: int, last: int) -> list[Event]:
        rows = await conn.fetch(f"SELECT {COLUMNS} FROM events WHERE position BETWEEN $1 AND $2 ORDER BY position", first, last)
        return [row_event(r, True) for r in rows]

    # -- hearing other nodes ----------------------------------------------------------

    def _signal_head(self, head: int) -> None:
        if head > self._pending_head:
            self._pending_head = head
            self._head_signal.set()

    async def _run_dispatcher(self) -> None:
        # Head listeners run under the announce lock, like commit listeners run in the
        # writer: they must not wait for an append of this store.
        while True:
            await self._head_signal.wait()
            self._head_signal.clear()
            while True:
                await self._quiet.wait()
                async with self._announce_lock:
                    if not self._quiet.is_set():
                        continue  # a commit of ours went in flight meanwhile; let it announce first
                    head = self._pending_head
                    if head > self._announced:
                        self._announced = head
                        try:
                            await self._notify_head(head)
                        except Exception:
                            log.exception("head listener failed at position %d", head)
                    break

    # -- reading ----------------------------------------------------------------------

    async def _fetch(self, sql: str, *args: Any) -> list[Record]:
        if self._pool is None:
            raise StoreClosed("store is not open")
        for attempt in range(_READ_ATTEMPTS):
            try:
                rows: list[Record] = await self._pool.fetch(sql, *args)
                return rows
            except _DRIVER_ERRORS as exc:
                if self._closing or self._pool is None:
                    raise StoreClosed("store closed") from exc
                # Reads are idempotent: a pooled connection the server dropped (restart,
                # pg_terminate_backend) is replaced by the pool on the next acquire.
                if attempt + 1 < _READ_ATTEMPTS and isinstance(exc, _CONNECTION_LOST):
                    continue
                raise translate(exc) from exc
        raise AssertionError("unreachable")

    async def _query(self, sql: str, *args: Any, check: bool = True) -> list[Event]:
        return [row_event(r, check) for r in await self._fetch(sql, *args)]

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
        params: list[Any] = [after]
        where = ["position > $1"]

        def param(value: Any, cast: str = "") -> str:
            params.append(value)
            return f"${len(params)}{cast}"

        if until is not None:
            where.append(f"position <= {param(until)}")
        if stream is not None:
            where.append(f"stream = {param(stream)}")
        if stream_prefix:
            where.append(f"starts_with(stream, {param(stream_prefix)})")
        if types:
            where.append(f"type = ANY({param(list(types), '::text[]')})")
        sql = f"SELECT {COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY position LIMIT {param(limit)}"
        return await self._query(sql, *params, check=check)

    async def read_stream(
        self, stream: str, from_version: int = 0, limit: int = 1000, *, backward: bool = False
    ) -> list[Event]:
        if backward:
            if from_version < 0:
                sql = f"SELECT {COLUMNS} FROM events WHERE stream = $1 ORDER BY version DESC LIMIT $2"
                return await self._query(sql, stream, limit)
            sql = f"SELECT {COLUMNS} FROM events WHERE stream = $1 AND version <= $2 ORDER BY version DESC LIMIT $3"
        else:
            sql = f"SELECT {COLUMNS} FROM events WHERE stream = $1 AND version >= $2 ORDER BY version LIMIT $3"
        return await self._query(sql, stream, from_version, limit)

    async def read_event(self, position: int) -> Event | None:
        events = await self._query(f"SELECT {COLUMNS} FROM events WHERE position = $1", position)
        return events[0] if events else None

    async def head(self) -> int:
        rows = await self._fetch("SELECT coalesce(max(position), 0) FROM events")
        return int(rows[0][0])

    async def stream_version(self, stream: str) -> int:
        rows = await self._fetch("SELECT coalesce(max(version), -1) FROM events WHERE stream = $1", stream)
        return int(rows[0][0])

    async def first_at_or_after(self, stream: str, recorded_at: int) -> Event | None:
        events = await self._query(
            f"SELECT {COLUMNS} FROM events WHERE stream = $1 AND recorded_at >= $2 "
            "ORDER BY recorded_at, version LIMIT 1",
            stream,
            recorded_at,
        )
        return events[0] if events else None

    async def last_before(self, stream: str, recorded_at: int) -> Event | None:
        events = await self._query(
            f"SELECT {COLUMNS} FROM events WHERE stream = $1 AND recorded_at < $2 "
            "ORDER BY recorded_at DESC, version DESC LIMIT 1",
            stream,
            recorded_at,
        )
        return events[0] if events else None

    async def load_snapshot(self, name: str) -> Snapshot | None:
        rows = await self._fetch("SELECT name, version, position, state FROM snapshots WHERE name = $1", name)
        return Snapshot(*rows[0]) if rows else None


_SERVER_SETTINGS = {"application_name": "eventhub", "jit": "off"}


def _columns(rows: list[Row]) -> list[list[Any]]:
    """Rows as the ten column arrays `_INSERT` unnests."""
    return [list(column) for column in zip(*rows)]
