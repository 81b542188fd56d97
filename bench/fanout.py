"""Fan-out: 1,000 websocket subscribers on one channel, latency and throughput, against a
bare aiohttp broadcast server measured in the same run.

    python -m bench.fanout [--subscribers 1000] [--rate 100] [--seconds 10] [--burst 1000]

For each server (`bench.servers broadcast`, then eventhub's `GET /channel/bench/ws`), the
subscribers connect from `--processes` processes of their own (`bench.subscribers`), one
insert checks that every one of them is live, and then:

- latency: `--rate` inserts per second for `--seconds`, paced on a schedule (a slow answer
  does not delay the next insert); for every line each subscriber receives, the time from
  sending its insert to the line's bytes arriving. p50 and p99 over all of them.
- throughput: `--burst` inserts sent as fast as 8 concurrent inserters get answers; the
  deliveries (lines received, all subscribers) divided by the time from the first insert
  sent to the last line received. Inserts cannot outrun delivery for long: both servers
  spend the same one core on accepting inserts and on writing lines.

The inserts come from this process (aiohttp), the server runs in its own, and every line
is matched to its insert by its text (the item URL that the insert's `Location` names).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.common import Row, print_table, save
from bench.load import body_of
from bench.servers import BenchError, Server, ceiling, cpu_seconds, create_channel, hub, raise_open_files
from bench.subscribers import Pool

CHANNEL = "bench"
INSERTERS = 8  # concurrent inserters in the throughput burst
LATE = 60.0  # seconds to wait for the last lines after the last insert


@dataclass
class Fanout:
    subscribers: int
    p50_ms: float
    p99_ms: float
    latency_lines: int
    latency_expected: int
    deliveries_per_s: float
    burst_lines: int
    burst_expected: int
    server_cpu_us: float  # server CPU per delivery in the burst
    subscribers_cpu_us: float  # subscriber processes' CPU per delivery in the burst
    burst_seconds: float



def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def _insert(session: aiohttp.ClientSession, url: str, body: bytes, sends: dict[str, float]) -> None:
    sent = time.monotonic()
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        await r.read()
        if r.status != 201:
            raise BenchError(f"insert answered {r.status}")
        sends[r.headers["Location"]] = sent


async def paced(url: str, rate: float, count: int) -> dict[str, float]:
    """`count` inserts at `rate` per second on a fixed schedule; {item URL: time sent}."""
    sends: dict[str, float] = {}
    body = body_of(200)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        start = time.monotonic() + 0.05
        tasks = []
        for k in range(count):
            delay = start + k / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_insert(session, url, body, sends)))
        await asyncio.gather(*tasks)
    return sends


async def burst(url: str, count: int, inserters: int = INSERTERS) -> tuple[float, dict[str, float]]:
    """`count` inserts from `inserters` closed loops; (time the first was sent, sends)."""
    sends: dict[str, float] = {}
    body = body_of(200)
    left = [count]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def loop() -> None:
            while left[0] > 0:
                left[0] -= 1
                await _insert(session, url, body, sends)

        start = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(inserters)))
    return start, sends


def measure(server: Server, processes: int, per_process: int, rate: float, seconds: float, count: int,
            folder: str, on_measure: Callable[[str], AbstractContextManager[object]] | None = None) -> Fanout:
    """Both measurements against one running server with a `CHANNEL` to insert into."""
    url = f"{server.base}/channel/{CHANNEL}"
    ws_url = f"ws://127.0.0.1:{server.port}/channel/{CHANNEL}/ws"
    with Pool(ws_url, processes, per_process) as pool:
        size = pool.ready()
        pool.mark()  # every subscriber gets the first insert: they are all live
        asyncio.run(paced(url, rate, 1))
        got = pool.collect(1, 30.0, folder)
        if got.received != size:
            raise BenchError(f"only {got.received} of {size} subscribers received the first insert")

        pool.mark()
        n = max(1, int(rate * seconds))
        context = on_measure("latency") if on_measure else None
        if context:
            context.__enter__()
        try:
            sends = asyncio.run(paced(url, rate, n))
            got = pool.collect(n, LATE, folder)
        finally:
            if context:
                context.__exit__(None, None, None)
        latencies = sorted(t - sends[text] for text, times in got.lines.items() if text in sends for t in times)

        pool.mark()
        sub_pids = [p.pid for p in pool.procs]
        context = on_measure("throughput") if on_measure else None
        if context:
            context.__enter__()
        try:
            cpu0, sub0 = cpu_seconds(server.pid), cpu_seconds(*sub_pids)
            start, burst_sends = asyncio.run(burst(url, count))
            took = pool.collect(count, LATE + count * size / 20_000, folder)
            server_cpu, sub_cpu = cpu_seconds(server.pid) - cpu0, cpu_seconds(*sub_pids) - sub0
        finally:
            if context:
                context.__exit__(None, None, None)
        last = max((max(ts) for text, ts in took.lines.items() if text in burst_sends), default=start)
        delivered = sum(len(ts) for text, ts in took.lines.items() if text in burst_sends)
    return Fanout(
        subscribers=size,
        p50_ms=percentile(latencies, 0.50) * 1e3,
        p99_ms=percentile(latencies, 0.99) * 1e3,
        latency_lines=len(latencies),
        latency_expected=n * size,
        deliveries_per_s=delivered / (last - start) if last > start else 0.0,
        burst_lines=delivered,
        burst_expected=count * size,
        server_cpu_us=server_cpu / max(delivered, 1) * 1e6,
        subscribers_cpu_us=sub_cpu / max(delivered, 1) * 1e6,
        burst_seconds=last - start,
    )


def _describe(name: str, f: Fanout) -> str:
    return (f"{name:<9} {f.subscribers:,} subscribers: latency p50 {f.p50_ms:7.2f} ms, p99 {f.p99_ms:7.2f} ms "
            f"({f.latency_lines:,}/{f.latency_expected:,} lines); burst {f.deliveries_per_s:>9,.0f} deliveries/s "
            f"({f.burst_lines:,}/{f.burst_expected:,} lines in {f.burst_seconds:.1f} s; CPU per delivery: server "
            f"{f.server_cpu_us:.1f} us, subscribers {f.subscribers_cpu_us:.1f} us)")


def run(subscribers: int = 1000, processes: int = 2, rate: float = 100.0, seconds: float = 10.0, count: int = 1000,
        profile: Path | None = None) -> list[Row]:
    raise_open_files()
    per_process = max(1, subscribers // processes)
    print(f"bench.fanout: {per_process * processes:,} subscribers in {processes} processes, {rate:g} inserts/s for "
          f"{seconds:g} s, then a burst of {count:,} inserts")
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        with ceiling("broadcast") as bare:
            ref = measure(bare, processes, per_process, rate, seconds, count, tmp)
        print(_describe("ceiling", ref))
        with hub(Path(tmp) / "fanout.db") as server:
            create_channel(server.base, CHANNEL)
            on_measure = None
            if profile is not None:
                from bench.profile import recorder

                folder, pid = profile, server.pid
                on_measure = lambda phase: recorder(pid, folder / f"fanout-{phase}.txt")  # noqa: E731
            ours = measure(server, processes, per_process, rate, seconds, count, tmp, on_measure)
        print(_describe("eventhub", ours))
    return [
        Row(f"fan-out latency p50 (ms), {ours.subscribers:,} subs", ours.p50_ms, "bare aiohttp broadcast, p50",
            ref.p50_ms, "ms", 0.0),
        Row(f"fan-out latency p99 (ms), {ours.subscribers:,} subs", ours.p99_ms, "bare aiohttp broadcast, p99",
            ref.p99_ms, "ms", 1.5, higher=False),
        Row("fan-out throughput (deliveries/s)", ours.deliveries_per_s, "bare aiohttp broadcast",
            ref.deliveries_per_s, "deliveries/s", 0.7),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.fanout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2, help="subscriber processes")
    parser.add_argument("--rate", type=float, default=100.0, help="inserts per second in the latency run")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the latency run")
    parser.add_argument("--burst", type=int, default=1000, help="inserts in the throughput run")
    parser.add_argument("--profile", type=Path, help="record eventhub with py-spy into this folder")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/out/fanout.json")
    args = parser.parse_args(argv)
    rows = run(args.subscribers, args.processes, args.rate, args.seconds, args.burst, args.profile)
    print_table("bench/fanout.py: websocket fan-out", rows)
    if not args.no_save:
        save("fanout", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
