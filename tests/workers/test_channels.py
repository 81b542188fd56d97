"""The channels purger: TTL expiry and deleted channels, driven by a manual clock."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.test_utils import TestClient

from api import channels
from api.keys import LOG
from eventhub.clock import ManualClock
from eventhub.events import ANY, Event, NewEvent, StreamAppend
from eventhub.hub import EventFilter
from projections.channels import ItemsPurged, parse_item_id
from tests.conftest import AppClient
from workers.channels import sweep

Client = TestClient[web.Request, web.Application]
TEXT = {"Content-Type": "text/plain"}


async def _setup(make_client: AppClient, ttl: Any, items: int = 1) -> tuple[Client, list[str]]:
    client = await make_client(facets=(channels,), ttl_sweep_seconds=1)
    assert (await client.post("/channel", json={"name": "stumptown", "ttlMillis": ttl})).status == 200
    urls = []
    for i in range(items):
        resp = await client.post("/channel/stumptown", data=f"item {i}".encode(), headers=TEXT)
        urls.append(resp.headers["Location"])
    return client, urls


async def _purged(client: Client, after: int) -> ItemsPurged:
    """The next ItemsPurged recorded after `after`."""
    async with asyncio.timeout(10):
        async for batch in client.app[LOG].hub.subscribe(after, EventFilter(types=["ItemsPurged"])):
            return msgspec.json.decode(batch[0].data or b"", type=ItemsPurged)
    raise AssertionError("unreachable")


async def _tick(clock: ManualClock, seconds: float) -> None:
    """Advance the clock once the purger is asleep on it, so the tick wakes it."""
    while clock.sleepers == 0:
        await asyncio.sleep(0)
    clock.advance(seconds)


async def _item(client: Client, url: str) -> Event:
    generation, version = parse_item_id(url.rpartition("/")[2]) or (0, 0)
    (event,) = await client.app[LOG].store.read_stream(f"channel:stumptown:{generation}", version, 1)
    return event


async def test_ttl_expiry_hides_then_purges(make_client: AppClient, clock: ManualClock) -> None:
    client, old = await _setup(make_client, ttl=30_000, items=2)
    clock.advance(20)
    resp = await client.post("/channel/stumptown", data=b"new", headers=TEXT)
    new = resp.headers["Location"]
    head = client.app[LOG].head
    await _tick(clock, 40)  # the old items are 60 s old, the new one 40 s: all past the 30 s TTL
    purged = await _purged(client, head)
    assert purged.reason == "ttl" and purged.through_version == 2  # every item is past the TTL now
    for url in old + [new]:
        assert (await client.get(url[url.index("/channel") :])).status == 404
        assert (await _item(client, url)).data is None  # the payload is gone, the event stays


async def test_purge_only_what_expired_and_idempotently(make_client: AppClient, clock: ManualClock) -> None:
    client, old = await _setup(make_client, ttl=30_000, items=2)
    clock.advance(20)
    resp = await client.post("/channel/stumptown", data=b"new", headers=TEXT)
    new = resp.headers["Location"]
    head = client.app[LOG].head
    await _tick(clock, 15)  # old: 35 s, new: 15 s
    purged = await _purged(client, head)
    assert purged.through_version == 1
    assert [(await _item(client, u)).data for u in old] == [None, None]
    assert (await _item(client, new)).data == b"new"
    fresh = await client.get(new[new.index("/channel") :])
    assert fresh.status == 200 and "Link" not in fresh.headers
    head = client.app[LOG].head
    assert await sweep(client.app) == 0 and client.app[LOG].head == head  # nothing more to do
    # a longer TTL does not bring purged items back
    await client.patch("/channel/stumptown", json={"ttlMillis": None})
    assert (await client.get(old[0][old[0].index("/channel") :])).status == 404


async def test_no_ttl_is_never_purged(make_client: AppClient, clock: ManualClock) -> None:
    client, urls = await _setup(make_client, ttl=None, items=2)
    clock.advance(10 * 365 * 86400)
    assert await sweep(client.app) == 0
    assert (await _item(client, urls[0])).data == b"item 0"


async def test_delete_purges_payloads_right_away(make_client: AppClient) -> None:
    client, urls = await _setup(make_client, ttl=None, items=3)
    head = client.app[LOG].head
    assert (await client.delete("/channel/stumptown")).status == 202
    purged = await _purged(client, head)
    assert (purged.reason, purged.through_version) == ("deleted", 2)
    assert [(await _item(client, u)).data for u in urls] == [None, None, None]
    assert not client.app[channels.CHANNELS].model.deleted  # nothing left to purge


async def test_insert_racing_a_delete_is_purged_too(make_client: AppClient) -> None:
    client, urls = await _setup(make_client, ttl=None, items=1)
    stream = f"channel:stumptown:{(parse_item_id(urls[0].rpartition('/')[2]) or (0, 0))[0]}"
    head = client.app[LOG].head
    await client.delete("/channel/stumptown")
    await _purged(client, head)
    # an insert that decided before the delete but committed after it
    (late,) = await client.app[LOG].append(StreamAppend(stream, [NewEvent("ItemInserted", b"late")], ANY))
    assert await sweep(client.app) == 1
    assert (await client.app[LOG].store.read_event(late.position)).data is None  # type: ignore[union-attr]


async def test_purge_survives_a_restart_between_erase_and_record(make_client: AppClient, clock: ManualClock) -> None:
    client, urls = await _setup(make_client, ttl=1000, items=2)
    first = await _item(client, urls[0])
    await client.app[LOG].store.purge([first.position])  # erased, then "crashed" before recording
    head = client.app[LOG].head
    await client.close()
    clock.advance(5)
    again = await make_client(facets=(channels,))
    purged = await _purged(again, head)  # the start-up sweep erases again and records it all
    assert purged.through_version == 1
    model = again.app[channels.CHANNELS].model
    assert model.channels["stumptown"].purged_through == 1
    assert (await _item(again, urls[1])).data is None
