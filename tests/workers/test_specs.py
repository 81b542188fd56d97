"""Specs workers: handing pipelines to a fake DPP on 127.0.0.1, and schedules on a ManualClock."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from api import specs
from api.keys import LOG, WORKERS
from eventhub.clock import ManualClock
from eventhub.events import StreamAppend, fact_event
from eventhub.hub import EventFilter
from projections.specs import DispatchClaimed, PipelineDispatchAttempted, decode_fact
from tests.api.test_specs import event, get, public_pem, rsa_key, spec, upload
from tests.conftest import AppClient

Client = TestClient[web.Request, web.Application]


class FakeDPP:
    """A DPP receiver: records every POST; `fail(pipeline, n)` answers 503 n times first."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.failures: dict[str, int] = {}
        self.always_fail = False
        self.app = web.Application()
        self.app.router.add_post("/", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append(body)
        left = self.failures.get(body["pipeline_id"], 0)
        if self.always_fail or left:
            self.failures[body["pipeline_id"]] = left - 1
            return web.Response(status=503, text="busy")
        return web.json_response({"ok": True})


async def dpp_server(aiohttp_server: Any, dpp: FakeDPP) -> str:
    server: TestServer = await aiohttp_server(dpp.app, host="127.0.0.1")
    return f"http://127.0.0.1:{server.port}/"


async def client_for(make_client: AppClient, **overrides: Any) -> Client:
    return await make_client(facets=(specs,), auth_public_key=public_pem(rsa_key()), **overrides)


async def until(client: Client, condition: Callable[[], Awaitable[bool]]) -> None:
    """Wait, on the hub and never on a timer, until a spec event makes `condition` true."""
    if await condition():
        return
    hub = client.app[LOG].hub
    async with asyncio.timeout(10):
        async for _ in hub.subscribe(hub.head, EventFilter(prefix="spec:")):
            if await condition():
                return


async def facts(client: Client) -> list[Any]:
    return [decode_fact(e) for e in await client.app[LOG].store.read_all(0, 10_000, stream_prefix="spec:")]


async def attempts(client: Client, pipeline: str | None = None) -> list[PipelineDispatchAttempted]:
    return [
        f for f in await facts(client)
        if isinstance(f, PipelineDispatchAttempted) and (pipeline is None or f.pipeline == pipeline)
    ]


def dispatched(client: Client, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len([a for a in await attempts(client) if a.ok]) == count

    return check


def is_(fn: Callable[[], object], value: object) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return fn() == value

    return check


def state(client: Client, n: int = 1) -> str:
    return client.app[specs.SPECS].datasets["me/id"].revisions[n - 1].state


# -- DPP ------------------------------------------------------------------------------------


async def test_each_planned_pipeline_is_posted_to_dpp(make_client: AppClient, clock: ManualClock, aiohttp_server: Any) -> None:
    dpp = FakeDPP()
    client = await client_for(make_client, dpp_url=await dpp_server(aiohttp_server, dpp))
    await upload(client, clock)
    await until(client, dispatched(client, 3))
    assert sorted(r["pipeline_id"] for r in dpp.received) == ["me/id/1/0", "me/id/1/1", "me/id/1/2"]
    csv = next(r for r in dpp.received if r["pipeline_id"] == "me/id/1/1")
    assert {k: csv[k] for k in ("flow_id", "dataset_id", "revision", "kind", "dependencies", "output")} == {
        "flow_id": "me/id/1", "dataset_id": "me/id", "revision": 1, "kind": "csv",
        "dependencies": ["me/id/1/0"], "output": {"kind": "csv", "parameters": {}},
    }
    assert csv["spec"] == spec()
    assert state(client) == "QUEUED"  # handed over; DPP reports progress through /source/update
    for p in ("me/id/1/0", "me/id/1/1", "me/id/1/2"):
        await event(client, p, "finish", True)
    assert (await get(client, "me/id/successful"))[1]["id"] == "me/id/1"
    assert len(dpp.received) == 3


async def test_dpp_failures_are_retried_with_backoff(make_client: AppClient, clock: ManualClock, aiohttp_server: Any) -> None:
    dpp = FakeDPP()
    dpp.failures["me/id/1/0"] = 2
    client = await client_for(make_client, dpp_url=await dpp_server(aiohttp_server, dpp), dpp_backoff_seconds=1.0)
    await upload(client, clock)

    def tried(n: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return len(await attempts(client, "me/id/1/0")) == n

        return check

    await until(client, tried(1))
    first = (await attempts(client, "me/id/1/0"))[0]
    assert (first.ok, first.error, first.retry_at) == (False, "HTTP 503", clock.now() + 1_000_000)
    clock.advance(1)
    await until(client, tried(2))
    assert (await attempts(client, "me/id/1/0"))[1].retry_at == clock.now() + 2_000_000  # doubled
    clock.advance(2)
    await until(client, tried(3))
    assert (await attempts(client, "me/id/1/0"))[2].ok and [r["pipeline_id"] for r in dpp.received].count("me/id/1/0") == 3
    info = (await get(client, "me/id/1"))[1]
    assert info["logs"][:2] == ["handing me/id/1/0 to DPP, attempt 1: HTTP 503", "handing me/id/1/0 to DPP, attempt 2: HTTP 503"]
    assert info["state"] == "QUEUED"


async def test_giving_up_fails_the_pipeline_and_its_dependants(
    make_client: AppClient, clock: ManualClock, aiohttp_server: Any
) -> None:
    dpp = FakeDPP()
    dpp.always_fail = True
    client = await client_for(make_client, dpp_url=await dpp_server(aiohttp_server, dpp), dpp_retries=1, dpp_backoff_seconds=0)
    await upload(client, clock)
    await until(client, is_(lambda: state(client), "FAILED"))
    info = (await get(client, "me/id/1"))[1]
    assert all(p["status"] == "FAILED" for p in info["pipelines"].values())
    assert "could not hand the pipeline to DPP after 2 attempts: HTTP 503" in info["error_log"]


async def test_unreachable_dpp_is_recorded(make_client: AppClient, clock: ManualClock, aiohttp_server: Any) -> None:
    server: TestServer = await aiohttp_server(web.Application(), host="127.0.0.1")
    url = f"http://127.0.0.1:{server.port}/"
    await server.close()
    client = await client_for(make_client, dpp_url=url, dpp_retries=0)
    await upload(client, clock)
    await until(client, is_(lambda: state(client), "FAILED"))
    (attempt,) = await attempts(client, "me/id/1/0")
    assert attempt.error is not None and "Connect" in attempt.error and attempt.retry_at is None


async def test_without_dpp_url_revisions_wait_for_updates(make_client: AppClient, clock: ManualClock) -> None:
    client = await client_for(make_client)
    assert [w.__name__ for w in client.app[WORKERS]] == ["scheduler"]
    await upload(client, clock)
    assert await attempts(client) == [] and state(client) == "QUEUED"


async def test_an_expired_claim_is_taken_over_after_a_restart(
    make_client: AppClient, clock: ManualClock, aiohttp_server: Any
) -> None:
    first = await client_for(make_client)
    await upload(first, clock)
    crashed = DispatchClaimed("me/id/1", "crashed-node", clock.now() + 30_000_000)
    await first.app[LOG].append(StreamAppend("spec:me/id", [fact_event(crashed)]))
    await first.close()
    dpp = FakeDPP()
    client = await client_for(make_client, dpp_url=await dpp_server(aiohttp_server, dpp))
    assert client.app[specs.SPECS].dispatch_todo(clock.now()) == []  # the dead node's lease still runs
    clock.advance(30)
    await until(client, dispatched(client, 3))
    claims = [f for f in await facts(client) if isinstance(f, DispatchClaimed)]
    assert [c.node == "crashed-node" for c in claims] == [True, False] and len(dpp.received) == 3


# -- schedules ------------------------------------------------------------------------------


def revisions(client: Client) -> list[tuple[int, str]]:
    ds = client.app[specs.SPECS].datasets["me/id"]
    return [(r.revision, r.trigger) for r in ds.revisions]


async def test_a_scheduled_dataset_gets_a_new_revision_when_due(make_client: AppClient, clock: ManualClock) -> None:
    client = await client_for(make_client)
    await upload(client, clock, spec(schedule="every 1m"))
    clock.advance(59)
    assert revisions(client) == [(1, "upload")]
    clock.advance(1)
    await until(client, is_(lambda: len(revisions(client)), 2))
    assert revisions(client) == [(1, "upload"), (2, "schedule")]
    info = (await get(client, "me/id/latest"))[1]
    assert info["id"] == "me/id/2" and info["state"] == "QUEUED" and info["spec_contents"]["schedule"] == "every 1m"
    clock.advance(600)  # ten periods missed: one run, not ten
    await until(client, is_(lambda: len(revisions(client)), 3))
    ds = client.app[specs.SPECS].datasets["me/id"]
    assert ds.next_due == clock.now() + 60_000_000
    await upload(client, clock)  # the schedule is removed
    assert ds.next_due is None
    clock.advance(3600)
    await upload(client, clock, spec(dataset="other"))  # a round trip through the log
    assert [n for n, _ in revisions(client)] == [1, 2, 3, 4]


async def test_schedules_survive_a_restart(make_client: AppClient, clock: ManualClock) -> None:
    first = await client_for(make_client)
    await upload(first, clock, spec(schedule="every 1h"))
    await first.close()
    client = await client_for(make_client)
    clock.advance(3600)
    await until(client, is_(lambda: len(revisions(client)), 2))
    assert revisions(client)[1] == (2, "schedule")


async def test_scheduled_revisions_are_dispatched_too(make_client: AppClient, clock: ManualClock, aiohttp_server: Any) -> None:
    dpp = FakeDPP()
    client = await client_for(make_client, dpp_url=await dpp_server(aiohttp_server, dpp))
    await upload(client, clock, spec(schedule="every 1d"))
    clock.advance(86400)
    await until(client, dispatched(client, 6))
    assert sorted({r["flow_id"] for r in dpp.received}) == ["me/id/1", "me/id/2"]
    assert revisions(client) == [(1, "upload"), (2, "schedule")]
