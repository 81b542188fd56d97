"""The log's own endpoints: /health and /events pages, long-poll, SSE and websocket."""

from __future__ import annotations

import asyncio

from api.keys import LOG
import msgspec

from eventhub.events import NewEvent, StreamAppend, fact_event
from tests.conftest import AppClient

AUTH = {"Authorization": "Bearer admin-secret"}


class Thing(msgspec.Struct, frozen=True):
    n: int


async def _append(client, stream: str, n: int = 1) -> None:  # type: ignore[no-untyped-def]
    await client.app[LOG].append(StreamAppend(stream, [fact_event(Thing(1))] * n))


async def test_health_reports_head_and_backend(make_client: AppClient) -> None:
    client = await make_client()
    await _append(client, "test:a", 3)
    resp = await client.get("/health")
    assert resp.status == 200
    body = await resp.json()
    assert body["head"] == 3 and body["backend"] == "sqlite"


async def test_events_needs_the_admin_token(make_client: AppClient) -> None:
    client = await make_client()
    assert (await client.get("/events")).status == 401
    assert (await client.get("/events", headers={"Authorization": "Bearer wrong"})).status == 401
    off = await make_client(admin_token="")
    resp = await off.get("/events", headers=AUTH)
    assert resp.status == 403 and "EVENTHUB_ADMIN_TOKEN" in (await resp.json())["error"]


async def test_events_page_filters_and_resumes(make_client: AppClient) -> None:
    client = await make_client()
    await _append(client, "test:a", 2)
    await _append(client, "other:b", 2)
    await client.app[LOG].append(StreamAppend("test:raw", [NewEvent("ItemInserted", b"secret bytes", {"content-type": "text/plain"})]))
    resp = await client.get("/events", params={"from": "2", "stream": "test:"}, headers=AUTH)
    body = await resp.json()
    assert [e["position"] for e in body["events"]] == [2, 5]
    fact, raw = body["events"]
    assert fact["data"] == {"n": 1} and fact["type"] == "Thing" and fact["version"] == 1
    assert {"position", "stream", "version", "type", "recorded_at", "hash"} <= fact.keys()
    # raw content shows as digest and size, never its bytes
    assert "data" not in raw and raw["size"] == len(b"secret bytes") and len(raw["digest"]) == 64
    assert body["next"] == 6
    page = await (await client.get("/events", params={"from": "1", "limit": "2"}, headers=AUTH)).json()
    assert [e["position"] for e in page["events"]] == [1, 2] and page["next"] == 3
    typed = await (await client.get("/events", params={"type": "ItemInserted"}, headers=AUTH)).json()
    assert [e["position"] for e in typed["events"]] == [5]
    for bad in ({"from": "x"}, {"from": "0"}, {"limit": "0"}, {"limit": "10001"}, {"wait": "-1"}, {"wait": "nan"}):
        resp = await client.get("/events", params=bad, headers=AUTH)
        assert resp.status == 400 and "error" in await resp.json()


async def test_long_poll_wakes_on_append(make_client: AppClient) -> None:
    client = await make_client()
    poll = asyncio.create_task(client.get("/events", params={"wait": "30", "stream": "test:x"}, headers=AUTH))
    await asyncio.sleep(0)
    await _append(client, "test:other")
    await _append(client, "test:x")
    body = await (await poll).json()
    assert [e["stream"] for e in body["events"]] == ["test:x"]


async def test_long_poll_times_out_empty(make_client: AppClient) -> None:
    client = await make_client()
    body = await (await client.get("/events", params={"wait": "0.05"}, headers=AUTH)).json()
    assert body["events"] == [] and body["next"] == 1


async def test_sse_resumes_from_last_event_id(make_client: AppClient) -> None:
    client = await make_client()
    await _append(client, "test:a", 3)
    resp = await client.get("/events/sse", headers={**AUTH, "Last-Event-ID": "1"})
    assert resp.headers["Content-Type"] == "text/event-stream"
    seen: list[int] = []
    while len(seen) < 3:
        line = (await resp.content.readline()).decode()
        if line.startswith("id: "):
            seen.append(int(line[4:]))
            if len(seen) == 2:
                await _append(client, "test:a")
    assert seen == [2, 3, 4]
    resp.close()


async def test_websocket_catches_up_then_follows(make_client: AppClient) -> None:
    client = await make_client()
    await _append(client, "test:a", 2)
    ws = await client.ws_connect("/events/ws", params={"from": "1"}, headers=AUTH)
    first = [await ws.receive_json(), await ws.receive_json()]
    await _append(client, "test:a")
    third = await ws.receive_json()
    assert [e["position"] for e in first + [third]] == [1, 2, 3]
    await ws.close()


async def test_websocket_resumes_without_a_gap(make_client: AppClient) -> None:
    client = await make_client()
    await _append(client, "test:a", 3)
    ws = await client.ws_connect("/events/ws", headers=AUTH)
    seen = [(await ws.receive_json())["position"] for _ in range(2)]
    await ws.close()
    await _append(client, "test:a", 2)
    ws = await client.ws_connect("/events/ws", params={"from": str(seen[-1] + 1)}, headers=AUTH)
    seen += [(await ws.receive_json())["position"] for _ in range(3)]
    await ws.close()
    assert seen == [1, 2, 3, 4, 5]
