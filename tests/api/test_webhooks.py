"""The webhook API as a Data Hub client calls it: PUT, GET, list, DELETE, errors, updateCursor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from api import channels, webhooks
from api.app import create_app
from api.keys import LOG
from eventhub.settings import Settings
from projections.webhooks import Webhook
from tests.conftest import AppClient

Client = TestClient[web.Request, web.Application]


class Receiver:
    """A real callback server on 127.0.0.1: records each call and answers as told.

    `statuses` are answered in turn (then 200). With `holding`, each call waits until
    `release(uri)` is called for the item it carries.
    """

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.arrived: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.statuses: list[int] = []
        self.holding = False
        self.gates: dict[str, asyncio.Event] = {}
        self.active = 0
        self.most_active = 0
        self.url = ""

    def release(self, uri: str) -> None:
        self.gates.setdefault(uri, asyncio.Event()).set()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        call = {"path": request.path, "body": body, "headers": dict(request.headers)}
        self.calls.append(call)
        self.arrived.put_nowait(call)
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            if self.holding:
                await self.gates.setdefault(body["uris"][0], asyncio.Event()).wait()
            status = self.statuses.pop(0) if self.statuses else 200
            headers = {"Location": "http://127.0.0.1:1/elsewhere"} if 300 <= status < 400 else None
            return web.Response(status=status, headers=headers)
        finally:
            self.active -= 1

    async def next(self, path: str | None = None) -> str:
        """The item URI of the next call (to `path`, when given)."""
        while True:
            call = await asyncio.wait_for(self.arrived.get(), 10)
            if path is None or call["path"] == path:
                return str(call["body"]["uris"][0])

    def uris(self, path: str | None = None) -> list[str]:
        return [c["body"]["uris"][0] for c in self.calls if path is None or c["path"] == path]


@pytest.fixture
async def receiver(aiohttp_server: Any) -> AsyncIterator[Receiver]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", r.handle)
    server = await aiohttp_server(app, shutdown_timeout=0.5)
    r.url = str(server.make_url("/hook"))
    yield r
    for gate in r.gates.values():
        gate.set()
    r.holding = False


async def hub_app(make_client: AppClient, **overrides: Any) -> Client:
    return await make_client(facets=(channels, webhooks), **overrides)


def host(client: Client) -> str:
    return f"http://{client.host}:{client.port}"


async def create_channel(client: Client, name: str = "stumptown", **fields: Any) -> str:
    resp = await client.post("/channel", json={"name": name, **fields})
    assert resp.status == 200, await resp.text()
    return f"{host(client)}/channel/{name}"


async def insert(client: Client, name: str = "stumptown", data: bytes = b"x") -> str:
    resp = await client.post(f"/channel/{name}", data=data, headers={"Content-Type": "text/plain"})
    assert resp.status == 201, await resp.text()
    return resp.headers["Location"]


async def put_webhook(client: Client, name: str = "hook", status: int = 201, **fields: Any) -> dict[str, Any]:
    resp = await client.put(f"/webhook/{name}", json=fields)
    assert resp.status == status, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def until(client: Client, check: Any, timeout: float = 10) -> None:
    """Wait for commits until `check()` holds (the read model is looked at after each)."""
    hub = client.app[LOG].hub
    async with asyncio.timeout(timeout):
        while not check():
            await hub.wait_change(None, None)


def hook_of(client: Client, name: str = "hook") -> Webhook:
    return client.app[webhooks.WEBHOOKS].model.webhooks[name]


# -- configure, list, get, delete ---------------------------------------------------------


async def test_create_get_list_and_delete(make_client: AppClient, receiver: Receiver) -> None:
    client = await hub_app(make_client)
    channel_url = await create_channel(client)
    resp = await client.put("/webhook/stumptownCallback", json={"callbackUrl": receiver.url, "channelUrl": channel_url})
    assert resp.status == 201
    url = f"{host(client)}/webhook/stumptownCallback"
    assert resp.headers["Location"] == url
    created = await resp.json()
    assert created == {
        "_links": {"self": {"href": url}, "errors": {"href": f"{url}/errors"}, "lastCompleted": {"href": f"{url}/lastCompleted"}},
        "name": "stumptownCallback",
        "callbackUrl": receiver.url,
        "channelUrl": channel_url,
        "parallelCalls": 1,
        "paused": False,
        "batch": "SINGLE",
        "heartbeat": False,
        "ttlMinutes": 0,
        "maxWaitMinutes": 1,
        "callbackTimeoutSeconds": 30,
        "maxAttempts": 0,
        "channelLatest": "",
        "lastCompleted": "",
        "inFlight": [],
        "errors": [],
    }
    assert await (await client.get("/webhook/stumptownCallback")).json() == created
    await put_webhook(client, "another", callbackUrl=receiver.url, channelUrl=channel_url)
    listing = await (await client.get("/webhook")).json()
    assert listing == {
        "_links": {
            "self": {"href": f"{host(client)}/webhook"},
            "webhooks": [
                {"name": "another", "href": f"{host(client)}/webhook/another"},
                {"name": "stumptownCallback", "href": url},
            ],
        }
    }
    resp = await client.delete("/webhook/stumptownCallback")
    assert resp.status == 202
    resp = await client.get("/webhook/stumptownCallback")
    assert resp.status == 404 and await resp.json() == {"error": "webhook 'stumptownCallback' does not exist"}
    assert (await client.delete("/webhook/stumptownCallback")).status == 404
    assert [w["name"] for w in (await (await client.get("/webhook")).json())["_links"]["webhooks"]] == ["another"]


async def test_put_again_is_safe_and_updates_merge(make_client: AppClient, receiver: Receiver) -> None:
    client = await hub_app(make_client)
    channel_url = await create_channel(client)
    first = await put_webhook(client, callbackUrl=receiver.url, channelUrl=channel_url, parallelCalls=2)
    head = client.app[LOG].head
    again = await put_webhook(client, status=200, callbackUrl=receiver.url, channelUrl=channel_url, parallelCalls=2)
    assert again == first and client.app[LOG].head == head  # the same configuration writes nothing
    # a GET body PUT back changes nothing either (status fields are ignored)
    resp = await client.put("/webhook/hook", json=first)
    assert resp.status == 200 and client.app[LOG].head == head
    updated = await put_webhook(client, status=200, paused=True, maxAttempts=5, ttlMinutes=10)
    assert (updated["paused"], updated["maxAttempts"], updated["ttlMinutes"], updated["parallelCalls"]) == (True, 5, 10, 2)
    assert updated["callbackUrl"] == receiver.url  # absent fields keep their value
    # the scheme and host of channelUrl may change, its channel may not
    moved = await put_webhook(client, status=200, channelUrl="https://hub.example.com/channel/stumptown/")
    assert moved["channelUrl"] == "https://hub.example.com/channel/stumptown"
    await create_channel(client, "other")
    resp = await client.put("/webhook/hook", json={"channelUrl": f"{host(client)}/channel/other"})
    assert resp.status == 409 and "cannot change" in (await resp.json())["error"]


async def test_links_follow_the_host_the_client_called(make_client: AppClient, receiver: Receiver) -> None:
    client = await hub_app(make_client)
    channel_url = await create_channel(client)
    await put_webhook(client, callbackUrl=receiver.url, channelUrl=channel_url)
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "hub.example.com"}
    body = await (await client.get("/webhook/hook", headers=headers)).json()
    assert body["_links"]["self"]["href"] == "https://hub.example.com/webhook/hook"
    listing = await (await client.get("/webhook", headers=headers)).json()
    assert listing["_links"]["webhooks"][0]["href"] == "https://hub.example.com/webhook/hook"


async def test_errors_and_last_completed_shapes(make_client: AppClient, receiver: Receiver) -> None:
    client = await hub_app(make_client)
    channel_url = await create_channel(client)
    await put_webhook(client, callbackUrl=receiver.url, channelUrl=channel_url)
    url = f"{host(client)}/webhook/hook"
    errors = await (await client.get("/webhook/hook/errors")).json()
    assert errors == {"_links": {"self": {"href": f"{url}/errors"}}, "errors": [{"name": "hook", "errors": []}]}
    item = await insert(client)
    await receiver.next()
    await until(client, lambda: hook_of(client).cursor == 0)
    last = await (await client.get("/webhook/hook/lastCompleted")).json()
    assert last == {
        "_links": {"self": {"href": f"{url}/lastCompleted"}},
        "lastCompleted": [{"name": "hook", "channelLatest": item, "lastCompleted": item}],
    }


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "invalid JSON body"),
        (b"[]", "invalid JSON body"),
        (b'{"callbackUrl": 5}', "invalid JSON body"),
        (b'{"parallelCalls": "2"}', "invalid JSON body"),
        (b'{"parallelCalls": 1.5}', "invalid JSON body"),
        (b'{"paused": "yes"}', "invalid JSON body"),
        (b'{"maxAttempts": true}', "invalid JSON body"),
        (b'{"channelUrl": "CHANNEL"}', "callbackUrl is required"),
        (b'{"callbackUrl": "CALLBACK"}', "channelUrl is required"),
        (b'{"callbackUrl": "CALLBACK", "channelUrl": "CHANNEL", "parallelCalls": 0}', "parallelCalls must be from 1"),
        (b'{"callbackUrl": "CALLBACK", "channelUrl": "CHANNEL", "parallelCalls": 101}', "parallelCalls must be from 1"),
        (b'{"callbackUrl": "CALLBACK", "channelUrl": "CHANNEL", "maxAttempts": -1}', "maxAttempts must be 0 or more"),
        (b'{"callbackUrl": "CALLBACK", "channelUrl": "CHANNEL", "maxWaitMinutes": 0}', "maxWaitMinutes"),
        (b'{"callbackUrl": "CALLBACK", "channelUrl": "CHANNEL", "callbackTimeoutSeconds": 0}', "callbackTimeoutSeconds"),
        (b'{"callbackUrl": "CALLBACK", "channelUrl": "CHANNEL", "ttlMinutes": -5}', "ttlMinutes"),
        (b'{"callbackUrl": "CALLBACK", "channelUrl": "CHANNEL", "batch": "MINUTE"}', "only SINGLE"),
        (b'{"callbackUrl": "CALLBACK", "channelUrl": "CHANNEL", "heartbeat": true}', "heartbeat"),
        (b'{"callbackUrl": "CALLBACK", "channelUrl": "CHANNEL", "name": "other"}', "names webhook 'other'"),
        (b'{"callbackUrl": "CALLBACK", "channelUrl": "HOST/channel/nope"}', "channel 'nope' does not exist"),
        (b'{"callbackUrl": "CALLBACK", "channelUrl": "HOST/chanel/stumptown"}', "is not a channel URL"),
        (b'{"callbackUrl": "CALLBACK", "channelUrl": "ftp://h/channel/stumptown"}', "is not a channel URL"),
        (b'{"callbackUrl": "CALLBACK", "channelUrl": "CHANNEL/0000000100000000"}', "must be a channel's URL"),
        (b'{"callbackUrl": "http://169.254.169.254/latest", "channelUrl": "CHANNEL"}', "cloud metadata"),
        (b'{"callbackUrl": "http://metadata.google.internal/x", "channelUrl": "CHANNEL"}', "metadata service"),
        (b'{"callbackUrl": "http://[fe80::1]/x", "channelUrl": "CHANNEL"}', "link-local"),
        (b'{"callbackUrl": "ftp://example.com/x", "channelUrl": "CHANNEL"}', "only http and https"),
        (b'{"callbackUrl": "http://user:pw@example.com/x", "channelUrl": "CHANNEL"}', "credentials"),
        (b'{"callbackUrl": "CALLBACK", "channelUrl": "CHANNEL", "startItem": "CHANNEL/0000000000000007"}', "has no item"),
        (b'{"callbackUrl": "CALLBACK", "channelUrl": "CHANNEL", "startItem": "HOST/channel/other/2024/01/01"}',
         "in channel 'other'"),
        (b'{"callbackUrl": "CALLBACK", "channelUrl": "CHANNEL", "startItem": "CHANNEL/2024/13/01"}', "names no time"),
        (b'{"callbackUrl": "CALLBACK", "channelUrl": "CHANNEL", "startItem": "tomorrow"}', "is not a channel URL"),
    ],
)
async def test_bad_put_is_400_and_writes_nothing(
    make_client: AppClient, receiver: Receiver, body: bytes, message: str
) -> None:
    client = await hub_app(make_client)
    channel_url = await create_channel(client)
    raw = body.replace(b"CALLBACK", receiver.url.encode()).replace(b"CHANNEL", channel_url.encode())
    raw = raw.replace(b"HOST", host(client).encode())
    head = client.app[LOG].head
    resp = await client.put("/webhook/hook", data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 400, await resp.text()
    assert message in (await resp.json())["error"]
    assert client.app[LOG].head == head
    assert (await client.get("/webhook/hook")).status == 404


async def test_bad_names_and_big_bodies(make_client: AppClient, receiver: Receiver) -> None:
    client = await hub_app(make_client)
    channel_url = await create_channel(client)
    resp = await client.put("/webhook/no.dots", json={"callbackUrl": receiver.url, "channelUrl": channel_url})
    assert resp.status == 400 and "1 to 48 characters" in (await resp.json())["error"]
    resp = await client.put("/webhook/" + "x" * 49, json={"callbackUrl": receiver.url, "channelUrl": channel_url})
    assert resp.status == 400
    resp = await client.put("/webhook/hook", data=b"{" + b" " * 70_000 + b"}", headers={"Content-Type": "application/json"})
    assert resp.status == 413 and "nothing was written" in (await resp.json())["error"]


async def test_allow_list_narrows_callbacks(make_client: AppClient, receiver: Receiver) -> None:
    client = await hub_app(make_client, webhook_allow=["10.0.0.0/8", "*.example.com"])
    channel_url = await create_channel(client)
    resp = await client.put("/webhook/hook", json={"callbackUrl": receiver.url, "channelUrl": channel_url})
    assert resp.status == 400 and "not in" in (await resp.json())["error"]
    await put_webhook(client, callbackUrl="https://hooks.example.com/in", channelUrl=channel_url)
    await put_webhook(client, "ten", callbackUrl="http://10.1.2.3/in", channelUrl=channel_url)


async def test_export_allow_applies_when_webhook_allow_is_unset(make_client: AppClient, receiver: Receiver) -> None:
    client = await hub_app(make_client, export_allow=["*.example.com"])
    channel_url = await create_channel(client)
    resp = await client.put("/webhook/hook", json={"callbackUrl": receiver.url, "channelUrl": channel_url})
    assert resp.status == 400


async def test_unknown_webhook_is_404_everywhere(make_client: AppClient) -> None:
    client = await hub_app(make_client)
    for method, path in [
        ("GET", "/webhook/nope"),
        ("DELETE", "/webhook/nope"),
        ("GET", "/webhook/nope/errors"),
        ("GET", "/webhook/nope/lastCompleted"),
        ("PUT", "/webhook/nope/updateCursor"),
    ]:
        resp = await client.request(method, path, data=b"http://h/channel/x/0000000100000000")
        assert resp.status == 404, (method, path)
        assert await resp.json() == {"error": "webhook 'nope' does not exist"}


async def test_bad_update_cursor_is_400(make_client: AppClient, receiver: Receiver) -> None:
    client = await hub_app(make_client)
    channel_url = await create_channel(client)
    other_url = await create_channel(client, "other")
    other_item = await insert(client, "other")
    await put_webhook(client, callbackUrl=receiver.url, channelUrl=channel_url)
    head = client.app[LOG].head
    for body, message in [
        ("", "item URL"),
        ("   ", "item URL"),
        ('"', "item URL"),
        ("not a url", "not a channel URL"),
        (channel_url, "not the channel's URL"),
        (other_url + "/0000000100000000", "in channel 'other'"),
        (other_item, "in channel 'other'"),
        (channel_url + "/0000000100000000", "has no item"),
        (channel_url + "/ZZZZ", "neither an item nor a time"),
    ]:
        resp = await client.put("/webhook/hook/updateCursor", data=body.encode(), headers={"Content-Type": "text/plain"})
        assert resp.status == 400, body
        assert message in (await resp.json())["error"], body
    assert client.app[LOG].head == head


async def test_update_cursor_accepts_text_or_a_json_string(make_client: AppClient, receiver: Receiver) -> None:
    client = await hub_app(make_client)
    channel_url = await create_channel(client)
    first = await insert(client)
    await put_webhook(client, callbackUrl=receiver.url, channelUrl=channel_url, paused=True)
    resp = await client.put("/webhook/hook/updateCursor", data=first.encode(), headers={"Content-Type": "text/plain"})
    assert resp.status == 202 and hook_of(client).cursor == 0  # delivery goes on after the first item
    resp = await client.put("/webhook/hook/updateCursor", json=f"{channel_url}/2000/01/01")
    assert resp.status == 202 and hook_of(client).cursor == -1  # everything from 2000 on: from the first item


async def test_webhooks_need_the_channels_facet(settings: Settings) -> None:
    with pytest.raises(RuntimeError, match="set up api.channels before api.webhooks"):
        create_app(settings, facets=(webhooks,))


async def test_deleted_channel_keeps_the_webhook_but_not_its_items(make_client: AppClient, receiver: Receiver) -> None:
    client = await hub_app(make_client)
    channel_url = await create_channel(client)
    await put_webhook(client, callbackUrl=receiver.url, channelUrl=channel_url)
    assert (await client.delete("/channel/stumptown")).status == 202
    body = await (await client.get("/webhook/hook")).json()
    assert body["channelLatest"] == ""
    # still configurable (say, to pause it) though its channel is gone
    assert (await put_webhook(client, status=200, paused=True))["paused"] is True
    resp = await client.put("/webhook/hook/updateCursor", data=f"{channel_url}/0000000100000000".encode())
    assert resp.status == 400 and "does not exist" in (await resp.json())["error"]
