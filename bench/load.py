"""The HTTP POST load generator: `wrk` with a Lua script when installed, else aiohttp.

Always a separate process from the server it loads. `wrk` (Debian's package) is the one
that can saturate an aiohttp server on this machine; the aiohttp client is the fallback
for machines without it and says so, since it may not saturate the ceiling (then the
ceiling's figure is the client's, and the ratio flatters the server measured).

    python -m bench.load --url http://127.0.0.1:8080/channel/bench --seconds 5   # aiohttp client
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.servers import spawn

MAX_REQUESTS = 5_000_000  # per run, whatever the time limit says

# Lua for wrk: the same POST on every connection, and a machine-readable summary line.
_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[{body}]==]

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class LoadResult:
    tool: str  # "wrk" or "aiohttp"
    requests: int  # answered with 2xx/3xx
    errors: int  # connect/read/write errors, timeouts and other statuses
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def body_of(size: int = 200) -> bytes:
    """A JSON object of exactly `size` bytes (an insert of 200 bytes, as the issue says)."""
    head = b'{"source":"bench","seq":12345,"payload":"'
    tail = b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def tool() -> str:
    return "wrk" if shutil.which("wrk") else "aiohttp"


def post_load(url: str, body: bytes, *, connections: int = 64, seconds: float = 10.0, force: str | None = None) -> LoadResult:
    """POST `body` to `url` over `connections` keep-alive connections for `seconds`."""
    which = force or tool()
    if which == "wrk":
        return _wrk(url, body, connections, seconds)
    return _aiohttp(url, body, connections, seconds)


def _wrk(url: str, body: bytes, connections: int, seconds: float) -> LoadResult:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(_LUA.format(body=body.decode()))
        threads = max(1, min(2, connections))
        cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
               "--timeout", "5s", "-s", str(script), url]
        proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=seconds + 60)
    line = next((x for x in out.decode().splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.decode()[-500:]} {out.decode()[-500:]}")
    s = json.loads(line[6:])
    errors = s["connect"] + s["read"] + s["write"] + s["status"] + s["timeout"]
    return LoadResult("wrk", s["requests"] - s["status"], errors, s["duration_us"] / 1e6, s["p50_us"] / 1e3, s["p99_us"] / 1e3)


def _aiohttp(url: str, body: bytes, connections: int, seconds: float) -> LoadResult:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        f.write(body)
        f.flush()
        cmd = [sys.executable, "-m", "bench.load", "--url", url, "--connections", str(connections),
               "--seconds", str(seconds), "--body-file", f.name]
        proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=seconds + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"aiohttp load failed ({proc.returncode}): {err.decode()[-800:]}")
    s = json.loads(out.decode().strip().splitlines()[-1])
    return LoadResult("aiohttp", s["requests"], s["errors"], s["seconds"], s["p50_ms"], s["p99_ms"])


# -- the aiohttp client, run in its own process -------------------------------------------


async def _client(url: str, body: bytes, connections: int, seconds: float) -> dict[str, float]:
    import aiohttp

    ok, errors = 0, 0
    latencies: list[float] = []
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
        start = time.perf_counter()
        deadline = start + seconds

        async def worker() -> None:
            nonlocal ok, errors
            while time.perf_counter() < deadline and ok + errors < MAX_REQUESTS:
                sent = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as r:
                        await r.read()
                        if r.status < 400:
                            ok += 1
                            if len(latencies) < 200_000:
                                latencies.append(time.perf_counter() - sent)
                        else:
                            errors += 1
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - start
    latencies.sort()

    def pick(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3 if latencies else 0.0

    return {"requests": ok, "errors": errors, "seconds": elapsed, "p50_ms": pick(0.5), "p99_ms": pick(0.99)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--body-file", type=Path, help="the body to POST (default: 200 bytes of JSON)")
    args = parser.parse_args(argv)
    import uvloop

    body = args.body_file.read_bytes() if args.body_file else body_of()
    result = uvloop.run(_client(args.url, body, args.connections, args.seconds))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
