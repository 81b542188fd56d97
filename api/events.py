"""The log's own endpoints: `/health`, and `/events` as JSON pages, long-poll, SSE and websocket.

Every `/events` form resumes from a position (`from`, inclusive, default 1; or
`Last-Event-ID` for SSE, exclusive) and accepts `stream` (a stream-name prefix) and
`type` filters. The log holds every facet's data,
so `/events` needs `Authorization: Bearer $EVENTHUB_ADMIN_TOKEN`; with no token set it is
off.
"""

from __future__ import annotations

import asyncio
import hmac

import msgspec
from aiohttp import web

from api.common import JSONError, json_response, route
from api.keys import LOG, SETTINGS
from eventhub.hub import EventFilter
from eventhub.render import event_summary

MAX_PAGE = 10_000
_encode = msgspec.json.Encoder().encode


def setup(app: web.Application) -> None:
    app.router.add_get("/health", route(health))
    app.router.add_get("/events", route(events_page))
    app.router.add_get("/events/sse", route(events_sse))
    app.router.add_get("/events/ws", events_ws)  # no wrapper: one frame less per open socket


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
    after: int  # the last position already seen: `from` - 1
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


def _query(request: web.Request, last_event_id: str | None = None) -> _Query:
    _authorize(request)
    q = request.query
    try:
        after = int(last_event_id) if last_event_id else int(q.get("from", "1")) - 1
        limit = int(q.get("limit", "1000"))
        wait = float(q.get("wait", "0"))
    except ValueError:
        raise _error(400, "from and limit must be integers, wait a number of seconds") from None
    if after < 0 or not 1 <= limit <= MAX_PAGE or not 0 <= wait < float("inf"):
        raise _error(400, f"from must be >= 1, limit 1..{MAX_PAGE}, wait >= 0")
    wait = min(wait, request.app[SETTINGS].long_poll_max_seconds)
    types = [t for t in q.getall("type", []) if t] or None
    return _Query(after, limit, wait, EventFilter(prefix=q.get("stream") or None, types=types))


async def events_page(request: web.Request) -> web.Response:
    """A page of events from `from`; with `wait`, a long poll that answers at the first match.

    `next` is where to ask from next: past the last event returned, or past everything
    this page examined when the filter left the page short.
    """
    query = _query(request)
    event_log = request.app[LOG]
    head = event_log.head
    f = query.filter
    types = sorted(f.types) if f.types else None
    events = await event_log.store.read_all(query.after, query.limit, until=head, stream_prefix=f.prefix, types=types)
    seen = events[-1].position if len(events) == query.limit else max(head, query.after)
    if not events and query.wait > 0:
        try:
            async with asyncio.timeout(query.wait):
                async for batch in event_log.hub.subscribe(seen, f):
                    events = batch[: query.limit]
                    seen = events[-1].position
                    break
        except TimeoutError:
            pass
    return json_response({"events": [event_summary(e) for e in events], "next": seen + 1})


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
    """A websocket of JSON text messages, one per event, from `from` on."""
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
