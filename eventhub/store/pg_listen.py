"""Hearing other nodes' commits on PostgreSQL: one LISTEN connection, kept open.

Every commit NOTIFYs its new head. A lost connection is re-established with a doubling
backoff, and after each (re)connect the head is read once, because commits made while
nobody listened notified nobody: together the two cover every commit. A half-open TCP
connection never reports its end, so an idle connection is probed every `keepalive`
seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeAlias

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information

log = logging.getLogger(__name__)

Conn: TypeAlias = asyncpg.Connection
_HEAD = "SELECT coalesce(max(position), 0) FROM events"
_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 5.0


class HeadListener:
    """Calls `on_head(position)` for each head another node announces on `channel`."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[Conn]],
        on_head: Callable[[int], None],
        *,
        channel: str,
        keepalive: float,
        errors: tuple[type[BaseException], ...],
        describe: Callable[[BaseException], object],
    ) -> None:
        self._connect = connect
        self._on_head = on_head
        self.channel = channel
        self.keepalive = keepalive
        self._errors = errors
        self._describe = describe
        self.reconnects = 0
        self._conn: Conn | None = None
        self._lost: asyncio.Event | None = None

    @property
    def pid(self) -> int | None:
        """The server process id of the LISTEN connection (for tests and diagnostics)."""
        conn = self._conn
        return conn.get_server_pid() if conn is not None and not conn.is_closed() else None

    async def start(self) -> None:
        """Open the connection and LISTEN; raises the driver's error when it cannot."""
        conn = await self._connect()
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        try:
            await conn.add_listener(self.channel, self._on_notify)
        except BaseException:
            conn.terminate()
            raise
        self._conn, self._lost = conn, lost

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            head = int(payload)
        except ValueError:
            log.warning("ignoring notification %r on %s", payload, self.channel)
            return
        self._on_head(head)

    async def run(self) -> None:
        """Keep the connection, forever; after each reconnect announce the current head."""
        backoff = _BACKOFF_MIN
        while True:
            if self._conn is None or self._conn.is_closed():
                try:
                    await self.start()
                    assert self._conn is not None
                    head = await self._conn.fetchval(_HEAD)
                except self._errors as exc:
                    self.drop()
                    log.warning("LISTEN connection failed (%s); retrying in %.2fs", self._describe(exc), backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
                    continue
                backoff = _BACKOFF_MIN
                self.reconnects += 1
                log.info("LISTEN connection restored at head %d", head)
                self._on_head(int(head))
            assert self._conn is not None and self._lost is not None
            try:
                await asyncio.wait_for(self._lost.wait(), self.keepalive)
            except asyncio.TimeoutError:
                try:
                    await asyncio.wait_for(self._conn.fetchval("SELECT 1"), self.keepalive)
                    continue
                except self._errors:
                    pass
            log.warning("LISTEN connection lost; reconnecting")
            self.drop()

    def drop(self) -> None:
        """Drop the connection at once (a dead server must not hang the caller)."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def close(self, timeout: float) -> None:
        """Close the connection politely, or drop it if the server does not answer."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), timeout)
            except self._errors:
                conn.terminate()
