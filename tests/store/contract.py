"""The behavioural suite every store backend runs: `StoreContract`.

A backend's test module subclasses `StoreContract` (pytest collects the subclass, not
this class: it has no `Test` prefix) and says only how to make its store:

    class TestSQLiteStore(StoreContract):
        async def make_store(self, clock: Clock) -> EventStore: ...
        async def reopen(self, store: EventStore) -> EventStore: ...   # optional

`make_store` returns an unopened store over a fresh, empty log; `reopen` returns an
unopened new store over the same data as `store` (which the test has closed), for the
restart cases, which are skipped when a backend does not provide it.

Everything here goes through the public contract of `eventhub.store.base.EventStore`;
the only clock the store sees is the `ManualClock` of the `clock` fixture, so
`recorded_at` is whatever the test set it to.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventhub.chain import GENESIS, ChainVerifier, check_event, verify
from eventhub.clock import Clock, ManualClock
from eventhub.errors import IdempotencyConflict, StoreClosed, WrongExpectedVersion
from eventhub.events import ANY, NO_STREAM, STREAM_EXISTS, Event, NewEvent, StreamAppend
from eventhub.store.base import EventStore, Snapshot

SECOND = 1_000_000


def new(type: str = "Happened", data: bytes = b"", **meta: str) -> NewEvent:
    return NewEvent(type, data, dict(meta))


def to(stream: str, *events: NewEvent, expected: int = ANY) -> StreamAppend:
    return StreamAppend(stream, list(events) or [new()], expected)


async def everything(store: EventStore) -> list[Event]:
    """The whole log, read unchecked, as `verify` reads it."""
    return [e async for e in store.iter_all(check=False)]


async def assert_log_sound(store: EventStore) -> list[Event]:
    """Positions 1..head without a gap, every event intact, the chain unbroken."""
    events = await everything(store)
    assert [e.position for e in events] == list(range(1, len(events) + 1))
    assert await store.head() == len(events)
    for event in events:
        assert check_event(event) is None, event.position
    result = await verify(store.iter_all(check=False))
    assert result.ok, (result.broken_at, result.reason)
    assert result.head == len(events)
    by_stream: dict[str, list[int]] = {}
    for event in events:
        by_stream.setdefault(event.stream, []).append(event.version)
    for stream, versions in by_stream.items():
        assert versions == list(range(len(versions))), stream
    return events


class StoreContract:
    """What every `EventStore` backend must do; subclass it and implement `make_store`."""

    async def make_store(self, clock: Clock) -> EventStore:
        """An unopened store over a fresh, empty log that reads time from `clock`."""
        raise NotImplementedError

    async def reopen(self, store: EventStore) -> EventStore:
        """An unopened new store over the same data as `store` (already closed)."""
        raise NotImplementedError

    # -- fixtures ---------------------------------------------------------------------

    @pytest.fixture
    def clock(self) -> ManualClock:
        return ManualClock()

    @pytest.fixture
    async def store(self, clock: ManualClock) -> AsyncIterator[EventStore]:
        store = await self.make_store(clock)
        await store.open()
        try:
            yield store
        finally:
            await store.close()

    async def _reopened(self, store: EventStore) -> EventStore:
        await store.close()
        try:
            again = await self.reopen(store)
        except NotImplementedError:
            pytest.skip(f"{type(self).__name__} does not implement reopen()")
        await again.open()
        return again

    # -- the empty log ----------------------------------------------------------------

    async def test_empty_log(self, store: EventStore) -> None:
        assert await store.head() == 0
        assert await store.read_all() == []
        assert await store.read_event(1) is None
        assert await store.read_stream("nothing") == []
        assert await store.read_stream("nothing", -1, backward=True) == []
        assert await store.stream_version("nothing") == -1
        assert await store.first_at_or_after("nothing", 0) is None
        assert await store.last_before("nothing", 2**62) is None
        assert await store.load_snapshot("nothing") is None
        assert (await verify(store.iter_all(check=False))).ok

    # -- appending --------------------------------------------------------------------

    async def test_append_one_event(self, store: EventStore, clock: ManualClock) -> None:
        [event] = await store.append(to("order:1", new("OrderPlaced", b'{"n":1}', actor="ann")))
        assert (event.position, event.stream, event.version, event.type) == (1, "order:1", 0, "OrderPlaced")
        assert event.data == b'{"n":1}'
        assert event.meta == {"actor": "ann"}
        assert event.recorded_at == clock.now()
        assert event.digest == hashlib.sha256(b'{"n":1}').digest()
        assert event.prev_hash == GENESIS
        assert check_event(event) is None
        assert await store.read_event(1) == event
        assert await store.read_all() == [event]
        assert await store.head() == 1
        assert await store.stream_version("order:1") == 0

    async def test_append_empty_payload_and_meta(self, store: EventStore) -> None:
        [event] = await store.append(StreamAppend("s", [NewEvent("Empty")]))
        assert event.data == b"" and event.meta == {}
        assert await store.read_event(1) == event

    async def test_append_many_streams_in_one_call(self, store: EventStore, clock: ManualClock) -> None:
        events = await store.append(
            to("a", new("A1"), new("A2")),
            to("b", new("B1")),
            to("c", new("C1"), new("C2"), new("C3")),
        )
        assert [(e.position, e.stream, e.version, e.type) for e in events] == [
            (1, "a", 0, "A1"),
            (2, "a", 1, "A2"),
            (3, "b", 0, "B1"),
            (4, "c", 0, "C1"),
            (5, "c", 1, "C2"),
            (6, "c", 2, "C3"),
        ]
        assert {e.recorded_at for e in events} == {clock.now()}
        assert [e.prev_hash for e in events[1:]] == [e.hash for e in events[:-1]]
        assert await store.read_all() == events
        await assert_log_sound(store)

    async def test_positions_gap_free_and_versions_from_zero(self, store: EventStore) -> None:
        returned: list[Event] = []
        for i in range(30):
            stream = f"s{i % 4}"
            returned += await store.append(to(stream, *[new(f"E{i}.{j}") for j in range(1 + i % 3)]))
        assert [e.position for e in returned] == list(range(1, len(returned) + 1))
        assert await store.read_all() == returned
        events = await assert_log_sound(store)
        for s in range(4):
            versions = [e.version for e in events if e.stream == f"s{s}"]
            assert versions == list(range(len(versions)))
            assert await store.stream_version(f"s{s}") == len(versions) - 1

    async def test_append_without_appends_returns_nothing(self, store: EventStore) -> None:
        assert await store.append() == []
        assert await store.head() == 0

    async def test_one_stream_twice_in_a_call_is_refused(self, store: EventStore) -> None:
        with pytest.raises(ValueError):
            await store.append(to("a"), to("b"), to("a"))
        assert await store.head() == 0

    # -- expected versions ------------------------------------------------------------

    @pytest.mark.parametrize(
        ("existing", "expected"),
        [
            (0, ANY),
            (2, ANY),
            (0, NO_STREAM),
            (1, STREAM_EXISTS),
            (3, STREAM_EXISTS),
            (1, 0),
            (3, 2),
        ],
        ids=["any-new", "any-existing", "no-stream", "exists-1", "exists-3", "exact-0", "exact-2"],
    )
    async def test_expected_version_matches(self, store: EventStore, existing: int, expected: int) -> None:
        for _ in range(existing):
            await store.append(to("s"))
        await store.append(to("other"))
        events = await store.append(to("s", new("X"), new("Y"), expected=expected))
        assert [e.version for e in events] == [existing, existing + 1]
        assert [e.position for e in events] == [existing + 2, existing + 3]
        assert await store.stream_version("s") == existing + 1

    @pytest.mark.parametrize(
        ("existing", "expected", "actual"),
        [
            (1, NO_STREAM, 0),
            (3, NO_STREAM, 2),
            (0, STREAM_EXISTS, -1),
            (0, 0, -1),
            (0, 4, -1),
            (2, 0, 1),
            (2, 2, 1),
        ],
        ids=["no-stream-but-1", "no-stream-but-3", "exists-but-none", "exact-0-none", "exact-4-none", "exact-0-of-2", "exact-2-of-2"],
    )
    async def test_wrong_expected_version(self, store: EventStore, existing: int, expected: int, actual: int) -> None:
        for _ in range(existing):
            await store.append(to("s"))
        before = await everything(store)
        with pytest.raises(WrongExpectedVersion) as info:
            await store.append(to("s", new("X"), expected=expected))
        assert (info.value.stream, info.value.expected, info.value.actual) == ("s", expected, actual)
        assert await everything(store) == before
        assert await store.stream_version("s") == actual

    async def test_conflict_in_second_stream_writes_nothing_of_the_call(self, store: EventStore) -> None:
        await store.append(to("a"), to("b", new("B0")))
        before = await everything(store)
        with pytest.raises(WrongExpectedVersion) as info:
            await store.append(
                to("a", new("A1"), expected=0),
                to("b", new("B1"), expected=NO_STREAM),
                to("c", new("C0"), expected=NO_STREAM),
            )
        assert (info.value.stream, info.value.expected, info.value.actual) == ("b", NO_STREAM, 0)
        assert await everything(store) == before
        assert await store.stream_version("a") == 0
        assert await store.stream_version("c") == -1
        # the failed call left no hole: the next append takes the next position
        events = await store.append(to("a", new("A1"), expected=0), to("c", new("C0"), expected=NO_STREAM))
        assert [e.position for e in events] == [3, 4]
        await assert_log_sound(store)

    @pytest.mark.parametrize("existing", [0, 1], ids=["new-stream", "existing-stream"])
    async def test_fifty_racing_appends_exactly_one_wins(self, store: EventStore, existing: int) -> None:
        if existing:
            await store.append(to("race", new("Start")))
        expected = NO_STREAM if not existing else 0

        async def attempt(i: int) -> list[Event] | WrongExpectedVersion:
            try:
                return await store.append(to("race", new("Claimed", str(i).encode()), expected=expected))
            except WrongExpectedVersion as exc:
                return exc

        outcomes = await asyncio.gather(*(attempt(i) for i in range(50)))
        wins = [o for o in outcomes if isinstance(o, list)]
        losses = [o for o in outcomes if isinstance(o, WrongExpectedVersion)]
        assert len(wins) == 1 and len(losses) == 49
        assert all((e.stream, e.expected, e.actual) == ("race", expected, existing) for e in losses)
        stream = await store.read_stream("race")
        assert [e.version for e in stream] == list(range(existing + 1))
        assert stream[-1] == wins[0][0]
        await assert_log_sound(store)

    async def test_conflicts_do_not_fail_their_batch_mates(self, store: EventStore) -> None:
        await store.append(to("taken"))
        await store.append(to("keyed", new("Original")), idempotency_key="used")

        async def good(i: int) -> list[Event]:
            return await store.append(to(f"free:{i}", new("Good", str(i).encode()), expected=NO_STREAM))

        async def conflicting() -> None:
            with pytest.raises(WrongExpectedVersion):
                await store.append(to("free:extra"), to("taken", expected=NO_STREAM))

        async def reused_key() -> None:
            with pytest.raises(IdempotencyConflict):
                await store.append(to("keyed", new("Different")), idempotency_key="used")

        calls: list[Awaitable[list[Event] | None]] = []
        for i in range(10):
            calls.append(good(i))
            calls.append(conflicting() if i % 2 else reused_key())
        results = await asyncio.gather(*calls)
        written = [r[0] for r in results if r is not None]
        assert len(written) == 10
        assert sorted(e.stream for e in written) == sorted(f"free:{i}" for i in range(10))
        assert await store.stream_version("free:extra") == -1
        events = await assert_log_sound(store)
        assert len(events) == 12

    # -- idempotency ------------------------------------------------------------------

    async def test_retry_with_key_returns_original_and_writes_nothing(self, store: EventStore, clock: ManualClock) -> None:
        call = (to("pay:1", new("Paid", b"10"), expected=NO_STREAM), to("ledger", new("Booked", b"10")))
        original = await store.append(*call, idempotency_key="req-1")
        await store.append(to("pay:1", new("Refunded"), expected=0))
        clock.advance(60)
        before = await everything(store)
        retried = await store.append(*call, idempotency_key="req-1")
        assert retried == original
        assert await everything(store) == before
        # a different key is a different call: it conflicts on the stream as usual
        with pytest.raises(WrongExpectedVersion):
            await store.append(*call, idempotency_key="req-2")

    async def test_concurrent_retries_in_one_batch_write_once(self, store: EventStore) -> None:
        call = to("job:7", new("Claimed", b"w1"), new("Started"), expected=NO_STREAM)
        results = await asyncio.gather(*(store.append(call, idempotency_key="claim-7") for _ in range(12)))
        assert all(r == results[0] for r in results)
        assert [e.position for e in results[0]] == [1, 2]
        assert len(await assert_log_sound(store)) == 2

    async def test_same_key_different_events_is_a_conflict(self, store: EventStore) -> None:
        await store.append(to("s", new("A", b"1")), idempotency_key="k")
        before = await everything(store)
        for other in (
            to("s", new("A", b"2")),
            to("s", new("B", b"1")),
            to("s", new("A", b"1", actor="x")),
            to("t", new("A", b"1")),
            to("s", new("A", b"1"), expected=0),
        ):
            with pytest.raises(IdempotencyConflict) as info:
                await store.append(other, idempotency_key="k")
            assert info.value.key == "k"
        assert await everything(store) == before

    async def test_same_key_different_events_in_one_batch(self, store: EventStore) -> None:
        async def attempt(data: bytes) -> list[Event] | IdempotencyConflict:
            try:
                return await store.append(to("s", new("A", data)), idempotency_key="k")
            except IdempotencyConflict as exc:
                return exc

        outcomes = await asyncio.gather(attempt(b"1"), attempt(b"2"), attempt(b"1"), attempt(b"2"))
        wins = [o for o in outcomes if isinstance(o, list)]
        assert len(wins) == 2 and wins[0] == wins[1]
        assert sum(isinstance(o, IdempotencyConflict) for o in outcomes) == 2
        assert len(await assert_log_sound(store)) == 1

    async def test_a_refused_call_does_not_use_up_its_key(self, store: EventStore) -> None:
        await store.append(to("s"))
        with pytest.raises(WrongExpectedVersion):
            await store.append(to("s", new("X"), expected=NO_STREAM), idempotency_key="k")
        events = await store.append(to("s", new("Y"), expected=0), idempotency_key="k")
        assert [(e.version, e.type) for e in events] == [(1, "Y")]

    async def test_keyed_call_without_events_does_not_fail_batch_mates(self, store: EventStore) -> None:
        results = await asyncio.gather(
            store.append(to("a")),
            store.append(StreamAppend("b", []), idempotency_key="empty"),
            store.append(to("c")),
            return_exceptions=True,
        )
        assert not any(isinstance(r, BaseException) for r in results), results
        assert results[1] == []
        assert len(await assert_log_sound(store)) == 2

    # -- reading ----------------------------------------------------------------------

    async def _fill(self, store: EventStore) -> list[Event]:
        """Twelve events over five streams, two types; some streams share prefixes."""
        events: list[Event] = []
        for i in range(12):
            stream = ["chan:a", "chan:b", "chan_x", "spec:a", "chan:ab"][i % 5]
            events += await store.append(to(stream, new("Even" if i % 2 == 0 else "Odd", str(i).encode())))
        return events

    async def test_read_all_after_limit_until(self, store: EventStore) -> None:
        events = await self._fill(store)
        assert await store.read_all() == events
        assert await store.read_all(after=5) == events[5:]
        assert await store.read_all(after=5, limit=3) == events[5:8]
        assert await store.read_all(after=3, until=7) == events[3:7]
        assert await store.read_all(after=3, limit=2, until=7) == events[3:5]
        assert await store.read_all(after=12) == []
        assert await store.read_all(after=7, until=7) == []
        assert await store.read_all(limit=0) == []
        paged: list[Event] = []
        after = 0
        while page := await store.read_all(after, 5):
            paged += page
            after = page[-1].position
        assert paged == events
        assert [e async for e in store.iter_all(after=2, batch=4)] == events[2:]
        assert [e async for e in store.iter_all(until=9, batch=4)] == events[:9]

    async def test_read_all_filters(self, store: EventStore) -> None:
        events = await self._fill(store)

        def where(pred: Callable[[Event], bool]) -> list[Event]:
            return [e for e in events if pred(e)]

        assert await store.read_all(stream_prefix="chan:") == where(lambda e: e.stream.startswith("chan:"))
        # the prefix is literal: "_" and "%" are not wildcards
        assert await store.read_all(stream_prefix="chan_") == where(lambda e: e.stream == "chan_x")
        assert await store.read_all(stream_prefix="chan:a") == where(lambda e: e.stream in ("chan:a", "chan:ab"))
        assert await store.read_all(stream="chan:a") == where(lambda e: e.stream == "chan:a")
        assert await store.read_all(types=["Odd"]) == where(lambda e: e.type == "Odd")
        assert await store.read_all(types=["Odd", "Even"]) == events
        assert await store.read_all(types=["Nope"]) == []
        assert await store.read_all(stream_prefix="nope") == []
        combined = where(lambda e: e.stream.startswith("chan") and e.type == "Even" and e.position > 2)
        assert await store.read_all(2, stream_prefix="chan", types=["Even"]) == combined
        assert await store.read_all(2, 2, stream_prefix="chan", types=["Even"]) == combined[:2]
        assert [e async for e in store.iter_all(stream_prefix="spec:", batch=1)] == where(
            lambda e: e.stream == "spec:a"
        )

    async def test_read_stream_forward_and_backward(self, store: EventStore) -> None:
        await store.append(to("other"))
        for i in range(6):
            await store.append(to("s", new(f"E{i}")), to(f"noise:{i}"))
        stream = await store.read_stream("s")
        assert [e.version for e in stream] == list(range(6))
        assert [e.type for e in stream] == [f"E{i}" for i in range(6)]
        assert await store.read_stream("s", 2) == stream[2:]
        assert await store.read_stream("s", 2, 3) == stream[2:5]
        assert await store.read_stream("s", 6) == []
        assert await store.read_stream("s", -1, backward=True) == stream[::-1]
        assert await store.read_stream("s", -1, 2, backward=True) == stream[:3:-1]
        assert await store.read_stream("s", 3, backward=True) == stream[3::-1]
        assert await store.read_stream("s", 3, 2, backward=True) == stream[3:1:-1]
        assert await store.read_stream("s", 0, backward=True) == stream[:1]
        assert await store.read_stream("s", 99, backward=True) == stream[::-1]
        assert await store.read_stream("missing") == []

    async def test_read_event_head_and_stream_version(self, store: EventStore) -> None:
        events = await self._fill(store)
        for event in events:
            assert await store.read_event(event.position) == event
        assert await store.read_event(0) is None
        assert await store.read_event(13) is None
        assert await store.read_event(-1) is None
        assert await store.head() == 12
        assert await store.stream_version("chan:a") == 2
        assert await store.stream_version("spec:a") == 1
        assert await store.stream_version("chan") == -1

    # -- time -------------------------------------------------------------------------

    async def test_first_at_or_after_and_last_before(self, store: EventStore, clock: ManualClock) -> None:
        t0 = clock.now()
        a = await store.append(to("s", new("A0"), new("A1")), to("x"))
        clock.advance(10)
        b = await store.append(to("s", new("B")))
        clock.advance(10)
        await store.append(to("x"))
        clock.advance(10)
        c = await store.append(to("s", new("C0"), new("C1")))
        t1, t2 = t0 + 10 * SECOND, t0 + 30 * SECOND
        assert [e.recorded_at for e in a + b + c if e.stream == "s"] == [t0, t0, t1, t2, t2]

        assert await store.first_at_or_after("s", 0) == a[0]
        assert await store.first_at_or_after("s", t0) == a[0]
        assert await store.first_at_or_after("s", t0 + 1) == b[0]
        assert await store.first_at_or_after("s", t1) == b[0]
        assert await store.first_at_or_after("s", t1 + 1) == c[0]
        assert await store.first_at_or_after("s", t2) == c[0]
        assert await store.first_at_or_after("s", t2 + 1) is None

        assert await store.last_before("s", t0) is None
        assert await store.last_before("s", t0 + 1) == a[1]
        assert await store.last_before("s", t1) == a[1]
        assert await store.last_before("s", t1 + 1) == b[0]
        assert await store.last_before("s", t2) == b[0]
        assert await store.last_before("s", t2 + 1) == c[1]
        assert await store.last_before("missing", t2 + 1) is None
        assert await store.first_at_or_after("missing", 0) is None

    async def test_time_lookups_in_a_long_stream_match_a_scan(self, store: EventStore, clock: ManualClock) -> None:
        # runs of equal times, gaps, other streams in between: every boundary of a search
        for run in range(40):
            await store.append(to("long", *[new("E") for _ in range(run % 4)]), to(f"other-{run % 3}"))
            clock.advance(run % 5)
        events = await store.read_stream("long", 0, 1000)
        times = sorted({e.recorded_at for e in events})
        for t in [0, times[0] - 1, *times, *(x + 1 for x in times), times[-1] + SECOND]:
            later = [e for e in events if e.recorded_at >= t]
            earlier = [e for e in events if e.recorded_at < t]
            assert await store.first_at_or_after("long", t) == (later[0] if later else None)
            assert await store.last_before("long", t) == (earlier[-1] if earlier else None)

    async def test_recorded_at_never_decreases(self, store: EventStore, clock: ManualClock) -> None:
        [first] = await store.append(to("s"))
        assert first.recorded_at == clock.now()
        clock.advance(-3600)
        [second] = await store.append(to("s"))
        assert second.recorded_at == first.recorded_at
        clock.advance(3600 + 1)
        [third] = await store.append(to("s"))
        assert third.recorded_at == clock.now() > first.recorded_at
        clock.advance(-1)
        await asyncio.gather(*(store.append(to(f"c{i}")) for i in range(10)))
        stamps = [e.recorded_at for e in await store.read_all()]
        assert stamps == sorted(stamps)

    # -- purging ----------------------------------------------------------------------

    async def test_purge_erases_data_and_keeps_the_chain(self, store: EventStore) -> None:
        events = await self._fill(store)
        assert await store.purge([3, 7, 99]) == 2
        assert await store.purge([3]) == 0
        assert await store.purge([]) == 0
        after = await store.read_all()
        for old, now in zip(events, after):
            if old.position in (3, 7):
                assert now.data is None and now.purged
                assert (now.digest, now.hash, now.prev_hash, now.meta) == (old.digest, old.hash, old.prev_hash, old.meta)
                assert msg_fields(now) == msg_fields(old)
            else:
                assert now == old
        purged = await store.read_event(3)
        assert purged is not None and purged.data is None
        assert events[2].version == 0 and (await store.read_stream(events[2].stream))[0].data is None
        await assert_log_sound(store)
        # the log still grows from the same chain
        [nxt] = await store.append(to("s"))
        assert nxt.prev_hash == events[-1].hash
        await assert_log_sound(store)

    # -- snapshots --------------------------------------------------------------------

    async def test_snapshots_save_load_replace(self, store: EventStore) -> None:
        assert await store.load_snapshot("channels") is None
        first = Snapshot("channels", 1, 10, b"\x00state-one")
        await store.save_snapshot(first)
        await store.save_snapshot(Snapshot("specs", 3, 4, b""))
        assert await store.load_snapshot("channels") == first
        second = Snapshot("channels", 2, 25, b"state-two" * 1000)
        await store.save_snapshot(second)
        assert await store.load_snapshot("channels") == second
        assert await store.load_snapshot("specs") == Snapshot("specs", 3, 4, b"")
        assert await store.head() == 0  # snapshots are not events

    # -- commit listeners -------------------------------------------------------------

    async def test_commit_listeners_see_each_batch_before_the_append_returns(self, store: EventStore) -> None:
        batches: list[list[Event]] = []
        calls: list[str] = []

        async def listener(events: list[Event]) -> None:
            batches.append(list(events))

        async def second(events: list[Event]) -> None:
            calls.append("second")

        store.commit_listeners.extend([listener, second])
        await store.append(to("taken"))

        async def writer(i: int) -> None:
            for j in range(5):
                try:
                    events = await store.append(to(f"w{i}", new("E"), new("F")), to("taken", expected=NO_STREAM if j == 2 else ANY))
                except WrongExpectedVersion:
                    continue
                seen = {e.position for batch in batches for e in batch}
                assert {e.position for e in events} <= seen

        await asyncio.gather(*(writer(i) for i in range(8)))
        flat = [e for batch in batches for e in batch]
        assert flat == await store.read_all(limit=10_000)
        for batch in batches:
            assert [e.position for e in batch] == list(range(batch[0].position, batch[0].position + len(batch)))
        assert len(calls) == len(batches)

    async def test_a_failing_listener_does_not_fail_a_durable_append(self, store: EventStore) -> None:
        async def broken(events: list[Event]) -> None:
            raise RuntimeError("listener bug")

        store.commit_listeners.append(broken)
        events = await store.append(to("s"))
        assert await store.read_all() == events

    # -- concurrency ------------------------------------------------------------------

    async def test_chain_verifies_after_concurrent_writers(self, store: EventStore) -> None:
        async def writer(i: int) -> int:
            written = 0
            for j in range(15):
                stream = f"w{i}" if j % 3 else "shared"
                version = await store.stream_version(stream)
                try:
                    written += len(await store.append(to(stream, *[new("E")] * (1 + j % 3), expected=version)))
                except WrongExpectedVersion:
                    pass
            return written

        counts = await asyncio.gather(*(writer(i) for i in range(20)))
        events = await assert_log_sound(store)
        assert len(events) == sum(counts)
        verifier = ChainVerifier()
        assert verifier.feed(await store.read_all(limit=100_000))
        assert verifier.result.head == len(events)

    async def test_reads_after_an_append_see_it_while_others_read(self, store: EventStore) -> None:
        """Read your writes: an acknowledged append is visible to the very next read,
        however many other reads are running on the store at the time."""
        stop = asyncio.Event()
        misses: list[str] = []

        async def busy_reader() -> None:
            after = 0
            while not stop.is_set():
                page = await store.read_all(after, 2)
                after = page[-1].position if page else after
                await store.stream_version("w0")
                await asyncio.sleep(0)

        async def writer(w: int) -> None:
            for _ in range(40):
                await store.stream_version(f"w{w}")
                [event] = await store.append(to(f"w{w}"))
                if await store.head() < event.position:
                    misses.append(f"head before {event.position}")
                if await store.read_event(event.position) != event:
                    misses.append(f"read_event {event.position}")
                if await store.stream_version(f"w{w}") != event.version:
                    misses.append(f"stream_version {event.stream}@{event.version}")

        readers = [asyncio.create_task(busy_reader()) for _ in range(3)]
        try:
            await asyncio.gather(*(writer(w) for w in range(6)))
        finally:
            stop.set()
            await asyncio.gather(*readers)
        assert misses == []

    @settings(
        max_examples=25,
        deadline=None,
        # The store fixture outlives examples on purpose (each example checks only what it
        # added), and every backend's subclass runs this same property: a failing example
        # replayed on another backend is a fair test of that backend too.
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.differing_executors,
        ],
    )
    @given(
        writers=st.lists(
            st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3), st.booleans()), min_size=1, max_size=8),
            min_size=1,
            max_size=6,
        ),
        pages=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    )
    async def test_concurrent_writers_and_readers_see_every_event_once_in_order(
        self, store: EventStore, writers: list[list[tuple[int, int, bool]]], pages: list[int]
    ) -> None:
        # The store lives across examples; each example checks the events it added.
        start = await store.head()
        written: list[Event] = []
        done = asyncio.Event()

        async def write(plan: Sequence[tuple[int, int, bool]]) -> None:
            for stream_no, count, exact in plan:
                stream = f"p{stream_no}"
                expected = await store.stream_version(stream) if exact else ANY
                try:
                    written.extend(await store.append(to(stream, *[new("E")] * count, expected=expected)))
                except WrongExpectedVersion:
                    pass
                await asyncio.sleep(0)

        async def read(limit: int) -> list[Event]:
            seen: list[Event] = []
            after = start
            while True:
                finished = done.is_set()
                page = await store.read_all(after, limit)
                seen += page
                if page:
                    after = page[-1].position
                elif finished:
                    return seen
                await asyncio.sleep(0)

        readers = [asyncio.create_task(read(limit)) for limit in pages]
        await asyncio.gather(*(write(plan) for plan in writers))
        done.set()
        head = await store.head()
        expected = sorted(written, key=lambda e: e.position)
        assert [e.position for e in expected] == list(range(start + 1, head + 1))
        for seen in await asyncio.gather(*readers):
            assert seen == expected

    # -- closing and reopening --------------------------------------------------------

    async def test_append_after_close_raises_store_closed(self, clock: ManualClock) -> None:
        store = await self.make_store(clock)
        await store.open()
        await store.append(to("s"))
        await store.close()
        with pytest.raises(StoreClosed):
            await store.append(to("s"))
        await store.close()  # closing twice is harmless

    async def test_close_answers_every_append_in_flight(self, store: EventStore) -> None:
        tasks = [asyncio.create_task(store.append(to(f"s{i}", new("E", str(i).encode())))) for i in range(40)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(store.append(to(f"late{i}"))) for i in range(10)]
        await store.close()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        acked = [o[0] for o in outcomes if isinstance(o, list)]
        assert all(isinstance(o, list | StoreClosed) for o in outcomes), outcomes
        store = await self._reopened(store)
        try:
            events = await assert_log_sound(store)
            assert sorted(acked, key=lambda e: e.position) == [e for e in events if e in acked]
            assert len(events) == len(acked)
        finally:
            await store.close()

    async def test_reopen_keeps_everything(self, store: EventStore, clock: ManualClock) -> None:
        await self._fill(store)
        keyed = await store.append(to("pay", new("Paid"), expected=NO_STREAM), idempotency_key="pay-1")
        await store.purge([2])
        await store.save_snapshot(Snapshot("p", 1, 13, b"model"))
        before = await everything(store)
        store = await self._reopened(store)
        try:
            assert await everything(store) == before
            assert await store.read_all() == before  # every event still passes its check
            assert await store.head() == 13
            assert await store.stream_version("chan:a") == 2
            assert await store.load_snapshot("p") == Snapshot("p", 1, 13, b"model")
            assert await store.append(to("pay", new("Paid"), expected=NO_STREAM), idempotency_key="pay-1") == keyed
            with pytest.raises(WrongExpectedVersion):
                await store.append(to("chan:a", expected=1))
            clock.advance(-3600)
            [nxt] = await store.append(to("chan:a", expected=2))
            assert (nxt.position, nxt.version, nxt.prev_hash) == (14, 3, before[-1].hash)
            assert nxt.recorded_at >= before[-1].recorded_at
            await assert_log_sound(store)
        finally:
            await store.close()


def msg_fields(event: Event) -> tuple[object, ...]:
    """An event's fields other than its payload."""
    return (event.position, event.stream, event.version, event.type, event.recorded_at)
