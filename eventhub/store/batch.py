"""What every backend's writer shares: queued jobs, and the pure decision of a batch.

A writer takes the appends queued while its last commit was in flight, reads what the
decision needs (stream versions, known idempotency keys) inside its write transaction,
lets `decide` check expectations and build the events and rows, writes the rows,
commits, and only then answers every caller with `Decision.answer`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import msgspec

from eventhub.chain import digest, encode_meta, hash_encode
from eventhub.errors import EventhubError, IdempotencyConflict, StoreCorrupt, WrongExpectedVersion
from eventhub.events import ANY, NO_STREAM, STREAM_EXISTS, Event, StreamAppend

T = TypeVar("T")
log = logging.getLogger(__name__)
Row = tuple[int, str, int, str, bytes | None, bytes, int, bytes, bytes, bytes]
"""An event as stored: position, stream, version, type, data, meta (JSON bytes),
recorded_at, digest, prev_hash, hash."""

COLUMNS = "position, stream, version, type, data, meta, recorded_at, digest, prev_hash, hash"

_decode_meta = msgspec.json.Decoder(dict[str, str]).decode
_fingerprint_encode = msgspec.msgpack.Encoder().encode


class AppendJob:
    """One `append` call waiting for the writer."""

    __slots__ = ("appends", "key", "fingerprint", "future")

    def __init__(self, appends: tuple[StreamAppend, ...], key: str | None) -> None:
        self.appends = appends
        self.key = key
        self.fingerprint = fingerprint(appends) if key is not None else b""
        self.future: asyncio.Future[list[Event]] = asyncio.get_running_loop().create_future()


class OpJob(Generic[T]):
    """Any other write (purge, snapshot, import) the writer runs in its own transaction."""

    __slots__ = ("op", "future")

    def __init__(self, op: Callable[..., Awaitable[T]]) -> None:
        self.op = op
        self.future: asyncio.Future[T] = asyncio.get_running_loop().create_future()


def fingerprint(appends: tuple[StreamAppend, ...]) -> bytes:
    """What an idempotency key promises: these streams, expectations and events."""
    return hashlib.sha256(
        _fingerprint_encode(
            [
                (a.stream, a.expected, [(e.type, digest(e.data), encode_meta(e.meta)) for e in a.events])
                for a in appends
            ]
        )
    ).digest()


Job = AppendJob | OpJob[Any]


async def run_writer(
    queue: asyncio.Queue[Job | None],
    commit: Callable[[list[AppendJob]], Awaitable[None]],
    run_op: Callable[[OpJob[Any]], Awaitable[None]],
    closing: Callable[[], bool],
    max_jobs: int = 2000,
) -> None:
    """The group-commit loop of a backend's one writer task.

    Takes every append queued while the previous commit was in flight (up to
    `max_jobs`) and commits them as one batch; other writes run alone, in queue order.
    Returns at the `None` a closing store queues, or once closing and drained.
    """
    pending: Job | None = None
    while True:
        job = pending if pending is not None else await queue.get()
        pending = None
        if job is None:
            return
        if isinstance(job, OpJob):
            await run_op(job)
            continue
        batch = [job]
        while len(batch) < max_jobs and not queue.empty():
            nxt = queue.get_nowait()
            if not isinstance(nxt, AppendJob):
                pending = nxt
                break
            batch.append(nxt)
        try:
            await commit(batch)
        except Exception as exc:  # the writer must outlive any one batch
            log.exception("writer failed a batch")
            for j in batch:
                fail(j.future, exc)
        if pending is None and closing() and queue.empty():
            return


def resolve(future: asyncio.Future[T], value: T) -> None:
    if not future.done():  # a caller that was cancelled no longer waits
        future.set_result(value)


def fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def expected_matches(expected: int, actual: int) -> bool:
    if expected == ANY:
        return True
    if expected == STREAM_EXISTS:
        return actual >= 0
    if expected == NO_STREAM:
        return actual == -1
    return expected == actual


class Decision:
    """The outcome of deciding a batch, answered once the batch is durable."""

    def __init__(self) -> None:
        self.accepted: list[tuple[AppendJob, list[Event]]] = []
        self.rows: list[Row] = []
        self.keys: list[tuple[str, bytes, int, int]] = []  # idempotency rows to insert
        self.replays: list[tuple[AppendJob, list[Event]]] = []
        self.stored_replays: list[tuple[AppendJob, int, int]] = []  # positions to read back
        self.refused: list[tuple[AppendJob, EventhubError]] = []
        self.versions: dict[str, int] = {}  # stream versions once the batch commits

    @property
    def events(self) -> list[Event]:
        return [e for _, evs in self.accepted for e in evs]

    def answer(self) -> None:
        for job, evs in self.accepted:
            resolve(job.future, evs)
        for job, evs in self.replays:
            resolve(job.future, evs)
        for job, error in self.refused:
            fail(job.future, error)


def decide(
    batch: list[AppendJob],
    versions: dict[str, int],
    known_keys: dict[str, tuple[bytes, int, int]],
    head: int,
    prev_hash: bytes,
    now: int,
) -> Decision:
    """Check every job's expectations and key against the log and the jobs before it.

    `versions` holds the current version of every stream the batch touches (missing: no
    stream); `known_keys` the stored idempotency keys the batch uses, as (fingerprint,
    first, last). Accepted jobs get consecutive positions after `head`, chained from
    `prev_hash`, all recorded at `now`.
    """
    d = Decision()
    versions = dict(versions)
    in_batch: dict[str, tuple[AppendJob, list[Event]]] = {}
    position = head
    sha256 = hashlib.sha256
    meta_cache: dict[int, bytes] = {}  # metas are often one shared dict; ids live as long as the batch
    for job in batch:
        key = job.key
        if key:
            if key in known_keys:
                stored, first, last = known_keys[key]
                if stored != job.fingerprint:
                    d.refused.append((job, IdempotencyConflict(key)))
                else:
                    d.stored_replays.append((job, first, last))
                continue
            if key in in_batch:
                original, evs = in_batch[key]
                if original.fingerprint != job.fingerprint:
                    d.refused.append((job, IdempotencyConflict(key)))
                else:
                    d.replays.append((job, evs))
                continue
        error: EventhubError | None = None
        for a in job.appends:
            actual = versions.get(a.stream, -1)
            if not expected_matches(a.expected, actual):
                error = WrongExpectedVersion(a.stream, a.expected, actual)
                break
        if error is not None:
            d.refused.append((job, error))
            continue
        events: list[Event] = []
        rows = d.rows
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
                dg = sha256(data).digest()
                h = sha256(hash_encode((prev_hash, position, stream, version, type_, meta_bytes, now, dg))).digest()
                rows.append((position, stream, version, type_, data, meta_bytes, now, dg, prev_hash, h))
                events.append(Event(position, stream, version, type_, data, meta, now, dg, prev_hash, h))
                prev_hash = h
            versions[stream] = version
        if key:
            in_batch[key] = (job, events)
            if events:  # a keyed call without events stores nothing, not even its key
                d.keys.append((key, job.fingerprint, events[0].position, events[-1].position))
        d.accepted.append((job, events))
    d.versions = versions
    return d


def row_event(row: Any, check: bool = True) -> Event:
    """An event from its stored row, checked against its own hash unless `check` is off."""
    position, stream, version, type_, data, meta_bytes, recorded_at, dg, prev_hash, h = row
    if check:
        if data is not None and hashlib.sha256(data).digest() != dg:
            raise StoreCorrupt(f"event at position {position} is corrupt: data does not match its digest", position)
        # chain.event_hash, inlined: every event a store serves comes through here
        if hashlib.sha256(hash_encode((prev_hash, position, stream, version, type_, meta_bytes, recorded_at, dg))).digest() != h:
            raise StoreCorrupt(f"event at position {position} is corrupt: hash does not match its fields", position)
    try:
        meta = _decode_meta(meta_bytes)
    except (msgspec.DecodeError, TypeError):
        raise StoreCorrupt(f"event at position {position} is corrupt: unreadable meta", position) from None
    return Event(position, stream, version, type_, data, meta, recorded_at, dg, prev_hash, h)


def event_row(event: Event) -> Row:
    """The stored row of an already hashed event (imports, copies)."""
    e = event
    return (e.position, e.stream, e.version, e.type, e.data, encode_meta(e.meta), e.recorded_at, e.digest, e.prev_hash, e.hash)


def chunks(items: list[T], size: int) -> list[list[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
