"""The core command line: verify (and tampering), tail (and --follow), export/import, stats.

Commands run in-process through `api.cli.main` (in a thread: each runs its own event
loop, as from a shell) and, for `tail --follow`, as a real subprocess. Every command
runs against SQLite and PostgreSQL; tampering edits the rows behind the store's back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import sqlite3
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from api.cli import main
from eventhub.cli import READ_BATCH, Progress, read_batches
from eventhub.chain import digest, encode_meta, event_hash
from eventhub.clock import ManualClock
from eventhub.events import FACT_CONTENT_TYPE, Event, NewEvent, StreamAppend
from eventhub.store import store_from_url

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
JSON = {"content-type": FACT_CONTENT_TYPE}  # facet events: data shown decoded
RAW = {"content-type": "application/octet-stream"}


def _sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on its own loop in another thread (fixtures are synchronous)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A log URL on each backend (PostgreSQL: a fresh database, dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'log.db'}"
        return
    from tests.store.pg import PgDatabases, admin_connect

    async def create() -> tuple[PgDatabases, str]:
        admin = await admin_connect()
        dbs = PgDatabases(admin)
        dsn = await dbs.create()
        await admin.close()
        return dbs, dsn

    async def drop(dbs: PgDatabases) -> None:
        dbs.admin = await admin_connect()
        try:
            await dbs.drop_all()
        finally:
            await dbs.admin.close()

    dbs, dsn = _sync(create())
    try:
        yield dsn
    finally:
        _sync(drop(dbs))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'source.db'}"


def path_of(url: str) -> str:
    return url[len("sqlite:///") :]


async def fill(url: str, rounds: int = 10, *, clock: ManualClock | None = None, purge: tuple[int, ...] = (4,)) -> list[Event]:
    """A mixed log: JSON facet events on `spec:` streams, raw content on a channel."""
    async with store_from_url(url, clock=clock or ManualClock()) as store:
        for i in range(rounds):
            await store.append(
                StreamAppend(f"spec:s{i % 3}", [NewEvent("RevisionUploaded", msgspec.json.encode({"i": i}), JSON)]),
                StreamAppend("channel:c", [NewEvent("ItemInserted", bytes([0, 1, 2, i]), RAW)]),
            )
        await store.purge(list(purge))
        return await store.read_all(0, 10_000)


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`eventhub ARGV` in-process; (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = await in_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn` in a thread of its own (a command runs its own event loop, as from a shell),
    joined before returning so no worker thread outlives the test."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args, **kwargs))


def tamper(url: str, sql: str, *params: object) -> None:
    """Change rows behind the store's back."""
    if url.startswith("sqlite"):
        with sqlite3.connect(path_of(url)) as conn:
            conn.execute(sql.replace("$1", "?").replace("$2", "?"), params)
        return
    import asyncpg  # type: ignore[import-untyped]

    async def go() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(sql, *params)
        finally:
            await conn.close()

    _sync(go())


# -- help -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["verify", "tail", "export", "import", "copy", "stats", "replay", "serve"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: eventhub {command}" in capsys.readouterr().out


def test_progress_draws_only_on_a_terminal() -> None:
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term, pipe = Terminal(), io.StringIO()
    for out in (term, pipe):
        bar = Progress(200, "verify", out)
        bar.update(50)
        bar.update(51)  # same percent: not redrawn
        bar.update(200)
        bar.done()
    assert term.getvalue() == f"\rverify [{'#' * 6:<25}]  25% 50/200\rverify [{'#' * 25}] 100% 200/200\n"
    assert pipe.getvalue() == ""


# -- verify ---------------------------------------------------------------------------


async def test_verify_an_intact_log_with_a_purged_payload(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    events = await fill(url)
    assert events[3].purged  # a purged payload is not tampering
    code, out, _ = await run(capsys, "verify", "--database-url", url)
    assert code == 0
    assert out == f"ok: 20 events, head 20, chain {events[-1].hash.hex()}\n"
    code, out, _ = await run(capsys, "verify", "--database-url", url, "--from", "11")
    assert (code, out) == (0, f"ok: 10 events, head 20, chain {events[-1].hash.hex()}\n")


async def test_verify_names_a_changed_data_byte(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    events = await fill(url)
    data = bytearray(events[6].data or b"")
    data[0] ^= 1
    tamper(url, "UPDATE events SET data = $1 WHERE position = $2", bytes(data), 7)
    code, out, _ = await run(capsys, "verify", "--database-url", url)
    assert (code, out) == (1, "broken at position 7: data does not match its digest\n")


async def test_verify_names_a_changed_type(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    await fill(url)
    tamper(url, "UPDATE events SET type = $1 WHERE position = $2", "RevisionDeleted", 9)
    code, out, _ = await run(capsys, "verify", "--database-url", url)
    assert (code, out) == (1, "broken at position 9: hash does not cover the event's fields\n")
    # starting past the break still anchors on the (checked) event before the start
    code, out, _ = await run(capsys, "verify", "--database-url", url, "--from", "10")
    assert code == 1 and out.startswith("broken at position 9:")


async def test_verify_names_a_deleted_row(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    await fill(url)
    tamper(url, "DELETE FROM events WHERE position = $1", 12)
    code, out, _ = await run(capsys, "verify", "--database-url", url)
    assert code == 1 and out.startswith("broken at position 12: position 12 is missing")


async def test_verify_catches_a_row_rewritten_with_its_own_hash(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A forger who rehashes the row they changed breaks the link to the next one."""
    events = await fill(url)
    e = events[4]
    data = b"forged"
    d = digest(data)
    h = event_hash(e.prev_hash, e.position, e.stream, e.version, e.type, encode_meta(e.meta), e.recorded_at, d)
    tamper(url, "UPDATE events SET data = $1, digest = $2, hash = $3 WHERE position = 5", data, d, h)
    code, out, _ = await run(capsys, "verify", "--database-url", url)
    assert (code, out) == (1, "broken at position 6: previous hash does not match the event before it\n")


def test_verify_names_unreadable_meta(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    _sync(fill(sqlite_url))
    tamper(sqlite_url, "UPDATE events SET meta = $1 WHERE position = $2", b"{not json", 13)
    assert main(["verify", "--database-url", sqlite_url]) == 1
    assert capsys.readouterr().out.startswith("broken at position 13: ")
    # an earlier break in the same batch is still the one named
    tamper(sqlite_url, "UPDATE events SET type = $1 WHERE position = $2", "Forged", 11)
    assert main(["verify", "--database-url", sqlite_url]) == 1
    assert capsys.readouterr().out == "broken at position 11: hash does not cover the event's fields\n"


async def fill_long(url: str, n: int) -> list[Event]:
    """`n` events in a few appends: a log longer than one read of a full walk."""
    async with store_from_url(url, clock=ManualClock()) as store:
        events: list[Event] = []
        for first in range(0, n, 1000):
            facts = [NewEvent("RevisionUploaded", msgspec.json.encode({"i": i}), JSON) for i in range(first, min(first + 1000, n))]
            events += await store.append(StreamAppend("spec:long", facts))
        return events


async def test_verify_walks_read_after_read(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    n = 2 * READ_BATCH + 500
    events = await fill_long(url, n)
    code, out, _ = await run(capsys, "verify", "--database-url", url)
    assert (code, out) == (0, f"ok: {n} events, head {n}, chain {events[-1].hash.hex()}\n")
    code, out, _ = await run(capsys, "verify", "--database-url", url, "--from", str(READ_BATCH + 2))
    assert (code, out) == (0, f"ok: {n - READ_BATCH - 1} events, head {n}, chain {events[-1].hash.hex()}\n")
    tamper(url, "UPDATE events SET type = $1 WHERE position = $2", "Forged", 2 * READ_BATCH + 7)
    code, out, _ = await run(capsys, "verify", "--database-url", url)
    assert (code, out) == (1, f"broken at position {2 * READ_BATCH + 7}: hash does not cover the event's fields\n")


def test_verify_names_unreadable_meta_in_a_later_read(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The rows of the failed read before the unreadable one are walked first."""
    _sync(fill_long(sqlite_url, 2 * READ_BATCH + 500))
    bad = 2 * READ_BATCH + 100
    tamper(sqlite_url, "UPDATE events SET meta = $1 WHERE position = $2", b"{not json", bad)
    assert main(["verify", "--database-url", sqlite_url]) == 1
    assert capsys.readouterr().out == f"broken at position {bad}: event at position {bad} is corrupt: unreadable meta\n"
    tamper(sqlite_url, "UPDATE events SET type = $1 WHERE position = $2", "Forged", bad - 1)
    assert main(["verify", "--database-url", sqlite_url]) == 1
    assert capsys.readouterr().out == f"broken at position {bad - 1}: hash does not cover the event's fields\n"


async def test_read_batches_cover_the_range_once_in_order(sqlite_url: str) -> None:
    events = await fill_long(sqlite_url, 23)
    async with store_from_url(sqlite_url) as store:
        batches = [b async for b in read_batches(store, 4, 21, size=5)]
        assert [len(b) for b in batches] == [5, 5, 5, 2]
        assert [e for b in batches for e in b] == events[4:21]
        assert [b async for b in read_batches(store, 21, 21)] == []


def test_read_only_commands_never_create_a_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.db"
    for command in (["verify"], ["tail"], ["stats"], ["export", str(tmp_path / "x.jsonl")], ["replay"]):
        assert main([*command, "--database-url", f"sqlite:///{missing}"]) == 2
        assert f"no database at {missing}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_read_only_commands_leave_the_file_unchanged(sqlite_url: str, tmp_path: Path) -> None:
    _sync(fill(sqlite_url))
    before = Path(path_of(sqlite_url)).read_bytes()
    for command in (["verify"], ["tail"], ["stats"], ["export", str(tmp_path / "x.jsonl")], ["replay"]):
        assert main([*command, "--database-url", sqlite_url]) == 0
    assert Path(path_of(sqlite_url)).read_bytes() == before
    with sqlite3.connect(path_of(sqlite_url)) as conn:
        assert conn.execute("SELECT count(*) FROM snapshots").fetchone() == (0,)


# -- tail -----------------------------------------------------------------------------


async def test_tail_prints_json_lines_with_filters(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    events = await fill(url)
    code, out, _ = await run(capsys, "tail", "--database-url", url)
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [e["position"] for e in lines] == list(range(1, 21))
    spec, raw, purged = lines[0], lines[1], lines[3]
    assert spec["data"] == {"i": 0} and spec["stream"] == "spec:s0" and spec["type"] == "RevisionUploaded"
    assert "data" not in raw and raw["size"] == 4 and raw["digest"] == events[1].digest.hex()
    assert purged["purged"] is True and "data" not in purged
    _, out, _ = await run(capsys, "tail", "--database-url", url, "--stream", "spec:s1", "--from", "5")
    assert [json.loads(line)["data"] for line in out.splitlines()] == [{"i": 4}, {"i": 7}]
    _, out, _ = await run(capsys, "tail", "--database-url", url, "--type", "ItemInserted", "--from", "-4")
    assert [json.loads(line)["position"] for line in out.splitlines()] == [18, 20]


async def _read_line(stream: asyncio.StreamReader) -> dict[str, Any]:
    line = await asyncio.wait_for(stream.readline(), 30)
    assert line, "tail --follow ended early"
    return json.loads(line)  # type: ignore[no-any-return]


async def test_tail_follow_sees_events_appended_after_it_started(url: str) -> None:
    await fill(url, rounds=2, purge=())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "api.cli", "tail", "--follow", "--interval", "0.05", "--database-url", url,
        "--stream", "spec:", cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        assert [(await _read_line(proc.stdout))["position"] for _ in range(2)] == [1, 3]
        async with store_from_url(url) as store:  # another process's commits
            await store.append(StreamAppend("channel:c", [NewEvent("ItemInserted", b"x", RAW)]))
            await store.append(StreamAppend("spec:late", [NewEvent("RevisionUploaded", b'{"late": 1}', JSON)]))
            late = await _read_line(proc.stdout)
            assert (late["position"], late["data"]) == (6, {"late": 1})
            await store.append(StreamAppend("spec:later", [NewEvent("RevisionUploaded", b'{"late": 2}', JSON)]))
            assert (await _read_line(proc.stdout))["position"] == 7
        assert proc.returncode is None
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
        await proc.stderr.read()


# -- export / import ------------------------------------------------------------------


async def _all(url: str) -> list[Event]:
    async with store_from_url(url) as store:
        return await store.read_all(0, 100_000)


async def test_export_import_round_trips_exactly(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = await fill(url)
    file = tmp_path / "log.jsonl"
    code, _, err = await run(capsys, "export", str(file), "--database-url", url)
    assert code == 0 and "exported 20 events (positions 1..20)" in err
    records = [json.loads(line) for line in file.read_text().splitlines()]
    assert records[3]["data"] is None  # purged stays purged
    target = f"sqlite:///{tmp_path / 'copy.db'}"
    code, _, err = await run(capsys, "import", str(file), "--database-url", target)
    assert code == 0 and "imported 20 events (positions 1..20)" in err
    assert await _all(target) == events
    code, out, _ = await run(capsys, "verify", "--database-url", target)
    assert (code, out) == (0, f"ok: 20 events, head 20, chain {events[-1].hash.hex()}\n")


async def test_import_into_postgres_from_a_sqlite_export(
    url: str, sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = await fill(sqlite_url)
    file = tmp_path / "log.jsonl"
    assert (await run(capsys, "export", str(file), "--database-url", sqlite_url))[0] == 0
    code, _, err = await run(capsys, "import", str(file), "--database-url", url)
    assert code == 0, err
    assert await _all(url) == events


async def test_export_in_pieces_imports_in_order(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = await fill(url)
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert (await run(capsys, "export", str(first), "--until", "8", "--database-url", url))[0] == 0
    assert (await run(capsys, "export", str(second), "--from", "9", "--database-url", url))[0] == 0
    target = f"sqlite:///{tmp_path / 'copy.db'}"
    code, _, err = await run(capsys, "import", str(second), "--database-url", target)
    assert code == 1 and "does not continue this log: it starts at position 9, the log's head is 0" in err
    assert await _all(target) == []
    assert (await run(capsys, "import", str(first), "--database-url", target))[0] == 0
    assert (await run(capsys, "import", str(second), "--database-url", target))[0] == 0
    assert await _all(target) == events
    # running an import again finds everything there and writes nothing
    code, _, err = await run(capsys, "import", str(second), "--database-url", target)
    assert code == 0 and "already in the log, nothing imported" in err


async def test_import_resumes_over_an_identical_overlap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, target = f"sqlite:///{tmp_path / 's.db'}", f"sqlite:///{tmp_path / 't.db'}"
    events = await fill(source)
    part, whole = tmp_path / "part.jsonl", tmp_path / "whole.jsonl"
    await run(capsys, "export", str(part), "--until", "7", "--database-url", source)
    await run(capsys, "export", str(whole), "--database-url", source)
    await run(capsys, "import", str(part), "--database-url", target)
    code, _, err = await run(capsys, "import", str(whole), "--database-url", target)
    assert code == 0 and "imported 13 events (positions 8..20)" in err
    assert await _all(target) == events


async def test_import_refuses_a_file_of_another_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine, theirs = f"sqlite:///{tmp_path / 'mine.db'}", f"sqlite:///{tmp_path / 'theirs.db'}"
    await fill(mine, rounds=5)
    clock = ManualClock(1_800_000_000_000_000)  # other times, other hashes
    await fill(theirs, rounds=10, clock=clock)
    file = tmp_path / "theirs.jsonl"
    await run(capsys, "export", str(file), "--database-url", theirs)
    before = await _all(mine)
    code, _, err = await run(capsys, "import", str(file), "--database-url", mine)
    assert code == 1 and "does not continue this log: at position 10 its event differs" in err
    tail_only = tmp_path / "tail.jsonl"
    await run(capsys, "export", str(tail_only), "--from", "11", "--database-url", theirs)
    code, _, err = await run(capsys, "import", str(tail_only), "--database-url", mine)
    assert code == 1 and "its event 11 does not chain to the log's event 10" in err
    assert await _all(mine) == before


async def test_import_refuses_a_tampered_file_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, target = f"sqlite:///{tmp_path / 's.db'}", f"sqlite:///{tmp_path / 't.db'}"
    await fill(source)
    file = tmp_path / "log.jsonl"
    await run(capsys, "export", str(file), "--database-url", source)
    lines = file.read_text().splitlines()
    record = json.loads(lines[14])
    record["type"] = "Forged"
    lines[14] = json.dumps(record)
    file.write_text("\n".join(lines) + "\n")
    code, _, err = await run(capsys, "import", str(file), "--database-url", target)
    assert code == 1 and f"refused: {file}:15: the file's chain is broken at position 15" in err
    file.write_text("\n".join(lines[:3]) + "\n{not a record}\n")
    code, _, err = await run(capsys, "import", str(file), "--database-url", target)
    assert code == 1 and f"refused: {file}:4: not an event record" in err
    assert await _all(target) == []


async def test_export_refuses_a_broken_log(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    await fill(url)
    tamper(url, "DELETE FROM events WHERE position = $1", 5)
    file = tmp_path / "log.jsonl"
    code, _, err = await run(capsys, "export", str(file), "--database-url", url)
    assert code == 1 and "broken at position 5: position 5 is missing (next is 6); nothing exported" in err
    assert not file.exists() and not (tmp_path / "log.jsonl.part").exists()


def test_export_of_an_unreadable_row_leaves_no_file(sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _sync(fill(sqlite_url))
    tamper(sqlite_url, "UPDATE events SET meta = $1 WHERE position = $2", b"{not json", 13)
    file = tmp_path / "log.jsonl"
    assert main(["export", str(file), "--database-url", sqlite_url]) == 2
    assert "position 13" in capsys.readouterr().err
    assert not file.exists() and not (tmp_path / "log.jsonl.part").exists()


async def test_export_does_not_overwrite_without_force(sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    await fill(sqlite_url)
    file = tmp_path / "log.jsonl"
    file.write_text("keep me")
    code, _, err = await run(capsys, "export", str(file), "--database-url", sqlite_url)
    assert code == 2 and "exists" in err and file.read_text() == "keep me"
    assert (await run(capsys, "export", str(file), "--force", "--database-url", sqlite_url))[0] == 0
    assert len(file.read_text().splitlines()) == 20
    code, out, _ = await run(capsys, "export", "-", "--from", "19", "--database-url", sqlite_url)
    assert code == 0 and [json.loads(line)["position"] for line in out.splitlines()] == [19, 20]


# -- copy -----------------------------------------------------------------------------


async def test_copy_between_backends_resumes_and_refuses(
    url: str, sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = await fill(sqlite_url)
    code, out, _ = await run(capsys, "copy", sqlite_url, url)
    assert (code, out) == (0, f"copied 20 events (0 already there), head 20, chain {events[-1].hash.hex()}\n")
    assert await _all(url) == events
    async with store_from_url(sqlite_url) as store:
        more = await store.append(StreamAppend("spec:s9", [NewEvent("RevisionUploaded", b'{"i": 99}', JSON)]))
    code, out, _ = await run(capsys, "copy", sqlite_url, url)
    assert code == 0 and out.startswith("copied 1 events (20 already there), head 21")
    # back the other way, into a new file
    back = f"sqlite:///{tmp_path / 'back.db'}"
    assert (await run(capsys, "copy", url, back))[0] == 0
    assert await _all(back) == [*events, *more]
    other = f"sqlite:///{tmp_path / 'other.db'}"
    await fill(other, clock=ManualClock(1_800_000_000_000_000))
    code, _, err = await run(capsys, "copy", other, url)
    assert code == 1 and "refused:" in err and "nothing copied" in err
    assert await _all(url) == [*events, *more]


# -- stats ----------------------------------------------------------------------------


async def test_stats(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    events = await fill(url)
    code, out, _ = await run(capsys, "stats", "--json", "--database-url", url)
    stats = json.loads(out)
    assert code == 0
    assert stats["events"] == stats["head"] == 20 and stats["streams"] == 4 and stats["purged"] == 1
    assert stats["bytes"] == sum(len(e.data) for e in events if e.data is not None)
    assert stats["types"] == {"RevisionUploaded": 10, "ItemInserted": 10}
    assert stats["facets"] == {"spec": 10, "channel": 10}
    assert stats["oldest"] == stats["newest"] == "2023-11-14T22:13:20.000Z"
    code, out, _ = await run(capsys, "stats", "--database-url", url)
    assert code == 0 and "events by type:" in out and "RevisionUploaded" in out
