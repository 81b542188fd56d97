"""The aiohttp application: the log on typed app keys, every facet's routes and workers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from types import ModuleType

import aiohttp
from aiohttp import web

from api import channels, events, exports, specs, webhooks
from api.common import POSITION_HEADER, json_response
from api.keys import CLOCK, HTTP, LOG, PROJECTIONS, SETTINGS, WORKERS
from eventhub.clock import Clock, SystemClock
from eventhub.errors import StoreCorrupt, StoreUnavailable
from eventhub.log import EventLog
from eventhub.netguard import GuardedResolver, OutboundGuard
from eventhub.projection import Projection
from eventhub.settings import Settings
from eventhub.store import create_store

log = logging.getLogger(__name__)

# each facet module exposes setup(app): routes, its projection, its workers
FACETS: tuple[ModuleType, ...] = (channels, webhooks, exports, specs)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    settings: Settings, *, clock: Clock | None = None, facets: tuple[ModuleType, ...] | None = None
) -> web.Application:
    app = web.Application(
        client_max_size=settings.max_body_bytes + 1,
        middlewares=[_log_middleware],
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


@web.middleware
async def _log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The log's part of every request, in one middleware (one layer per request is cheaper):

    - a store that cannot serve answers 503 with a message, never a traceback;
    - `Hub-Position`: a read that names a position waits until this node has applied it,
      and a write reports the head after it, so a client can read on node B what it
      wrote through node A.
    """
    event_log = request.app[LOG]
    raw = request.headers.get(POSITION_HEADER)
    try:
        if raw:
            try:
                position = int(raw)
            except ValueError:
                return json_response({"error": f"{POSITION_HEADER} must be an integer"}, status=400)
            if not await event_log.wait_for(position, 10.0):
                return json_response({"error": f"this node has not reached position {position} yet"}, status=503)
        response = await handler(request)
    except StoreUnavailable as exc:
        return json_response({"error": "store unavailable", "message": str(exc)}, status=503)
    except StoreCorrupt as exc:
        log.error("corruption: %s", exc)
        return json_response({"error": "store corrupt", "message": str(exc), "position": exc.position}, status=503)
    if request.method not in ("GET", "HEAD", "OPTIONS") and not response.prepared:
        response.headers[POSITION_HEADER] = str(event_log.head)
    return response
