"""The websocket broadcast on its own: one writer per stream, real websockets, a real log.

A small aiohttp app registers each websocket with one `Broadcast` the test controls, as
`api.channels.subscribe_ws` does, and takes the socket's prefix and the stream version it
arrived at from the query string, so a test can put a joiner exactly mid-batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient

from api.broadcast import Broadcast, text_frame
from eventhub.clock import ManualClock
from eventhub.errors import StoreUnavailable
from eventhub.events import Event, NewEvent, StreamAppend
from eventhub.log import EventLog
from eventhub.store.sqlite import SQLiteStore

STREAM = "s:1"
_LEFT = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)


class _FlakyStore(SQLiteStore):
    """The real SQLite store, whose reads fail on demand (fault injection by wrapping)."""

    failing = False

    async def read_all(self, *args: Any, **kwargs: Any) -> list[Event]:
        if self.failing:
            raise StoreUnavailable("injected: reads fail")
        return await super().read_all(*args, **kwargs)


@dataclass
class Rig:
    log: EventLog
    store: _FlakyStore
    broadcast: Broadcast
    client: TestClient[web.Request, web.Application]
    deleted: asyncio.Event
    stops: list[bool] = field(default_factory=list)

    async def connect(self, prefix: str = "a/", version: int = -1, repeat: int = 1,
                      **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
        before = len(self.broadcast)
        params = {"prefix": prefix, "version": str(version), "repeat": str(repeat)}
        ws: aiohttp.ClientWebSocketResponse = await self.client.ws_connect("/ws", params=params, **kwargs)
        await _until(lambda: len(self.broadcast) > before)
        return ws

    async def append(self, *data: bytes) -> None:
        await self.log.append(StreamAppend(STREAM, [NewEvent("Wrote", d) for d in data]))


async def _until(done: Callable[[], bool]) -> None:
    """Let the server side run until `done()`: a registration, an unregistration."""
    async with asyncio.timeout(10):
        while not done():
            await asyncio.sleep(0.001)


async def _lines(ws: aiohttp.ClientWebSocketResponse, n: int) -> list[str]:
    async with asyncio.timeout(10):
        return [await ws.receive_str() for _ in range(n)]


Rigged = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def rig(tmp_path: Path, aiohttp_client: Any, clock: ManualClock) -> AsyncIterator[Rigged]:
    logs: list[EventLog] = []

    async def make(*, max_lines: int = 10_000, window_events: int = 10_000, heartbeat: float = 30.0) -> Rig:
        store = _FlakyStore(str(tmp_path / f"b{len(logs)}.db"))
        log = EventLog(store, window_events=window_events)
        await log.open()
        logs.append(log)
        deleted = asyncio.Event()
        stops: list[bool] = []
        broadcast = Broadcast(
            log.hub, STREAM, log.head, -1, lambda e: str(e.version), max_lines=max_lines, until=deleted.wait,
            on_stop=lambda: stops.append(True), heartbeat=heartbeat, sleep=clock.sleep,
            logger=logging.getLogger("tests.broadcast"),
        )

        async def subscribe(request: web.Request) -> web.StreamResponse:
            ws = web.WebSocketResponse(autoping=False, compress=False)
            await ws.prepare(request)
            assert request.transport is not None
            q = request.query
            broadcast.add(ws, request.transport, q["prefix"] * int(q["repeat"]), int(q["version"]))
            try:
                while (msg := await ws.receive()).type not in _LEFT:
                    if msg.type is WSMsgType.PONG:
                        broadcast.pong(ws)
                    elif msg.type is WSMsgType.PING:
                        await ws.pong(msg.data)
            finally:
                broadcast.remove(ws)
            return ws

        app = web.Application()
        app.router.add_get("/ws", subscribe)
        client = await aiohttp_client(app)
        return Rig(log, store, broadcast, client, deleted, stops)

    yield make
    for log in logs:
        await log.close()


def test_text_frames_are_rfc6455() -> None:
    assert text_frame(b"hi") == b"\x81\x02hi"
    assert text_frame(b"x" * 200)[:4] == b"\x81\x7e\x00\xc8"
    assert text_frame(b"x" * 70_000)[:10] == b"\x81\x7f" + (70_000).to_bytes(8, "big")


async def test_every_subscriber_gets_the_same_lines_in_order_with_its_own_prefix(rig: Rigged) -> None:
    r = await rig()
    subs = [await r.connect("a/") for _ in range(20)] + [await r.connect("b/") for _ in range(5)]
    await r.append(b"0")
    await r.append(b"1", b"2", b"3")  # one commit: one batch, one write per socket
    await r.append(b"4")
    for ws in subs[:20]:
        assert await _lines(ws, 5) == [f"a/{v}" for v in range(5)]
    for ws in subs[20:]:
        assert await _lines(ws, 5) == [f"b/{v}" for v in range(5)]


async def test_a_joiner_gets_only_what_came_after_it_even_mid_batch(rig: Rigged) -> None:
    r = await rig()
    first = await r.connect("a/", version=-1)
    # the broadcast has written nothing yet; these arrived when versions 0 and 1 were
    # already committed, so they wait and are let in exactly where they start
    late = await r.connect("b/", version=0)
    later = await r.connect("c/", version=1)
    await r.append(b"0", b"1", b"2")
    assert await _lines(first, 3) == ["a/0", "a/1", "a/2"]
    assert await _lines(late, 2) == ["b/1", "b/2"]
    assert await _lines(later, 1) == ["c/2"]
    caught_up = await r.connect("d/", version=2)  # the usual case: joins its group at once
    await r.append(b"3")
    for ws, prefix in ((first, "a"), (late, "b"), (later, "c"), (caught_up, "d")):
        assert await _lines(ws, 1) == [f"{prefix}/3"]


async def test_the_last_one_out_stops_it(rig: Rigged) -> None:
    r = await rig()
    one, two = await r.connect(), await r.connect()
    await one.close()
    await _until(lambda: len(r.broadcast) == 1)
    assert not r.broadcast.stopped
    await r.append(b"x")
    assert await _lines(two, 1) == ["a/0"]
    await two.close()
    await _until(lambda: r.broadcast.stopped)
    async with asyncio.timeout(10):
        await r.broadcast.join()
    assert r.stops == [True]
    with pytest.raises(RuntimeError):
        r.broadcast.add(web.WebSocketResponse(), None, "a/", 0)  # type: ignore[arg-type]


async def test_a_stalled_client_is_dropped_and_nobody_waits_for_it(rig: Rigged, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tests.broadcast")
    r = await rig(max_lines=4)
    stalled = await r.connect("h", repeat=16_000)  # 16 kB lines fill its socket buffers fast
    fast = await r.connect("a/")
    sent = 0
    while len(r.broadcast) == 2:
        assert sent < 2000, "the stalled client was never dropped"
        await r.append(b"x")
        assert await _lines(fast, 1) == [f"a/{sent}"]  # never held up
        sent += 1
    assert "more than 4 items behind, disconnected" in caplog.text
    received = 0
    async with asyncio.timeout(10):
        while (await stalled.receive()).type is WSMsgType.TEXT:
            received += 1
    assert received < sent
    await r.append(b"y")
    assert await _lines(fast, 1) == [f"a/{sent}"]


async def test_until_closes_every_socket_with_1001(rig: Rigged) -> None:
    r = await rig()
    subs = [await r.connect() for _ in range(3)]
    r.deleted.set()
    for ws in subs:
        msg = await ws.receive(timeout=10)
        assert msg.type is WSMsgType.CLOSE and msg.data == 1001
    async with asyncio.timeout(10):
        await r.broadcast.join()
    assert r.stops == [True]


async def test_heartbeat_drops_a_client_that_does_not_answer(
    rig: Rigged, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tests.broadcast")
    r = await rig(heartbeat=30.0)
    alive = await r.connect("a/", autoping=False)
    mute = await r.connect("m/", autoping=False)
    clock.advance(30)
    for ws in (alive, mute):
        assert (await ws.receive(timeout=10)).type is WSMsgType.PING
    await alive.pong()
    await alive.ping(b"sync")  # answered after the server has read the pong before it
    assert (await alive.receive(timeout=10)).data == b"sync"
    clock.advance(30)
    assert (await alive.receive(timeout=10)).type is WSMsgType.PING
    assert (await mute.receive(timeout=10)).type in (WSMsgType.CLOSED, WSMsgType.ERROR)
    assert "did not answer a ping" in caplog.text and len(r.broadcast) == 1
    await r.append(b"x")
    assert await _lines(alive, 1) == ["a/0"]


async def test_a_failing_store_disconnects_everyone_with_an_error(
    rig: Rigged, caplog: pytest.LogCaptureFixture
) -> None:
    r = await rig(window_events=1)
    subs = [await r.connect() for _ in range(2)]
    r.store.failing = True
    await r.append(b"0", b"1", b"2")  # past the 1-event window: the broadcast reads the store
    for ws in subs:
        assert (await ws.receive(timeout=10)).type in (WSMsgType.CLOSED, WSMsgType.ERROR)
    async with asyncio.timeout(10):
        await r.broadcast.join()
    assert r.stops == [True] and "injected: reads fail" in caplog.text
