"""`eventhub replay`: the facets' projections rebuilt in memory, as of a position or a
time, and `--check` against the snapshots the running projections wrote.

The projections come from `create_app(..., facets=...)`, as a serving node gets them;
a tiny test-only facet registers `Tally` (and `Opaque`, whose snapshot is not JSON).
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import pytest
from aiohttp import web

from api.keys import PROJECTIONS
from eventhub.clock import ManualClock
from eventhub.events import Event, NewEvent, StreamAppend, iso_millis
from eventhub.log import EventLog
from eventhub.projection import Projection
from eventhub.store import Snapshot, store_from_url
from api.cli import main
from tests.eventhub.test_cli import in_thread, sqlite_url, url  # noqa: F401  (fixtures)


class Tally(Projection):
    """Per `tally:` stream: how many events, and the last amount."""

    name = "tally"
    version = 1
    prefixes: ClassVar[tuple[str, ...]] = ("tally:",)

    def __init__(self) -> None:
        super().__init__()
        self.streams: dict[str, dict[str, int]] = {}

    def apply(self, event: Event) -> None:
        amount = msgspec.json.decode(event.data or b"{}").get("amount", 0)
        entry = self.streams.setdefault(event.stream, {"count": 0, "last": 0})
        entry["count"] += 1
        entry["last"] = amount

    def snapshot(self) -> bytes:
        return msgspec.json.encode(self.streams)

    def restore(self, state: bytes) -> None:
        self.streams = msgspec.json.decode(state)


class Opaque(Projection):
    """Counts every event; its snapshot is not JSON."""

    name = "opaque"

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def apply(self, event: Event) -> None:
        self.n += 1

    def snapshot(self) -> bytes:
        return b"\xff" + self.n.to_bytes(4, "big")

    def restore(self, state: bytes) -> None:
        self.n = int.from_bytes(state[1:], "big")


class Packed(Opaque):
    """Counts every event; its snapshot is msgpack."""

    name = "packed"

    def snapshot(self) -> bytes:
        return msgspec.msgpack.encode({"n": self.n, "raw": b"\x00"})

    def restore(self, state: bytes) -> None:
        self.n = msgspec.msgpack.decode(state)["n"]


def _setup(app: web.Application) -> None:
    app[PROJECTIONS].append(Tally())
    app[PROJECTIONS].append(Opaque())
    app[PROJECTIONS].append(Packed())


FACET = types.ModuleType("tally_facet")
FACET.setup = _setup  # type: ignore[attr-defined]


async def replay(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await in_thread(main, ["replay", *argv], facets=(FACET,))
    out, err = capsys.readouterr()
    return code, out, err


async def live_run(url: str, clock: ManualClock, rounds: int = 12) -> dict[int, tuple[int, Any]]:
    """Run the log with the projections live; what they held after each commit:
    position -> (recorded_at, tally view)."""
    tally = Tally()
    seen: dict[int, tuple[int, Any]] = {}
    log = EventLog(store_from_url(url, clock=clock), [tally, Opaque()], snapshot_every=1_000_000)
    await log.open()
    try:
        for i in range(rounds):
            clock.advance(60)
            events = await log.append(
                StreamAppend(f"tally:{i % 3}", [NewEvent("Tallied", msgspec.json.encode({"amount": i}))]),
                StreamAppend("other:x", [NewEvent("Ignored")]),
            )
            seen[events[-1].position] = (events[-1].recorded_at, json.loads(tally.snapshot()))
    finally:
        await log.close()  # writes the snapshots at the head
    return seen


async def test_replay_until_gives_the_model_the_projections_had(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    seen = await live_run(url, ManualClock())
    for position in (2, 10, 24):
        code, out, _ = await replay(capsys, "--database-url", url, "--until", str(position))
        doc = json.loads(out)
        assert code == 0 and doc["position"] == position and doc["head"] == 24
        assert doc["recorded_at"] == iso_millis(seen[position][0])
        assert doc["projections"]["tally"] == {"version": 1, "model": seen[position][1]}
        assert doc["projections"]["opaque"]["model"] == {
            "snapshot_base64": "/w" + {2: "AAAAI=", 10: "AAAAo=", 24: "AAABg="}[position]
        }
        assert doc["projections"]["packed"]["model"] == {"n": position, "raw": "AA=="}
    code, out, _ = await replay(capsys, "--database-url", url, "--until", "0")
    assert json.loads(out)["projections"]["tally"]["model"] == {}


async def test_replay_at_a_time(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    seen = await live_run(url, ManualClock())
    recorded = {p: at for p, (at, _) in seen.items()}
    between = iso_millis(recorded[8] + 30_000_000)  # half a minute after the 4th commit
    code, out, _ = await replay(capsys, "--database-url", url, "--at", between, "--projection", "tally")
    doc = json.loads(out)
    assert code == 0 and doc["position"] == 8 and list(doc["projections"]) == ["tally"]
    assert doc["projections"]["tally"]["model"] == seen[8][1]
    exact = iso_millis(recorded[8]).replace("Z", "+00:00")
    assert json.loads((await replay(capsys, "--database-url", url, "--at", exact))[1])["position"] == 8
    before = "2000-01-01T00:00:00"
    assert json.loads((await replay(capsys, "--database-url", url, "--at", before))[1])["position"] == 0


async def test_replay_rejects_bad_arguments(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    await live_run(url, ManualClock(), rounds=1)
    code, _, err = await replay(capsys, "--database-url", url, "--projection", "nope")
    assert code == 2 and "no projection named nope (known: tally, opaque, packed)" in err
    code, _, err = await replay(capsys, "--database-url", url, "--until", "-1")
    assert code == 2 and "--until must be a position" in err
    with pytest.raises(SystemExit):
        await replay(capsys, "--database-url", url, "--at", "yesterday")
    with pytest.raises(SystemExit):
        await replay(capsys, "--database-url", url, "--until", "3", "--check")


async def test_replay_check_agrees_with_the_running_projections(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    await live_run(url, ManualClock())
    # the log moves on without a new snapshot: each is compared at its own position
    async with store_from_url(url) as store:
        await store.append(StreamAppend("tally:9", [NewEvent("Tallied", b'{"amount": 99}')]))
    code, out, _ = await replay(capsys, "--database-url", url, "--check")
    assert code == 0
    assert "tally: same as its snapshot (snapshot at position 24, head 25)" in out
    assert "opaque: same as its snapshot" in out


async def test_replay_check_reports_a_difference(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    await live_run(url, ManualClock())
    async with store_from_url(url) as store:
        snap = await store.load_snapshot("tally")
        assert snap is not None
        model = msgspec.json.decode(snap.state)
        model["tally:1"]["last"] = 1000
        del model["tally:2"]
        await store.save_snapshot(Snapshot("tally", 1, snap.position, msgspec.json.encode(model)))
    code, out, _ = await replay(capsys, "--database-url", url, "--check", "--projection", "tally")
    assert code == 1
    assert "tally: DIFFERS from its snapshot (snapshot at position 24, head 24):" in out
    assert "  .tally:1.last: rebuild 10, snapshot 1000" in out
    assert '  .tally:2: only in the rebuild: {"count":4,"last":11}' in out
    assert "opaque" not in out


async def test_replay_check_ignores_key_order_and_skips_other_versions(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await live_run(url, ManualClock())
    async with store_from_url(url) as store:
        snap = await store.load_snapshot("tally")
        assert snap is not None
        reordered = dict(reversed(list(msgspec.json.decode(snap.state).items())))
        await store.save_snapshot(Snapshot("tally", 1, snap.position, msgspec.json.encode(reordered)))
        await store.save_snapshot(Snapshot("opaque", 7, snap.position, b"\x00"))
    code, out, _ = await replay(capsys, "--database-url", url, "--check")
    assert code == 0
    assert "tally: same as its snapshot" in out
    assert "opaque: snapshot written by version 7, this code is version 1: not compared" in out


async def test_replay_check_without_snapshots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = f"sqlite:///{tmp_path / 'empty.db'}"
    async with store_from_url(db) as store:
        await store.append(StreamAppend("tally:a", [NewEvent("Tallied", b'{"amount": 1}')]))
    code, out, _ = await replay(capsys, "--database-url", db, "--check")
    assert code == 0 and "tally: no snapshot to compare with" in out


async def test_replay_without_facets_uses_the_apps(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`eventhub replay` as shipped: the projections `api.app.FACETS` registers."""
    from api.app import FACETS
    from api.cli import facet_projections

    async with store_from_url(sqlite_url) as store:
        await store.append(StreamAppend("tally:a", [NewEvent("Tallied", b'{"amount": 1}')]))
    names = [p.name for p in facet_projections(sqlite_url)]
    assert bool(names) == bool(FACETS)
    capsys.readouterr()
    assert await in_thread(main, ["replay", "--database-url", sqlite_url]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["position"] == 1 and list(doc["projections"]) == names
    assert await in_thread(main, ["replay", "--check", "--database-url", sqlite_url]) == 0


async def test_rebuild_across_reads_folds_each_event_once(url: str) -> None:
    """A log longer than one read of the walk: the rebuild holds what folding every event
    one by one gives, up to a position inside a read."""
    from api.cli import rebuild
    from eventhub.cli import READ_BATCH

    n, until = 2 * READ_BATCH + 300, 2 * READ_BATCH + 123
    async with store_from_url(url, clock=ManualClock()) as store:
        for first in range(0, n, 500):
            await store.append(
                *(
                    StreamAppend(f"{prefix}{first % 7}", [NewEvent("Tallied", msgspec.json.encode({"amount": i}))
                                                          for i in range(first, first + 250)])
                    for prefix in ("tally:", "other:")
                )
            )
        expected, opaque = Tally(), Opaque()
        for event in await store.read_all(0, until):
            if event.stream.startswith("tally:"):
                expected.apply(event)
        rebuilt = Tally()
        assert await rebuild(store, [rebuilt, opaque], until) == until
    assert rebuilt.streams == expected.streams and rebuilt.position == until
    assert opaque.n == until and opaque.position == until
