"""The Data Hub API as a client written against ../shared/seeds/datahub.md calls it."""

from __future__ import annotations

import asyncio
import gzip
import logging
import re
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from api import channels
from api.keys import LOG
from eventhub.clock import ManualClock
from eventhub.events import iso_millis
from tests.conftest import AppClient

Client = TestClient[web.Request, web.Application]
ID = re.compile(r"[0-9A-V]{16}")


async def _client(make_client: AppClient, **overrides: Any) -> Client:
    return await make_client(facets=(channels,), **overrides)


async def _create(client: Client, name: str = "stumptown", **fields: Any) -> dict[str, Any]:
    resp = await client.post("/channel", json={"name": name, **fields})
    assert resp.status == 200, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def _insert(client: Client, name: str, data: bytes = b"x", **headers: str) -> str:
    resp = await client.post(f"/channel/{name}", data=data, headers={"Content-Type": "text/plain", **headers})
    assert resp.status == 201, await resp.text()
    return resp.headers["Location"]


def _path(url: str) -> str:
    return url[url.index("/channel") :]


async def _head(client: Client) -> int:
    return client.app[LOG].head


# -- channels -----------------------------------------------------------------------------


async def test_create_list_get_patch(make_client: AppClient, clock: ManualClock) -> None:
    client = await _client(make_client)
    host = f"http://{client.host}:{client.port}"
    created = await _create(client, ttlMillis="3600000")
    assert created == {
        "_links": {
            "self": {"href": f"{host}/channel/stumptown"},
            "latest": {"href": f"{host}/channel/stumptown/latest"},
            "ws": {"href": f"ws://{client.host}:{client.port}/channel/stumptown/ws"},
        },
        "name": "stumptown",
        "creationDate": iso_millis(clock.now()),
        "lastUpdateDate": iso_millis(clock.now()),
        "ttlMillis": 3600000,
    }
    await _create(client, "ptown")
    listing = await (await client.get("/channel")).json()
    assert listing == {
        "_links": {
            "self": {"href": f"{host}/channel"},
            "channels": [
                {"name": "stumptown", "href": f"{host}/channel/stumptown"},
                {"name": "ptown", "href": f"{host}/channel/ptown"},
            ],
        }
    }
    clock.advance(18)
    resp = await client.post("/channel/stumptown", data=b"hello", headers={"Content-Type": "text/plain"})
    timestamp = (await resp.json())["timestamp"]
    meta = await (await client.get("/channel/stumptown")).json()
    assert meta["lastUpdateDate"] == timestamp != meta["creationDate"] == created["creationDate"]
    patched = await client.patch("/channel/stumptown", json={"ttlMillis": "30000"})
    assert patched.status == 200 and (await patched.json())["ttlMillis"] == 30000
    assert (await (await client.get("/channel/stumptown")).json())["ttlMillis"] == 30000
    cleared = await client.patch("/channel/stumptown", json={"ttlMillis": None})
    assert (await cleared.json())["ttlMillis"] is None


async def test_ttl_default_and_none(make_client: AppClient) -> None:
    client = await _client(make_client)
    assert (await _create(client, "a"))["ttlMillis"] == 120 * 24 * 3600 * 1000
    assert (await _create(client, "b", ttlMillis=None))["ttlMillis"] is None
    assert (await _create(client, "c", ttlMillis=5000))["ttlMillis"] == 5000
    assert (await _create(client, "Some-Name_9" + "x" * 37))["name"] == "Some-Name_9" + "x" * 37
    assert (await _create(client, "A"))["name"] == "A"  # names are case-sensitive
    assert (await client.get("/channel/a")).status == 200 and (await client.get("/channel/A")).status == 200


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b'{"name": "stumptown" "ttlMillis": "3600000"}', 400, "invalid JSON"),  # the contract's own example
        (b"[1, 2]", 400, "object"),
        (b'{"name": 5}', 400, "str"),
        (b"{}", 400, "name is required"),
        (b'{"name": ""}', 400, "1 to 48"),
        (b'{"name": "has space"}', 400, "1 to 48"),
        (b'{"name": "dot.ted"}', 400, "1 to 48"),
        (b'{"name": "' + b"x" * 49 + b'"}', 400, "1 to 48"),
        (b'{"name": "ok", "ttlMillis": -1}', 400, "ttlMillis"),
        (b'{"name": "ok", "ttlMillis": 0}', 400, "ttlMillis"),
        (b'{"name": "ok", "ttlMillis": "soon"}', 400, "ttlMillis"),
        (b'{"name": "ok", "ttlMillis": 1.5}', 400, "ttlMillis"),
        (b'{"name": "ok", "ttlMillis": true}', 400, "ttlMillis"),
        (b'{"name": "taken"}', 409, "already exists"),
    ],
)
async def test_create_refuses_bad_input(make_client: AppClient, body: bytes, status: int, says: str) -> None:
    client = await _client(make_client)
    await _create(client, "taken")
    head = await _head(client)
    resp = await client.post("/channel", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == status
    assert resp.content_type == "application/json" and says in (await resp.json())["error"]
    assert await _head(client) == head  # nothing written


async def test_unknown_channel_and_bad_patch(make_client: AppClient) -> None:
    client = await _client(make_client)
    for method, path in [("GET", "/channel/nope"), ("PATCH", "/channel/nope"), ("DELETE", "/channel/nope"),
                         ("POST", "/channel/nope"), ("GET", "/channel/nope/latest"), ("GET", "/channel/nope/ws")]:
        resp = await client.request(method, path, json={})
        assert resp.status == 404 and "does not exist" in (await resp.json())["error"], (method, path)
    await _create(client)
    bad = await client.patch("/channel/stumptown", json={"ttlMillis": "-5"})
    assert bad.status == 400 and "ttlMillis" in (await bad.json())["error"]
    head = await _head(client)
    same = await client.patch("/channel/stumptown", json={"description": "ignored"})
    assert same.status == 200 and await _head(client) == head  # nothing to change, nothing written


async def test_concurrent_creates_one_wins_and_inserts_all_land(make_client: AppClient) -> None:
    client = await _client(make_client)
    creates = await asyncio.gather(*(client.post("/channel", json={"name": "race"}) for _ in range(10)))
    assert sorted(r.status for r in creates) == [200] + [409] * 9
    inserts = await asyncio.gather(*(client.post("/channel/race", data=bytes([i])) for i in range(50)))
    urls = [r.headers["Location"] for r in inserts]
    assert len(set(urls)) == 50
    listed = await (await client.get("/channel/race/earliest/100")).json()
    assert sorted(listed["_links"]["uris"]) == listed["_links"]["uris"] == sorted(urls)


# -- items ---------------------------------------------------------------------------------


async def test_insert_and_fetch_exact_bytes_and_headers(make_client: AppClient, clock: ManualClock) -> None:
    client = await _client(make_client)
    await _create(client)
    body = gzip.compress(bytes(range(256)) * 4)
    resp = await client.post(
        "/channel/stumptown",
        data=body,
        headers={"Content-Type": "application/x-thing; v=2", "Content-Encoding": "gzip",
                 "Content-Language": "en", "Accept": "application/json"},
    )
    assert resp.status == 201
    created = await resp.json()
    host = f"http://{client.host}:{client.port}"
    location = resp.headers["Location"]
    assert ID.fullmatch(created["id"]) and location == f"{host}/channel/stumptown/{created['id']}"
    assert created == {
        "_links": {"channel": {"href": f"{host}/channel/stumptown"}, "self": {"href": location}},
        "id": created["id"],
        "timestamp": iso_millis(clock.now()),
    }
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        async with raw.get(location) as item:
            assert item.status == 200
            assert await item.read() == body
            assert item.headers["Content-Type"] == "application/x-thing; v=2"
            assert item.headers["Content-Encoding"] == "gzip"
            assert item.headers["Content-Language"] == "en"
            assert item.headers["Creation-Date"] == created["timestamp"]
            assert "Link" not in item.headers  # the only item: no previous, no next


async def test_link_headers_walk_the_channel(make_client: AppClient) -> None:
    client = await _client(make_client)
    await _create(client)
    urls = [await _insert(client, "stumptown", f"item {i}".encode()) for i in range(3)]
    assert urls == sorted(urls) and len(set(urls)) == 3  # ids sort in insertion order
    links = []
    for url in urls:
        resp = await client.get(_path(url))
        assert await resp.read() == f"item {urls.index(url)}".encode()
        assert resp.headers["Content-Type"] == "text/plain"
        links.append(resp.headers.getall("Link", []))
    assert links == [
        [f'<{urls[1]}>;rel="next"'],
        [f'<{urls[0]}>;rel="previous"', f'<{urls[2]}>;rel="next"'],
        [f'<{urls[1]}>;rel="previous"'],
    ]


async def test_latest_and_earliest_redirect(make_client: AppClient) -> None:
    client = await _client(make_client)
    await _create(client)
    for method in ("HEAD", "GET"):
        empty = await client.request(method, "/channel/stumptown/latest", allow_redirects=False)
        assert empty.status == 404
    urls = [await _insert(client, "stumptown", bytes([i])) for i in range(3)]
    for method in ("HEAD", "GET"):
        resp = await client.request(method, "/channel/stumptown/latest", allow_redirects=False)
        assert resp.status == 303 and resp.headers["Location"] == urls[-1]
    first = await client.get("/channel/stumptown/earliest", allow_redirects=False)
    assert first.status == 303 and first.headers["Location"] == urls[0]
    followed = await client.get("/channel/stumptown/latest")
    assert await followed.read() == bytes([2])
    nxt = await client.get(_path(urls[0]) + "/next", allow_redirects=False)
    assert nxt.headers["Location"] == urls[1]
    assert (await client.get(_path(urls[0]) + "/previous", allow_redirects=False)).status == 404


async def test_lists_of_n(make_client: AppClient) -> None:
    client = await _client(make_client)
    await _create(client)
    urls = [await _insert(client, "stumptown") for _ in range(5)]

    async def uris(path: str) -> list[str]:
        resp = await client.get(path)
        assert resp.status == 200, await resp.text()
        return (await resp.json())["_links"]["uris"]  # type: ignore[no-any-return]

    assert await uris("/channel/stumptown/latest/2") == urls[3:]
    assert await uris("/channel/stumptown/earliest/2") == urls[:2]
    assert await uris("/channel/stumptown/latest/10000") == urls
    assert await uris(_path(urls[1]) + "/next/2") == urls[2:4]
    assert await uris(_path(urls[3]) + "/previous/10") == urls[:3]
    assert await uris(_path(urls[4]) + "/next/3") == []
    page = await (await client.get(_path(urls[1]) + "/next/2")).json()
    assert page["_links"]["next"]["href"] == urls[3] + "/next/2"
    assert page["_links"]["previous"]["href"] == urls[2] + "/previous/2"
    for bad in ("/channel/stumptown/latest/10001", "/channel/stumptown/earliest/0", _path(urls[0]) + "/next/20000"):
        resp = await client.get(bad)
        assert resp.status == 400 and "10000" in (await resp.json())["error"]
    for missing in ("/channel/stumptown/0000000000000000", "/channel/stumptown/not-an-id",
                    "/channel/stumptown/" + "V" * 16 + "/next/2"):
        resp = await client.get(missing)
        assert resp.status == 404 and "does not exist" in (await resp.json())["error"]


async def test_forwarded_host_and_proto_in_bodies_and_headers(make_client: AppClient) -> None:
    client = await _client(make_client)
    fwd = {"X-Forwarded-Host": "hub.example.org", "X-Forwarded-Proto": "https"}
    meta = await (await client.post("/channel", json={"name": "stumptown"}, headers=fwd)).json()
    assert meta["_links"]["self"]["href"] == "https://hub.example.org/channel/stumptown"
    assert meta["_links"]["ws"]["href"] == "wss://hub.example.org/channel/stumptown/ws"
    first = await client.post("/channel/stumptown", data=b"1", headers=fwd)
    assert first.headers["Location"].startswith("https://hub.example.org/channel/stumptown/")
    await client.post("/channel/stumptown", data=b"2", headers=fwd)
    item = await client.get(_path(first.headers["Location"]), headers={"Host": "other:8080"})
    assert item.headers["Link"].startswith("<http://other:8080/channel/stumptown/")
    latest = await client.head("/channel/stumptown/latest", headers=fwd, allow_redirects=False)
    assert latest.headers["Location"].startswith("https://hub.example.org/")
    listing = await (await client.get("/channel", headers=fwd)).json()
    assert listing["_links"]["self"]["href"] == "https://hub.example.org/channel"


async def test_oversize_insert_is_413_and_writes_nothing(make_client: AppClient) -> None:
    client = await _client(make_client, max_body_bytes=1000)
    await _create(client)
    head = await _head(client)
    resp = await client.post("/channel/stumptown", data=b"x" * 1001, headers={"Content-Type": "text/plain"})
    assert resp.status == 413 and "1000 bytes" in (await resp.json())["error"]

    async def chunked() -> Any:
        for _ in range(11):
            yield b"y" * 100

    resp = await client.post("/channel/stumptown", data=chunked(), headers={"Content-Type": "text/plain"})
    assert resp.status == 413
    assert await _head(client) == head
    await _insert(client, "stumptown", b"z" * 1000)


async def test_time_queries(make_client: AppClient, clock: ManualClock) -> None:
    client = await _client(make_client)
    await _create(client, ttlMillis=None)
    # the manual clock starts at 2023-11-14T22:13:20Z
    a = await _insert(client, "stumptown")
    clock.advance(30)  # 22:13:50
    b = await _insert(client, "stumptown")
    clock.advance(20)  # 22:14:10
    c = await _insert(client, "stumptown")
    clock.advance(3600)  # 23:14:10
    d = await _insert(client, "stumptown")

    async def period(path: str) -> dict[str, Any]:
        resp = await client.get("/channel/stumptown/" + path)
        assert resp.status == 200, await resp.text()
        return (await resp.json())["_links"]  # type: ignore[no-any-return]

    assert (await period("2023/11/14"))["uris"] == [a, b, c, d]
    hour = await period("2023/11/14/22")
    assert hour["uris"] == [a, b, c]
    base = f"http://{client.host}:{client.port}/channel/stumptown/"
    assert hour["self"]["href"] == base + "2023/11/14/22"
    assert hour["previous"]["href"] == base + "2023/11/14/21"
    assert hour["next"]["href"] == base + "2023/11/14/23"
    assert (await period("2023/11/14/22/13"))["uris"] == [a, b]
    assert (await period("2023/11/14/22/13/50"))["uris"] == [b]
    assert (await period("2023/11/14/23/59/59"))["next"]["href"] == base + "2023/11/15/00/00/00"
    assert (await period("2023/11/15"))["uris"] == []
    assert (await client.get("/channel/stumptown/2023/13/01")).status == 400


async def test_ttl_hides_items_from_every_read(make_client: AppClient, clock: ManualClock) -> None:
    client = await _client(make_client)
    await _create(client, ttlMillis=10_000)
    old = await _insert(client, "stumptown", b"old")
    clock.advance(6)
    new = await _insert(client, "stumptown", b"new")
    clock.advance(5)  # old is 11 s old, new 5 s
    assert (await client.get(_path(old))).status == 404
    fresh = await client.get(_path(new))
    assert fresh.status == 200 and "Link" not in fresh.headers  # the expired neighbour is not linked
    earliest = await client.get("/channel/stumptown/earliest", allow_redirects=False)
    assert earliest.headers["Location"] == new
    assert (await (await client.get("/channel/stumptown/earliest/5")).json())["_links"]["uris"] == [new]
    clock.advance(6)
    assert (await client.get(_path(new))).status == 404
    assert (await client.head("/channel/stumptown/latest", allow_redirects=False)).status == 404
    assert (await client.get("/channel/stumptown")).status == 200  # the channel itself stays
    await client.patch("/channel/stumptown", json={"ttlMillis": None})
    assert (await client.get(_path(old))).status == 200  # not purged yet, so a longer TTL shows it again


async def test_delete_then_recreate(make_client: AppClient) -> None:
    client = await _client(make_client)
    await _create(client)
    old = await _insert(client, "stumptown", b"old")
    resp = await client.delete("/channel/stumptown")
    assert resp.status == 202
    for path in ("/channel/stumptown", _path(old), "/channel/stumptown/latest"):
        assert (await client.get(path, allow_redirects=False)).status == 404
    assert (await (await client.get("/channel")).json())["_links"]["channels"] == []
    await _create(client)
    assert (await client.get("/channel/stumptown/latest", allow_redirects=False)).status == 404
    assert (await client.get(_path(old))).status == 404  # the old items stay gone
    new = await _insert(client, "stumptown", b"new")
    assert new != old and new > old
    assert await (await client.get(_path(new))).read() == b"new"


async def test_bulk_insert_is_one_append(make_client: AppClient) -> None:
    client = await _client(make_client, max_body_bytes=1000)
    await _create(client)
    with aiohttp.MultipartWriter("mixed") as mp:
        mp.append(b"\x00\x01binary", {"Content-Type": "application/octet-stream"})
        mp.append("bonjour", {"Content-Type": "text/plain", "Content-Language": "fr"})
    head = await _head(client)
    resp = await client.post("/channel/stumptown/bulk", data=mp)
    assert resp.status == 201, await resp.text()
    uris = (await resp.json())["_links"]["uris"]
    assert len(uris) == 2 and await _head(client) == head + 2
    first, second = [await client.get(_path(u)) for u in uris]
    assert await first.read() == b"\x00\x01binary" and first.headers["Content-Type"] == "application/octet-stream"
    assert await second.read() == b"bonjour" and second.headers["Content-Language"] == "fr"
    plain = await client.post("/channel/stumptown/bulk", data=b"x", headers={"Content-Type": "text/plain"})
    assert plain.status == 415
    head = await _head(client)
    for body, ctype, status in [
        (b"garbage", "multipart/mixed", 400),  # no boundary
        (b"--b--\r\n", "multipart/mixed; boundary=b", 400),  # no parts
        (b"--b\r\n\r\n" + b"x" * 2000 + b"\r\n--b--\r\n", "multipart/mixed; boundary=b", 413),
    ]:
        resp = await client.post("/channel/stumptown/bulk", data=body, headers={"Content-Type": ctype})
        assert resp.status == status and "error" in await resp.json(), (body[:20], await resp.text())
    assert await _head(client) == head


# -- subscriptions -------------------------------------------------------------------------


async def test_websocket_sends_item_urls_in_order(make_client: AppClient) -> None:
    client = await _client(make_client)
    meta = await _create(client)
    assert meta["_links"]["ws"]["href"].endswith("/channel/stumptown/ws")
    one = await client.ws_connect("/channel/stumptown/ws")
    two = await client.ws_connect("/channel/stumptown/ws")
    urls = [await _insert(client, "stumptown", bytes([i])) for i in range(5)]
    assert [await one.receive_str() for _ in urls] == urls
    assert [await two.receive_str() for _ in urls] == urls
    await one.close()
    more = await _insert(client, "stumptown")
    assert await two.receive_str() == more
    await client.delete("/channel/stumptown")
    closed = await two.receive()
    assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 1001


async def test_websocket_slow_reader_is_dropped_without_slowing_others(
    make_client: AppClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="api.channels")
    client = await _client(make_client, channel_ws_buffer=20)
    await _create(client)
    # a long host makes each URL ~16 KB, so the socket of a client that stops reading fills fast
    slow = await client.ws_connect("/channel/stumptown/ws", headers={"X-Forwarded-Host": "h" * 16000})
    fast = await client.ws_connect("/channel/stumptown/ws")
    sent: list[str] = []
    while "behind, disconnected" not in caplog.text:
        assert len(sent) < 2000, "the slow reader was never dropped"
        sent.append(await _insert(client, "stumptown", str(len(sent)).encode()))
        assert await fast.receive_str() == sent[-1]  # the fast reader keeps up throughout
    received = 0
    while (msg := await slow.receive()).type == aiohttp.WSMsgType.TEXT:
        received += 1
    assert received < len(sent) and msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
    sent.append(await _insert(client, "stumptown"))
    assert await fast.receive_str() == sent[-1]
    assert [len(b) for b in client.app[channels.BROADCASTS].values()] == [1]  # only the fast one left
    await fast.close()


async def test_websocket_subscribers_share_one_broadcast(make_client: AppClient) -> None:
    client = await _client(make_client)
    await _create(client)
    broadcasts = client.app[channels.BROADCASTS]
    plain = [await client.ws_connect("/channel/stumptown/ws") for _ in range(10)]
    proxied = await client.ws_connect(
        "/channel/stumptown/ws", headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "hub.example.org"}
    )
    assert len(broadcasts) == 1 and len(next(iter(broadcasts.values()))) == 11
    urls = [await _insert(client, "stumptown", b"one")]
    with aiohttp.MultipartWriter("mixed") as mp:  # one append of three: one batch for the broadcast
        for i in range(3):
            mp.append(f"bulk {i}", {"Content-Type": "text/plain"})
    bulk = await client.post("/channel/stumptown/bulk", data=mp)
    urls += (await bulk.json())["_links"]["uris"]
    for ws in plain:
        assert [await ws.receive_str() for _ in urls] == urls
    assert [await proxied.receive_str() for _ in urls] == ["https://hub.example.org" + _path(u) for u in urls]

    late = await client.ws_connect("/channel/stumptown/ws")  # mid-stream: only what comes next
    later = await _insert(client, "stumptown")
    assert await late.receive_str() == later == await plain[0].receive_str()

    for ws in [*plain, proxied, late]:
        await ws.close()
    await _settled(lambda: not broadcasts)  # the last one out stopped it
    again = await client.ws_connect("/channel/stumptown/ws")  # and the next one starts another
    newest = await _insert(client, "stumptown")
    assert await again.receive_str() == newest and len(broadcasts) == 1
    await again.close()


async def test_shutdown_closes_channel_websockets_with_1001(make_client: AppClient) -> None:
    client = await _client(make_client)
    await _create(client)
    ws = await client.ws_connect("/channel/stumptown/ws")
    await client.app.shutdown()
    closed = await ws.receive(timeout=10)
    assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 1001
    assert not client.app[channels.BROADCASTS]


async def _settled(done: Callable[[], bool]) -> None:
    """Let the server finish what the client cannot see the end of (an unregistration)."""
    async with asyncio.timeout(10):
        while not done():
            await asyncio.sleep(0.001)


async def test_sse_streams_and_resumes_from_last_event_id(make_client: AppClient) -> None:
    client = await _client(make_client)
    await _create(client)
    resp = await client.get("/channel/stumptown/events")
    assert resp.headers["Content-Type"] == "text/event-stream"
    urls = [await _insert(client, "stumptown") for _ in range(3)]
    seen: list[tuple[int, str]] = []
    while len(seen) < 2:
        seen.append(await _sse_event(resp))
    resp.close()
    assert [u for _, u in seen] == urls[:2]
    resumed = await client.get("/channel/stumptown/events", headers={"Last-Event-ID": str(seen[-1][0])})
    assert (await _sse_event(resumed))[1] == urls[2]
    later = await _insert(client, "stumptown")
    assert (await _sse_event(resumed))[1] == later
    resumed.close()
    bad = await client.get("/channel/stumptown/events", headers={"Last-Event-ID": "abc"})
    assert bad.status == 400


async def test_sse_resume_reads_history_at_the_clients_pace(make_client: AppClient) -> None:
    client = await _client(make_client, channel_ws_buffer=5)
    await _create(client)
    urls = [await _insert(client, "stumptown") for _ in range(30)]  # six times the buffer
    resp = await client.get("/channel/stumptown/events", headers={"Last-Event-ID": "0"})
    assert [(await _sse_event(resp))[1] for _ in urls] == urls
    await client.delete("/channel/stumptown")
    async with asyncio.timeout(10):
        assert await resp.content.read() == b""  # deleting the channel ends the stream


async def _sse_event(resp: aiohttp.ClientResponse) -> tuple[int, str]:
    position, data = 0, ""
    async with asyncio.timeout(10):
        while True:
            line = (await resp.content.readline()).decode().rstrip("\n")
            if line.startswith("id: "):
                position = int(line[4:])
            elif line.startswith("data: "):
                data = line[6:]
            elif line == "" and data:
                return position, data


async def test_restart_sees_the_same_channels_and_items(make_client: AppClient) -> None:
    client = await _client(make_client)
    await _create(client, ttlMillis=None)
    urls = [await _insert(client, "stumptown", bytes([i])) for i in range(3)]
    await client.delete("/channel/stumptown")
    await _create(client, ttlMillis=None)
    urls = [await _insert(client, "stumptown", bytes([i])) for i in range(3)]
    await client.close()
    again = await _client(make_client)
    meta = await (await again.get("/channel/stumptown")).json()
    assert meta["ttlMillis"] is None
    latest = await again.get("/channel/stumptown/latest", allow_redirects=False)
    assert _path(latest.headers["Location"]) == _path(urls[-1])
    middle = await again.get(_path(urls[1]))
    assert await middle.read() == bytes([1]) and len(middle.headers.getall("Link")) == 2
