"""Durable HTTP inserts per second, against the framework's ceiling and a broker, in one run.

    python -m bench.insert [--seconds 10] [--connections 64] [--load wrk|aiohttp]

1. The ceiling: `bench.servers noop` (aiohttp on uvloop, msgspec-decodes the body, 201).
2. eventhub: `python -m api.cli serve` on a fresh SQLite file (`synchronous=FULL`, the
   default), one channel, `POST /channel/bench` with the same 200-byte JSON body.
3. NATS JetStream: nats-py publishing the same body to a file-storage stream on the local
   server (127.0.0.1:4222), 64 publishes in flight with `gather`, every ack awaited.

The HTTP load comes from `bench.load` (wrk when installed) in its own process, over 64
keep-alive connections. The ceiling and eventhub serve side by side and are loaded in
turns, `--rounds` times (default 3); the row is the round with the median ratio and every
round is printed. After the last round the log's head is checked against the answered
requests: every 201 is an event on disk.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Row, print_table, save
from bench.load import LoadResult, body_of, post_load, tool
from bench.servers import BenchError, ceiling, cpu_seconds, create_channel, health, hub, spawn

NATS_URL = "nats://127.0.0.1:4222"
NATS_START = [
    "start-stop-daemon", "--start", "--oknodo", "--background", "--exec", "/usr/sbin/nats-server", "--",
    "-a", "127.0.0.1", "-p", "4222", "-js", "-sd", "/var/lib/nats-server", "-l", "/var/log/nats-server.log",
]
MAX_PUBLISHES = 5_000_000
WARMUP_SECONDS = 1.0
ROUNDS = 3


def _nats_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 4222), timeout=1.0):
            return True
    except OSError:
        return False


def ensure_nats(start: bool) -> bool:
    """Is NATS listening? If not and `start`, start it as the machine's services are."""
    if _nats_up():
        return True
    if not start:
        return False
    try:
        spawn(NATS_START, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _nats_up():
            return True
        time.sleep(0.1)
    return False


async def nats_publish_rate(body: bytes, seconds: float, in_flight: int = 64) -> tuple[float, int]:
    """JetStream publishes per second to a file-storage stream, `in_flight` at a time."""
    import nats
    from nats.js.api import StorageType, StreamConfig
    from nats.js.errors import NotFoundError

    nc = await nats.connect(NATS_URL, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream(timeout=10)
        name = "EVENTHUB_BENCH"
        try:
            await js.delete_stream(name)
        except NotFoundError:
            pass
        await js.add_stream(StreamConfig(name=name, subjects=["eventhub.bench"], storage=StorageType.FILE))
        try:
            async def burst() -> None:
                await asyncio.gather(*(js.publish("eventhub.bench", body) for _ in range(in_flight)))

            warm_until = time.perf_counter() + min(WARMUP_SECONDS, seconds / 4)
            while time.perf_counter() < warm_until:
                await burst()
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds and done < MAX_PUBLISHES:
                await burst()
                done += in_flight
            elapsed = time.perf_counter() - start
        finally:
            await js.delete_stream(name)
    finally:
        await nc.close()
    return done / elapsed, done


def _describe(name: str, r: LoadResult, cpu: float) -> str:
    return (f"{name:<9} {r.rate:>10,.0f}/s  {r.requests:>9,} answered  {r.errors:>6,} errors  "
            f"p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms  ({r.tool}, {r.seconds:.1f} s); server CPU "
            f"{100 * cpu / r.seconds:.0f}% of a core, {1e6 * cpu / max(r.requests, 1):.0f} us per insert")


class _Target:
    """One server under load, round after round: its results and the CPU they took."""

    def __init__(self, name: str, pid: int, url: str, profile: Path | None) -> None:
        self.name, self.pid, self.url, self.profile = name, pid, url, profile
        self.results: list[LoadResult] = []

    def load(self, body: bytes, connections: int, seconds: float, load: str) -> LoadResult:
        cpu = cpu_seconds(self.pid)
        if self.profile is None:
            result = post_load(self.url, body, connections=connections, seconds=seconds, force=load)
        else:
            from bench.profile import recorder

            stem = "insert" if self.name == "eventhub" else f"insert-{self.name}"
            path = self.profile / f"{stem}-round{len(self.results) + 1}.txt"
            with recorder(self.pid, path):
                result = post_load(self.url, body, connections=connections, seconds=seconds, force=load)
        print(_describe(self.name, result, cpu_seconds(self.pid) - cpu))
        self.results.append(result)
        return result


def run(seconds: float = 10.0, connections: int = 64, load: str | None = None, start_nats: bool = True,
        profile: Path | None = None, broker: bool = True, rounds: int = ROUNDS) -> list[Row]:
    """The ceiling and eventhub, both serving, loaded in turns `rounds` times (`seconds`
    each in all); the row is the round with the median ratio, so a spell of a busy machine
    weighs on both sides or on one round only."""
    load = load or tool()
    rounds = max(rounds, 1)
    body = body_of(200)
    warm = WARMUP_SECONDS if seconds >= 5 else 0.0  # short runs are smoke runs: no warm-up
    print(f"bench.insert: {connections} connections, {len(body)}-byte JSON bodies, load generator: {load}, "
          f"{rounds} rounds of {seconds / rounds:.1f} s each")
    if load == "aiohttp":
        print("  (the aiohttp client may not saturate the ceiling; install wrk for a true ceiling)")
    with (
        ceiling("noop") as noop,
        tempfile.TemporaryDirectory(prefix="bench-insert-") as tmp,
        hub(Path(tmp) / "insert.db") as server,
    ):
        create_channel(server.base, "bench")
        ceiling_target = _Target("ceiling", noop.pid, f"{noop.base}/channel/bench", profile)
        ours_target = _Target("eventhub", server.pid, f"{server.base}/channel/bench", profile)
        for target in (ceiling_target, ours_target):
            if warm:
                post_load(target.url, body, connections=connections, seconds=warm, force=load)
        before = int(health(server.base)["head"])  # type: ignore[call-overload]
        for _ in range(rounds):
            for target in (ceiling_target, ours_target):
                target.load(body, connections, seconds / rounds, load)
        written = int(health(server.base)["head"]) - before  # type: ignore[call-overload]
    answered = sum(r.requests for r in ours_target.results)
    if answered == 0:
        raise BenchError("eventhub answered no insert with 201 (is POST /channel/{name} served?)")
    if written < answered:
        raise BenchError(f"{answered} inserts answered but only {written} events in the log")
    print(f"  log head moved by {written:,} events (>= {answered:,} answered: every 201 is on disk)")
    pairs = sorted(zip(ours_target.results, ceiling_target.results), key=lambda p: p[0].rate / max(p[1].rate, 1e-9))
    ours, ceil = pairs[len(pairs) // 2]
    ratios = ", ".join(f"{o.rate / max(c.rate, 1e-9):.2f}" for o, c in zip(ours_target.results, ceiling_target.results))
    print(f"  ratio per round: {ratios}; the row is the median round")

    rows = [
        Row("durable HTTP insert rate", ours.rate, f"no-op aiohttp+msgspec POST ({load})", ceil.rate, "inserts/s", 0.5),
    ]
    if not broker:
        print("the broker row is left out (--no-broker)")
    elif ensure_nats(start_nats):
        nats_rate, published = asyncio.run(nats_publish_rate(body, seconds))
        print(f"{'nats':<9} {nats_rate:>10,.0f}/s  {published:>9,} acked publishes (JetStream, file storage, 64 in flight)")
        rows.append(Row("HTTP insert vs a broker", ours.rate, "NATS JetStream publish, 64 in flight", nats_rate, "inserts/s", 0.4))
    else:
        print("NATS is not listening on 127.0.0.1:4222: the broker row is left out")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.insert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per target (default 10)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--load", choices=("wrk", "aiohttp"), help="load generator (default: wrk if installed)")
    parser.add_argument("--no-start-nats", action="store_true", help="leave NATS alone if it is down (skip its row)")
    parser.add_argument("--no-broker", action="store_true", help="skip the NATS measurement")
    parser.add_argument("--profile", type=Path, help="record eventhub with py-spy into this folder")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/out/insert.json")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"turns of ceiling and eventhub (default {ROUNDS})")
    args = parser.parse_args(argv)
    rows = run(args.seconds, args.connections, args.load, not args.no_start_nats, args.profile, not args.no_broker,
               args.rounds)
    print_table("bench/insert.py: durable HTTP inserts", rows)
    if not args.no_save:
        save("insert", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
