"""The hash chain: intact events check, any changed field or byte is caught, purges are not."""

from __future__ import annotations

import msgspec
import pytest

from eventhub.chain import GENESIS, ChainVerifier, check_event, digest, encode_meta, event_hash
from eventhub.events import Event


def _chain(n: int) -> list[Event]:
    events, prev = [], GENESIS
    for p in range(1, n + 1):
        data = f"payload {p}".encode()
        meta = {"content-type": "text/plain", "actor": "test"}
        d = digest(data)
        h = event_hash(prev, p, "s", p - 1, "T", encode_meta(meta), 1000 + p, d)
        events.append(Event(p, "s", p - 1, "T", data, meta, 1000 + p, d, prev, h))
        prev = h
    return events


def test_an_intact_chain_verifies() -> None:
    v = ChainVerifier()
    assert v.feed(_chain(5))
    assert v.result.ok and v.result.events == 5 and v.result.head == 5


def test_meta_is_hashed_independent_of_key_order() -> None:
    assert encode_meta({"b": "1", "a": "2"}) == encode_meta({"a": "2", "b": "1"})


@pytest.mark.parametrize(
    "change",
    [
        {"data": b"payload X"},
        {"type": "U"},
        {"stream": "t"},
        {"version": 9},
        {"recorded_at": 1},
        {"meta": {"content-type": "text/html", "actor": "test"}},
    ],
)
def test_any_changed_field_is_caught_at_its_position(change: dict[str, object]) -> None:
    events = _chain(5)
    events[2] = msgspec.structs.replace(events[2], **change)
    assert check_event(events[2]) is not None
    v = ChainVerifier()
    assert not v.feed(events)
    assert v.result.broken_at == 3


def test_a_rewritten_event_breaks_the_next_link() -> None:
    events = _chain(4)
    bad = msgspec.structs.replace(events[1], data=b"forged", digest=digest(b"forged"))
    bad = msgspec.structs.replace(
        bad, hash=event_hash(bad.prev_hash, 2, "s", 1, "T", encode_meta(bad.meta), bad.recorded_at, bad.digest)
    )
    events[1] = bad
    v = ChainVerifier()
    assert not v.feed(events)
    assert v.result.broken_at == 3 and "previous hash" in v.result.reason


def test_a_missing_event_is_named() -> None:
    events = _chain(4)
    del events[1]
    v = ChainVerifier()
    assert not v.feed(events)
    assert v.result.broken_at == 2 and "missing" in v.result.reason


def test_a_purged_payload_still_verifies() -> None:
    events = _chain(3)
    events[1] = msgspec.structs.replace(events[1], data=None)
    assert check_event(events[1]) is None
    assert ChainVerifier().feed(events)


def test_the_count_and_chain_carry_over_runs_and_stop_at_a_break() -> None:
    events = _chain(9)
    v = ChainVerifier()
    assert v.feed(events[:4]) and v.feed(events[4:6])
    assert (v.result.events, v.result.head, v.result.chain) == (6, 6, events[5].hash)
    events[7] = msgspec.structs.replace(events[7], type="U")
    assert not v.feed(events[6:])
    assert (v.result.events, v.result.head, v.result.chain, v.result.broken_at) == (7, 7, events[6].hash, 8)
    assert not v.feed(events[8:])  # nothing is walked past a break
    assert v.result.events == 7


def test_a_walk_anchored_past_the_start_counts_from_its_anchor() -> None:
    events = _chain(6)
    v = ChainVerifier(3, events[2].hash)
    assert v.feed(events[3:])
    assert (v.result.events, v.result.head) == (3, 6)


def test_an_empty_meta_is_hashed_as_an_empty_object() -> None:
    """`feed` encodes meta without `encode_meta`'s empty-dict branch: same bytes."""
    prev, data = GENESIS, b"x"
    h = event_hash(prev, 1, "s", 0, "T", encode_meta({}), 5, digest(data))
    assert encode_meta({}) == b"{}"
    assert ChainVerifier().feed([Event(1, "s", 0, "T", data, {}, 5, digest(data), prev, h)])
