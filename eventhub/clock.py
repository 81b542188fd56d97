"""Time as the log sees it: a real clock, and a manual one tests can move."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> int:
        """UTC microseconds since the epoch."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of this clock's time."""
        ...


class SystemClock:
    def now(self) -> int:
        return time.time_ns() // 1000

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock:
    """A clock that moves only when told to; sleepers wake when `advance` passes them."""

    def __init__(self, start: int = 1_700_000_000_000_000) -> None:
        self._now = start
        self._sleepers: list[tuple[int, asyncio.Future[None]]] = []

    def now(self) -> int:
        return self._now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._now + int(seconds * 1_000_000), future))
        try:
            await future
        finally:
            self._sleepers = [(t, f) for t, f in self._sleepers if f is not future]

    def advance(self, seconds: float) -> None:
        self._now += int(seconds * 1_000_000)
        for due, future in self._sleepers:
            if due <= self._now and not future.done():
                future.set_result(None)

    @property
    def sleepers(self) -> int:
        return sum(1 for _, f in self._sleepers if not f.done())
