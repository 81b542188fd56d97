"""One writer per followed stream, fanning each event's text line out to many websockets.

A `Broadcast` follows one stream of the log from the hub (one cursor, one wake per commit,
however many sockets listen) and writes every event to every registered websocket as a
text frame. The line of an event is `prefix + suffix(event)`: the suffix is computed once
per event, the prefix is the subscriber's own (the base URL its request used), and each
distinct prefix is framed once per batch, so the cost per delivered line is one
`transport.write` of bytes built for somebody else too.

Writes are fire and forget: nothing waits for a socket to drain, so a slow client holds
up neither the writer nor the others. A client whose transport already buffers more than
`max_lines` of its lines has stopped reading; it is disconnected (`transport.abort()`,
which also frees the buffer). A subscriber is only a dictionary entry; it has no task,
queue or timer of its own beyond aiohttp's handler, which registers the socket, waits for
the client to leave (answering its pings, reporting its pongs) and unregisters it.

The heartbeat is the broadcast's too, instead of aiohttp's timer per socket: every
`heartbeat` seconds one task writes a ping to every socket, and disconnects those that
have not answered the previous one with a pong (a dead peer goes within two beats).

Frames are written to the transport directly, not through aiohttp's `send_str` (a
coroutine per socket per line that may await a drain). That is valid only for sockets
without permessage-deflate: create the `WebSocketResponse` with `compress=False`, and
with `autoping=False` and no `heartbeat` (see `pong`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

from aiohttp import web

from eventhub.events import Event
from eventhub.hub import EventFilter, Hub

log = logging.getLogger(__name__)

Transport = asyncio.Transport


class _Joining(NamedTuple):
    after: int  # the stream's version when it registered: it gets the events past this one only
    ws: web.WebSocketResponse
    transport: Transport
    prefix: str


PING = b"\x89\x00"  # a final ping frame without payload


def text_frame(payload: bytes) -> bytes:
    """An unmasked, final RFC 6455 text frame (what a server sends) carrying `payload`."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


class Broadcast:
    """Follows `stream` after log position `after` and writes each event's line to every
    subscriber. `version` is the stream's version at that position (-1: no event yet).

    `until()` completes when the stream ends for good (its channel deleted, say): every
    socket is then closed with 1001. `on_stop` runs once, when the broadcast stops for any
    reason (the last subscriber left, `until`, `close`, or a failure), so its owner can
    forget it; `add` on a stopped broadcast is an error. `heartbeat` is in seconds of
    `sleep`, the app clock's. It logs to `logger`, its owner's.
    """

    def __init__(self, hub: Hub, stream: str, after: int, version: int, suffix: Callable[[Event], str], *, max_lines: int,
                 until: Callable[[], Awaitable[object]], on_stop: Callable[[], object],
                 heartbeat: float, sleep: Callable[[float], Awaitable[None]], name: str = "",
                 logger: logging.Logger = log) -> None:
        self.hub = hub
        self.stream = stream
        self.suffix = suffix
        self.max_lines = max_lines
        self.name = name or stream
        self.log = logger
        self.stopped = False
        self.version = version  # of the last event written (or skipped as before everyone)
        self._on_stop = on_stop
        self._groups: dict[str, dict[web.WebSocketResponse, Transport]] = {}  # prefix -> sockets
        self._joining: deque[_Joining] = deque()
        self._unanswered: set[web.WebSocketResponse] = set()  # pinged, no pong yet
        self._follow = asyncio.create_task(self._run(after))
        self._watch = asyncio.create_task(self._until(until))
        self._beat = asyncio.create_task(self._heartbeat(heartbeat, sleep))

    def __len__(self) -> int:
        return sum(map(len, self._groups.values())) + len(self._joining)

    # -- subscribers ------------------------------------------------------------------

    def add(self, ws: web.WebSocketResponse, transport: Transport, prefix: str, version: int) -> None:
        """Register a prepared socket; it gets the events past stream version `version` (the
        stream's version when it arrived), whatever this broadcast has still to write of
        earlier ones. Usually the broadcast has written those already and the socket joins
        its group at once; otherwise it waits (as a `_Joining`) for the events it is owed."""
        if self.stopped:
            raise RuntimeError(f"broadcast {self.name} has stopped")
        if version <= self.version and not self._joining:
            self._groups.setdefault(prefix, {})[ws] = transport
        else:
            self._joining.append(_Joining(version, ws, transport, prefix))

    def pong(self, ws: web.WebSocketResponse) -> None:
        """The client answered a ping: alive."""
        self._unanswered.discard(ws)

    def remove(self, ws: web.WebSocketResponse) -> None:
        """Unregister (no matter if already dropped); the last one out stops the broadcast."""
        self._unanswered.discard(ws)
        for prefix, members in self._groups.items():
            if members.pop(ws, None) is not None:
                if not members:
                    del self._groups[prefix]
                break
        else:
            for joining in self._joining:
                if joining.ws is ws:
                    self._joining.remove(joining)
                    break
        if not self._groups and not self._joining and not self.stopped:
            self._stop()

    async def close(self, code: int, message: bytes) -> None:
        """Stop, and close every socket with `code` (concurrently: a slow one delays nobody)."""
        if not self.stopped:
            self._stop()
        sockets = [ws for members in self._groups.values() for ws in members] + [j.ws for j in self._joining]
        self._groups.clear()
        self._joining.clear()
        # drain=False: a client that stopped reading must not hold this up; aiohttp still
        # waits (bounded) for the client's own close frame
        await asyncio.gather(*(ws.close(code=code, message=message, drain=False) for ws in sockets),
                             return_exceptions=True)

    async def join(self) -> None:
        """Wait until its tasks have ended (once it has stopped)."""
        await asyncio.gather(self._follow, self._watch, self._beat, return_exceptions=True)

    def _stop(self) -> None:
        self.stopped = True
        current = asyncio.current_task()
        for task in (self._follow, self._watch, self._beat):
            if task is not current:
                task.cancel()
        self._on_stop()

    # -- the three tasks --------------------------------------------------------------

    async def _until(self, until: Callable[[], Awaitable[object]]) -> None:
        await until()
        await self.close(1001, b"channel deleted")

    async def _run(self, after: int) -> None:
        try:
            async for batch in self.hub.subscribe(after, EventFilter(stream=self.stream)):
                self._deliver(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a store failure while catching up, say: nobody is left waiting silently
            self.log.error("broadcast %s failed: %r; disconnecting its %d subscribers", self.name, exc, len(self))
            for members in self._groups.values():
                for transport in members.values():
                    transport.abort()
            for joining in self._joining:
                joining.transport.abort()
            self._groups.clear()
            self._joining.clear()
            if not self.stopped:
                self._stop()

    async def _heartbeat(self, seconds: float, sleep: Callable[[float], Awaitable[None]]) -> None:
        while True:
            await sleep(seconds)
            silent, self._unanswered = self._unanswered, set()
            for members in self._groups.values():
                gone = [ws for ws in silent if ws in members] if silent else []
                for ws in gone:
                    members.pop(ws).abort()
                    self.log.info("%s: subscriber did not answer a ping within %g s, disconnected", self.name, seconds)
                for ws, transport in members.items():
                    if not transport.is_closing():
                        try:
                            transport.write(PING)
                        except Exception:  # died under us: its handler unregisters it
                            continue
                        self._unanswered.add(ws)
            self._drop_empty()

    # -- writing ----------------------------------------------------------------------

    def _deliver(self, batch: Sequence[Event]) -> None:
        """Write `batch` (ascending versions), letting joiners in exactly where they start."""
        joining = self._joining
        start, n = 0, len(batch)
        while start < n:
            end = n
            if joining:
                self._promote(batch[start].version - 1)
                if joining:  # the next joiner is owed only events past its own `after`: cut there
                    cut = joining[0].after
                    end = next((i for i in range(start + 1, n) if batch[i].version > cut), n)
            self._write(batch[start:end])
            start = end
        self.version = batch[-1].version
        if joining:
            self._promote(self.version)

    def _promote(self, through: int) -> None:
        """Joiners that arrived at or before version `through` join their groups."""
        joining = self._joining
        while joining and joining[0].after <= through:
            j = joining.popleft()
            self._groups.setdefault(j.prefix, {})[j.ws] = j.transport

    def _write(self, events: Sequence[Event]) -> None:
        suffixes = [self.suffix(e) for e in events]
        max_lines = self.max_lines
        for prefix, members in self._groups.items():
            frames = [text_frame((prefix + s).encode()) for s in suffixes]
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            limit = max_lines * len(frames[0])  # one prefix's lines are one length (fixed-width ids)
            behind: list[web.WebSocketResponse] | None = None
            for ws, transport in members.items():
                if transport.is_closing():  # gone; its handler unregisters it
                    continue
                if transport.get_write_buffer_size() > limit:
                    if behind is None:
                        behind = []
                    behind.append(ws)
                    continue
                try:
                    transport.write(data)
                except Exception:  # a transport that died under us must not fail the others
                    (behind := behind or []).append(ws)
            if behind is not None:
                for ws in behind:
                    members.pop(ws).abort()
                    self.log.info("%s: subscriber more than %d items behind, disconnected", self.name, max_lines)
        self._drop_empty()

    def _drop_empty(self) -> None:
        for prefix in [p for p, members in self._groups.items() if not members]:
            del self._groups[prefix]
