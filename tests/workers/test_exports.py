"""The export worker against real receivers: order, parallelism, retries, timeouts,
restarts, crashed nodes and two nodes racing over one database."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from api.keys import LOG
from eventhub.clock import ManualClock
from eventhub.events import NO_STREAM, StreamAppend, fact_event
from eventhub.settings import Settings
from eventhub.store import store_from_url
from projections import exports as model
from tests.api.test_exports import Client, Receiver, export_app, post, receiver, wait_finished  # noqa: F401
from tests.conftest import AppClient


async def _until_sleeping(clock: ManualClock, count: int = 1) -> None:
    """The worker is waiting on the manual clock (nothing to await from outside)."""
    for _ in range(5000):
        if clock.sleepers >= count:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the worker never went to sleep")


async def _events(client: Client, export_id: str) -> list[tuple[str, dict[str, Any]]]:
    events = await client.app[LOG].store.read_stream(model.stream_of(export_id))
    return [(e.type, json.loads(e.data or b"{}")) for e in events]


async def _seed(settings: Settings, clock: ManualClock, facts: list[tuple[str, list[model.ExportEvent]]]) -> None:
    """Write export streams straight into the database before any app opens it."""
    store = store_from_url(settings.database_url, clock=clock)
    await store.open()
    try:
        for export_id, stream_facts in facts:
            await store.append(StreamAppend(model.stream_of(export_id), [fact_event(f) for f in stream_facts], NO_STREAM))
    finally:
        await store.close()


def _request(export_id: str, client: str, uri: str, n: int = 0) -> model.ExportRequested:
    return model.ExportRequested(id=export_id, client=client, uri=uri, data=json.dumps({"who": client, "n": n}))


async def test_one_client_in_order_one_at_a_time_clients_in_parallel(make_client: AppClient, receiver: Receiver) -> None:
    inflight: Counter[str] = Counter()
    most: Counter[str] = Counter()
    order: list[tuple[str, int]] = []
    bob_arrived = asyncio.Event()

    async def respond(request: web.Request, _: int) -> web.Response:
        data = json.loads(await request.read())
        who, n = data["who"], data["n"]
        order.append((who, n))
        inflight[who] += 1
        most[who] = max(most[who], inflight[who])
        if who == "bob":
            bob_arrived.set()
        elif n == 0:
            await bob_arrived.wait()  # alice's first export waits for bob's: they run side by side
        await asyncio.sleep(0.005)
        inflight[who] -= 1
        return web.Response(text=f"{who}{n}")

    receiver.respond = respond
    client = await export_app(make_client, export_parallel=4)
    ids = [(await post(client, receiver.url, data=json.dumps({"who": "alice", "n": n})))[1]["id"] for n in range(5)]
    bob = (await post(client, receiver.url, data='{"who": "bob", "n": 0}', who="bob"))[1]["id"]
    for n, export_id in enumerate(ids):
        body = await wait_finished(client, receiver.url, export_id)
        assert body["ext_response"] == {"status": 200, "body": f"alice{n}"}
    assert (await wait_finished(client, receiver.url, bob, who="bob"))["ext_response"]["body"] == "bob0"
    assert [n for who, n in order if who == "alice"] == [0, 1, 2, 3, 4]
    assert most == {"alice": 1, "bob": 1}
    assert order.index(("bob", 0)) < order.index(("alice", 1))


async def test_receiver_failing_twice_then_succeeding(make_client: AppClient, receiver: Receiver, clock: ManualClock) -> None:
    async def respond(request: web.Request, n: int) -> web.Response:
        return web.Response(status=503, text="busy") if n <= 2 else web.Response(text="thanks")

    receiver.respond = respond
    client = await export_app(make_client, export_backoff_seconds=1.0, export_backoff_max_seconds=60.0)
    start = clock.now()
    _, created = await post(client, receiver.url)
    for wait in (1.0, 2.0):  # doubling backoff, driven by the manual clock
        await receiver.arrived.get()
        await _until_sleeping(clock)
        assert (await post(client, receiver.url, created["id"]))[1]["state"] == "Processing"
        clock.advance(wait)
    body = await wait_finished(client, receiver.url, created["id"])
    assert body["ext_response"] == {"status": 200, "body": "thanks"}
    events = await _events(client, created["id"])
    assert [t for t, _ in events] == [
        "ExportRequested", "ExportClaimed", "ExportAttemptFailed", "ExportClaimed", "ExportAttemptFailed",
        "ExportClaimed", "ExportFinished",
    ]
    failed = [d for t, d in events if t == "ExportAttemptFailed"]
    assert [f["retry_at"] - start for f in failed] == [1_000_000, 3_000_000]
    assert [f["status"] for f in failed] == [503, 503]
    assert [r["headers"]["X-Export-Attempt"] for r in receiver.calls] == ["1", "2", "3"]


async def test_long_poll_sleeps_through_a_failed_attempt(make_client: AppClient, receiver: Receiver, clock: ManualClock) -> None:
    async def respond(request: web.Request, n: int) -> web.Response:
        return web.Response(status=502, text="flaky") if n == 1 else web.Response(text="fine")

    receiver.respond = respond
    client = await export_app(make_client, export_backoff_seconds=5.0)
    _, created = await post(client, receiver.url)
    await receiver.arrived.get()
    poll = asyncio.create_task(post(client, receiver.url, created["id"], path="/lp/export", timeout=30))
    await _until_sleeping(clock)  # the failure is recorded; the state is still Processing
    assert not poll.done()
    clock.advance(5)
    status, body = await asyncio.wait_for(poll, 10)
    assert status == 200 and body["state"] == "Finished" and body["ext_response"] == {"status": 200, "body": "fine"}


async def test_5xx_until_the_retries_run_out_keeps_the_receivers_answer(make_client: AppClient, receiver: Receiver) -> None:
    async def respond(request: web.Request, n: int) -> web.Response:
        return web.Response(status=500, text=f"broken {n}")

    receiver.respond = respond
    client = await export_app(make_client, export_retries=2)
    _, created = await post(client, receiver.url)
    body = await wait_finished(client, receiver.url, created["id"])
    assert body["ext_response"] == {"status": 500, "body": "broken 3"}
    assert len(receiver.calls) == 3


async def test_receiver_that_never_answers_finishes_with_504(make_client: AppClient, receiver: Receiver) -> None:
    receiver.respond = receiver.hold
    client = await export_app(make_client, export_timeout_seconds=0.2, export_retries=1)
    _, created = await post(client, receiver.url)
    body = await wait_finished(client, receiver.url, created["id"])
    status, text = body["ext_response"]["status"], body["ext_response"]["body"]
    assert status == 504 and "did not answer within 0.2s" in text and "2 attempts" in text
    assert len(receiver.calls) == 2


async def test_unreachable_receiver_finishes_with_502(make_client: AppClient) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}/hook"
    client = await export_app(make_client, export_retries=2)
    _, created = await post(client, uri)
    body = await wait_finished(client, uri, created["id"])
    assert body["ext_response"]["status"] == 502
    assert body["ext_response"]["body"].startswith("export failed after 3 attempts: cannot reach " + uri)


async def test_restart_with_work_in_flight_finishes_it(make_client: AppClient, receiver: Receiver) -> None:
    receiver.respond = receiver.hold
    first = await export_app(make_client)
    _, a = await post(first, receiver.url, data='{"n": 1}')
    _, b = await post(first, receiver.url, data='{"n": 2}')
    await receiver.arrived.get()  # a is being sent, b waits its turn
    await first.close()  # shutdown mid-send: the claim is handed back
    events = await _events_of(first, a["id"], make_client)
    assert [t for t, _ in events][-1] == "ExportAttemptFailed" and "shut down" in events[-1][1]["reason"]

    receiver.respond = Receiver().respond  # answers at once from now on
    receiver.release.set()
    second = await export_app(make_client)  # a fresh app on the same database
    assert (await post(second, receiver.url, a["id"]))[1]["state"] == "Processing"
    assert (await post(second, receiver.url, b["id"]))[1]["state"] == "Pending"
    for export_id in (a["id"], b["id"]):
        assert (await wait_finished(second, receiver.url, export_id))["ext_response"]["status"] == 200
    # at least once: the interrupted send of a is repeated
    assert [c["body"] for c in receiver.calls] == [b'{"n": 1}', b'{"n": 1}', b'{"n": 2}']


async def _events_of(closed: Client, export_id: str, make_client: AppClient) -> list[tuple[str, dict[str, Any]]]:
    reader = await make_client(facets=())  # the log alone, no facet: nothing acts on the export
    return await _events(reader, export_id)


async def test_a_crashed_nodes_claim_is_taken_over_when_its_lease_ends(
    make_client: AppClient, receiver: Receiver, settings: Settings, clock: ManualClock
) -> None:
    lease = clock.now() + 30_000_000
    await _seed(settings, clock, [
        ("dead1", [_request("dead1", "alice", receiver.url), model.ExportClaimed(node="gone:1", attempt=1, lease_until=lease)]),
        ("next1", [_request("next1", "alice", receiver.url, 1)]),
    ])
    client = await export_app(make_client)
    await _until_sleeping(clock)
    assert receiver.calls == []  # the dead node's lease still runs
    assert (await post(client, receiver.url, "dead1"))[1]["state"] == "Processing"
    clock.advance(30)
    for export_id in ("dead1", "next1"):
        assert (await wait_finished(client, receiver.url, export_id))["ext_response"]["status"] == 200
    assert [c["headers"]["X-Export-Attempt"] for c in receiver.calls] == ["2", "1"]


async def test_a_crashed_holder_of_the_last_attempt_is_recorded_not_retried(
    make_client: AppClient, receiver: Receiver, settings: Settings, clock: ManualClock
) -> None:
    await _seed(settings, clock, [
        ("last", [_request("last", "alice", receiver.url), model.ExportClaimed(node="gone:2", attempt=2, lease_until=clock.now())]),
    ])
    client = await export_app(make_client, export_retries=1)
    body = await wait_finished(client, receiver.url, "last")
    assert body["ext_response"]["status"] == 504 and "gone:2" in body["ext_response"]["body"]
    assert receiver.calls == []


async def test_two_apps_on_one_database_deliver_each_export_once(
    make_client: AppClient, receiver: Receiver, settings: Settings, clock: ManualClock
) -> None:
    ids = [f"race{c}-{n}" for c in range(8) for n in range(3)]
    await _seed(settings, clock, [(i, [_request(i, f"client{i[4]}", receiver.url, int(i[-1]))]) for i in ids])

    async def slow(request: web.Request, n: int) -> web.Response:
        await asyncio.sleep(0.005)  # so that neither node can take everything before the other starts
        return web.Response(text="ok")

    receiver.respond = slow
    nodes = await asyncio.gather(*(export_app(make_client, export_parallel=2) for _ in range(2)))
    for _ in ids:
        await asyncio.wait_for(receiver.arrived.get(), 20)
    # the last outcome may still be committing: look until every stream says Finished
    store = nodes[0].app[LOG].store
    for _ in range(2000):
        finished = await store.read_all(0, 1000, stream_prefix=model.PREFIX, types=["ExportFinished"])
        if len(finished) == len(ids):
            break
        await asyncio.sleep(0.005)
    assert sorted(e.stream for e in finished) == sorted(model.stream_of(i) for i in ids)
    assert Counter(c["headers"]["X-Export-Id"] for c in receiver.calls) == Counter(ids)
    claimed = await store.read_all(0, 1000, stream_prefix=model.PREFIX, types=["ExportClaimed"])
    assert len(claimed) == len(ids)  # one winning claim per export, no second attempt


async def _server(env: dict[str, str]) -> tuple[asyncio.subprocess.Process, str]:
    """An eventhub server with the exports facet in its own process (the bench's server role)."""
    root = Path(__file__).resolve().parents[2]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(root / "bench" / "exports.py"), "--role", "server",
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(root), **env},
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    assert line.startswith("PORT "), line
    return proc, f"http://127.0.0.1:{line.split()[1]}"


@pytest.mark.slow
async def test_kill_9_mid_send_then_a_restarted_server_sends_it_again(receiver: Receiver, tmp_path: Path) -> None:
    import aiohttp

    from api.exports import mint_macaroon

    async def first_hangs(request: web.Request, n: int) -> web.StreamResponse:
        if n == 1:
            await receiver.release.wait()
        return web.Response(text=f"got it on call {n}")

    receiver.respond = first_hangs
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'kill.db'}", "EVENTHUB_EXPORT_MACAROON_KEY": "k",
        "EVENTHUB_EXPORT_TARGET": "eventhub", "EVENTHUB_EXPORT_TIMEOUT_SECONDS": "0.5",
        "EVENTHUB_EXPORT_LEASE_GRACE_SECONDS": "0.5", "EVENTHUB_LOG_LEVEL": "ERROR",
    }
    keys = {p: mint_macaroon("k", "eventhub", p, receiver.url, "alice") for p in ("/export", "/lp/export")}

    async def call(http: aiohttp.ClientSession, base: str, path: str, export_id: str = "") -> dict[str, Any]:
        body = {"id": export_id, "uri": receiver.url, "data": '{"n": 1}'}
        async with http.post(base + path, json=body, params={"timeout": "10"}, headers={"X-Api-Key": keys[path]}) as r:
            assert r.status == 200, await r.text()
            return await r.json()  # type: ignore[no-any-return]

    async with aiohttp.ClientSession() as http:
        proc, base = await _server(env)
        try:
            created = await call(http, base, "/export")
            await asyncio.wait_for(receiver.arrived.get(), 10)  # claimed and on the wire
        finally:
            proc.kill()  # kill -9: no release, the claim stays until its lease ends
            await proc.wait()
        proc, base = await _server(env)
        try:
            for _ in range(20):
                answer = await call(http, base, "/lp/export", created["id"])
                if answer["state"] == "Finished":
                    break
            assert answer["ext_response"] == {"status": 200, "body": "got it on call 2"}
        finally:
            proc.terminate()
            await proc.wait()
    assert [c["headers"]["X-Export-Attempt"] for c in receiver.calls] == ["1", "2"]


@pytest.mark.slow
def test_bench_smoke(tmp_path: Path) -> None:
    """The benchmark runs end to end (tiny numbers): server, receiver and load processes."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, str(root / "bench" / "exports.py"), "--clients", "3", "--per-client", "2",
         "--database", str(tmp_path / "bench.db")],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "finished/s" in out.stdout and "p99" in out.stdout
