"""The channels purger: erases item payloads past their channel's TTL or of deleted channels.

Reads already hide such items (see `api.channels._visible`); this reactor frees the space.
It sweeps every `ttl_sweep_seconds` of the app's clock and right after each
`ChannelDeleted`. For each generation it purges the payloads through the last expired
item, then records `ItemsPurged`, so the purge is itself in the log. A crash between the
two only means the next sweep purges again: `store.purge` is idempotent, and so is the
record (the projection keeps the highest version purged). Several nodes may sweep at
once; they erase the same payloads and record the same fact.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from aiohttp import web

from api.keys import CLOCK, LOG, PROJECTIONS, SETTINGS
from eventhub.hub import EventFilter
from projections.channels import PREFIX, Channel, Channels, decide_purged

log = logging.getLogger(__name__)
_PAGE = 1000


async def purger(app: web.Application) -> None:
    """The worker: sweep at start, on every tick of the clock and after every delete."""
    hub, clock = app[LOG].hub, app[CLOCK]
    wake = asyncio.Event()

    async def deletes(after: int) -> None:
        async for _ in hub.subscribe(after, EventFilter(prefix=PREFIX, types=["ChannelDeleted"])):
            wake.set()

    async def ticks() -> None:
        while True:
            await clock.sleep(app[SETTINGS].ttl_sweep_seconds)
            wake.set()

    tasks = [asyncio.create_task(deletes(hub.head)), asyncio.create_task(ticks())]
    try:
        while True:
            try:
                await sweep(app)
            except Exception:  # a store hiccup must not end the worker; the next sweep retries
                log.exception("channel purge sweep failed")
            await wake.wait()
            wake.clear()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def sweep(app: web.Application) -> int:
    """Purge what is due now; return how many payloads were erased."""
    model = _projection(app).model
    store = app[LOG].store
    now = app[CLOCK].now()
    erased = 0
    for channel in list(model.channels.values()):
        cutoff = channel.cutoff(now)
        if cutoff is None or channel.purged_through >= channel.items - 1:
            continue
        last = await store.last_before(channel.items_stream, cutoff)
        if last is not None and last.version > channel.purged_through:
            erased += await purge(app, channel, last.version, "ttl")
    for channel in list(model.deleted.values()):
        erased += await purge(app, channel, channel.items - 1, "deleted")
    return erased


async def purge(app: web.Application, channel: Channel, through: int, reason: Literal["ttl", "deleted"]) -> int:
    """Erase the payloads of versions `purged_through + 1 .. through`, then record it."""
    store = app[LOG].store
    version, positions = channel.purged_through + 1, []
    while version <= through:
        events = await store.read_stream(channel.items_stream, version, min(_PAGE, through - version + 1))
        if not events:
            break
        positions += [e.position for e in events]
        version = events[-1].version + 1
    erased = await asyncio.shield(store.purge(positions))  # a shutdown must not cut an erase short
    await app[LOG].append(decide_purged(channel, through, reason))
    log.info("channel %s: purged %d payloads through item %d (%s)", channel.name, erased, through, reason)
    return erased


def _projection(app: web.Application) -> Channels:
    return next(p for p in app[PROJECTIONS] if isinstance(p, Channels))
