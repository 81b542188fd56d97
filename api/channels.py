"""The Data Hub API (`/channel…`) over the log: channels, items, latest, websocket, SSE, time.

Handlers are thin: decode with msgspec, decide (`projections.channels`), append, render
in the hub's own shapes. Every `ChannelError` becomes `{"error": "..."}` with its status in
`_handle`, the one place errors are mapped. URLs in bodies and headers use the host the
client called (`X-Forwarded-Proto` / `X-Forwarded-Host` honoured).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import BodyPartReader, WSMsgType, web

from api.broadcast import Broadcast
from api.common import BodyTooLarge, Handler, base_url, json_response, read_body, route, ws_base_url
from api.keys import CLOCK, LOG, PROJECTIONS, SETTINGS, WORKERS
from eventhub.errors import WrongExpectedVersion
from eventhub.events import Event, StreamAppend, datetime_to_micros, iso_millis
from eventhub.hub import EventFilter
from projections.channels import (
    MAX_N,
    Channel,
    ChannelError,
    ChannelRequest,
    Channels,
    Model,
    decide_create,
    decide_delete,
    decide_insert,
    decide_update,
    item_id,
    item_meta,
    parse_item_id,
    parse_items_stream,
)
from workers import channels as workers

log = logging.getLogger(__name__)

CHANNELS = web.AppKey("channels", Channels)
BROADCASTS = web.AppKey("channel_broadcasts", dict[str, Broadcast])  # items stream -> its websockets' writer
_STATUS = {"invalid": 400, "not_found": 404, "conflict": 409, "too_large": 413, "unsupported": 415}
_JSON_LIMIT = 64 * 1024
_LEFT = frozenset({WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR})
_SSE_KEEPALIVE = 15.0
_UNITS = [dt.timedelta(days=1), dt.timedelta(hours=1), dt.timedelta(minutes=1), dt.timedelta(seconds=1)]


def setup(app: web.Application) -> None:
    projection = Channels()
    app[CHANNELS] = projection
    app[BROADCASTS] = {}
    app.on_shutdown.append(_close_broadcasts)
    app[PROJECTIONS].append(projection)
    app[WORKERS].append(workers.purger)
    r = app.router
    r.add_get("/channel", _handle(list_channels))
    r.add_post("/channel", _handle(create_channel))
    r.add_get("/channel/{name}", _handle(get_channel))
    r.add_patch("/channel/{name}", _handle(update_channel))
    r.add_delete("/channel/{name}", _handle(delete_channel))
    r.add_post("/channel/{name}", _handle(insert))
    r.add_post("/channel/{name}/bulk", _handle(insert_bulk))
    r.add_get("/channel/{name}/ws", subscribe_ws)  # maps its own errors: one frame less per open socket
    r.add_get("/channel/{name}/events", _handle(subscribe_sse))
    r.add_get("/channel/{name}/latest", _handle(latest))
    r.add_get("/channel/{name}/earliest", _handle(earliest))
    r.add_get(r"/channel/{name}/latest/{n:\d+}", _handle(latest_n))
    r.add_get(r"/channel/{name}/earliest/{n:\d+}", _handle(earliest_n))
    period = r"/channel/{name}/{Y:\d{4}}/{M:\d{1,2}}/{D:\d{1,2}}"
    for suffix in ("", r"/{h:\d{1,2}}", r"/{h:\d{1,2}}/{m:\d{1,2}}", r"/{h:\d{1,2}}/{m:\d{1,2}}/{s:\d{1,2}}"):
        r.add_get(period + suffix, _handle(time_query))
    r.add_get("/channel/{name}/{id}", _handle(get_item))
    r.add_get("/channel/{name}/{id}/{direction:next|previous}", _handle(step))
    r.add_get(r"/channel/{name}/{id}/{direction:next|previous}/{n:\d+}", _handle(step_n))


def _handle(handler: Handler) -> Handler:
    return route(handler, (ChannelError, BodyTooLarge), _error)


def _error(error: ChannelError | BodyTooLarge) -> web.Response:
    if isinstance(error, BodyTooLarge):
        error = ChannelError("too_large", f"{error}; nothing was written")
    return json_response({"error": error.message}, status=_STATUS[error.kind])


# -- channels ----------------------------------------------------------------------------


async def list_channels(request: web.Request) -> web.Response:
    base = base_url(request)
    names = request.app[CHANNELS].model.channels
    channels = [{"name": n, "href": f"{base}/channel/{n}"} for n in names]
    return json_response({"_links": {"self": {"href": f"{base}/channel"}, "channels": channels}})


async def create_channel(request: web.Request) -> web.Response:
    body = await _json(request)
    default = request.app[SETTINGS].channel_default_ttl_millis
    await _commit(request, lambda model: decide_create(model, body, default))
    channel = _channels(request).get(str(body.name))
    return json_response(_metadata(request, channel), headers={"Location": _channel_url(request, channel.name)})


async def get_channel(request: web.Request) -> web.Response:
    return json_response(_metadata(request, _channel(request)))


async def update_channel(request: web.Request) -> web.Response:
    body = await _json(request)
    name = request.match_info["name"]
    await _commit(request, lambda model: decide_update(model, name, body))
    return json_response(_metadata(request, _channels(request).get(name)))


async def delete_channel(request: web.Request) -> web.Response:
    """202: gone from every read now; the purger erases its payloads right after."""
    name = request.match_info["name"]
    await _commit(request, lambda model: decide_delete(model, name))
    return web.Response(status=202)


def _metadata(request: web.Request, channel: Channel) -> dict[str, Any]:
    url = _channel_url(request, channel.name)
    return {
        "_links": {
            "self": {"href": url},
            "latest": {"href": f"{url}/latest"},
            "ws": {"href": f"{ws_base_url(request)}/channel/{channel.name}/ws"},
        },
        "name": channel.name,
        "creationDate": iso_millis(channel.created_at),
        "lastUpdateDate": iso_millis(channel.updated_at),
        "ttlMillis": channel.ttl_millis,
    }


# -- inserting ---------------------------------------------------------------------------


async def insert(request: web.Request) -> web.Response:
    channel = _channel(request)
    data = await read_body(request, request.app[SETTINGS].max_body_bytes)
    h = request.headers
    meta = item_meta(h.get("Content-Type"), h.get("Content-Encoding"), h.get("Content-Language"))
    # any version: an insert never conflicts, so no decide-again loop (`_commit`)
    (event,) = await request.app[LOG].append(decide_insert(_channels(request).model, channel.name, [(data, meta)]))
    name, generation = parse_items_stream(event.stream)
    channel_url = _channel_url(request, name)
    id_ = item_id(generation, event.version)
    url = f"{channel_url}/{id_}"
    body = {
        "_links": {"channel": {"href": channel_url}, "self": {"href": url}},
        "id": id_,
        "timestamp": iso_millis(event.recorded_at),
    }
    return json_response(body, status=201, headers={"Location": url})


async def insert_bulk(request: web.Request) -> web.Response:
    """`multipart/mixed`, one item per part with its own headers, all in one atomic append."""
    channel = _channel(request)
    if not request.content_type.startswith("multipart/"):
        raise ChannelError("unsupported", "a bulk insert is multipart/mixed, one item per part")
    limit = request.app[SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)
    items: list[tuple[bytes, dict[str, str]]] = []
    size = 0
    try:
        async for part in await request.multipart():
            if not isinstance(part, BodyPartReader):
                raise ChannelError("invalid", "a bulk insert's parts are items, not nested multiparts")
            chunks = []
            while chunk := await part.read_chunk():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(limit)
                chunks.append(chunk)
            h = part.headers
            data = _transfer_decode(b"".join(chunks), h.get("Content-Transfer-Encoding", ""))
            meta = item_meta(h.get("Content-Type", "text/plain"), h.get("Content-Encoding"), h.get("Content-Language"))
            items.append((data, meta))
    except ValueError as exc:  # aiohttp's word for a body that is not multipart
        raise ChannelError("invalid", f"not a multipart body: {exc}") from None
    events = await _commit(request, lambda model: decide_insert(model, channel.name, items))
    uris = [_inserted_url(request, e) for e in events]
    links = {"self": {"href": f"{_channel_url(request, channel.name)}/bulk"}, "uris": uris}
    return json_response({"_links": links}, status=201)


def _transfer_decode(data: bytes, encoding: str) -> bytes:
    try:
        if encoding.lower() == "base64":
            return base64.b64decode(data)
        if encoding.lower() == "quoted-printable":
            return binascii.a2b_qp(data)
    except binascii.Error as exc:
        raise ChannelError("invalid", f"a part's {encoding} body does not decode: {exc}") from None
    return data


# -- reading items -----------------------------------------------------------------------


async def get_item(request: web.Request) -> web.Response:
    channel = _channel(request)
    lo, hi = await _visible(request, channel)
    version = _version(request, channel, lo, hi)
    events = await request.app[LOG].store.read_stream(channel.items_stream, version, 1)
    if not events or events[0].data is None:
        raise ChannelError("not_found", f"item {request.match_info['id']} does not exist")
    item = events[0]
    headers = {
        "Content-Type": item.meta.get("content-type", "application/octet-stream"),
        "Creation-Date": iso_millis(item.recorded_at),
    }
    for key, header in (("content-encoding", "Content-Encoding"), ("content-language", "Content-Language")):
        if key in item.meta:
            headers[header] = item.meta[key]
    response = web.Response(body=item.data, headers=headers)
    if version > lo:
        response.headers.add("Link", f'<{_item_url(request, channel, version - 1)}>;rel="previous"')
    if version < hi:
        response.headers.add("Link", f'<{_item_url(request, channel, version + 1)}>;rel="next"')
    return response


async def latest(request: web.Request) -> web.Response:
    channel = _channel(request)
    lo, hi = await _visible(request, channel)
    return _see_other(request, channel, hi, lo <= hi)


async def earliest(request: web.Request) -> web.Response:
    channel = _channel(request)
    lo, hi = await _visible(request, channel)
    return _see_other(request, channel, lo, lo <= hi)


async def step(request: web.Request) -> web.Response:
    """`/{id}/next` and `/{id}/previous`: 303 to the neighbour, 404 at the ends."""
    channel = _channel(request)
    lo, hi = await _visible(request, channel)
    version = _version(request, channel, lo, hi) + (1 if request.match_info["direction"] == "next" else -1)
    return _see_other(request, channel, version, lo <= version <= hi)


async def latest_n(request: web.Request) -> web.Response:
    channel, n = _channel(request), _n(request)
    lo, hi = await _visible(request, channel)
    return _listing(request, channel, max(lo, hi - n + 1), hi, n)


async def earliest_n(request: web.Request) -> web.Response:
    channel, n = _channel(request), _n(request)
    lo, hi = await _visible(request, channel)
    return _listing(request, channel, lo, min(hi, lo + n - 1), n)


async def step_n(request: web.Request) -> web.Response:
    channel, n = _channel(request), _n(request)
    lo, hi = await _visible(request, channel)
    version = _version(request, channel, lo, hi)
    if request.match_info["direction"] == "next":
        return _listing(request, channel, version + 1, min(hi, version + n), n)
    return _listing(request, channel, max(lo, version - n), version - 1, n)


async def time_query(request: web.Request) -> web.Response:
    """Item URIs inserted in one UTC year/month/day/hour/minute/second, with period links."""
    channel = _channel(request)
    parts = [int(request.match_info[k]) for k in ("Y", "M", "D", "h", "m", "s") if k in request.match_info]
    try:
        start = dt.datetime(*parts, tzinfo=dt.timezone.utc)  # type: ignore[arg-type, misc]
    except ValueError as exc:
        raise ChannelError("invalid", f"not a time: {exc}") from None
    unit = _UNITS[len(parts) - 3]
    lo, hi = await _visible(request, channel)
    store = request.app[LOG].store
    first = await store.first_at_or_after(channel.items_stream, datetime_to_micros(start))
    last = await store.last_before(channel.items_stream, datetime_to_micros(start + unit))
    begin, end = max(lo, first.version if first else hi + 1), min(hi, last.version if last else -1)
    body = _listing_body(request, channel, begin, end)
    url = f"{_channel_url(request, channel.name)}/"
    body["_links"]["self"] = {"href": url + _period(start, len(parts))}
    body["_links"]["previous"] = {"href": url + _period(start - unit, len(parts))}
    body["_links"]["next"] = {"href": url + _period(start + unit, len(parts))}
    return json_response(body)


def _period(start: dt.datetime, parts: int) -> str:
    return start.strftime("/".join(["%Y", "%m", "%d", "%H", "%M", "%S"][:parts]))


async def _visible(request: web.Request, channel: Channel) -> tuple[int, int]:
    """The versions (lo, hi) of the items a read may see: not purged, not past the TTL.

    Empty when lo > hi. Costs one indexed read for a channel with a TTL, none otherwise.
    """
    lo, hi = channel.purged_through + 1, channel.items - 1
    cutoff = channel.cutoff(request.app[CLOCK].now())
    if cutoff is None or lo > hi:
        return lo, hi
    if channel.latest_at < cutoff:
        return hi + 1, hi
    first = await request.app[LOG].store.first_at_or_after(channel.items_stream, cutoff)
    return max(lo, first.version if first else hi + 1), hi


def _version(request: web.Request, channel: Channel, lo: int, hi: int) -> int:
    text = request.match_info["id"]
    parsed = parse_item_id(text)
    if parsed is None or parsed[0] != channel.generation or not lo <= parsed[1] <= hi:
        raise ChannelError("not_found", f"item {text} does not exist in channel {channel.name!r}")
    return parsed[1]


def _n(request: web.Request) -> int:
    n = int(request.match_info["n"])
    if not 1 <= n <= MAX_N:
        raise ChannelError("invalid", f"n must be 1 to {MAX_N}")
    return n


def _see_other(request: web.Request, channel: Channel, version: int, exists: bool) -> web.Response:
    if not exists:
        raise ChannelError("not_found", f"no such item in channel {channel.name!r}")
    return web.Response(status=303, headers={"Location": _item_url(request, channel, version)})


def _listing(request: web.Request, channel: Channel, begin: int, end: int, n: int) -> web.Response:
    body = _listing_body(request, channel, begin, end)
    links = body["_links"]
    links["self"] = {"href": base_url(request) + request.rel_url.path}
    if begin <= end:
        links["previous"] = {"href": f"{_item_url(request, channel, begin)}/previous/{n}"}
        links["next"] = {"href": f"{_item_url(request, channel, end)}/next/{n}"}
    return json_response(body)


def _listing_body(request: web.Request, channel: Channel, begin: int, end: int) -> dict[str, Any]:
    """`{"_links": {"uris": [...]}}` for versions begin..end, at most MAX_N of them."""
    uris = [_item_url(request, channel, v) for v in range(begin, min(end, begin + MAX_N - 1) + 1)]
    body: dict[str, Any] = {"_links": {"uris": uris}}
    if end - begin + 1 > MAX_N:
        body["truncated"] = True
    return body


# -- subscribing -------------------------------------------------------------------------

Feed = asyncio.Queue[tuple[int, str] | None]
"""(position, URL) of each new item for an SSE stream; None when the subscription ends."""


async def subscribe_ws(request: web.Request) -> web.StreamResponse:
    """One text message per insert, the item's URL, as it commits.

    The channel's one `Broadcast` writes to every socket (see api/broadcast.py); this
    handler only registers the socket, waits for the client to leave, and unregisters it.
    A client that stops reading lags on its own; once more than `channel_ws_buffer` of its
    lines wait in its send buffer, it is disconnected. Deleting the channel closes the
    socket (1001, going away). permessage-deflate is declined: the broadcast writes one
    frame's bytes to many sockets.
    """
    try:
        channel = _channel(request)
    except ChannelError as exc:
        return _error(exc)
    # no aiohttp heartbeat (a timer per socket): the broadcast pings them all; no deflate
    ws = web.WebSocketResponse(autoping=False, compress=False)
    await ws.prepare(request)
    transport = request.transport
    if transport is None:  # gone during the handshake
        return ws
    broadcast = _broadcast(request.app, channel)
    broadcast.add(ws, transport, f"{_channel_url(request, channel.name)}/", channel.items - 1)
    try:
        # what the client sends is ignored; this answers its pings, reports its pongs and
        # notices it leaving (`receive` rather than `async for`: one coroutine less per socket)
        while (msg := await ws.receive()).type not in _LEFT:
            if msg.type is WSMsgType.PONG:
                broadcast.pong(ws)
            elif msg.type is WSMsgType.PING:
                try:
                    await ws.pong(msg.data)
                except ConnectionError:  # it left while pinging
                    break
    finally:
        broadcast.remove(ws)
    return ws


def _broadcast(app: web.Application, channel: Channel) -> Broadcast:
    """The channel generation's running broadcast, started by its first subscriber."""
    broadcasts, stream = app[BROADCASTS], channel.items_stream
    broadcast = broadcasts.get(stream)
    if broadcast is None:
        hub, model = app[LOG].hub, app[CHANNELS].model
        generation = channel.generation

        async def until_deleted() -> None:
            while (live := model.channels.get(channel.name)) is not None and live.generation == generation:
                await hub.wait_change(channel.stream, None)

        def forget() -> None:
            if broadcasts.get(stream) is broadcast:
                del broadcasts[stream]

        broadcast = broadcasts[stream] = Broadcast(
            hub, stream, hub.head, channel.items - 1, lambda event: item_id(generation, event.version),
            max_lines=app[SETTINGS].channel_ws_buffer, until=until_deleted,
            heartbeat=app[SETTINGS].channel_ws_heartbeat_seconds, sleep=app[CLOCK].sleep,
            on_stop=forget, name=f"channel {channel.name}", logger=log,
        )
    return broadcast


async def _close_broadcasts(app: web.Application) -> None:
    """At shutdown: every channel websocket gets 1001 (going away) instead of a cut."""
    broadcasts = list(app[BROADCASTS].values())
    await asyncio.gather(*(b.close(1001, b"server shutting down") for b in broadcasts))
    await asyncio.gather(*(b.join() for b in broadcasts))


async def subscribe_sse(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events of new item URLs, `id:` the log position; resumes from Last-Event-ID."""
    channel = _channel(request)
    raw = request.headers.get("Last-Event-ID", "")
    if raw and not raw.isdigit():
        raise ChannelError("invalid", "Last-Event-ID must be a log position (an id this stream sent)")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    feed: Feed = asyncio.Queue(request.app[SETTINGS].channel_ws_buffer)
    pump = asyncio.create_task(_pump(request, channel, int(raw) if raw else request.app[LOG].head, feed))
    try:
        while True:
            try:
                item = await asyncio.wait_for(feed.get(), _SSE_KEEPALIVE)
            except TimeoutError:
                await response.write(b": keepalive\n\n")  # also notices a client that left
                continue
            if item is None:
                break
            await response.write(f"id: {item[0]}\ndata: {item[1]}\n\n".encode())
    except ConnectionError:
        pass
    finally:
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
    return response


async def _pump(request: web.Request, channel: Channel, after: int, feed: Feed) -> None:
    """Fill `feed` with this generation's items after `after` until the channel is deleted.

    SSE only (websockets share their channel's `Broadcast`): each stream reads the hub on
    its own cursor, so a slow one holds up nobody. History (a resume) is fed at the client's pace; once the feed is full of live items
    the client is too far behind and its connection is dropped.
    """
    hub = request.app[LOG].hub
    model = request.app[CHANNELS].model
    live_after = hub.head

    async def follow() -> None:
        async for batch in hub.subscribe(after, EventFilter(stream=channel.items_stream)):
            for event in batch:
                item = (event.position, _item_url(request, channel, event.version))
                if event.position <= live_after:
                    await feed.put(item)
                else:
                    feed.put_nowait(item)

    async def until_deleted() -> None:
        while (live := model.channels.get(channel.name)) is not None and live.generation == channel.generation:
            await hub.wait_change(channel.stream, None)

    tasks = [asyncio.create_task(follow()), asyncio.create_task(until_deleted())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    error = next((e for task in done if (e := task.exception()) is not None), None)
    if error is not None:
        if isinstance(error, asyncio.QueueFull):
            log.info("channel %s: subscriber more than %d items behind, disconnected", channel.name, feed.maxsize)
        else:
            log.error("channel %s: subscription failed: %r", channel.name, error)
        if request.transport is not None:
            request.transport.abort()
        while not feed.empty():
            feed.get_nowait()
    await feed.put(None)


# -- helpers -----------------------------------------------------------------------------


def _channels(request: web.Request) -> Channels:
    return request.app[CHANNELS]


def _channel(request: web.Request) -> Channel:
    return _channels(request).get(request.match_info["name"])


def _channel_url(request: web.Request, name: str) -> str:
    return f"{base_url(request)}/channel/{name}"


def _item_url(request: web.Request, channel: Channel, version: int) -> str:
    return f"{_channel_url(request, channel.name)}/{item_id(channel.generation, version)}"


def _inserted_url(request: web.Request, event: Event) -> str:
    name, generation = parse_items_stream(event.stream)
    return f"{_channel_url(request, name)}/{item_id(generation, event.version)}"


async def _json(request: web.Request) -> ChannelRequest:
    body = await read_body(request, _JSON_LIMIT)
    try:
        return msgspec.json.decode(body, type=ChannelRequest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ChannelError("invalid", f"invalid JSON body: {exc}") from None


async def _commit(request: web.Request, decide: Callable[[Model], StreamAppend | None]) -> list[Event]:
    """Decide on the current model and append with its expected version.

    On a conflict this node catches up with the log and decides again, so a conflict with
    an unrelated write (say, the purger's record) never reaches the client.
    """
    event_log = request.app[LOG]
    for _ in range(3):
        append = decide(_channels(request).model)
        if append is None:
            return []
        try:
            return await event_log.append(append)
        except WrongExpectedVersion:
            await event_log.wait_for(await event_log.store.head(), timeout=5.0)
    raise ChannelError("conflict", "the channel kept changing while this request ran; try again")
