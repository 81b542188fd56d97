"""The log's own endpoints: `/health`, and `/events` as JSON pages, long-poll, SSE and websocket.

Every `/events` form resumes from a position (`after`, or `Last-Event-ID` for SSE) and
accepts `stream` (exact), `prefix` and `type` filters. The log holds every facet's data,
so `/events` needs `Authorization: Bearer $EVENTHUB_ADMIN_TOKEN`; with no token set it is
off.
"""

from __future__ import annotations

import asyncio
import hmac

import msgspec
from aiohttp import web

from api.common import JSONError, json_response
from api.keys import LOG, SETTINGS
from eventhub.hub import EventFilter
from eventhub.render import event_summary

MAX_PAGE = 10_000
_encode = msgspec.json.Encoder().encode


def setup(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/events", events_page)
    app.router.add_get("/events/sse", events_sse)
    app.router.add_get("/events/ws", events_ws)


async def health(request: web.Request) -> web.Response:
    event_log = request.app[LOG]
    return json_response(
        {
            "status": "ok",
            "backend": event_log.store.backend,
            "head": event_log.head,
            "projections": event_log.projections.positions(),
        }
    )


class _Query(msgspec.Struct):
    after: int
    limit: int
    wait: float
    filter: EventFilter


def _error(status: int, message: str) -> JSONError:
    return JSONError(status, {"error": message})


def _authorize(request: web.Request) -> None:
    token = request.app[SETTINGS].admin_token
    if not token:
        raise _error(403, "the /events endpoints are off: set EVENTHUB_ADMIN_TOKEN to use them")
    given = request.headers.get("Authorization", "")
    if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), token.encode()):
        raise _error(401, "missing or wrong bearer token")


def _query(request: web.Request, after_header: str | None = None) -> _Query:
    _authorize(request)
    q = request.query
    try:
        after = int(after_header or q.get("after", "0"))
        limit = int(q.get("limit", "1000"))
        wait = float(q.get("wait", "0"))
    except ValueError:
        raise _error(400, "after and limit must be integers, wait a number of seconds") from None
    if after < 0 or not 1 <= limit <= MAX_PAGE or wait < 0:
        raise _error(400, f"after must be >= 0, limit 1..{MAX_PAGE}, wait >= 0")
    wait = min(wait, request.app[SETTINGS].long_poll_max_seconds)
    types = [t for t in q.getall("type", []) if t] or None
    return _Query(after, limit, wait, EventFilter(q.get("stream") or None, q.get("prefix") or None, types))


async def events_page(request: web.Request) -> web.Response:
    """A page of events after `after`; with `wait`, a long poll that returns on the first match."""
    query = _query(request)
    event_log = request.app[LOG]
    events = await _page(request, query)
    if not events and query.wait > 0:
        try:
            async with asyncio.timeout(query.wait):
                async for batch in event_log.hub.subscribe(query.after, query.filter):
                    events = batch[: query.limit]
                    break
        except TimeoutError:
            pass
    last = events[-1].position if events else None
    return json_response(
        {
            "events": [event_summary(e) for e in events],
            "head": event_log.head,
            "next_after": last if last is not None else max(query.after, 0),
        }
    )


async def _page(request: web.Request, query: _Query) -> list:  # type: ignore[type-arg]
    f = query.filter
    return await request.app[LOG].store.read_all(
        query.after,
        query.limit,
        until=request.app[LOG].head,
        stream=f.stream,
        stream_prefix=f.prefix,
        types=sorted(f.types) if f.types else None,
    )


async def events_sse(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events, one per log event, `id` = position; resumes from Last-Event-ID."""
    query = _query(request, request.headers.get("Last-Event-ID"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    async for batch in request.app[LOG].hub.subscribe(query.after, query.filter):
        chunk = b"".join(
            b"id: %d\nevent: %s\ndata: %s\n\n" % (e.position, e.type.encode(), _encode(event_summary(e)))
            for e in batch
        )
        await response.write(chunk)
    return response


async def events_ws(request: web.Request) -> web.WebSocketResponse:
    """A websocket of JSON text messages, one per event, from `after` on."""
    query = _query(request)
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(request)
    sender = asyncio.create_task(_pump_ws(request, ws, query))
    try:
        async for _ in ws:  # we ignore what the client sends; this notices the close
            pass
    finally:
        sender.cancel()
    return ws


async def _pump_ws(request: web.Request, ws: web.WebSocketResponse, query: _Query) -> None:
    async for batch in request.app[LOG].hub.subscribe(query.after, query.filter):
        for e in batch:
            await ws.send_str(_encode(event_summary(e)).decode())
