"""Fan-out: 1,000 websocket subscribers on one channel, latency and throughput, against a
bare aiohttp broadcast server measured in the same run.

    python -m bench.fanout [--subscribers 1000] [--rate 100] [--calm-rate 25] [--seconds 10] [--burst 1000]

For each server (`bench.servers broadcast`, then eventhub's `GET /channel/bench/ws`), the
subscribers connect from `--processes` processes of their own (`bench.subscribers`), one
insert checks that every one of them is live, and then:

- latency: `--rate` inserts per second for `--seconds`, paced on a schedule (a slow answer
  does not delay the next insert); for every line each subscriber receives, the time from
  sending its insert to the line's bytes arriving. p50 and p99 over all of them. Then the
  same at `--calm-rate` (default a quarter of the rate): 100 inserts/s to 1,000
  subscribers is 100,000 deliveries/s, more than the bare server and the subscribers
  together sustain on 2 cores, so the first figure measures a growing backlog on both
  sides; the second shows latency where neither server is saturated (no target).
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
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
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
class Latency:
    rate: float
    p50_ms: float
    p99_ms: float
    lines: int
    expected: int


@dataclass
class Fanout:
    subscribers: int
    latency: list[Latency]  # one per rate, the first at the rate
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


Phase = Callable[[str], AbstractContextManager[object]]


def measure(server: Server, processes: int, per_process: int, rates: Sequence[float], seconds: float, count: int,
            folder: str, phase: Phase | None = None) -> Fanout:
    """Both measurements against one running server with a `CHANNEL` to insert into;
    `phase(name)` wraps each measured phase (a profiler, say)."""
    url = f"{server.base}/channel/{CHANNEL}"
    ws_url = f"ws://127.0.0.1:{server.port}/channel/{CHANNEL}/ws"
    during = phase or (lambda name: nullcontext())
    with Pool(ws_url, processes, per_process) as pool:
        size = pool.ready()
        pool.mark()  # every subscriber gets the first insert: they are all live
        asyncio.run(paced(url, 10.0, 1))
        got = pool.collect(1, 30.0, folder)
        if got.received != size:
            raise BenchError(f"only {got.received} of {size} subscribers received the first insert")

        latency = []
        for rate in rates:
            pool.mark()
            n = max(1, int(rate * seconds))
            with during(f"latency-{rate:g}"):
                sends = asyncio.run(paced(url, rate, n))
                got = pool.collect(n, LATE, folder)
            times = sorted(t - sends[text] for text, ts in got.lines.items() if text in sends for t in ts)
            latency.append(Latency(rate, percentile(times, 0.50) * 1e3, percentile(times, 0.99) * 1e3, len(times), n * size))

        pool.mark()
        sub_pids = [p.pid for p in pool.procs]
        with during("throughput"):
            cpu0, sub0 = cpu_seconds(server.pid), cpu_seconds(*sub_pids)
            start, burst_sends = asyncio.run(burst(url, count))
            took = pool.collect(count, LATE + count * size / 20_000, folder)
            server_cpu, sub_cpu = cpu_seconds(server.pid) - cpu0, cpu_seconds(*sub_pids) - sub0
        last = max((max(ts) for text, ts in took.lines.items() if text in burst_sends), default=start)
        delivered = sum(len(ts) for text, ts in took.lines.items() if text in burst_sends)
    return Fanout(
        subscribers=size,
        latency=latency,
        deliveries_per_s=delivered / (last - start) if last > start else 0.0,
        burst_lines=delivered,
        burst_expected=count * size,
        server_cpu_us=server_cpu / max(delivered, 1) * 1e6,
        subscribers_cpu_us=sub_cpu / max(delivered, 1) * 1e6,
        burst_seconds=last - start,
    )


def _describe(name: str, f: Fanout) -> str:
    lines = [f"{name:<9} {f.subscribers:,} subscribers:"]
    for x in f.latency:
        lines.append(f"  {x.rate:g} inserts/s: latency p50 {x.p50_ms:8.2f} ms, p99 {x.p99_ms:8.2f} ms "
                     f"({x.lines:,}/{x.expected:,} lines)")
    lines.append(f"  burst: {f.deliveries_per_s:,.0f} deliveries/s ({f.burst_lines:,}/{f.burst_expected:,} lines in "
                 f"{f.burst_seconds:.1f} s); CPU per delivery: server {f.server_cpu_us:.1f} us, subscribers "
                 f"{f.subscribers_cpu_us:.1f} us")
    return "\n".join(lines)


def run(subscribers: int = 1000, processes: int = 2, rate: float = 100.0, seconds: float = 10.0, count: int = 1000,
        profile: Path | None = None, calm_rate: float | None = None) -> list[Row]:
    """The rows; `calm_rate` adds a latency run at a rate both servers sustain (default rate / 4)."""
    raise_open_files()
    per_process = max(1, subscribers // processes)
    calm = calm_rate if calm_rate is not None else rate / 4
    rates = [rate, calm] if calm else [rate]
    print(f"bench.fanout: {per_process * processes:,} subscribers in {processes} processes; "
          f"{' and '.join(f'{r:g}' for r in rates)} inserts/s for {seconds:g} s each, then a burst of {count:,} inserts")
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        with ceiling("broadcast") as bare:
            ref = measure(bare, processes, per_process, rates, seconds, count, tmp)
        print(_describe("ceiling", ref))
        with hub(Path(tmp) / "fanout.db") as server:
            create_channel(server.base, CHANNEL)
            phase: Phase | None = None
            if profile is not None:
                from bench.profile import recorder

                folder, pid = profile, server.pid
                phase = lambda name: recorder(pid, folder / f"fanout-{name}.txt")  # noqa: E731
            ours = measure(server, processes, per_process, rates, seconds, count, tmp, phase)
        print(_describe("eventhub", ours))
    subs = f"{ours.subscribers:,} subs"
    hot, ref_hot = ours.latency[0], ref.latency[0]
    rows = [
        Row(f"fan-out latency p50 (ms), {subs}, {rate:g}/s", hot.p50_ms, "bare aiohttp broadcast, p50",
            ref_hot.p50_ms, "ms", 0.0),
        Row(f"fan-out latency p99 (ms), {subs}, {rate:g}/s", hot.p99_ms, "bare aiohttp broadcast, p99",
            ref_hot.p99_ms, "ms", 1.5, higher=False),
    ]
    if len(rates) > 1:
        low, ref_low = ours.latency[1], ref.latency[1]
        rows.append(Row(f"fan-out latency p99 (ms), {subs}, {calm:g}/s", low.p99_ms, "bare aiohttp broadcast, p99",
                        ref_low.p99_ms, "ms", 0.0))
    rows.append(Row("fan-out throughput (deliveries/s)", ours.deliveries_per_s, "bare aiohttp broadcast",
                    ref.deliveries_per_s, "deliveries/s", 0.7))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.fanout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2, help="subscriber processes")
    parser.add_argument("--rate", type=float, default=100.0, help="inserts per second in the latency run")
    parser.add_argument("--calm-rate", type=float, help="a second latency run's rate (default: rate / 4; 0: none)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each latency run")
    parser.add_argument("--burst", type=int, default=1000, help="inserts in the throughput run")
    parser.add_argument("--profile", type=Path, help="record eventhub with py-spy into this folder")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/out/fanout.json")
    args = parser.parse_args(argv)
    rows = run(args.subscribers, args.processes, args.rate, args.seconds, args.burst, args.profile, args.calm_rate)
    print_table("bench/fanout.py: websocket fan-out", rows)
    if not args.no_save:
        save("fanout", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
