"""The export service's HTTP API: `POST /export` and `POST /lp/export`, macaroon auth.

Both endpoints take `{"id", "uri", "data"}`. An empty `id` queues a new export and
answers `{"id", "state": "Pending", "ext_response": {}}`; a known id answers its current
state, with `ext_response` `{"status", "body"}` once Finished. `/lp/export` waits for
the next change of a request that is not Finished yet, up to `?timeout=` seconds.

Every request carries a macaroon (`X-Api-Key`, or the Basic-auth username) minted with
`EVENTHUB_EXPORT_MACAROON_KEY` whose first-party caveats are exactly `target = …`,
`method = post`, `path = <request path>` and `destination = <body uri>`. Its
identifier is the client: a client sees only its own requests. Errors are plain-text
messages, as the original service sends them.
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import math
from collections.abc import Awaitable

from aiohttp import BasicAuth, web
from pymacaroons import Macaroon, Verifier  # type: ignore[import-untyped]
from pymacaroons.exceptions import MacaroonException  # type: ignore[import-untyped]

from api.common import BodyTooLarge, json_response, read_body, route
from api.keys import LOG, PROJECTIONS, SETTINGS
from eventhub.errors import SettingsError
from eventhub.events import NO_STREAM, StreamAppend, fact_event
from eventhub.netguard import OutboundGuard, RefusedDestination
from eventhub.settings import Settings, env_name, load_settings
from projections import exports as model
from projections.exports import ExportError, ExportsProjection

EXPORTS = web.AppKey("exports", ExportsProjection)
GUARD = web.AppKey("exports_guard", OutboundGuard)
DEFAULT_LONG_POLL_SECONDS = 5.0


def setup(app: web.Application) -> None:
    from workers import exports as worker

    projection = ExportsProjection()
    app[EXPORTS] = projection
    app[GUARD] = OutboundGuard(app[SETTINGS].export_allow)
    app[PROJECTIONS].append(projection)
    app.router.add_post("/export", route(export))
    app.router.add_post("/lp/export", route(export_long_poll))
    worker.setup(app)


# -- handlers -------------------------------------------------------------------------


async def export(request: web.Request) -> web.Response:
    return await _errors(_handle(request, long_poll=False))


async def export_long_poll(request: web.Request) -> web.Response:
    return await _errors(_handle(request, long_poll=True))


async def _errors(handling: Awaitable[web.Response]) -> web.Response:
    """The one place the facet's error becomes HTTP: status and a plain-text message."""
    try:
        return await handling
    except ExportError as exc:
        headers = {"WWW-Authenticate": 'Basic realm="export"'} if exc.status == 401 else None
        return web.Response(status=exc.status, text=exc.message, headers=headers)


async def _handle(request: web.Request, *, long_poll: bool) -> web.Response:
    settings = request.app[SETTINGS]
    token = _authenticate(request, settings)
    timeout = _timeout(request, settings) if long_poll else 0.0
    try:
        raw = await read_body(request, settings.export_max_body_bytes)
    except BodyTooLarge as exc:
        raise ExportError(413, str(exc)) from None
    body = model.decode_body(raw)
    client = token.check_destination(body.uri)
    projection = request.app[EXPORTS]
    if not body.id:
        return await _create(request, client, body)
    entry = model.find(projection, client, body.id)
    if long_poll and entry.state != model.FINISHED:
        await _wait_for_change(request, entry, timeout)
    return json_response(model.render(entry, await _finished(request, entry)))


async def _wait_for_change(request: web.Request, entry: model.Entry, timeout: float) -> None:
    """Until the request's state differs from what it is now, or `timeout` seconds pass.

    A commit that leaves the state as it was (a failed attempt between retries) does
    not end the wait. Waiting is a future per stream: no CPU while nothing happens.
    """
    hub = request.app[LOG].hub
    loop = asyncio.get_running_loop()
    state, deadline = entry.state, loop.time() + timeout
    # each check of the read model is followed by wait_change with no await between
    while entry.state == state and (remaining := deadline - loop.time()) > 0:
        await hub.wait_change(entry.stream, remaining)


async def _create(request: web.Request, client: str, body: model.ExportBody) -> web.Response:
    fact = model.new_request(client, body)
    try:
        await request.app[GUARD].check_resolved(fact.uri)
    except RefusedDestination as exc:
        raise ExportError(400, f"destination refused: {exc}") from None
    event = fact_event(fact, actor=client)
    await request.app[LOG].append(StreamAppend(model.stream_of(fact.id), [event], NO_STREAM))
    entry = request.app[EXPORTS].get(fact.id)
    assert entry is not None  # read your writes: the append folded it in
    return json_response(model.render(entry))


async def _finished(request: web.Request, entry: model.Entry) -> model.ExportFinished | None:
    """The outcome event, read from the log (bodies are not kept in the read model)."""
    if entry.finished_version is None:
        return None
    events = await request.app[LOG].store.read_stream(entry.stream, entry.finished_version, 1)
    if not events or events[0].data is None:
        return None
    fact = model.from_event(events[0])
    return fact if isinstance(fact, model.ExportFinished) else None


def _timeout(request: web.Request, settings: Settings) -> float:
    raw = request.query.get("timeout")
    if raw is None or raw == "":
        value = DEFAULT_LONG_POLL_SECONDS
    else:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise ExportError(400, f"timeout must be a number of seconds >= 0, not {raw!r}")
    return min(value, settings.long_poll_max_seconds)


# -- macaroons ------------------------------------------------------------------------


class _Token:
    """A macaroon whose signature and target/method/path caveats have been verified."""

    def __init__(self, client: str, destinations: list[str]) -> None:
        self.client = client
        self.destinations = destinations

    def check_destination(self, uri: str) -> str:
        """The client, once every `destination` caveat names `uri`; else 401."""
        for allowed in self.destinations:
            if allowed != uri:
                message = f"Invalid API key/token: caveat 'destination = {allowed}' does not match the uri"
                raise ExportError(401, message)
        return self.client


_REQUIRED = ("target", "method", "path", "destination")


def _authenticate(request: web.Request, settings: Settings) -> _Token:
    key = settings.export_macaroon_key
    if not key:
        name = env_name("export_macaroon_key")
        raise ExportError(401, f"{name} is not set: the export service refuses every request")
    serialized = _macaroon_from(request)
    try:
        macaroon = Macaroon.deserialize(serialized)
        identifier = macaroon.identifier_bytes
        caveats = list(macaroon.caveats)
    except Exception:  # pymacaroons raises anything from IndexError to binascii.Error on garbage
        raise ExportError(401, "Invalid API key/token: not a macaroon") from None
    expected = {
        "target": f"target = {settings.export_target}",
        "method": f"method = {request.method.lower()}",
        "path": f"path = {request.path}",
    }
    seen: set[str] = set()
    destinations: list[str] = []
    refused: list[str] = []

    def satisfied(predicate: str) -> bool:
        name = predicate.split(" = ", 1)[0]
        if name == "destination" and predicate.startswith("destination = "):
            destinations.append(predicate[len("destination = ") :])
            ok = True
        elif name == "method":
            ok = predicate.lower() == expected["method"]
        else:
            ok = expected.get(name) == predicate
        if ok:
            seen.add(name)
        else:
            refused.append(predicate)
        return ok

    verifier = Verifier()
    verifier.satisfy_general(satisfied)
    try:
        verifier.verify(macaroon, key)
    except MacaroonException:
        if refused:
            raise ExportError(401, f"Invalid API key/token: caveat {refused[0]!r} is not satisfied") from None
        if any(not c.first_party() for c in caveats):
            raise ExportError(401, "Invalid API key/token: third-party caveats are not accepted") from None
        raise ExportError(401, "Invalid API key/token: bad signature") from None
    missing = [name for name in _REQUIRED if name not in seen]
    if missing:
        raise ExportError(401, f"Invalid API key/token: no {', '.join(missing)} caveat")
    try:
        client = identifier.decode()
    except UnicodeDecodeError:
        client = "0x" + binascii.hexlify(identifier).decode()
    return _Token(client, destinations)


def _macaroon_from(request: web.Request) -> str:
    token = request.headers.get("X-Api-Key", "").strip()
    if token:
        return token
    header = request.headers.get("Authorization", "")
    if header[:6].lower() == "basic ":
        try:
            token = str(BasicAuth.decode(header).login).strip()
        except ValueError:
            raise ExportError(401, "Invalid API key/token: malformed Basic authorization") from None
        if token:
            return token
    raise ExportError(401, "Missing API key/token: send the macaroon in X-Api-Key or as the Basic-auth username")


def mint_macaroon(key: str, target: str, path: str, destination: str, identifier: str) -> str:
    """A macaroon as the Databox arbiter mints it for one client, path and destination."""
    macaroon = Macaroon(location=target, identifier=identifier, key=key)
    for caveat in (f"target = {target}", "method = post", f"path = {path}", f"destination = {destination}"):
        macaroon.add_first_party_caveat(caveat)
    serialized: str = macaroon.serialize()
    return serialized


# -- command line ---------------------------------------------------------------------


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`eventhub macaroon --destination URI [--path /export] [--client ID]`."""
    p = sub.add_parser(
        "macaroon",
        help="mint an export macaroon (key and target from EVENTHUB_EXPORT_MACAROON_KEY / _TARGET)",
    )
    p.add_argument("--destination", required=True, help="the uri the exports will go to, exactly as sent")
    p.add_argument(
        "--path", default="/export", choices=("/export", "/lp/export"), help="the endpoint (default /export)"
    )
    p.add_argument("--client", default="local", help="the client id (the macaroon's identifier; default 'local')")
    p.set_defaults(sync=cmd_macaroon)


def cmd_macaroon(args: argparse.Namespace) -> int:
    settings = load_settings()
    if not settings.export_macaroon_key:
        raise SettingsError(f"{env_name('export_macaroon_key')} is not set: there is no key to mint with")
    print(mint_macaroon(settings.export_macaroon_key, settings.export_target, args.path, args.destination, args.client))
    return 0

