"""The benchmark scripts run end to end on tiny sizes: servers start, load runs, tables print.

No figure is asserted (a smoke run measures nothing); these only catch a script that no
longer runs. Each starts real processes (eventhub, a ceiling server, subscriber
processes) on 127.0.0.1, so they are marked slow. NATS is never started here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import all as bench_all
from bench import coldstart, fanout, insert, memory
from bench.common import Row
from bench.load import body_of, post_load
from bench.profile import summarize
from bench.servers import ceiling
from bench.subscribers import Subscriber

pytestmark = pytest.mark.slow


def test_insert_runs_with_the_aiohttp_load_generator(capsys: pytest.CaptureFixture[str]) -> None:
    assert insert.main(["--seconds", "1", "--connections", "4", "--load", "aiohttp", "--no-broker", "--no-save"]) == 0
    out = capsys.readouterr().out
    assert "load generator: aiohttp" in out and "every 201 is on disk" in out
    assert "| durable HTTP insert rate" in out


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_wrk_runs_its_lua_script_against_the_ceiling() -> None:
    with ceiling("noop", max_seconds=30) as server:
        result = post_load(f"{server.base}/channel/bench", body_of(200), connections=2, seconds=1, force="wrk")
    assert result.tool == "wrk" and result.requests > 0 and result.errors == 0


def test_fanout_runs_against_both_servers(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--subscribers", "10", "--rate", "50", "--seconds", "0.2", "--burst", "10", "--no-save"]
    assert fanout.main(args) == 0
    out = capsys.readouterr().out
    ceiling_part, eventhub_part = out.split("eventhub ", 1)
    for part in (ceiling_part, eventhub_part):  # every subscriber got every line, on both servers
        assert "50 inserts/s: latency" in part and "(100/100 lines)" in part  # 10 inserts x 10 subscribers
        assert "12.5 inserts/s: latency" in part and "(20/20 lines)" in part
        assert "(100/100 lines in" in part  # the burst
    assert "| fan-out latency p99 (ms), 10 subs, 50/s" in out and "| fan-out throughput (deliveries/s)" in out


def test_all_writes_the_table_json_and_chart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_all.main(["--quick", "--only", "replay", "--out", str(tmp_path)]) == 0
    assert "| replay: full rebuild, 2,000 events" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["quick"] is True and results["errors"] == {}
    assert [r["question"] for r in results["rows"]] == ["replay: verify, 2,000 events", "replay: full rebuild, 2,000 events"]
    assert all(r["target"] == 0.3 and isinstance(r["holds"], bool) for r in results["rows"])
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = bench_all.markdown(results)
    assert "| replay: verify, 2,000 events | " in table and "| ≥ 0.30 |" in table


def test_coldstart_restarts_with_snapshots(capsys: pytest.CaptureFixture[str]) -> None:
    assert coldstart.main(["--events", "300", "--repeats", "1", "--no-save"]) == 0
    out = capsys.readouterr().out
    assert "snapshots now: channels@300" in out
    assert "| cold start, 300-event log + snapshots (s)" in out


def test_memory_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert memory.main(["--subscribers", "20", "--no-ceiling", "--no-save"]) == 0
    assert "| memory: RSS, 20 idle ws subscribers (MB)" in capsys.readouterr().out


def test_a_margin_row_holds_by_difference() -> None:
    assert Row("cold", 1.9, "empty", 1.0, "s", 0.0, higher=False, margin=1.0).holds
    assert not Row("mem", 300.0, "idle", 100.0, "MB", 0.0, higher=False, margin=150.0).holds
    assert Row("mem", 300.0, "idle", 100.0, "MB", 0.0, higher=False, margin=150.0).target_text == "+<=150 MB"


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


async def test_the_subscriber_parses_frames_split_anywhere() -> None:
    import asyncio

    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    sub = Subscriber(b"GET / HTTP/1.1\r\n\r\n", ready)
    transport = _Transport()
    sub.connection_made(transport)  # type: ignore[arg-type]
    long = b"y" * 300
    stream = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
        + b"\x81\x05hello"
        + b"\x89\x02hi"  # ping
        + b"\x81\x7e" + len(long).to_bytes(2, "big") + long
        + b"\x81\x00"
    )
    for i in range(0, len(stream), 7):  # 7-byte pieces cut through headers and frames
        sub.data_received(stream[i : i + 7])
    assert ready.done() and sub.lines == [b"hello", long, b""]
    assert transport.written[-1] == b"\x8a\x82\0\0\0\0hi"  # the pong, masked with the zero key
    sub.data_received(b"\x88\x02\x03\xe8")  # close
    assert transport.closed


def test_the_profile_summary_counts_leaf_and_inclusive_frames(tmp_path: Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text(
        "process 1:main;run (a/b.py:1);insert (api/channels.py:10) 3\n"
        "process 1:main;run (a/b.py:1) 1\n"
    )
    text = summarize(raw)
    assert "4 samples" in text and "75.0%  insert (api/channels.py)" in text and "100.0%  run (a/b.py)" in text
