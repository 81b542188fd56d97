"""Websocket subscribers for the fan-out and memory benchmarks, in a process of their own.

    python -m bench.subscribers --url ws://127.0.0.1:8080/channel/bench/ws --count 500

A minimal RFC 6455 client on asyncio protocols (no per-message coroutine), so that the
subscribers cost far less CPU than the server delivering to them and do not become the
bottleneck on a 2-core machine. Each connection records, per message, the text (an item
URL) and the monotonic time its bytes arrived (`CLOCK_MONOTONIC`, the same clock in
every process of the machine).

Driven by lines on stdin; answers on stdout:

    (start)                  -> READY <connected>
    MARK                     -> MARKED            forget everything received so far
    COLLECT <n> <secs> <path>-> DONE <received> <open>   wait until every open connection
                                has received n messages since MARK (or secs pass), then
                                write {"lines": {text: [times]}, ...} as msgpack to path
    QUIT                     -> (exits)

The process also exits by itself after `--max-seconds`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import select
import subprocess
import sys
import time
from urllib.parse import urlsplit

import msgspec

CONNECT_PARALLEL = 64  # handshakes in flight: stays under the server's listen backlog
_now = time.monotonic


class Subscriber(asyncio.Protocol):
    """One websocket: handshake, then unmasked server frames parsed straight from the buffer."""

    __slots__ = ("request", "transport", "ready", "buffer", "upgraded", "lines", "times", "closed")

    def __init__(self, request: bytes, ready: asyncio.Future[None]) -> None:
        self.request = request
        self.ready = ready
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.upgraded = False
        self.lines: list[bytes] = []
        self.times: list[float] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is not an asyncio.Transport subclass)
        transport.write(self.request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed during the handshake: {exc}"))

    def data_received(self, data: bytes) -> None:
        now = _now()
        buf = self.buffer + data if self.buffer else data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buf
                return
            status = buf[: buf.find(b"\r\n")]
            if b" 101 " not in status:
                self.ready.set_exception(ConnectionError(f"handshake refused: {status.decode(errors='replace')}"))
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded = True
            self.ready.set_result(None)
            buf = buf[end + 4 :]
        i, n = 0, len(buf)
        while n - i >= 2:
            b0, b1 = buf[i], buf[i + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if n - i < 4:
                    break
                length, head = int.from_bytes(buf[i + 2 : i + 4], "big"), 4
            elif length == 127:
                if n - i < 10:
                    break
                length, head = int.from_bytes(buf[i + 2 : i + 10], "big"), 10
            if b1 & 0x80:  # masked (servers do not mask; tolerated anyway)
                head += 4
            if n - i < head + length:
                break
            payload = buf[i + head : i + head + length]
            if b1 & 0x80:
                key = buf[i + head - 4 : i + head]
                payload = bytes(c ^ key[k % 4] for k, c in enumerate(payload))
            opcode = b0 & 0x0F
            if opcode in (1, 2, 0):
                self.lines.append(payload)
                self.times.append(now)
            elif opcode == 9:  # ping: answer with a pong carrying the same payload
                self._send(0xA, payload)
            elif opcode == 8:  # close: echo it and hang up
                self._send(0x8, payload[:2])
                assert self.transport is not None
                self.transport.close()
            i += head + length
        self.buffer = buf[i:]

    def _send(self, opcode: int, payload: bytes) -> None:
        # client frames must be masked; the zero key leaves the payload as it is
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)


def _handshake(url: str) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    return host, port, request


async def connect_all(url: str, count: int, timeout: float = 120.0) -> list[Subscriber]:
    loop = asyncio.get_running_loop()
    host, port, request = _handshake(url)
    gate = asyncio.Semaphore(CONNECT_PARALLEL)

    async def one() -> Subscriber:
        async with gate:
            ready: asyncio.Future[None] = loop.create_future()
            _, sub = await loop.create_connection(lambda: Subscriber(request, ready), host, port)
            await ready
            return sub

    return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), timeout)


async def collect(subs: list[Subscriber], expected: int, seconds: float, path: str) -> tuple[int, int]:
    deadline = _now() + seconds
    while _now() < deadline and any(not s.closed and len(s.lines) < expected for s in subs):
        await asyncio.sleep(0.01)
    lines: dict[str, list[float]] = {}
    for s in subs:
        for text, at in zip(s.lines, s.times):
            lines.setdefault(text.decode(), []).append(at)
    received = sum(len(s.lines) for s in subs)
    still_open = sum(not s.closed for s in subs)
    counts = [len(s.lines) for s in subs]
    with open(path, "wb") as f:
        f.write(msgspec.msgpack.encode({"lines": lines, "counts": counts, "open": still_open}))
    return received, still_open


async def run(url: str, count: int, max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    subs = await connect_all(url, count)
    print(f"READY {len(subs)}", flush=True)
    deadline = _now() + max_seconds
    try:
        while (left := deadline - _now()) > 0:
            try:
                line = await asyncio.wait_for(reader.readline(), left)
            except TimeoutError:
                break
            words = line.decode().split()
            if not words or words[0] == "QUIT":
                break
            if words[0] == "MARK":
                for s in subs:
                    s.lines, s.times = [], []
                print("MARKED", flush=True)
            elif words[0] == "COLLECT":
                received, still_open = await collect(subs, int(words[1]), float(words[2]), words[3])
                print(f"DONE {received} {still_open}", flush=True)
    finally:
        for s in subs:
            if s.transport is not None:
                s.transport.close()


# -- the driving side: a pool of subscriber processes -------------------------------------


class Pool:
    """`processes` subscriber processes of `per_process` connections each, driven by line."""

    def __init__(self, url: str, processes: int, per_process: int, max_seconds: float = 600.0) -> None:
        from bench.servers import spawn

        self.url = url
        self.size = processes * per_process
        cmd = [sys.executable, "-m", "bench.subscribers", "--url", url, "--count", str(per_process),
               "--max-seconds", str(max_seconds)]
        self.procs = [spawn(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(processes)]
        self._pending = [b"" for _ in self.procs]

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _readline(self, i: int, timeout: float) -> str:
        proc = self.procs[i]
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = _now() + timeout
        while b"\n" not in self._pending[i]:
            left = deadline - _now()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"subscriber process {proc.pid} said nothing for {timeout:.0f} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise ConnectionError(f"subscriber process {proc.pid} ended (exit {proc.wait()})")
            self._pending[i] += chunk
        line, _, self._pending[i] = self._pending[i].partition(b"\n")
        return line.decode()

    def _all(self, command: str | None, expect: str, timeout: float) -> list[list[str]]:
        for proc in self.procs:
            if command is not None:
                assert proc.stdin is not None
                proc.stdin.write(command.encode() + b"\n")
                proc.stdin.flush()
        answers = []
        for i in range(len(self.procs)):
            words = self._readline(i, timeout).split()
            if not words or words[0] != expect:
                raise RuntimeError(f"subscriber process answered {words!r}, expected {expect}")
            answers.append(words)
        return answers

    def ready(self, timeout: float = 180.0) -> int:
        """Wait until every connection is upgraded; how many are."""
        return sum(int(w[1]) for w in self._all(None, "READY", timeout))

    def mark(self) -> None:
        self._all("MARK", "MARKED", 30.0)

    def collect(self, expected: int, seconds: float, folder: str) -> Collected:
        """Wait (at most `seconds`) for `expected` messages per connection since `mark`."""
        paths = [os.path.join(folder, f"sub{i}.msgpack") for i in range(len(self.procs))]
        for proc, path in zip(self.procs, paths):
            assert proc.stdin is not None
            proc.stdin.write(f"COLLECT {expected} {seconds} {path}\n".encode())
            proc.stdin.flush()
        result = Collected()
        for i, path in enumerate(paths):
            words = self._readline(i, seconds + 120.0).split()
            if not words or words[0] != "DONE":
                raise RuntimeError(f"subscriber process answered {words!r} to COLLECT")
            with open(path, "rb") as f:
                part = msgspec.msgpack.decode(f.read())
            for text, times in part["lines"].items():
                result.lines.setdefault(text, []).extend(times)
            result.counts.extend(part["counts"])
            result.open += part["open"]
        return result

    def close(self) -> None:
        from bench.servers import stop

        for proc in self.procs:
            if proc.poll() is None and proc.stdin is not None:
                try:
                    proc.stdin.write(b"QUIT\n")
                    proc.stdin.close()
                except OSError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                stop(proc, timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()


class Collected:
    """What a pool received since `mark`: receive times per line, counts per connection."""

    def __init__(self) -> None:
        self.lines: dict[str, list[float]] = {}
        self.counts: list[int] = []
        self.open = 0

    @property
    def received(self) -> int:
        return sum(self.counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.subscribers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args(argv)
    import uvloop

    from bench.servers import raise_open_files

    raise_open_files()
    uvloop.run(run(args.url, args.count, args.max_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
