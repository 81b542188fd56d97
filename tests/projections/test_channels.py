"""Channels' pure parts: item ids, decisions, and the fold of the read model."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventhub.events import ANY, NO_STREAM, Event, NewEvent, StreamAppend
from projections.channels import (
    ChannelError,
    ChannelRequest,
    Channels,
    decide_create,
    decide_delete,
    decide_insert,
    decide_purged,
    decide_update,
    item_id,
    item_meta,
    parse_item_id,
    parse_ttl,
)

DAY = 86_400_000


class Log:
    """Commits decisions into events and folds them, like the log would, without a store."""

    def __init__(self) -> None:
        self.projection = Channels()
        self.position = 0
        self.versions: dict[str, int] = {}
        self.now = 1_700_000_000_000_000

    @property
    def model(self):  # type: ignore[no-untyped-def]
        return self.projection.model

    def commit(self, append: StreamAppend | None) -> list[Event]:
        assert append is not None
        version = self.versions.get(append.stream, -1)
        assert append.expected in (ANY, version), f"conflict on {append.stream}"
        events = []
        for new in append.events:
            self.position += 1
            version += 1
            events.append(
                Event(self.position, append.stream, version, new.type, new.data, new.meta, self.now, b"", b"", b"")
            )
        self.versions[append.stream] = version
        for event in events:
            self.projection.apply(event)
        return events


def _create(name: str = "stumptown", **fields: object) -> ChannelRequest:
    return msgspec.convert({"name": name, **fields}, ChannelRequest)


def _insert(log: Log, name: str = "stumptown", n: int = 1) -> list[Event]:
    return log.commit(decide_insert(log.model, name, [(b"x", item_meta("text/plain", None, None))] * n))


# -- ids -----------------------------------------------------------------------------------


@given(st.integers(0, 2**40 - 1), st.integers(0, 2**40 - 1))
def test_item_ids_round_trip(generation: int, version: int) -> None:
    text = item_id(generation, version)
    assert len(text) == 16 and set(text) <= set("0123456789ABCDEFGHIJKLMNOPQRSTUV")
    assert parse_item_id(text) == (generation, version)


@given(st.lists(st.tuples(st.integers(0, 2**40 - 1), st.integers(0, 2**40 - 1)), min_size=2))
def test_item_ids_sort_like_generation_then_version(pairs: list[tuple[int, int]]) -> None:
    assert sorted(pairs) == [parse_item_id(t) for t in sorted(item_id(*p) for p in pairs)]


@pytest.mark.parametrize("text", ["", "latest", "0000000000000000X", "000000000000000W", "000000000000000a"])
def test_not_item_ids(text: str) -> None:
    assert parse_item_id(text) is None


# -- decisions -----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "ttl"), [(None, None), (1, 1), ("3600000", 3600000), (30000.0, 30000)])
def test_ttl_parses(value: object, ttl: int | None) -> None:
    assert parse_ttl(value) == ttl


@pytest.mark.parametrize("value", [0, -1, "-5", "1e3", "", 1.5, True, [], {}])
def test_ttl_refuses(value: object) -> None:
    with pytest.raises(ChannelError) as err:
        parse_ttl(value)
    assert err.value.kind == "invalid" and "ttlMillis" in err.value.message


def test_create_decides_the_stream_and_its_expected_version() -> None:
    log = Log()
    append = decide_create(log.model, _create(), DAY)
    assert (append.stream, append.expected, append.events[0].type) == ("channel:stumptown", NO_STREAM, "ChannelCreated")
    log.commit(append)
    channel = log.model.channels["stumptown"]
    assert (channel.ttl_millis, channel.generation, channel.created_at) == (DAY, 1, log.now)
    with pytest.raises(ChannelError) as err:
        decide_create(log.model, _create(), DAY)
    assert err.value.kind == "conflict"
    log.commit(decide_delete(log.model, "stumptown"))
    again = decide_create(log.model, _create(ttlMillis=None), DAY)
    assert again.expected == 1  # after Created, Deleted: a re-create cannot race another
    log.commit(again)
    assert log.model.channels["stumptown"].generation == 3 and log.model.channels["stumptown"].ttl_millis is None


@pytest.mark.parametrize("name", ["", "a b", "a/b", "a:b", "ü", "x" * 49])
def test_create_refuses_bad_names(name: str) -> None:
    with pytest.raises(ChannelError) as err:
        decide_create(Log().model, _create(name), DAY)
    assert err.value.kind == "invalid"


def test_unknown_channel_is_not_found() -> None:
    log = Log()
    for decide in (
        lambda: decide_update(log.model, "nope", _create()),
        lambda: decide_delete(log.model, "nope"),
        lambda: decide_insert(log.model, "nope", [(b"", {})]),
        lambda: log.projection.get("nope"),
    ):
        with pytest.raises(ChannelError) as err:
            decide()
        assert err.value.kind == "not_found"


def test_update_only_when_something_changes() -> None:
    log = Log()
    log.commit(decide_create(log.model, _create(ttlMillis=5), DAY))
    assert decide_update(log.model, "stumptown", ChannelRequest()) is None
    assert decide_update(log.model, "stumptown", ChannelRequest(ttlMillis="5")) is None
    log.commit(decide_update(log.model, "stumptown", ChannelRequest(ttlMillis=None)))
    assert log.model.channels["stumptown"].ttl_millis is None


# -- the fold ------------------------------------------------------------------------------


def test_inserts_count_and_date_the_channel() -> None:
    log = Log()
    log.commit(decide_create(log.model, _create(), DAY))
    channel = log.model.channels["stumptown"]
    assert channel.updated_at == channel.created_at and channel.items == 0
    log.now += 5_000_000
    events = _insert(log, n=3)
    assert [e.stream for e in events] == ["channel:stumptown:1"] * 3 and [e.version for e in events] == [0, 1, 2]
    assert events[0].meta == {"content-type": "text/plain"} and events[0].data == b"x"
    assert (channel.items, channel.updated_at) == (3, log.now)


def test_deleted_generation_waits_for_its_purge() -> None:
    log = Log()
    log.commit(decide_create(log.model, _create(), DAY))
    channel = log.model.channels["stumptown"]
    _insert(log, n=2)
    log.commit(decide_purged(channel, 0, "ttl"))
    assert channel.purged_through == 0
    log.commit(decide_delete(log.model, "stumptown"))
    assert "stumptown" not in log.model.channels and list(log.model.deleted) == ["channel:stumptown:1"]
    # an insert that decided before the delete lands in the dead generation: it must be purged too
    log.commit(StreamAppend("channel:stumptown:1", [NewEvent("ItemInserted", b"late")], ANY))
    assert log.model.deleted["channel:stumptown:1"].items == 3
    log.commit(decide_purged(log.model.deleted["channel:stumptown:1"], 2, "deleted"))
    assert not log.model.deleted


def test_deleting_an_empty_channel_leaves_nothing_to_purge() -> None:
    log = Log()
    log.commit(decide_create(log.model, _create(), DAY))
    log.commit(decide_delete(log.model, "stumptown"))
    assert not log.model.deleted and log.model.versions == {"stumptown": 1}


def test_snapshot_restores_the_same_model() -> None:
    log = Log()
    log.commit(decide_create(log.model, _create("a"), DAY))
    log.commit(decide_create(log.model, _create("b", ttlMillis=None), DAY))
    _insert(log, "a", 2)
    _insert(log, "b", 1)
    log.commit(decide_delete(log.model, "b"))
    copy = Channels()
    copy.restore(log.projection.snapshot())
    assert copy.model == log.model and list(copy.model.channels) == ["a"]


def test_events_of_other_types_are_ignored() -> None:
    log = Log()
    log.commit(StreamAppend("channel:stumptown", [NewEvent("SomethingNew", b"{}")], ANY))
    assert log.model.channels == {} and log.model.versions == {"stumptown": 0}
    assert decide_create(log.model, _create(), DAY).expected == 0  # its version still counts
