"""The aiohttp application: the log on typed app keys, every facet's routes and workers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from types import ModuleType

import aiohttp
from aiohttp import web

from api import channels, events, exports, specs, webhooks
from api.keys import CLOCK, HTTP, LOG, PROJECTIONS, SETTINGS, WORKERS
from eventhub.clock import Clock, SystemClock
from eventhub.log import EventLog
from eventhub.netguard import GuardedResolver, OutboundGuard
from eventhub.projection import Projection
from eventhub.settings import Settings
from eventhub.store import create_store

log = logging.getLogger(__name__)

# each facet module exposes setup(app): routes, its projection, its workers
FACETS: tuple[ModuleType, ...] = (channels, webhooks, exports, specs)


def create_app(
    settings: Settings, *, clock: Clock | None = None, facets: tuple[ModuleType, ...] | None = None
) -> web.Application:
    app = web.Application(
        client_max_size=settings.max_body_bytes + 1,
        handler_args={"max_field_size": 16384, "auto_decompress": False},  # channel items keep the bytes sent
    )
    app[SETTINGS] = settings
    app[CLOCK] = clock or SystemClock()
    app[PROJECTIONS] = []
    app[WORKERS] = []
    events.setup(app)
    for facet in FACETS if facets is None else facets:
        facet.setup(app)
    app.cleanup_ctx.append(_open_log)
    app.cleanup_ctx.append(_client_session)
    app.cleanup_ctx.append(_run_workers)
    return app


async def _open_log(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    projections: list[Projection] = app[PROJECTIONS]
    event_log = EventLog(
        create_store(settings, clock=app[CLOCK]),
        projections,
        snapshot_every=settings.snapshot_every,
        window_events=settings.window_events,
        window_bytes=settings.window_bytes,
    )
    await event_log.open()
    app[LOG] = event_log
    yield
    await event_log.close()


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    # The one client session of the process. Its resolver refuses link-local and metadata
    # addresses for every outbound call; facets check their own allow lists per URL.
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(OutboundGuard()), limit=256)
    timeout = aiohttp.ClientTimeout(total=app[SETTINGS].export_timeout_seconds)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        app[HTTP] = session
        yield


async def _run_workers(app: web.Application) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(factory(app), name=factory.__qualname__) for factory in app[WORKERS]]
    yield
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for task, result in zip(tasks, results):
        if isinstance(result, Exception):
            log.error("worker %s ended with %r", task.get_name(), result)
