"""Memory: the server's RSS with 10,000 idle websocket subscribers against its RSS idle
with none.

    python -m bench.memory [--subscribers 10000] [--processes 2] [--no-ceiling]

eventhub (`python -m api.cli serve`, one channel) is measured idle, then with the
subscribers connected to `GET /channel/bench/ws` from `--processes` client processes
(`bench.subscribers`) and left idle; RSS (psutil) is the median of five samples over a
second, taken once the sockets are all upgraded and a moment has passed. One insert then
checks that every subscriber is live. Both this process and the subscriber processes raise
their open-file limit to the hard limit (`resource.setrlimit`); the server inherits it.

For scale, the same is measured on the bare aiohttp broadcast server (`--no-ceiling` to
skip): what 10,000 websockets cost aiohttp alone.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import Row, print_table, save
from bench.fanout import paced
from bench.servers import BenchError, Server, ceiling, create_channel, hub, raise_open_files, rss_bytes
from bench.subscribers import Pool

CHANNEL = "bench"
SETTLE = 1.0


@dataclass
class Memory:
    idle_mb: float
    loaded_mb: float
    subscribers: int

    @property
    def per_subscriber_kb(self) -> float:
        return (self.loaded_mb - self.idle_mb) * 1e3 / max(self.subscribers, 1)


def rss_mb(pid: int, seconds: float, samples: int = 5) -> float:
    """The median of `samples` RSS readings spread over `seconds`."""
    values = []
    for _ in range(samples):
        values.append(rss_bytes(pid) / 1e6)
        time.sleep(seconds / samples)
    return statistics.median(values)


def measure(server: Server, subscribers: int, processes: int, folder: str) -> Memory:
    settle = SETTLE if subscribers >= 1000 else 0.1  # small runs are smoke runs
    time.sleep(settle)
    idle = rss_mb(server.pid, settle)
    ws_url = f"ws://127.0.0.1:{server.port}/channel/{CHANNEL}/ws"
    with Pool(ws_url, processes, max(1, subscribers // processes)) as pool:
        size = pool.ready()
        time.sleep(settle)
        loaded = rss_mb(server.pid, settle)
        pool.mark()
        asyncio.run(paced(f"{server.base}/channel/{CHANNEL}", 1.0, 1))
        got = pool.collect(1, 60.0, folder)
        if got.received != size:
            raise BenchError(f"only {got.received} of {size} idle subscribers received an insert")
    return Memory(idle, loaded, size)


def run(subscribers: int = 10_000, processes: int = 2, compare: bool = True) -> list[Row]:
    limit = raise_open_files()
    if limit < subscribers + 1000:
        raise BenchError(f"the open-file hard limit is {limit}: too low for {subscribers:,} websockets")
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        with hub(Path(tmp) / "memory.db") as server:
            create_channel(server.base, CHANNEL)
            ours = measure(server, subscribers, processes, tmp)
        print(f"eventhub: idle {ours.idle_mb:.1f} MB, with {ours.subscribers:,} idle subscribers {ours.loaded_mb:.1f} MB "
              f"({ours.per_subscriber_kb:.1f} kB each)")
        if compare:
            with ceiling("broadcast") as bare:
                ref = measure(bare, subscribers, processes, tmp)
            print(f"bare aiohttp: idle {ref.idle_mb:.1f} MB, with {ref.subscribers:,} {ref.loaded_mb:.1f} MB "
                  f"({ref.per_subscriber_kb:.1f} kB each): aiohttp's own share of eventhub's figure")
    return [
        Row(f"memory: RSS, {ours.subscribers:,} idle ws subscribers (MB)", ours.loaded_mb, "RSS idle with none",
            ours.idle_mb, "MB", 0.0, higher=False, margin=150.0),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=2, help="subscriber processes")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the bare aiohttp comparison")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/out/memory.json")
    args = parser.parse_args(argv)
    rows = run(args.subscribers, args.processes, not args.no_ceiling)
    print_table("bench/memory.py: idle websocket subscribers", rows)
    if not args.no_save:
        save("memory", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
