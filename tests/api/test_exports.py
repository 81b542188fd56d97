"""The export service as a Databox client calls it: POST /export and /lp/export with a
macaroon, against real receiving servers on 127.0.0.1."""

from __future__ import annotations

import argparse
import asyncio
import base64
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pymacaroons import Macaroon  # type: ignore[import-untyped]

from api import exports
from api.keys import LOG
from eventhub.settings import load_settings
from tests.conftest import AppClient

KEY = "export-root-key"
TARGET = "eventhub"
Client = TestClient[web.Request, web.Application]
Responder = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


# -- helpers shared with tests/workers/test_exports.py ---------------------------------


class Receiver:
    """A real HTTP server that records what it is sent and answers as told."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.arrived: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.release = asyncio.Event()
        self.respond: Responder = _echo
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        call = {"method": request.method, "path": request.path, "headers": dict(request.headers), "body": body}
        self.calls.append(call)
        self.arrived.put_nowait(call)
        return await self.respond(request, len(self.calls))

    async def hold(self, request: web.Request, n: int) -> web.StreamResponse:
        """Answer only once `release` is set."""
        await self.release.wait()
        return await _echo(request, n)


async def _echo(request: web.Request, n: int) -> web.Response:
    return web.json_response({"received": (await request.read()).decode(), "n": n})


@pytest.fixture
async def receiver(aiohttp_server: Any) -> AsyncIterator[Receiver]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", r.handle)
    server = await aiohttp_server(app, shutdown_timeout=0.5)
    r.url = str(server.make_url("/hook"))
    yield r
    r.release.set()


def mint(destination: str, path: str = "/export", client: str = "alice", *, key: str = KEY,
         caveats: list[str] | None = None) -> str:
    if caveats is None:
        return exports.mint_macaroon(key, TARGET, path, destination, client)
    m = Macaroon(location=TARGET, identifier=client, key=key)
    for c in caveats:
        m.add_first_party_caveat(c)
    return str(m.serialize())


async def export_app(make_client: AppClient, **overrides: Any) -> Client:
    from api import exports as facet

    settings: dict[str, Any] = {
        "export_macaroon_key": KEY, "export_target": TARGET, "export_backoff_seconds": 0.0,
        "export_timeout_seconds": 5.0, **overrides,
    }
    return await make_client(facets=(facet,), **settings)


async def post(client: Client, uri: str, id: str = "", data: str | None = '{"key": "KEY0", "value": ["V0", "V1"]}',
               *, path: str = "/export", who: str = "alice", timeout: float | None = None) -> tuple[int, Any]:
    body: dict[str, Any] = {"id": id, "uri": uri}
    if data is not None:
        body["data"] = data
    params = {"timeout": str(timeout)} if timeout is not None else None
    resp = await client.post(path, json=body, params=params, headers={"X-Api-Key": mint(uri, path, who)})
    payload = await resp.json() if resp.content_type == "application/json" else await resp.text()
    return resp.status, payload


async def wait_finished(client: Client, uri: str, export_id: str, who: str = "alice") -> dict[str, Any]:
    """Long-poll until Finished (each poll answers on the next change; no sleeping)."""
    for _ in range(50):
        status, body = await post(client, uri, export_id, path="/lp/export", who=who, timeout=10)
        assert status == 200, body
        if body["state"] == "Finished":
            return body  # type: ignore[no-any-return]
    raise AssertionError(f"{export_id} never finished")


# -- the contract's flows -------------------------------------------------------------


async def test_new_request_then_poll_until_finished(make_client: AppClient, receiver: Receiver) -> None:
    client = await export_app(make_client)
    data = '{"key": "KEY0", "value": ["V0", "V1"]}'
    status, created = await post(client, receiver.url, data=data)
    assert status == 200
    assert created["state"] == "Pending" and created["ext_response"] == {}
    assert uuid.UUID(created["id"]).version == 4

    done = await wait_finished(client, receiver.url, created["id"])
    assert done == {
        "id": created["id"], "state": "Finished",
        "ext_response": {"status": 200, "body": f'{{"received": "{data.replace(chr(34), chr(92) + chr(34))}", "n": 1}}'},
    }
    (call,) = receiver.calls
    assert call["method"] == "POST" and call["path"] == "/hook" and call["body"] == data.encode()
    assert call["headers"]["Content-Type"] == "application/json"
    assert call["headers"]["X-Export-Id"] == created["id"]

    # /export answers the same, again and again (the original forgot it after one read)
    for _ in range(2):
        status, again = await post(client, receiver.url, created["id"])
        assert status == 200 and again == done


async def test_long_poll_wakes_on_the_change(make_client: AppClient, receiver: Receiver) -> None:
    receiver.respond = receiver.hold
    client = await export_app(make_client)
    _, created = await post(client, receiver.url)
    await receiver.arrived.get()  # claimed and being sent: Processing
    status, now = await post(client, receiver.url, created["id"])
    assert now["state"] == "Processing" and now["ext_response"] == {}

    poll = asyncio.create_task(post(client, receiver.url, created["id"], path="/lp/export", timeout=30))
    await asyncio.sleep(0.05)
    assert not poll.done()  # waiting: nothing changed yet
    receiver.release.set()
    status, body = await asyncio.wait_for(poll, 10)
    assert status == 200 and body["state"] == "Finished" and body["ext_response"]["status"] == 200


async def test_long_poll_times_out_with_the_current_state(make_client: AppClient, receiver: Receiver) -> None:
    receiver.respond = receiver.hold
    client = await export_app(make_client, long_poll_max_seconds=0.2)
    _, created = await post(client, receiver.url)
    await receiver.arrived.get()
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, body = await post(client, receiver.url, created["id"], path="/lp/export", timeout=0.1)
    assert status == 200 and body == {"id": created["id"], "state": "Processing", "ext_response": {}}
    # ?timeout= is capped by EVENTHUB_LONG_POLL_MAX_SECONDS
    status, body = await post(client, receiver.url, created["id"], path="/lp/export", timeout=3600)
    assert status == 200 and body["state"] == "Processing"
    assert loop.time() - started < 2
    status, text = await post(client, receiver.url, created["id"], path="/lp/export", timeout=-1)
    assert status == 400 and "timeout" in text
    receiver.release.set()


async def test_long_poll_new_request_answers_pending_at_once(make_client: AppClient, receiver: Receiver) -> None:
    receiver.respond = receiver.hold
    client = await export_app(make_client)
    status, body = await post(client, receiver.url, path="/lp/export", timeout=30)
    assert status == 200 and body["state"] == "Pending" and body["ext_response"] == {}
    receiver.release.set()
    assert (await wait_finished(client, receiver.url, body["id"]))["ext_response"]["status"] == 200


async def test_unknown_and_other_clients_ids_are_the_same_404(make_client: AppClient, receiver: Receiver) -> None:
    client = await export_app(make_client)
    _, mine = await post(client, receiver.url, who="alice")
    status, theirs = await post(client, receiver.url, mine["id"], who="bob")
    assert status == 404 and theirs == f"Can't find request with the id of {mine['id']}"
    unknown = str(uuid.uuid4())
    status, text = await post(client, receiver.url, unknown, who="bob")
    assert status == 404 and text == f"Can't find request with the id of {unknown}"
    status, text = await post(client, receiver.url, "not-a-uuid", who="alice", path="/lp/export")
    assert status == 404
    assert (await post(client, receiver.url, mine["id"], who="alice"))[0] == 200


# -- macaroons ------------------------------------------------------------------------


async def _status(client: Client, token: str | None, uri: str, path: str = "/export",
                  headers: dict[str, str] | None = None) -> tuple[int, str]:
    h = dict(headers or {})
    if token is not None:
        h["X-Api-Key"] = token
    resp = await client.post(path, json={"id": "", "uri": uri, "data": "{}"}, headers=h)
    return resp.status, await resp.text()


async def test_every_caveat_wrong_in_turn_is_401(make_client: AppClient, receiver: Receiver) -> None:
    client = await export_app(make_client)
    head = await client.app[LOG].store.head()
    uri = receiver.url
    good = [f"target = {TARGET}", "method = post", "path = /export", f"destination = {uri}"]
    wrong = ["target = elsewhere", "method = get", "path = /lp/export", "destination = http://127.0.0.1:1/other"]
    for i in range(4):
        caveats = good[:i] + [wrong[i]] + good[i + 1 :]
        status, text = await _status(client, mint(uri, caveats=caveats), uri)
        assert status == 401 and wrong[i].split(" = ")[0] in text, (wrong[i], text)
        missing = good[:i] + good[i + 1 :]
        status, text = await _status(client, mint(uri, caveats=missing), uri)
        assert status == 401 and good[i].split(" = ")[0] in text, (good[i], text)
    status, text = await _status(client, mint(uri, caveats=[*good, "time < 2000-01-01"]), uri)
    assert status == 401 and "time" in text
    assert await client.app[LOG].store.head() == head  # nothing written


async def test_signature_header_and_encoding_rules(make_client: AppClient, receiver: Receiver) -> None:
    client = await export_app(make_client)
    uri = receiver.url
    assert (await _status(client, mint(uri, key="another-key"), uri)) == (401, "Invalid API key/token: bad signature")
    status, text = await _status(client, None, uri)
    assert status == 401 and "Missing API key" in text
    for garbage in ("abc", "!!!!", base64.urlsafe_b64encode(b"0004junk").decode()):
        assert (await _status(client, garbage, uri))[0] == 401
    # a macaroon minted for /export does not open /lp/export
    status, text = await _status(client, mint(uri), uri, path="/lp/export")
    assert status == 401 and "path" in text
    # method = POST in capitals is the same caveat; Basic-auth username carries it too
    upper = [f"target = {TARGET}", "method = POST", "path = /export", f"destination = {uri}"]
    assert (await _status(client, mint(uri, caveats=upper), uri))[0] == 200
    basic = "Basic " + base64.b64encode(f"{mint(uri)}:".encode()).decode()
    assert (await _status(client, None, uri, headers={"Authorization": basic}))[0] == 200


async def test_no_key_configured_refuses_everything(make_client: AppClient, receiver: Receiver) -> None:
    client = await export_app(make_client, export_macaroon_key="")
    status, text = await _status(client, mint(receiver.url), receiver.url)
    assert status == 401 and "EVENTHUB_EXPORT_MACAROON_KEY is not set" in text


# -- bad input ------------------------------------------------------------------------


async def test_bad_bodies_are_400_and_write_nothing(make_client: AppClient, receiver: Receiver) -> None:
    client = await export_app(make_client, export_max_body_bytes=1024)
    uri = receiver.url
    head = await client.app[LOG].store.head()
    headers = {"X-Api-Key": mint(uri), "Content-Type": "application/json"}
    cases: list[tuple[bytes, str]] = [
        (b"{not json", "not valid JSON"),
        (b'["id", "uri"]', "invalid request"),
        (b'{"id": 7, "uri": "%s", "data": "{}"}' % uri.encode(), "id"),
        (b'{"id": "", "uri": "%s", "data": {"a": 1}}' % uri.encode(), "data"),
        (b'{"id": "", "uri": "%s", "data": "{oops"}' % uri.encode(), "data"),
        (b'{"id": "", "uri": "%s"}' % uri.encode(), "data"),
        (b'{"uri": "%s", "data": "{}"}' % uri.encode(), "id"),
    ]
    for raw, needle in cases:
        resp = await client.post("/export", data=raw, headers=headers)
        text = await resp.text()
        assert resp.status == 400 and needle in text, (raw, resp.status, text)
    big = b'{"id": "", "uri": "%s", "data": "\\"%s\\""}' % (uri.encode(), b"x" * 2000)
    resp = await client.post("/export", data=big, headers=headers)
    assert resp.status == 413 and "1024 bytes" in await resp.text()
    # a body without a uri cannot satisfy the destination caveat check it is sent with
    resp = await client.post("/export", data=b'{"id": "", "data": "{}"}', headers=headers)
    assert resp.status == 400 and "uri" in await resp.text()
    assert await client.app[LOG].store.head() == head


async def test_refused_destinations_are_400_at_request_time(make_client: AppClient, receiver: Receiver) -> None:
    client = await export_app(make_client)
    for uri, why in [
        ("http://169.254.169.254/latest/meta-data", "metadata"),
        ("http://[fe80::1]/x", "link-local"),
        ("ftp://example.com/x", "http"),
        ("http://metadata.google.internal/", "metadata"),
        ("not a url", "http"),
    ]:
        status, text = await post(client, uri)
        assert status == 400 and why in text, (uri, text)
    narrowed = await export_app(make_client, export_allow=["10.0.0.0/8"])
    status, text = await post(narrowed, receiver.url)
    assert status == 400 and "EVENTHUB_EXPORT_ALLOW" in text
    assert receiver.calls == []


# -- minting ----------------------------------------------------------------------------


def test_macaroon_command_mints_a_verifiable_macaroon(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="eventhub")
    sub = parser.add_subparsers(dest="command", required=True)
    exports.add_commands(sub)
    args = parser.parse_args(["macaroon", "--destination", "http://r/hook", "--path", "/lp/export", "--client", "c1"])
    monkeypatch.setenv("EVENTHUB_EXPORT_MACAROON_KEY", KEY)
    monkeypatch.setenv("EVENTHUB_EXPORT_TARGET", "box")
    assert args.sync(args) == 0
    token = capsys.readouterr().out.strip()
    m = Macaroon.deserialize(token)
    assert m.identifier == "c1"
    assert [c.caveat_id for c in m.caveats] == ["target = box", "method = post", "path = /lp/export", "destination = http://r/hook"]
    assert load_settings().export_target == "box"
    monkeypatch.delenv("EVENTHUB_EXPORT_MACAROON_KEY")
    with pytest.raises(Exception, match="EVENTHUB_EXPORT_MACAROON_KEY is not set"):
        args.sync(args)
