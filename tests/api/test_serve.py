"""`eventhub serve` as a real process: it answers /health, and a bad start is one line and exit 2."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

ENTRY = [sys.executable, "-m", "api.cli"]
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTHUB_") and k != "DATABASE_URL"}
    env.update(extra)
    return env


@pytest.mark.slow
async def test_serve_answers_health_and_stops_cleanly(tmp_path: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [*ENTRY, "serve"],
        cwd=tmp_path,
        env=_env(EVENTHUB_PORT=str(port), PYTHONPATH=str(ROOT)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):  # bounded: the server needs a moment to bind
                try:
                    async with session.get(f"http://127.0.0.1:{port}/health") as resp:
                        body = await resp.json()
                        break
                except aiohttp.ClientConnectionError:
                    if proc.poll() is not None:
                        pytest.fail(proc.communicate()[1].decode())
                    await asyncio.sleep(0.05)
            else:
                pytest.fail("server never answered")
        assert body["status"] == "ok" and body["backend"] == "sqlite"
        assert (tmp_path / "eventhub.db").exists()  # DATABASE_URL unset: a file in the working directory
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


@pytest.mark.parametrize(
    ("setup", "env", "message"),
    [
        ("corrupt", {}, "database file is corrupt"),
        ("none", {"EVENTHUB_PORT": "eighty"}, "EVENTHUB_PORT"),
        ("none", {"DATABASE_URL": "mysql://nope"}, "DATABASE_URL"),
        ("missing-dir", {}, "cannot open database file"),
    ],
)
def test_a_bad_start_is_one_line_and_exit_2(tmp_path: Path, setup: str, env: dict[str, str], message: str) -> None:
    db = tmp_path / "eventhub.db"
    if setup == "corrupt":
        db.write_bytes(b"this is not an SQLite database, it is a text file" * 20)
    extra = {"DATABASE_URL": f"sqlite:///{db}", "EVENTHUB_PORT": str(_free_port()), **env}
    if setup == "missing-dir":
        extra["DATABASE_URL"] = f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}"
    proc = subprocess.run(
        [*ENTRY, "serve"], cwd=tmp_path, env=_env(PYTHONPATH=str(ROOT), **extra), capture_output=True, timeout=30
    )
    assert proc.returncode == 2
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr.decode()
