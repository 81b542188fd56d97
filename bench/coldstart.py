"""Cold start: process start to the first `/health` answer, on a 1,000,000-event log with
snapshots against the same start on an empty log.

    python -m bench.coldstart [--events 1000000] [--path log.db --reuse] [--repeats 3]

The log is the replay benchmark's mixed log (`bench.replay.generate`). Each start is
`python -m api.cli serve` as a subprocess, timed from spawning it to the first 200 from
`/health` (polled every 5 ms), then stopped with SIGTERM. Interpreter start and imports
are in both figures; the difference is what the log's size costs.

The first start on the big log has no snapshots and folds the whole log into the facets'
projections (printed, not a row); its graceful stop writes every projection's snapshot
at the head, as a node that was running writes them. The measured starts restore those.
The reference starts use an empty log file that a first start created. Last, for
information, a start after a crash: the events a node appends after its last snapshot
(at most `EVENTHUB_SNAPSHOT_EVERY` - 1) are folded at the next start.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import Row, print_table, save
from bench.servers import hub
from eventhub.settings import Settings

EVENTS = 1_000_000


def start_seconds(database: Path) -> float:
    """Spawn eventhub on `database`, wait for `/health`, stop it; seconds to the answer."""
    with hub(database) as server:
        return server.start_seconds


def snapshots(database: Path) -> list[tuple[str, int]]:
    conn = sqlite3.connect(database)
    try:
        return [(str(n), int(p)) for n, p in conn.execute("SELECT name, position FROM snapshots ORDER BY name")]
    finally:
        conn.close()


def run(events: int = EVENTS, path: Path | None = None, reuse: bool = False, repeats: int = 3) -> list[Row]:
    from bench import replay

    with tempfile.TemporaryDirectory(prefix="bench-coldstart-") as tmp:
        log = path or Path(tmp) / "big.db"
        if not (reuse and log.exists()):
            for old in log.parent.glob(log.name + "*"):
                old.unlink()
            took = asyncio.run(replay.generate(log, events))
            print(f"bench.coldstart: generated {events:,} events in {took:.1f} s")
        conn = sqlite3.connect(log)
        head = int(conn.execute("SELECT COALESCE(MAX(position), 0) FROM events").fetchone()[0])
        conn.close()

        empty = Path(tmp) / "empty.db"
        start_seconds(empty)  # creates the schema: later starts open an existing, empty log
        first = start_seconds(log)
        snaps = snapshots(log)
        print(f"bench.coldstart: {head:,}-event log, first start (no snapshots, folds the log): {first:.2f} s; "
              f"snapshots now: {', '.join(f'{n}@{p:,}' for n, p in snaps) or 'none (no facet has a projection)'}")
        big, small = [], []
        for _ in range(repeats):  # interleaved, so drift on a shared machine hits both alike
            small.append(start_seconds(empty))
            big.append(start_seconds(log))
        print(f"  starts on the big log: {', '.join(f'{s:.3f}' for s in big)} s; "
              f"on the empty log: {', '.join(f'{s:.3f}' for s in small)} s")
        # A node that crashed wrote no snapshot at the end: up to snapshot_every - 1 events
        # past the last one are folded at the next start.
        gap = min(Settings().snapshot_every - 1, events)
        asyncio.run(replay.generate(log, gap, seed=8))
        print(f"  after a crash ({gap:,} events past the snapshots): {start_seconds(log):.3f} s")
    measured, reference = statistics.median(big), statistics.median(small)
    label = f"{head / 1e6:g}M" if head >= 100_000 else f"{head:,}"
    return [
        Row(f"cold start, {label}-event log + snapshots (s)", measured, "the same start on an empty log",
            reference, "s", 0.0, higher=False, margin=1.0),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.coldstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=EVENTS, help=f"events to generate (default {EVENTS:,})")
    parser.add_argument("--path", type=Path, help="the big log's SQLite file (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true", help="use --path as it is if it exists")
    parser.add_argument("--repeats", type=int, default=3, help="starts measured on each log (median)")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/out/coldstart.json")
    args = parser.parse_args(argv)
    rows = run(args.events, args.path, args.reuse, args.repeats)
    print_table("bench/coldstart.py: start to first /health", rows)
    if not args.no_save:
        save("coldstart", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
