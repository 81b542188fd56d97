"""The app as a whole: a store that cannot serve answers 503 with a message, a corrupt
event is reported (never served), and `Hub-Position` lets a read follow a write."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from api import channels
from api.keys import LOG
from eventhub.errors import StoreFull, StoreUnavailable
from eventhub.settings import Settings
from tests.conftest import AppClient


async def _channel(make_client: AppClient) -> Any:
    client = await make_client(facets=(channels,))
    assert (await client.post("/channel", json={"name": "c"})).status == 200
    return client


@pytest.mark.parametrize("error", [StoreFull("database or disk is full"), StoreUnavailable("database is locked")])
async def test_a_store_that_cannot_write_answers_503(make_client: AppClient, error: Exception) -> None:
    client = await _channel(make_client)
    store = client.app[LOG].store
    head = await store.head()

    async def failing(*_: Any, **__: Any) -> Any:
        raise error

    real: Callable[..., Awaitable[Any]] = store.append
    store.append = failing  # type: ignore[method-assign]
    try:
        resp = await client.post("/channel/c", data=b"lost?")
        assert resp.status == 503
        body = await resp.json()
        assert body["message"] == str(error) and "Traceback" not in await resp.text()
    finally:
        store.append = real  # type: ignore[method-assign]
    assert await store.head() == head  # nothing half-written
    assert (await client.post("/channel/c", data=b"later")).status == 201


async def test_a_corrupt_item_is_reported_not_served(make_client: AppClient, settings: Settings) -> None:
    client = await _channel(make_client)
    resp = await client.post("/channel/c", data=b"precious bytes")
    location = resp.headers["Location"]
    position = client.app[LOG].head
    with sqlite3.connect(settings.sqlite_path) as raw:  # behind the store's back
        raw.execute("UPDATE events SET data = ? WHERE position = ?", (b"precious bytez", position))
    resp = await client.get(location[location.index("/channel") :])
    assert resp.status == 503
    body = await resp.json()
    assert body["error"] == "store corrupt" and body["position"] == position
    assert b"bytez" not in await resp.read()


async def test_writes_report_their_position_and_reads_can_wait_for_it(make_client: AppClient) -> None:
    client = await _channel(make_client)
    resp = await client.post("/channel/c", data=b"x")
    written = int(resp.headers["Hub-Position"])
    assert written == client.app[LOG].head
    ok = await client.get("/channel/c/latest", headers={"Hub-Position": str(written)}, allow_redirects=False)
    assert ok.status == 303
    bad = await client.get("/channel/c", headers={"Hub-Position": "soon"})
    assert bad.status == 400
