"""Exports end to end: how many exports finish per second, and how long each one takes.

Three processes: the eventhub server (exports facet, SQLite, uvloop), a receiving
server that answers 200 at once, and this one, the load: `--clients` clients, each with
its own macaroon, each sending `--per-client` exports. In `closed` mode a client sends
one export, long-polls it until Finished, then sends the next (latency is one export's
trip); in `burst` mode a client queues all its exports first, then long-polls each
(latency includes waiting behind the client's own earlier exports, which go out in
order). Latency is measured from sending the POST to the long poll answering Finished.

    .venv/bin/python bench/exports.py --clients 100 --per-client 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

KEY = "bench-export-key"
TARGET = "eventhub"
MAX_POLLS = 200  # per export: a bound, not an expectation


# -- the two servers ------------------------------------------------------------------


def _listen() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


async def _serve(app: web.Application) -> None:
    """Run `app` on a free port, print `PORT n`, stop on SIGTERM."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = _listen()
    await web.SockSite(runner, sock, backlog=1024).start()
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    await stop.wait()
    await runner.cleanup()


def run_receiver() -> None:
    import uvloop

    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/{tail:.*}", ok)
    uvloop.run(_serve(app))


def run_server() -> None:
    import uvloop

    from api import exports
    from api.app import create_app
    from eventhub.settings import load_settings

    uvloop.run(_serve(create_app(load_settings(), facets=(exports,))))


# -- the load -------------------------------------------------------------------------


class _Client:
    def __init__(self, session: aiohttp.ClientSession, base: str, receiver: str, name: str) -> None:
        from api.exports import mint_macaroon

        self.session = session
        self.base = base
        self.receiver = receiver
        self.keys = {p: mint_macaroon(KEY, TARGET, p, receiver, name) for p in ("/export", "/lp/export")}

    async def post(self, path: str, export_id: str = "", data: str = '{"n": 0}') -> dict[str, object]:
        body = {"id": export_id, "uri": self.receiver, "data": data}
        params = {"timeout": "30"} if path == "/lp/export" else None
        headers = {"X-Api-Key": self.keys[path]}
        async with self.session.post(self.base + path, json=body, params=params, headers=headers) as r:
            if r.status != 200:
                raise RuntimeError(f"{path}: {r.status} {await r.text()}")
            return await r.json()  # type: ignore[no-any-return]

    async def finished(self, export_id: str) -> None:
        for _ in range(MAX_POLLS):
            answer = await self.post("/lp/export", export_id)
            if answer["state"] == "Finished":
                ext = answer["ext_response"]
                if not isinstance(ext, dict) or ext.get("status") != 200:
                    raise RuntimeError(f"{export_id} finished with {ext}")
                return
        raise RuntimeError(f"{export_id} not finished after {MAX_POLLS} polls")


async def _client_closed(c: _Client, n: int, latencies: list[float]) -> None:
    for i in range(n):
        started = time.perf_counter()
        created = await c.post("/export", data=f'{{"n": {i}}}')
        await c.finished(str(created["id"]))
        latencies.append(time.perf_counter() - started)


async def _client_burst(c: _Client, n: int, latencies: list[float]) -> None:
    sent: list[tuple[float, str]] = []
    for i in range(n):
        started = time.perf_counter()
        created = await c.post("/export", data=f'{{"n": {i}}}')
        sent.append((started, str(created["id"])))
    for started, export_id in sent:
        await c.finished(export_id)
        latencies.append(time.perf_counter() - started)


async def load(base: str, receiver: str, clients: int, per_client: int, mode: str) -> tuple[float, list[float]]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        cs = [_Client(session, base, receiver, f"client{i}") for i in range(clients)]
        await cs[0].post("/export")  # warm up: connections, projections, first fsync
        latencies: list[float] = []
        run = _client_closed if mode == "closed" else _client_burst
        started = time.perf_counter()
        await asyncio.gather(*(run(c, per_client, latencies) for c in cs))
        return time.perf_counter() - started, latencies


# -- orchestration --------------------------------------------------------------------


def _start(role: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--role", role], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"the {role} did not start (exit {proc.wait()})")
    return proc, int(line.split()[1])


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=("load", "server", "receiver"), default="load", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--per-client", type=int, default=20)
    parser.add_argument("--parallel", type=int, default=100, help="EVENTHUB_EXPORT_PARALLEL of the server")
    parser.add_argument("--mode", choices=("closed", "burst"), default="closed")
    parser.add_argument("--database", help="SQLite file (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.role == "receiver":
        run_receiver()
        return 0
    if args.role == "server":
        run_server()
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        database = args.database or os.path.join(tmp, "bench.db")
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "DATABASE_URL": f"sqlite:///{database}",
            "EVENTHUB_EXPORT_MACAROON_KEY": KEY,
            "EVENTHUB_EXPORT_TARGET": TARGET,
            "EVENTHUB_EXPORT_PARALLEL": str(args.parallel),
            "EVENTHUB_LONG_POLL_MAX_SECONDS": "30",
            "EVENTHUB_LOG_LEVEL": "WARNING",
        }
        receiver, receiver_port = _start("receiver", env)
        try:
            server, server_port = _start("server", env)
            try:
                wall, latencies = asyncio.run(
                    load(f"http://127.0.0.1:{server_port}", f"http://127.0.0.1:{receiver_port}/hook",
                         args.clients, args.per_client, args.mode)
                )
            finally:
                _stop(server)
        finally:
            _stop(receiver)

    total = len(latencies)
    ms = [v * 1000 for v in latencies]
    print(f"exports end to end: {args.clients} clients x {args.per_client}, mode {args.mode}, "
          f"sqlite, export_parallel {args.parallel}")
    print(f"{'exports':>8} {'wall s':>8} {'finished/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    print(f"{total:>8} {wall:>8.2f} {total / wall:>11.1f} {_percentile(ms, 50):>8.1f} "
          f"{_percentile(ms, 99):>8.1f} {max(ms):>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
