"""Webhook delivery against a real receiver on 127.0.0.1: order, retries, cursors, pause,
delete, restarts, crashed nodes, parallel calls and two nodes over one log."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from api import channels, webhooks
from api.keys import LOG
from eventhub.claims import Lease
from eventhub.clock import ManualClock
from eventhub.events import StreamAppend, micros_to_datetime
from projections.webhooks import WebhookClaimed, stream_of, to_event
from tests.api.test_webhooks import (  # noqa: F401 (receiver is a fixture)
    Client,
    Receiver,
    create_channel,
    hook_of,
    hub_app,
    insert,
    put_webhook,
    receiver,
    until,
)
from tests.conftest import AppClient


async def _types(client: Client, name: str = "hook") -> list[str]:
    return [e.type for e in await client.app[LOG].store.read_stream(stream_of(name))]


async def _until_sleeping(clock: ManualClock, count: int = 1) -> None:
    """The worker waits on the manual clock (a state with nothing to await from outside)."""
    for _ in range(5000):
        if clock.sleepers >= count:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the worker never went to sleep")


async def test_new_items_are_posted_in_order(make_client: AppClient, receiver: Receiver) -> None:
    client = await hub_app(make_client)
    channel_url = await create_channel(client)
    await insert(client, data=b"before")  # older than the webhook: not sent
    await put_webhook(client, callbackUrl=receiver.url, channelUrl=channel_url)
    items = [await insert(client, data=f"item {i}".encode()) for i in range(3)]
    assert [await receiver.next() for _ in items] == items
    call = receiver.calls[0]
    assert call["body"] == {"name": "hook", "uris": [items[0]], "type": "item"}
    assert call["headers"]["Content-Type"] == "application/json"
    await until(client, lambda: hook_of(client).cursor == 3)
    body = await (await client.get("/webhook/hook")).json()
    assert (body["lastCompleted"], body["channelLatest"], body["errors"]) == (items[-1], items[-1], [])
    assert receiver.uris() == items  # nothing twice


async def test_start_item_previous_and_time(make_client: AppClient, receiver: Receiver, clock: ManualClock) -> None:
    client = await hub_app(make_client)
    channel_url = await create_channel(client)
    items = [await insert(client)]
    clock.advance(3600)
    items += [await insert(client), await insert(client)]
    await put_webhook(client, "after", callbackUrl=receiver.url + "/after", channelUrl=channel_url, startItem=items[0])
    assert [await receiver.next("/hook/after") for _ in range(2)] == items[1:]
    await put_webhook(client, "previous", callbackUrl=receiver.url + "/previous", channelUrl=channel_url,
                      startItem="previous")
    assert await receiver.next("/hook/previous") == items[2]
    hour = micros_to_datetime(clock.now()).strftime("%Y/%m/%d/%H")  # the hour of the last two items
    start = f"{channel_url}/{hour}"
    await put_webhook(client, "time", callbackUrl=receiver.url + "/time", channelUrl=channel_url, startItem=start)
    assert [await receiver.next("/hook/time") for _ in range(2)] == items[1:]


async def test_failures_are_retried_with_backoff_and_listed(
    make_client: AppClient, receiver: Receiver, clock: ManualClock
) -> None:
    client = await hub_app(make_client, webhook_backoff_seconds=1.0)
    channel_url = await create_channel(client)
    await put_webhook(client, callbackUrl=receiver.url, channelUrl=channel_url)
    receiver.statuses = [500, 302]  # a redirect is not followed: it is a failure too
    first, second = await insert(client), await insert(client)
    assert await receiver.next() == first
    await until(client, lambda: (r := hook_of(client).retries.get(0)) is not None and r.attempts == 1)
    assert hook_of(client).retries[0].retry_at == clock.now() + 1_000_000  # the first wait: the base
    body = await (await client.get("/webhook/hook")).json()
    assert body["inFlight"] == [first] and len(body["errors"]) == 1
    clock.advance(1)
    assert await receiver.next() == first
    await until(client, lambda: hook_of(client).retries[0].attempts == 2)
    assert hook_of(client).retries[0].retry_at == clock.now() + 2_000_000  # doubled
    clock.advance(2)
    assert [await receiver.next(), await receiver.next()] == [first, second]  # in order: second waited
    await until(client, lambda: hook_of(client).cursor == 1)
    errors = (await (await client.get("/webhook/hook/errors")).json())["errors"][0]["errors"]
    assert len(errors) == 2
    assert f"{first} attempt 1: 500 Internal Server Error" in errors[0]
    assert f"{first} attempt 2: 302 Found" in errors[1]
    assert (await (await client.get("/webhook/hook")).json())["inFlight"] == []


async def test_backoff_is_capped_at_max_wait(make_client: AppClient, receiver: Receiver, clock: ManualClock) -> None:
    client = await hub_app(make_client, webhook_backoff_seconds=40.0)
    channel_url = await create_channel(client)
    await put_webhook(client, callbackUrl=receiver.url, channelUrl=channel_url)
    receiver.statuses = [500, 500, 500]
    item = await insert(client)
    for attempt, wait in [(1, 40), (2, 60), (3, 60)]:  # 40, then 80 and 160 capped at a minute
        assert await receiver.next() == item
        await until(client, lambda: (r := hook_of(client).retries.get(0)) is not None and r.attempts == attempt)
        assert hook_of(client).retries[0].retry_at == clock.now() + wait * 1_000_000
        clock.advance(wait)
    assert await receiver.next() == item
    await until(client, lambda: hook_of(client).cursor == 0)


async def test_max_attempts_gives_up_and_moves_on(make_client: AppClient, receiver: Receiver) -> None:
    client = await hub_app(make_client, webhook_backoff_seconds=0.0)
    channel_url = await create_channel(client)
    await put_webhook(client, callbackUrl=receiver.url, channelUrl=channel_url, maxAttempts=2)
    receiver.statuses = [500, 503]
    first, second = await insert(client), await insert(client)
    assert [await receiver.next() for _ in range(3)] == [first, first, second]
    await until(client, lambda: hook_of(client).cursor == 1)
    body = await (await client.get("/webhook/hook")).json()
    assert body["lastCompleted"] == second and body["inFlight"] == []
    assert body["errors"][-1].endswith("attempt 2: 503 Service Unavailable (gave up)")


async def test_update_cursor_replays_and_skips(make_client: AppClient, receiver: Receiver) -> None:
    client = await hub_app(make_client)
    channel_url = await create_channel(client)
    await put_webhook(client, callbackUrl=receiver.url, channelUrl=channel_url)
    items = [await insert(client) for _ in range(3)]
    assert [await receiver.next() for _ in items] == items
    await until(client, lambda: hook_of(client).cursor == 2)
    resp = await client.put("/webhook/hook/updateCursor", data=items[0].encode(), headers={"Content-Type": "text/plain"})
    assert resp.status == 202
    assert [await receiver.next(), await receiver.next()] == items[1:]  # replayed after the item given
    await until(client, lambda: hook_of(client).cursor == 2)
    await put_webhook(client, status=200, paused=True)
    more = [await insert(client) for _ in range(3)]
    resp = await client.put("/webhook/hook/updateCursor", data=more[1].encode(), headers={"Content-Type": "text/plain"})
    assert resp.status == 202
    await put_webhook(client, status=200, paused=False)
    assert await receiver.next() == more[2]  # the two before it were skipped
    await until(client, lambda: hook_of(client).cursor == 5)
    assert receiver.uris() == items + items[1:] + more[2:]


async def test_changing_start_item_moves_the_cursor(make_client: AppClient, receiver: Receiver) -> None:
    client = await hub_app(make_client)
    channel_url = await create_channel(client)
    items = [await insert(client) for _ in range(3)]
    await put_webhook(client, callbackUrl=receiver.url, channelUrl=channel_url, startItem=items[1])
    assert await receiver.next() == items[2]
    await until(client, lambda: hook_of(client).cursor == 2)
    await put_webhook(client, status=200, startItem=items[1])  # the same startItem: nothing moves
    await put_webhook(client, status=200, startItem=items[0])
    assert [await receiver.next(), await receiver.next()] == items[1:]


async def test_paused_webhooks_deliver_nothing_until_resumed(make_client: AppClient, receiver: Receiver) -> None:
    client = await hub_app(make_client)
    channel_url = await create_channel(client)
    await put_webhook(client, "paused", callbackUrl=receiver.url + "/paused", channelUrl=channel_url, paused=True)
    await put_webhook(client, "live", callbackUrl=receiver.url + "/live", channelUrl=channel_url)
    item = await insert(client)
    assert await receiver.next("/hook/live") == item
    await until(client, lambda: hook_of(client, "live").cursor == 0)
    assert receiver.uris("/hook/paused") == [] and hook_of(client, "paused").cursor == -1
    assert await _types(client, "paused") == ["WebhookConfigured", "WebhookCursorMoved"]
    await put_webhook(client, "paused", status=200, paused=False)
    assert await receiver.next("/hook/paused") == item


async def test_delete_stops_delivery_and_the_name_starts_afresh(make_client: AppClient, receiver: Receiver) -> None:
    client = await hub_app(make_client)
    channel_url = await create_channel(client)
    await put_webhook(client, "gone", callbackUrl=receiver.url + "/gone", channelUrl=channel_url)
    await put_webhook(client, "live", callbackUrl=receiver.url + "/live", channelUrl=channel_url)
    first = await insert(client)
    assert await receiver.next("/hook/gone") == first
    await until(client, lambda: hook_of(client, "gone").cursor == 0)
    assert (await client.delete("/webhook/gone")).status == 202
    second = await insert(client)
    assert [await receiver.next("/hook/live"), await receiver.next("/hook/live")] == [first, second]
    await until(client, lambda: hook_of(client, "live").cursor == 1)
    assert receiver.uris("/hook/gone") == [first]
    await put_webhook(client, "gone", callbackUrl=receiver.url + "/gone", channelUrl=channel_url)
    third = await insert(client)
    assert await receiver.next("/hook/gone") == third  # a new webhook: from the next new item


async def test_with_no_webhook_left_the_channels_are_not_followed_until_a_new_one(
    make_client: AppClient, receiver: Receiver
) -> None:
    client = await hub_app(make_client)
    channel_url = await create_channel(client)
    await put_webhook(client, "only", callbackUrl=receiver.url + "/only", channelUrl=channel_url)
    first = await insert(client)
    assert await receiver.next("/hook/only") == first
    assert (await client.delete("/webhook/only")).status == 202
    await insert(client)  # seen by the watcher, which then stops: no webhook is left
    hub = client.app[LOG].hub
    await until(client, lambda: ("channel:", None) not in hub._filter_waiters)
    await insert(client)  # wakes nobody
    await put_webhook(client, "only", callbackUrl=receiver.url + "/only", channelUrl=channel_url)
    fresh = [await insert(client) for _ in range(3)]
    assert [await receiver.next("/hook/only") for _ in fresh] == fresh


async def test_restart_resumes_from_the_cursor(make_client: AppClient, receiver: Receiver) -> None:
    first = await hub_app(make_client)
    channel_url = await create_channel(first)
    await put_webhook(first, callbackUrl=receiver.url, channelUrl=channel_url)
    items = [await insert(first) for _ in range(2)]
    assert [await receiver.next() for _ in items] == items
    await until(first, lambda: hook_of(first).cursor == 1)
    await first.close()  # a clean shutdown hands the webhook back
    second = await hub_app(make_client)  # a fresh app on the same database
    assert (await _types(second))[-1] == "WebhookReleased" and hook_of(second).lease is None
    location = await insert(second)  # another port: the URIs sent keep the channelUrl given
    items.append(f"{channel_url}/{location.rpartition('/')[2]}")
    assert await receiver.next() == items[2]
    await until(second, lambda: hook_of(second).cursor == 2)
    assert receiver.uris() == items


async def test_restart_keeps_attempts_and_errors(make_client: AppClient, receiver: Receiver, clock: ManualClock) -> None:
    first = await hub_app(make_client, webhook_backoff_seconds=5.0)
    channel_url = await create_channel(first)
    await put_webhook(first, callbackUrl=receiver.url, channelUrl=channel_url, maxAttempts=3)
    receiver.statuses = [500, 500]
    item = await insert(first)
    await receiver.next()
    await until(first, lambda: 0 in hook_of(first).retries)
    await first.close()
    second = await hub_app(make_client, webhook_backoff_seconds=5.0)
    clock.advance(5)
    assert await receiver.next() == item
    await until(second, lambda: hook_of(second).retries[0].attempts == 2)  # the count went on
    assert hook_of(second).retries[0].retry_at == clock.now() + 10_000_000
    clock.advance(10)
    assert await receiver.next() == item
    await until(second, lambda: hook_of(second).cursor == 0)
    assert len((await (await second.get("/webhook/hook")).json())["errors"]) == 2


async def test_a_crashed_nodes_webhook_is_taken_over_when_its_lease_ends(
    make_client: AppClient, receiver: Receiver, clock: ManualClock
) -> None:
    client = await hub_app(make_client)
    channel_url = await create_channel(client)
    await put_webhook(client, callbackUrl=receiver.url, channelUrl=channel_url)
    versions = client.app[webhooks.WEBHOOKS].model.versions
    dead = WebhookClaimed(lease=Lease("gone:1", clock.now() + 60_000_000))
    await client.app[LOG].append(StreamAppend(stream_of("hook"), [to_event(dead)], versions["hook"]))
    item = await insert(client)
    await _until_sleeping(clock, 2)  # the purger's tick, and the wait for the dead node's lease to end
    assert receiver.calls == []
    clock.advance(60)
    assert await receiver.next() == item
    await until(client, lambda: hook_of(client).cursor == 0)
    lease = hook_of(client).lease
    assert lease is not None and lease.node != "gone:1"


async def test_parallel_calls_move_the_cursor_over_the_done_prefix_only(
    make_client: AppClient, receiver: Receiver
) -> None:
    client = await hub_app(make_client)
    channel_url = await create_channel(client)
    await put_webhook(client, callbackUrl=receiver.url, channelUrl=channel_url, parallelCalls=3)
    receiver.holding = True
    items = [await insert(client) for _ in range(5)]
    assert sorted([await receiver.next() for _ in range(3)]) == items[:3]
    receiver.release(items[2])
    receiver.release(items[1])
    assert sorted([await receiver.next(), await receiver.next()]) == items[3:]  # the window slid on
    assert hook_of(client).cursor == -1  # the first item is not done: the cursor stays
    receiver.release(items[0])
    await until(client, lambda: hook_of(client).cursor == 2)
    receiver.release(items[3])
    receiver.release(items[4])
    await until(client, lambda: hook_of(client).cursor == 4)
    assert receiver.most_active == 3 and sorted(receiver.uris()) == items


async def _either_until(one: Client, two: Client, check: Any) -> None:
    """Wait until one node records what `check` looks for, then let the other read it too."""
    waits = [asyncio.ensure_future(until(c, lambda c=c: check(c))) for c in (one, two)]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED, timeout=10)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
    for c in (one, two):
        await c.app[LOG].hub.advance(await c.app[LOG].store.head())
        assert check(c)


async def test_two_nodes_deliver_each_item_once(make_client: AppClient, receiver: Receiver, clock: ManualClock) -> None:
    """Two apps on one database; the lease runs out between items, so both race to claim each."""
    one = await hub_app(make_client)
    two = await hub_app(make_client)
    channel_url = await create_channel(one)
    await put_webhook(one, callbackUrl=receiver.url, channelUrl=channel_url)
    await two.app[LOG].hub.advance(await two.app[LOG].store.head())
    items = []
    for n in range(6):
        items.append(await insert(one if n % 2 else two))
        head = await one.app[LOG].store.head()
        # SQLite has no cross-process announcements (PostgreSQL's LISTEN/NOTIFY does that):
        # tell both nodes about the commit, so that both wake and race to claim the item
        await asyncio.gather(one.app[LOG].hub.advance(head), two.app[LOG].hub.advance(head))
        assert await receiver.next() == f"{channel_url}/{items[-1].rpartition('/')[2]}"
        await _either_until(one, two, lambda client: hook_of(client).cursor == n)
        clock.advance(60)  # past the lease: the next item is up for grabs
    assert len(receiver.calls) == len(items)  # each once
    # every record was made by the node holding the webhook at the time
    holders, holder = set(), None
    for event in await one.app[LOG].store.read_stream(stream_of("hook")):
        lease = json.loads(event.data or b"{}").get("lease")
        if event.type == "WebhookClaimed":
            holder = lease["node"]
            holders.add(holder)
        elif lease is not None:
            assert lease["node"] == holder, event
    assert holders  # which node won each race is up to the scheduler


async def test_a_callback_refused_at_delivery_is_an_error(make_client: AppClient, receiver: Receiver) -> None:
    first = await hub_app(make_client)
    channel_url = await create_channel(first)
    await put_webhook(first, callbackUrl=receiver.url, channelUrl=channel_url, maxAttempts=1)
    await first.close()
    second = await hub_app(make_client, webhook_allow=["10.0.0.0/8"])  # narrower since
    await insert(second)
    await until(second, lambda: hook_of(second).cursor == 0)
    errors = (await (await second.get("/webhook/hook")).json())["errors"]
    assert receiver.calls == [] and "refused: 127.0.0.1 is not in" in errors[0] and errors[0].endswith("(gave up)")


async def test_items_past_the_webhooks_ttl_are_skipped(make_client: AppClient, receiver: Receiver, clock: ManualClock) -> None:
    client = await hub_app(make_client)
    channel_url = await create_channel(client)
    await put_webhook(client, callbackUrl=receiver.url, channelUrl=channel_url, ttlMinutes=1, paused=True)
    await insert(client)
    clock.advance(120)
    fresh = await insert(client)
    await put_webhook(client, status=200, paused=False)
    assert await receiver.next() == fresh
    await until(client, lambda: hook_of(client).cursor == 1)
    assert receiver.uris() == [fresh]


async def test_a_recreated_channel_is_followed_from_its_first_item(make_client: AppClient, receiver: Receiver) -> None:
    client = await hub_app(make_client)
    channel_url = await create_channel(client)
    await put_webhook(client, callbackUrl=receiver.url, channelUrl=channel_url)
    old = await insert(client)
    assert await receiver.next() == old
    await client.delete("/channel/stumptown")
    await create_channel(client)
    new = await insert(client)
    assert await receiver.next() == new and new != old
    generation = client.app[channels.CHANNELS].get("stumptown").generation
    await until(client, lambda: (hook_of(client).generation, hook_of(client).cursor) == (generation, 0))
    body: dict[str, Any] = await (await client.get("/webhook/hook")).json()
    assert body["lastCompleted"] == new


async def test_a_cursor_set_mid_call_is_not_overwritten(make_client: AppClient, receiver: Receiver) -> None:
    client = await hub_app(make_client)
    channel_url = await create_channel(client)
    await put_webhook(client, callbackUrl=receiver.url, channelUrl=channel_url)
    receiver.holding = True
    items = [await insert(client) for _ in range(3)]
    assert await receiver.next() == items[0]  # held by the receiver
    resp = await client.put("/webhook/hook/updateCursor", data=items[2].encode(), headers={"Content-Type": "text/plain"})
    assert resp.status == 202
    receiver.holding = False
    receiver.release(items[0])
    last = await insert(client)
    assert await receiver.next() == last  # the call in flight was dropped, nothing before the new cursor sent
    await until(client, lambda: hook_of(client).cursor == 3)
    moves = [json.loads(e.data or b"{}") for e in await client.app[LOG].store.read_stream(stream_of("hook"))
             if e.type == "WebhookCursorMoved"]
    assert [(m["reason"], m["version"]) for m in moves] == [("start", -1), ("set", 2), ("delivered", 3)]


async def test_pausing_mid_retry_stops_attempts_and_resuming_continues_the_count(
    make_client: AppClient, receiver: Receiver, clock: ManualClock
) -> None:
    client = await hub_app(make_client, webhook_backoff_seconds=10.0)
    channel_url = await create_channel(client)
    await put_webhook(client, callbackUrl=receiver.url, channelUrl=channel_url)
    receiver.statuses = [500]
    item = await insert(client)
    assert await receiver.next() == item
    await until(client, lambda: 0 in hook_of(client).retries)
    await put_webhook(client, status=200, paused=True)
    clock.advance(10)  # the retry is due, but the webhook is paused
    await asyncio.sleep(0)  # let a (wrongly) woken retry run, if there were one
    assert receiver.arrived.empty()
    await put_webhook(client, status=200, paused=False)
    assert await receiver.next() == item
    await until(client, lambda: hook_of(client).cursor == 0)
    assert len(receiver.calls) == 2
    failures = [e for e in await client.app[LOG].store.read_stream(stream_of("hook")) if e.type == "WebhookDeliveryFailed"]
    assert [json.loads(e.data or b"{}")["attempt"] for e in failures] == [1]
