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
which also frees the buffer). A subscriber is only a dictionary entry; it has no task or
queue of its own beyond aiohttp's handler, which registers the socket, waits for the
client to leave and unregisters it.

Frames are written to the transport directly, not through aiohttp's `send_str` (a
coroutine per socket per line that may await a drain). That is valid only for sockets
without permessage-deflate: create the `WebSocketResponse` with `compress=False`.
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
    after: int  # the log head when it registered: it gets events past this position only
    ws: web.WebSocketResponse
    transport: Transport
    prefix: str


def text_frame(payload: bytes) -> bytes:
    """An unmasked, final RFC 6455 text frame (what a server sends) carrying `payload`."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


class Broadcast:
    """Follows `stream` after `after` and writes each event's line to every subscriber.

    `until()` completes when the stream ends for good (its channel deleted, say): every
    socket is then closed with 1001. `on_stop` runs once, when the broadcast stops for any
    reason (the last subscriber left, `until`, `close`, or a failure), so its owner can
    forget it; `add` on a stopped broadcast is an error. It logs to `logger` (its owner's).
    """

    def __init__(self, hub: Hub, stream: str, after: int, suffix: Callable[[Event], str], *, max_lines: int,
                 until: Callable[[], Awaitable[None]], on_stop: Callable[[], None], name: str = "",
                 logger: logging.Logger = log) -> None:
        self.hub = hub
        self.stream = stream
        self.suffix = suffix
        self.max_lines = max_lines
        self.name = name or stream
        self.log = logger
        self.stopped = False
        self._on_stop = on_stop
        self._groups: dict[str, dict[web.WebSocketResponse, Transport]] = {}  # prefix -> sockets
        self._joining: deque[_Joining] = deque()
        self._follow = asyncio.create_task(self._run(after))
        self._watch = asyncio.create_task(self._until(until))

    def __len__(self) -> int:
        return sum(map(len, self._groups.values())) + len(self._joining)

    # -- subscribers ------------------------------------------------------------------

    def add(self, ws: web.WebSocketResponse, transport: Transport, prefix: str, after: int) -> None:
        """Register a prepared socket; it gets the events with position > `after` (the head
        when it arrived), whatever this broadcast has still to write of earlier ones."""
        if self.stopped:
            raise RuntimeError(f"broadcast {self.name} has stopped")
        self._joining.append(_Joining(after, ws, transport, prefix))

    def remove(self, ws: web.WebSocketResponse) -> None:
        """Unregister (no matter if already dropped); the last one out stops the broadcast."""
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

    def _stop(self) -> None:
        self.stopped = True
        current = asyncio.current_task()
        for task in (self._follow, self._watch):
            if task is not current:
                task.cancel()
        self._on_stop()

    # -- the two tasks ----------------------------------------------------------------

    async def _until(self, until: Callable[[], Awaitable[None]]) -> None:
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

    # -- writing ----------------------------------------------------------------------

    def _deliver(self, batch: Sequence[Event]) -> None:
        """Write `batch` (ascending positions), letting joiners in exactly where they start."""
        joining = self._joining
        start, n = 0, len(batch)
        while start < n:
            end = n
            if joining:
                position = batch[start].position
                while joining and joining[0].after < position:
                    j = joining.popleft()
                    self._groups.setdefault(j.prefix, {})[j.ws] = j.transport
                if joining:  # the next joiner starts after its own `after`: cut the batch there
                    cut = joining[0].after
                    end = next((i for i in range(start + 1, n) if batch[i].position > cut), n)
            self._write(batch[start:end])
            start = end

    def _write(self, events: Sequence[Event]) -> None:
        suffixes = [self.suffix(e) for e in events]
        max_lines = self.max_lines
        for prefix, members in self._groups.items():
            frames = [text_frame((prefix + s).encode()) for s in suffixes]
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            limit = max_lines * len(frames[0])  # a subscriber's lines are all the same length
            behind: list[web.WebSocketResponse] | None = None
            for ws, transport in members.items():
                if transport.is_closing():  # gone; its handler unregisters it
                    continue
                if transport.get_write_buffer_size() > limit:
                    if behind is None:
                        behind = []
                    behind.append(ws)
                    continue
                transport.write(data)
            if behind is not None:
                for ws in behind:
                    members.pop(ws).abort()
                    self.log.info("%s: subscriber more than %d items behind, disconnected", self.name, max_lines)
        for prefix in [p for p, members in self._groups.items() if not members]:
            del self._groups[prefix]
