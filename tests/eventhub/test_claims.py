"""Work claims: exactly one of many racing claimers wins, and an expired lease can be taken over."""

from __future__ import annotations

import asyncio
from pathlib import Path

from eventhub import claims
from eventhub.clock import ManualClock
from eventhub.events import NewEvent, StreamAppend
from eventhub.log import EventLog
from eventhub.store import store_from_url


def test_claimable_free_own_foreign_expired() -> None:
    now = 1_000
    assert claims.claimable(None, "a", now)
    assert claims.claimable(claims.Lease("a", now + 5), "a", now)
    assert not claims.claimable(claims.Lease("b", now + 5), "a", now)
    assert claims.claimable(claims.Lease("b", now), "a", now)  # the deadline itself is expired
    assert claims.lease_until(now, 1.5) == now + 1_500_000
    assert claims.new_node_id() != claims.new_node_id()


async def test_many_claimers_on_two_logs_of_one_database_exactly_one_wins(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'claims.db'}"
    clock = ManualClock()
    logs = [EventLog(store_from_url(url, clock=clock)) for _ in range(2)]
    for log in logs:
        await log.open()
    try:
        for round_ in range(5):
            stream = f"work:{round_}"
            await logs[0].append(StreamAppend(stream, [NewEvent("WorkQueued")]))
            nodes = [f"node{i}" for i in range(10)]
            results = await asyncio.gather(*(
                claims.claim(logs[i % 2], stream, 0, [NewEvent("WorkClaimed", node.encode())])
                for i, node in enumerate(nodes)
            ))
            winners = [r for r in results if r is not None]
            assert len(winners) == 1 and winners[0][0].version == 1
            events = await logs[0].store.read_stream(stream)
            assert [e.type for e in events] == ["WorkQueued", "WorkClaimed"]
        # a loser's hub was caught up: its read model can see the winner
        for log in logs:
            assert log.head == await log.store.head()
    finally:
        for log in logs:
            await log.close()


async def test_an_expired_claim_is_taken_over_with_the_version_seen(tmp_path: Path) -> None:
    log = EventLog(store_from_url(f"sqlite:///{tmp_path / 'c.db'}", clock=ManualClock()))
    await log.open()
    try:
        await log.append(StreamAppend("work:x", [NewEvent("WorkQueued")]))
        first = await claims.claim(log, "work:x", 0, [NewEvent("WorkClaimed", b"dead")])
        assert first is not None
        # the taker appends with the version it saw (1); a stale taker (0) loses
        assert await claims.claim(log, "work:x", 0, [NewEvent("WorkClaimed", b"late")]) is None
        taken = await claims.claim(log, "work:x", 1, [NewEvent("WorkClaimed", b"alive")])
        assert taken is not None and taken[0].version == 2
    finally:
        await log.close()
