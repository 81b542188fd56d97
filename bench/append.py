"""Durable appends per second: eventhub's store against the eventsourcing package and plain sqlite3.

    python -m bench.append [--seconds 3] [--database-url postgresql://…]

Three shapes: 1 appender × 1 event per call; 64 concurrent appenders × 1 event; 1 appender
× batches of 100. On SQLite the same run measures the references: the `eventsourcing`
package's SQLite recorder inserting one event per call, and plain `sqlite3` inserting
the same rows into the same schema in 100-row transactions (the storage ceiling). All
with `synchronous=FULL`. Every loop stops at a time limit or a count, whichever first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

from bench.common import Row, print_table, save
from eventhub.events import NewEvent, StreamAppend
from eventhub.store import EventStore, store_from_url
from eventhub.chain import GENESIS
from eventhub.store.batch import AppendJob, decide
from eventhub.store.sqlite import _INSERT, _SCHEMA

BODY = b"x" * 200
META = {"content-type": "application/octet-stream"}
MAX_EVENTS = 2_000_000


async def _timed(seconds: float, step: Callable[[], Awaitable[int]]) -> float:
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline and done < MAX_EVENTS:
        done += await step()
    return done / (time.perf_counter() - start)


async def measure_eventhub(url_for: Callable[[str], str], seconds: float) -> dict[str, float]:
    """Each shape on its own log (`url_for(shape)`), so none pays for another's rows."""
    event = NewEvent("Benchmarked", BODY, META)
    batch = [event] * 100
    results: dict[str, float] = {}

    async def on_store(shape: str, run: Callable[[EventStore], Awaitable[float]]) -> None:
        store = store_from_url(url_for(shape))
        await store.open()
        try:
            results[shape] = await run(store)
        finally:
            await store.close()

    async def single(store: EventStore) -> float:
        async def step() -> int:
            await store.append(StreamAppend("bench:single", [event]))
            return 1

        return await _timed(seconds, step)

    async def concurrent(store: EventStore) -> float:
        # 64 appenders that keep the writer fed: each runs its own loop
        async def appender(i: int, deadline: float, counts: list[int]) -> None:
            while time.perf_counter() < deadline and counts[0] < MAX_EVENTS:
                await store.append(StreamAppend(f"bench:c{i}", [event]))
                counts[0] += 1

        counts = [0]
        start = time.perf_counter()
        await asyncio.gather(*(appender(i, start + seconds, counts) for i in range(64)))
        return counts[0] / (time.perf_counter() - start)

    async def batched(store: EventStore) -> float:
        async def step() -> int:
            await store.append(StreamAppend("bench:batch", batch))
            return 100

        return await _timed(seconds, step)

    await on_store("single", single)
    await on_store("concurrent", concurrent)
    await on_store("batch", batched)
    return results


def measure_eventsourcing(path: str, seconds: float) -> float:
    from eventsourcing.persistence import StoredEvent
    from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteDatastore

    datastore = SQLiteDatastore(path)
    recorder = SQLiteApplicationRecorder(datastore)
    recorder.create_table()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds and done < MAX_EVENTS:
        recorder.insert_events([StoredEvent(uuid.uuid4(), 1, "bench.Benchmarked", BODY)])
        done += 1
    rate = done / (time.perf_counter() - start)
    datastore.close()
    return rate


def measure_sqlite3_batches(path: str, seconds: float) -> float:
    """The storage ceiling: plain sqlite3 writing exactly the rows eventhub writes.

    The rows (real chained hashes, the same meta) are built by the store's own
    `decide` outside the clock; only the 100-row transactions are timed.
    """
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.executescript(_SCHEMA)
    event = NewEvent("Benchmarked", BODY, META)
    head, prev_hash, done, timed = 0, GENESIS, 0, 0.0
    wall = time.perf_counter()

    async def rows_for(head: int, prev_hash: bytes) -> list[Any]:
        job = AppendJob((StreamAppend("bench:batch", [event] * 100),), None)
        return decide([job], {"bench:batch": head - 1} if head else {}, {}, head, prev_hash, time.time_ns() // 1000).rows

    loop = asyncio.new_event_loop()
    try:
        while timed < seconds and done < MAX_EVENTS and time.perf_counter() - wall < 3 * seconds:
            rows = loop.run_until_complete(rows_for(head, prev_hash))
            start = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_INSERT, rows)
            conn.execute("COMMIT")
            timed += time.perf_counter() - start
            head, prev_hash = rows[-1][0], rows[-1][-1]
            done += 100
    finally:
        loop.close()
        conn.close()
    return done / timed


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--database-url", default="", help="default: a fresh SQLite file in a temp dir")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{os.path.join(tmp, 'eventhub.db')}"

        def url_for(shape: str) -> str:
            return args.database_url or f"sqlite:///{os.path.join(tmp, shape + '.db')}"

        ours = uvloop.run(measure_eventhub(url_for, args.seconds))
        backend = "postgres" if url.startswith("postgres") else "sqlite"
        rows = [Row(f"{backend}: 1 appender x 1 event", ours["single"], "(no reference)", 0, "events/s", 0)]
        if backend == "sqlite":
            peer = measure_eventsourcing(os.path.join(tmp, "es.db"), args.seconds)
            ceiling = measure_sqlite3_batches(os.path.join(tmp, "plain.db"), args.seconds)
            rows = [
                Row("sqlite: 1 appender x 1 event", ours["single"], "eventsourcing SQLite, 1 event/call", peer, "events/s", 0.0),
                Row("sqlite: 64 appenders x 1 event", ours["concurrent"], "eventsourcing SQLite, 1 event/call", peer, "events/s", 5.0),
                Row("sqlite: 1 appender x 100 events", ours["batch"], "sqlite3, 100-row txns, same schema", ceiling, "events/s", 0.7),
            ]
        else:
            rows += [
                Row(f"{backend}: 64 appenders x 1 event", ours["concurrent"], "(no reference)", 0, "events/s", 0),
                Row(f"{backend}: 1 appender x 100 events", ours["batch"], "(no reference)", 0, "events/s", 0),
            ]
    print_table(f"bench/append.py ({backend})", rows)
    save(f"append-{backend}", rows)
    return rows


if __name__ == "__main__":
    main()
