"""The Data Hub's webhooks (`/webhook…`) over the log: configure, list, inspect, delete, move the cursor.

Handlers are thin: decode with msgspec, decide (`projections.webhooks`), append, render in
the real hub's shapes. Every `WebhookError` becomes `{"error": "..."}` with its status in
`_handle`, the one place errors are mapped. Delivery itself is `workers.webhooks`.
Webhooks follow channels, so `api.channels` must be set up first in the same app.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from api.channels import CHANNELS
from api.common import BodyTooLarge, Handler, base_url, json_response, read_body, route
from api.keys import LOG, PROJECTIONS, SETTINGS, WORKERS
from eventhub.errors import WrongExpectedVersion
from eventhub.events import StreamAppend
from eventhub.netguard import OutboundGuard
from projections.channels import Channel
from projections.webhooks import (
    TimeAt,
    Webhook,
    WebhookError,
    WebhookRequest,
    Webhooks,
    configure,
    decide_cursor,
    decide_delete,
    decide_put,
    expected_version,
    item_cursor,
    parse_location,
    previous_cursor,
    start_changed,
)
WEBHOOKS = web.AppKey("webhooks", Webhooks)
GUARD = web.AppKey("webhooks_guard", OutboundGuard)
_STATUS = {"invalid": 400, "not_found": 404, "conflict": 409, "too_large": 413}
_BODY_LIMIT = 64 * 1024


def setup(app: web.Application) -> None:
    from workers import webhooks as workers  # here: the worker imports this module's app keys

    if CHANNELS not in app:
        raise RuntimeError("webhooks follow channels: set up api.channels before api.webhooks")
    projection = Webhooks()
    app[WEBHOOKS] = projection
    settings = app[SETTINGS]
    allow_setting = "EVENTHUB_WEBHOOK_ALLOW" if settings.webhook_allow else "EVENTHUB_EXPORT_ALLOW"
    app[GUARD] = OutboundGuard(settings.webhook_allow or settings.export_allow, allow_setting)
    app[PROJECTIONS].append(projection)
    app[WORKERS].append(workers.run)
    r = app.router
    r.add_get("/webhook", _handle(list_webhooks))
    r.add_get("/webhook/{name}", _handle(get_webhook))
    r.add_put("/webhook/{name}", _handle(put_webhook))
    r.add_delete("/webhook/{name}", _handle(delete_webhook))
    r.add_get("/webhook/{name}/errors", _handle(get_errors))
    r.add_get("/webhook/{name}/lastCompleted", _handle(get_last_completed))
    r.add_put("/webhook/{name}/updateCursor", _handle(update_cursor))


def _handle(handler: Handler) -> Handler:
    return route(handler, (WebhookError, BodyTooLarge), _error)


def _error(error: WebhookError | BodyTooLarge) -> web.Response:
    if isinstance(error, BodyTooLarge):
        error = WebhookError("too_large", f"{error}; nothing was written")
    return json_response({"error": error.message}, status=_STATUS[error.kind])


# -- handlers ----------------------------------------------------------------------------


async def list_webhooks(request: web.Request) -> web.Response:
    """`{"_links": {"self", "webhooks": [{"name", "href"}]}}`, by name as the real hub sorts them."""
    base = base_url(request)
    names = sorted(request.app[WEBHOOKS].model.webhooks)
    hooks = [{"name": n, "href": f"{base}/webhook/{n}"} for n in names]
    return json_response({"_links": {"self": {"href": f"{base}/webhook"}, "webhooks": hooks}})


async def get_webhook(request: web.Request) -> web.Response:
    return json_response(_body(request, _webhook(request)))


async def put_webhook(request: web.Request) -> web.Response:
    """Create (201, `Location`) or update (200); an identical PUT writes nothing."""
    name = request.match_info["name"]
    body = _decode(await read_body(request, _BODY_LIMIT))
    settings = request.app[SETTINGS]
    model = request.app[WEBHOOKS].model
    created = False

    async def decide() -> StreamAppend | None:
        nonlocal created
        existing = model.webhooks.get(name)
        expected = expected_version(model, name)  # taken with `existing`: a change meanwhile is a conflict
        channels = request.app[CHANNELS].model
        config = configure(existing, name, body, channels, request.app[GUARD], settings.webhook_timeout_seconds)
        start = None
        if start_changed(existing, config):
            channel = channels.channels.get(config.channel)
            if channel is None:
                raise WebhookError("invalid", f"channel {config.channel!r} does not exist, so startItem cannot be placed")
            version = await _cursor(request, config.start_item, channel) if config.start_item else channel.items - 1
            start = (channel.generation, version)
        created = existing is None
        return decide_put(existing, expected, config, start)

    await _commit(request, decide)
    hook = _webhook(request)
    if created:
        return json_response(_body(request, hook), status=201, headers={"Location": _url(request, name)})
    return json_response(_body(request, hook))


async def delete_webhook(request: web.Request) -> web.Response:
    """202 as the real hub answers; the worker stops at once (no more calls after the commit)."""
    name = request.match_info["name"]
    model = request.app[WEBHOOKS].model

    async def decide() -> StreamAppend:
        return decide_delete(model, name)

    await _commit(request, decide)
    return web.Response(status=202)


async def get_errors(request: web.Request) -> web.Response:
    hook = _webhook(request)
    links = {"self": {"href": f"{_url(request, hook.name)}/errors"}}
    return json_response({"_links": links, "errors": [{"name": hook.name, "errors": hook.error_lines()}]})


async def get_last_completed(request: web.Request) -> web.Response:
    hook = _webhook(request)
    links = {"self": {"href": f"{_url(request, hook.name)}/lastCompleted"}}
    status = _status(request, hook)
    entry = {"name": hook.name, "channelLatest": status["channelLatest"], "lastCompleted": status["lastCompleted"]}
    return json_response({"_links": links, "lastCompleted": [entry]})


async def update_cursor(request: web.Request) -> web.Response:
    """The body is an item URL (delivery goes on after it) or a time URL (from that time on)."""
    name = request.match_info["name"]
    hook = _webhook(request)
    raw = (await read_body(request, _BODY_LIMIT)).decode("utf-8", errors="replace").strip()
    if raw.startswith('"'):
        try:
            raw = str(json.loads(raw)).strip()
        except ValueError:
            raise WebhookError("invalid", "the body is an item URL, as text/plain") from None
    if not raw:
        raise WebhookError("invalid", "the body is an item URL, as text/plain")
    channel = request.app[CHANNELS].model.channels.get(hook.config.channel)
    if channel is None:
        raise WebhookError("invalid", f"channel {hook.config.channel!r} does not exist; there is no item to move to")
    version = await _cursor(request, raw, channel)
    model = request.app[WEBHOOKS].model

    async def decide() -> StreamAppend:
        live = request.app[CHANNELS].model.channels.get(channel.name)
        if live is None or live.generation != channel.generation:
            raise WebhookError("conflict", f"channel {channel.name!r} was deleted meanwhile")
        return decide_cursor(model, name, channel.generation, version)

    await _commit(request, decide)
    return web.Response(status=202)


# -- rendering ---------------------------------------------------------------------------


def _body(request: web.Request, hook: Webhook) -> dict[str, Any]:
    """The configuration and status, in the real hub's `GET /webhook/{name}` shape."""
    c = hook.config
    url = _url(request, hook.name)
    return {
        "_links": {
            "self": {"href": url},
            "errors": {"href": f"{url}/errors"},
            "lastCompleted": {"href": f"{url}/lastCompleted"},
        },
        "name": c.name,
        "callbackUrl": c.callback_url,
        "channelUrl": c.channel_url,
        "parallelCalls": c.parallel_calls,
        "paused": c.paused,
        "batch": "SINGLE",
        "heartbeat": False,
        "ttlMinutes": c.ttl_minutes,
        "maxWaitMinutes": c.max_wait_minutes,
        "callbackTimeoutSeconds": c.callback_timeout_seconds,
        "maxAttempts": c.max_attempts,
        **_status(request, hook),
        "inFlight": hook.in_flight(),
        "errors": hook.error_lines(),
    }


def _status(request: web.Request, hook: Webhook) -> dict[str, str]:
    """`channelLatest` and `lastCompleted` as item URLs, "" when there is none."""
    channel = request.app[CHANNELS].model.channels.get(hook.config.channel)
    latest = ""
    if channel is not None and channel.items > channel.purged_through + 1:
        latest = hook.item_url(channel.generation, channel.items - 1)
    done = hook.cursor_in(channel.generation) if channel is not None else hook.cursor
    completed = hook.item_url(hook.generation, done) if done >= 0 else ""
    return {"channelLatest": latest, "lastCompleted": completed}


# -- helpers -----------------------------------------------------------------------------


def _webhook(request: web.Request) -> Webhook:
    return request.app[WEBHOOKS].get(request.match_info["name"])


def _url(request: web.Request, name: str) -> str:
    return f"{base_url(request)}/webhook/{name}"


def _decode(body: bytes) -> WebhookRequest:
    try:
        return msgspec.json.decode(body, type=WebhookRequest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise WebhookError("invalid", f"invalid JSON body: {exc}") from None


async def _cursor(request: web.Request, text: str, channel: Channel) -> int:
    """The cursor for a startItem or an updateCursor body: the last item not to send."""
    if text.strip().lower() == "previous":
        return previous_cursor(channel)
    location = parse_location(text)
    version = item_cursor(location, channel)
    if version is not None:
        return version
    assert isinstance(location, TimeAt)
    first = await request.app[LOG].store.first_at_or_after(channel.items_stream, location.start)
    return first.version - 1 if first is not None else channel.items - 1


async def _commit(request: web.Request, decide: Callable[[], Awaitable[StreamAppend | None]]) -> None:
    """Decide on the current model and append with its expected version.

    On a conflict (say, with the worker's own record of a delivery) this node catches up
    with the log and decides again, so the client never sees it unless it persists.
    """
    event_log = request.app[LOG]
    for _ in range(5):
        append = await decide()
        if append is None:
            return
        try:
            await event_log.append(append)
            return
        except WrongExpectedVersion:
            await event_log.wait_for(await event_log.store.head(), timeout=5.0)
    raise WebhookError("conflict", "the webhook kept changing while this request ran; try again")
