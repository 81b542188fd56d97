"""The servers a benchmark measures, each in its own process, and the two ceilings.

- `hub(...)` starts eventhub exactly as an operator does, `python -m api.cli serve`, with
  `DATABASE_URL`, `EVENTHUB_PORT` and `EVENTHUB_HOST=127.0.0.1` in its environment.
- `python -m bench.servers noop` is the HTTP insert ceiling: aiohttp on uvloop, a POST
  handler that decodes the JSON body with msgspec and answers 201, nothing else.
- `python -m bench.servers broadcast` is the fan-out ceiling: aiohttp on uvloop keeping
  its websockets in a list and sending each POST's line (an item URL) to every one.

Both ceilings serve the same paths as eventhub's channels (`POST /channel/{name}`,
`GET /channel/{name}/ws`) and `/health`, so the load generators cannot tell them apart.
Every child process gets SIGTERM when the benchmark process dies (Linux
`PR_SET_PDEATHSIG`), and the ceilings also stop by themselves after `--max-seconds`.

`BENCH_EXTRA_FACETS=api.channels` (comma-separated modules) adds facets that are not yet
in `api.app.FACETS` to the served app; it exists for benchmarking a facet before it is
wired, and the tests use it so they do not depend on the wiring.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
START_TIMEOUT = 120.0  # a 1,000,000-event log without snapshots is folded before /health answers
EXTRA_FACETS_ENV = "BENCH_EXTRA_FACETS"


class BenchError(RuntimeError):
    """A benchmark cannot run as set up (a route missing, a server that did not start)."""


# -- processes ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def raise_open_files() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn(cmd: Sequence[str], env: dict[str, str] | None = None, **kwargs: object) -> subprocess.Popen[bytes]:
    """A child in the project root that ends when this process ends."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(list(cmd), cwd=ROOT, env=full, preexec_fn=_die_with_parent, **kwargs)  # type: ignore[call-overload, no-any-return]


def stop(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    """SIGTERM (a graceful stop: eventhub writes its snapshots), then SIGKILL after `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def post_json(url: str, body: object, timeout: float = 10.0) -> tuple[int, bytes, dict[str, str]]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float = START_TIMEOUT) -> float:
    """Poll `url` until it answers 200; the monotonic time it first did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"server exited with {proc.returncode} before {url} answered")
        try:
            status, _ = get(url, timeout=1.0)
            if status == 200:
                return time.monotonic()
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.005)
    raise BenchError(f"{url} did not answer 200 within {timeout:.0f} s")


class Server:
    """A running server process: its pid, port and base URL, and how long it took to start."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, started: float, ready: float) -> None:
        self.proc = proc
        self.port = port
        self.base = f"http://{HOST}:{port}"
        self.start_seconds = ready - started

    @property
    def pid(self) -> int:
        return self.proc.pid


def hub_command() -> list[str]:
    """`python -m api.cli serve`, plus the facets named in BENCH_EXTRA_FACETS if any."""
    extra = [m.strip() for m in os.environ.get(EXTRA_FACETS_ENV, "").split(",") if m.strip()]
    if not extra:
        return [sys.executable, "-m", "api.cli", "serve"]
    code = (
        "import importlib, sys, api.app\n"
        f"for name in {extra!r}:\n"
        "    module = importlib.import_module(name)\n"
        "    if module not in api.app.FACETS:\n"
        "        api.app.FACETS = (*api.app.FACETS, module)\n"
        "from api.cli import main\n"
        "sys.exit(main(['serve']))\n"
    )
    return [sys.executable, "-c", code]


def hub_env(database: Path, port: int, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": f"sqlite:///{database}",
        "EVENTHUB_PORT": str(port),
        "EVENTHUB_HOST": HOST,
        "EVENTHUB_LOG_LEVEL": "WARNING",
        **extra,
    }


@contextmanager
def hub(database: Path, *, timeout: float = START_TIMEOUT, **extra_env: str) -> Iterator[Server]:
    """eventhub serving `database` on a free port; stopped gracefully on exit."""
    port = free_port()
    started = time.monotonic()
    proc = spawn(hub_command(), hub_env(database, port, **extra_env))
    try:
        ready = wait_ready(proc, f"http://{HOST}:{port}/health", timeout)
        yield Server(proc, port, started, ready)
    finally:
        stop(proc)


@contextmanager
def ceiling(kind: str, max_seconds: float = 900.0) -> Iterator[Server]:
    """One of this module's ceiling servers (`noop` or `broadcast`) on a free port."""
    port = free_port()
    started = time.monotonic()
    cmd = [sys.executable, "-m", "bench.servers", kind, "--port", str(port), "--max-seconds", str(max_seconds)]
    proc = spawn(cmd)
    try:
        ready = wait_ready(proc, f"http://{HOST}:{port}/health", 30.0)
        yield Server(proc, port, started, ready)
    finally:
        stop(proc, timeout=10.0)


def create_channel(base: str, name: str) -> None:
    """`POST /channel {"name": name}`; a clear error when the channels facet is not served."""
    status, body, _ = post_json(f"{base}/channel", {"name": name})
    if status == 404 or status == 405:
        raise BenchError(
            f"POST {base}/channel answered {status}: the channels facet is not served. Wire api.channels "
            f"into api.app.FACETS, or run with {EXTRA_FACETS_ENV}=api.channels to add it for the benchmark."
        )
    if status not in (200, 201):
        raise BenchError(f"POST {base}/channel answered {status}: {body[:200]!r}")


def health(base: str) -> dict[str, object]:
    status, body = get(f"{base}/health")
    if status != 200:
        raise BenchError(f"{base}/health answered {status}")
    return json.loads(body)  # type: ignore[no-any-return]


def cpu_seconds(*pids: int) -> float:
    """User + system CPU seconds the processes have used so far."""
    import psutil  # type: ignore[import-untyped]

    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def rss_bytes(pid: int) -> int:
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


# -- the ceilings -----------------------------------------------------------------------


def _noop_app() -> object:
    import msgspec
    from aiohttp import web

    decode = msgspec.json.decode

    async def insert(request: web.Request) -> web.Response:
        decode(await request.read())
        return web.Response(status=201)

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/channel/{name}", insert)
    app.router.add_get("/health", ok)
    return app


def _broadcast_app() -> object:
    from aiohttp import web

    sockets: list[web.WebSocketResponse] = []
    counter = [0]

    async def subscribe(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sockets.append(ws)
        try:
            async for _ in ws:
                pass
        finally:
            sockets.remove(ws)
        return ws

    async def insert(request: web.Request) -> web.Response:
        await request.read()
        counter[0] += 1
        line = f"http://{request.host}/channel/{request.match_info['name']}/{counter[0]}"
        for ws in list(sockets):
            if not ws.closed:
                await ws.send_str(line)
        return web.Response(status=201, headers={"Location": line})

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text=f"{len(sockets)}")

    app = web.Application()
    app.router.add_post("/channel/{name}", insert)
    app.router.add_get("/channel/{name}/ws", subscribe)
    app.router.add_get("/health", ok)
    return app


async def _serve(app: object, port: int, max_seconds: float) -> None:
    from aiohttp import web

    assert isinstance(app, web.Application)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, port, backlog=4096).start()
    try:
        await asyncio.wait_for(stopping.wait(), max_seconds)
    except TimeoutError:
        pass
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.servers", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("noop", "broadcast"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="stop by itself after this long")
    args = parser.parse_args(argv)
    import uvloop

    raise_open_files()
    app = _noop_app() if args.kind == "noop" else _broadcast_app()
    uvloop.run(_serve(app, args.port, args.max_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
