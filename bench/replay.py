"""Benchmark: `eventhub verify` and a full projection rebuild over a generated log.

Generates a mixed log (default 1,000,000 events: raw channel items, JSON facet-like
events, build log lines, exports) in a SQLite file, then measures in one run, each
beside the same log's plain-sqlite3 read ceiling (`SELECT` every row, nothing else):

- `verify`: the CLI's chain walk (`eventhub.cli.verify_store`), every hash recomputed;
- rebuild: the CLI's replay fold (`api.cli.rebuild`) into the facets' projections plus a
  bench projection that decodes every JSON payload and keeps a per-stream model.

    .venv/bin/python -m bench.replay                 # 1,000,000 events
    .venv/bin/python -m bench.replay --events 20000  # a quick look

The generated streams use `bench…:` prefixes, so facet projections (which only read their
own prefixes) skip them: the rebuild figure is the log's cost plus the bench model's.

The three are measured in turns (`--rounds`, default 3) and each figure is its median, so
a burst of load from elsewhere on a shared machine slows one round, which the median drops.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import msgspec

from api.cli import facet_projections, rebuild
from bench.common import Row, print_table, save
from eventhub.cli import verify_store
from eventhub.events import FACT_CONTENT_TYPE, Event, NewEvent, StreamAppend
from eventhub.projection import Projection
from eventhub.store.sqlite import SQLiteStore

BATCH_EVENTS = 5000
FULL = 1_000_000
JSON = {"content-type": FACT_CONTENT_TYPE}
RAW = {"content-type": "application/octet-stream"}
TEXT = {"content-type": "text/plain"}


class BenchModel(Projection):
    """A projection that works like a facet's: decode JSON, keep a small model per stream."""

    name = "bench"
    prefixes: ClassVar[tuple[str, ...]] = ("benchspec:", "benchbuild:", "benchexport:", "benchchan:")

    def __init__(self) -> None:
        super().__init__()
        self.states: dict[str, str] = {}
        self.items: dict[str, int] = {}
        self.bytes = 0

    def apply(self, event: Event) -> None:
        if event.type == "ItemInserted":
            self.items[event.stream] = self.items.get(event.stream, 0) + 1
            self.bytes += len(event.data or b"")
        elif event.data and event.meta.get("content-type") == FACT_CONTENT_TYPE:
            body = msgspec.json.decode(event.data)
            self.states[event.stream] = body.get("state", event.type)

    def snapshot(self) -> bytes:
        return msgspec.json.encode({"states": self.states, "items": self.items, "bytes": self.bytes})

    def restore(self, state: bytes) -> None:
        model = msgspec.json.decode(state)
        self.states, self.items, self.bytes = model["states"], model["items"], model["bytes"]


def _event(rng: random.Random, kind: int, n: int) -> tuple[str, NewEvent]:
    """One event of the mix: 40% raw channel items, 30% spec JSON, 20% build log lines,
    10% export state changes."""
    if kind < 40:
        size = rng.randint(64, 1500)
        return f"benchchan:{rng.randrange(50)}", NewEvent("ItemInserted", rng.randbytes(size), RAW)
    if kind < 70:
        body = {"revision": n, "state": rng.choice(["QUEUED", "RUNNING", "SUCCEEDED", "FAILED"]), "errors": []}
        return f"benchspec:owner/ds{rng.randrange(2000)}", NewEvent("RevisionStateChanged", msgspec.json.encode(body), JSON)
    if kind < 90:
        line = f"step {n % 7}: " + "x" * rng.randint(20, 200)
        return f"benchbuild:{rng.randrange(5000)}", NewEvent("LogWritten", line.encode(), TEXT)
    body = {"url": f"https://example.com/hook/{n}", "state": rng.choice(["pending", "sent", "failed"]), "attempt": 1}
    return f"benchexport:{rng.randrange(20000)}", NewEvent("ExportStateChanged", msgspec.json.encode(body), JSON)


async def generate(path: Path, events: int, seed: int = 7) -> float:
    """Append `events` mixed events in big group-committed calls; seconds taken."""
    rng = random.Random(seed)
    store = SQLiteStore(str(path))
    await store.open()
    started = time.perf_counter()
    try:
        written = 0
        while written < events:
            by_stream: dict[str, list[NewEvent]] = {}
            for n in range(written, min(written + BATCH_EVENTS, events)):
                stream, event = _event(rng, rng.randrange(100), n)
                by_stream.setdefault(stream, []).append(event)
            committed = await store.append(*(StreamAppend(s, evs) for s, evs in by_stream.items()))
            written += len(committed)
    finally:
        await store.close()
    return time.perf_counter() - started


def sqlite_ceiling(path: Path) -> int:
    """Every row through plain sqlite3: the most any reader of this file can do."""
    conn = sqlite3.connect(path)
    try:
        n = 0
        cur = conn.execute(
            "SELECT position, stream, version, type, data, meta, recorded_at, digest, prev_hash, hash "
            "FROM events ORDER BY position"
        )
        while rows := cur.fetchmany(BATCH_EVENTS):
            n += len(rows)
        return n
    finally:
        conn.close()


async def run_verify(path: Path) -> int:
    async with SQLiteStore(str(path)) as store:
        result = await verify_store(store, progress=False)
    if not result.ok:
        raise SystemExit(f"verify failed at {result.broken_at}: {result.reason}")
    return result.events


async def run_rebuild(path: Path, projections: list[Projection]) -> int:
    async with SQLiteStore(str(path)) as store:
        return await rebuild(store, projections, await store.head())


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def disk_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


TARGET = 0.3  # issue 8: replay and verify at least 0.3x the plain sqlite3 read ceiling
ROUNDS = 3


class Measured(NamedTuple):
    """Seconds to read every event: plain sqlite3 (the ceiling), verify, and a rebuild."""

    events: int
    ceiling_s: float
    verify_s: float
    rebuild_s: float


def measure(path: Path, rounds: int = ROUNDS) -> Measured:
    """The ceiling, verify and a rebuild of the log at `path`, in turns, `rounds` times;
    the median of each."""
    taken: list[Measured] = []
    for n in range(1, rounds + 1):
        events, ceiling_s = _timed(lambda: sqlite_ceiling(path))
        verified, verify_s = _timed(lambda: asyncio.run(run_verify(path)))
        projections = [*facet_projections(f"sqlite:///{path}"), BenchModel()]  # built (and imported) untimed
        rebuilt, rebuild_s = _timed(lambda: asyncio.run(run_rebuild(path, projections)))
        if not events == verified == rebuilt:
            raise SystemExit(f"read {events:,} rows, verified {verified:,}, rebuilt to {rebuilt:,}")
        taken.append(Measured(events, ceiling_s, verify_s, rebuild_s))
        if rounds > 1:
            print(
                f"round {n}: SELECT {ceiling_s:.2f} s, verify {verify_s:.2f} s ({ceiling_s / verify_s:.2f}x), "
                f"rebuild {rebuild_s:.2f} s ({ceiling_s / rebuild_s:.2f}x)",
                flush=True,
            )
    return Measured(
        taken[0].events,
        statistics.median(m.ceiling_s for m in taken),
        statistics.median(m.verify_s for m in taken),
        statistics.median(m.rebuild_s for m in taken),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=FULL, help=f"events to generate (default {FULL:,})")
    parser.add_argument("--path", type=Path, help="the SQLite file (default: a temporary one, removed after)")
    parser.add_argument("--reuse", action="store_true", help="use --path as it is if it exists (skip generating)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"measurements of each, median taken (default {ROUNDS})")
    args = parser.parse_args(argv)

    tmp = None if args.path else Path(tempfile.mkdtemp(prefix="bench-replay-"))
    path: Path = args.path or tmp / "bench.db"  # type: ignore[operator]
    try:
        if args.reuse and path.exists():
            gen_seconds = None
        else:
            for old in path.parent.glob(path.name + "*"):
                old.unlink()
            gen_seconds = asyncio.run(generate(path, args.events))
        ceiling, ceiling_s, verify_s, rebuild_s = measure(path, max(args.rounds, 1))
        size = disk_size(path)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    ceiling_rate = ceiling / ceiling_s
    reference = "sqlite3 SELECT every row (ceiling)"
    rows = [
        Row("verify: events/s (chain walk)", ceiling / verify_s, reference, ceiling_rate, "events/s", TARGET),
        Row("replay: events/s (full rebuild)", ceiling / rebuild_s, reference, ceiling_rate, "events/s", TARGET),
    ]
    print(f"log: {ceiling:,} mixed events, {size / 1e6:,.1f} MB on disk ({size / max(ceiling, 1):,.0f} B/event)")
    if gen_seconds is not None:
        print(f"generated with store.append in {gen_seconds:.1f} s ({ceiling / gen_seconds:,.0f} events/s)")
    median = " (medians)" if args.rounds > 1 else ""
    print(
        f"verify {verify_s:.2f} s ({size / 1e6 / verify_s:,.0f} MB/s), rebuild {rebuild_s:.2f} s, "
        f"SELECT {ceiling_s:.2f} s{median}"
    )
    print_table("eventhub verify and replay against the SQLite read ceiling", rows)
    if args.events == FULL and gen_seconds is not None:  # smoke runs do not overwrite the record
        print(f"saved {save('replay-sqlite', rows)}")
    return 0 if all(r.holds for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
