"""Crash: a process appending under load is killed with SIGKILL; nothing it
acknowledged may be lost, and the log it leaves must be whole.

The child (`crash_writer.py`) runs 64 concurrent appenders and prints each acknowledged
event. The parent reads 2000 acknowledgements, kills the child at once (no sleeps: the
child is mid-load by construction), reads what was printed before the kill, and checks
the reopened file. Three runs on one file, so recovery from a crash is itself crashed.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from pathlib import Path

import pytest

from eventhub.store.sqlite import SQLiteStore
from tests.store.contract import assert_log_sound

HELPER = Path(__file__).with_name("crash_writer.py")
ROOT = Path(__file__).resolve().parents[2]
ACKS_BEFORE_KILL = 2000

Ack = tuple[int, str, int, str]


def _parse(line: bytes) -> Ack:
    position, stream, version, hash_hex = line.decode().split()
    return int(position), stream, int(version), hash_hex


async def _run_and_kill(path: str, tag: str) -> list[Ack]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HELPER),
        path,
        tag,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None and proc.stderr is not None
    acks: list[Ack] = []
    try:
        while len(acks) < ACKS_BEFORE_KILL:
            line = await proc.stdout.readline()
            if not line:
                await proc.wait()
                stderr = (await proc.stderr.read()).decode()
                pytest.fail(f"writer exited early ({proc.returncode}) after {len(acks)} acks:\n{stderr}")
            acks.append(_parse(line))
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert proc.returncode == -9, "killed by SIGKILL, not ended on its own"
    # Lines printed before the kill are acknowledgements too. Each flush is one write(2),
    # so a torn line is unlikely; whatever follows the last newline is dropped anyway.
    rest = await proc.stdout.read()
    acks += [_parse(line) for line in rest.split(b"\n")[:-1]]
    return acks


@pytest.mark.slow
async def test_sigkill_under_load_loses_no_acknowledged_event(tmp_path: Path) -> None:
    path = str(tmp_path / "events.db")
    acked: dict[int, Ack] = {}
    for run in range(3):
        acks = await _run_and_kill(path, f"run{run}")
        assert len(acks) >= ACKS_BEFORE_KILL
        positions = [a[0] for a in acks]
        assert len(set(positions)) == len(positions), "an acknowledged position was reported twice"
        assert not set(positions) & set(acked), "a new run reused an acknowledged position"
        acked.update((a[0], a) for a in acks)

        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        finally:
            conn.close()
        store = SQLiteStore(path)
        await store.open()
        try:
            events = await assert_log_sound(store)  # positions 1..head, versions, chain
            by_position = {e.position: e for e in events}
            for position, stream, version, hash_hex in acked.values():
                event = by_position.get(position)
                assert event is not None, f"acknowledged position {position} is missing"
                assert (event.stream, event.version, event.hash.hex()) == (stream, version, hash_hex)
            seen = [(e.stream, e.version) for e in events]
            assert len(seen) == len(set(seen)), "an event is stored twice"
            assert len(events) >= len(acked)
        finally:
            await store.close()
