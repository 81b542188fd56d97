"""Webhooks' pure parts: locations, configuration, decisions, backoff, and the fold."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventhub.claims import Lease
from eventhub.events import NO_STREAM, Event, StreamAppend
from eventhub.netguard import OutboundGuard
from projections.channels import Channel, item_id
from projections.channels import Model as ChannelsModel
from projections.webhooks import (
    ERRORS_KEPT,
    ChannelAt,
    ItemAt,
    TimeAt,
    WebhookClaimed,
    WebhookConfigured,
    WebhookCursorMoved,
    WebhookDeleted,
    WebhookDeliveryFailed,
    WebhookError,
    WebhookReleased,
    WebhookRequest,
    Webhooks,
    backoff_seconds,
    configure,
    decide_cursor,
    decide_delete,
    decide_failure,
    decide_put,
    expected_version,
    item_cursor,
    parse_location,
    payload,
    previous_cursor,
    start_changed,
    to_event,
)

NOW = 1_700_000_000_000_000
CHANNEL = "http://hub/channel/stumptown"
GUARD = OutboundGuard()


def _channels(items: int = 3) -> ChannelsModel:
    return ChannelsModel(channels={"stumptown": Channel("stumptown", 7, None, NOW, items=items)})


def _request(**fields: object) -> WebhookRequest:
    return msgspec.convert(fields, WebhookRequest)


def _config(**fields: object) -> WebhookConfigured:
    request = _request(**{"callbackUrl": "http://client/callback", "channelUrl": CHANNEL, **fields})
    return configure(None, "hook", request, _channels(), GUARD, 30)


class Log:
    """Commits appends into events and folds them, as the log would, without a store."""

    def __init__(self) -> None:
        self.projection = Webhooks()
        self.position = 0
        self.versions: dict[str, int] = {}
        self.now = NOW

    def commit(self, append: StreamAppend | None) -> None:
        assert append is not None
        version = self.versions.get(append.stream, -1)
        assert append.expected == version, f"conflict on {append.stream}"
        for new in append.events:
            self.position += 1
            version += 1
            event = Event(self.position, append.stream, version, new.type, new.data, new.meta, self.now, b"", b"", b"")
            self.projection.apply(event)
        self.versions[append.stream] = version

    def record(self, *facts: object) -> None:
        model = self.projection.model
        self.commit(StreamAppend("webhook:hook", [to_event(f) for f in facts], expected_version(model, "hook")))  # type: ignore[arg-type]

    def create(self, **fields: object) -> None:
        self.commit(decide_put(None, NO_STREAM, _config(**fields), (7, 2)))


# -- locations -----------------------------------------------------------------------------


def test_locations() -> None:
    assert parse_location("http://hub/channel/stumptown") == ChannelAt("stumptown")
    assert parse_location("https://hub:8080/channel/stumptown/ ") == ChannelAt("stumptown")
    assert parse_location(f"http://hub/channel/stumptown/{item_id(7, 2)}") == ItemAt("stumptown", 7, 2)
    assert parse_location("http://hub/channel/stumptown/2024/02/29") == TimeAt("stumptown", 1_709_164_800_000_000)
    assert parse_location("http://hub/channel/s/2024/02/29/01/02/03") == TimeAt("s", 1_709_168_523_000_000)
    for bad in ["", "hub/channel/x", "ftp://hub/channel/x", "http://hub/channels/x", "http://hub/channel",
                "http://hub/channel/a.b", "http://hub/channel/x/latest", "http://hub/channel/x/2024/02/30",
                "http://hub/channel/x/2024/02", "http://[::1/channel/x"]:
        with pytest.raises(WebhookError) as caught:
            parse_location(bad)
        assert caught.value.kind == "invalid", bad


def test_item_cursor() -> None:
    channel = _channels(items=3).channels["stumptown"]
    assert item_cursor(ItemAt("stumptown", 7, 0), channel) == 0
    assert item_cursor(ItemAt("stumptown", 7, 2), channel) == 2
    assert item_cursor(TimeAt("stumptown", NOW), channel) is None
    locations: list[ChannelAt | ItemAt | TimeAt] = [
        ItemAt("stumptown", 7, 3), ItemAt("stumptown", 6, 0), ItemAt("other", 7, 0), ChannelAt("stumptown")
    ]
    for location in locations:
        with pytest.raises(WebhookError):
            item_cursor(location, channel)
    assert previous_cursor(channel) == 1
    assert previous_cursor(Channel("empty", 1, None, NOW)) == -1


# -- configuration -------------------------------------------------------------------------


def test_configure_defaults_and_merge() -> None:
    config = _config()
    assert config == WebhookConfigured(name="hook", channel="stumptown", channel_url=CHANNEL,
                                       callback_url="http://client/callback", callback_timeout_seconds=30)
    log = Log()
    log.create()
    hook = log.projection.model.webhooks["hook"]
    merged = configure(hook, "hook", _request(paused=True, parallelCalls=4), _channels(), GUARD, 30)
    assert (merged.paused, merged.parallel_calls, merged.callback_url) == (True, 4, "http://client/callback")
    # a deleted channel does not stop changes to a webhook that follows it
    assert configure(hook, "hook", _request(paused=False), ChannelsModel(), GUARD, 30).paused is False
    with pytest.raises(WebhookError) as caught:
        configure(hook, "hook", _request(channelUrl="http://hub/channel/other"), _channels(), GUARD, 30)
    assert caught.value.kind == "conflict"


@pytest.mark.parametrize(
    "fields",
    [{"parallelCalls": 0}, {"maxAttempts": -1}, {"maxWaitMinutes": 0}, {"maxWaitMinutes": 1441},
     {"ttlMinutes": -1}, {"callbackTimeoutSeconds": 1801}, {"batch": "SECOND"}, {"heartbeat": True},
     {"name": "other"}, {"callbackUrl": "http://169.254.169.254/"}, {"channelUrl": "http://hub/channel/nope"}],
)
def test_configure_refuses(fields: dict[str, object]) -> None:
    with pytest.raises(WebhookError) as caught:
        _config(**fields)
    assert caught.value.kind == "invalid"


def test_batch_single_and_no_heartbeat_are_accepted() -> None:
    assert _config(batch="single", heartbeat=False).parallel_calls == 1


# -- decisions -----------------------------------------------------------------------------


def test_put_create_update_and_no_change() -> None:
    log = Log()
    config = _config()
    append = decide_put(None, NO_STREAM, config, (7, 2))
    assert append is not None and append.expected == NO_STREAM
    assert [e.type for e in append.events] == ["WebhookConfigured", "WebhookCursorMoved"]
    log.commit(append)
    hook = log.projection.model.webhooks["hook"]
    assert (hook.generation, hook.cursor, hook.epoch, hook.config_version) == (7, 2, 1, 0)
    assert decide_put(hook, 1, config, None) is None  # the same again: nothing
    assert not start_changed(hook, config)
    moved = msgspec.structs.replace(config, start_item=f"{CHANNEL}/{item_id(7, 0)}")
    assert start_changed(hook, moved) and start_changed(None, config)
    append = decide_put(hook, 1, moved, (7, 0))
    assert append is not None and [e.type for e in append.events] == ["WebhookConfigured", "WebhookCursorMoved"]
    assert json.loads(append.events[1].data)["reason"] == "set"


def test_cursor_and_delete_decisions() -> None:
    log = Log()
    with pytest.raises(WebhookError) as caught:
        decide_cursor(log.projection.model, "hook", 7, 0)
    assert caught.value.kind == "not_found"
    log.create()
    log.commit(decide_cursor(log.projection.model, "hook", 7, -1))
    assert log.projection.model.webhooks["hook"].cursor == -1
    log.commit(decide_delete(log.projection.model, "hook"))
    assert "hook" not in log.projection.model.webhooks
    with pytest.raises(WebhookError):
        decide_delete(log.projection.model, "hook")


@given(st.integers(1, 200), st.floats(0, 100), st.integers(1, 1440))
def test_backoff_doubles_and_is_capped(attempt: int, base: float, max_wait: int) -> None:
    wait = backoff_seconds(attempt, base, max_wait)
    assert 0 <= wait <= max_wait * 60
    assert wait <= backoff_seconds(attempt + 1, base, max_wait)
    if attempt == 1:
        assert wait == min(base, max_wait * 60)


def test_failure_retries_then_gives_up() -> None:
    lease = Lease("me", NOW + 40_000_000)
    config = _config(maxAttempts=3)
    retry = decide_failure(config, 7, 0, 1, "500", NOW, 1.0, lease)
    assert retry.retry_at == NOW + 1_000_000 and retry.lease == Lease("me", NOW + 41_000_000)
    assert decide_failure(config, 7, 0, 2, "500", NOW, 1.0, lease).retry_at == NOW + 2_000_000
    final = decide_failure(config, 7, 0, 3, "500", NOW, 1.0, lease)
    assert final.retry_at is None and final.lease == lease
    assert decide_failure(_config(), 7, 0, 10_000, "500", NOW, 1.0, lease).retry_at == NOW + 60_000_000


def test_payload_is_the_hubs_single_item_shape() -> None:
    assert json.loads(payload(_config(), "http://hub/x")) == {"name": "hook", "uris": ["http://hub/x"], "type": "item"}


# -- the fold ------------------------------------------------------------------------------


def test_fold_failures_errors_and_cursor() -> None:
    log = Log()
    log.create()
    hook = log.projection.model.webhooks["hook"]
    for attempt in range(1, ERRORS_KEPT + 3):
        log.record(WebhookDeliveryFailed(generation=7, version=3, attempt=attempt, reason="500", retry_at=NOW + attempt))
    log.record(WebhookDeliveryFailed(generation=7, version=4, attempt=1, reason="timeout", retry_at=None))
    assert len(hook.errors) == ERRORS_KEPT and hook.errors[-1].gave_up
    assert hook.error_lines()[-1] == (
        f"2023-11-14T22:13:20.000Z {CHANNEL}/{item_id(7, 4)} attempt 1: timeout (gave up)"
    )
    assert hook.in_flight() == [f"{CHANNEL}/{item_id(7, 3)}"]  # the given-up item is not in flight
    assert hook.retry_of(7, 3) is not None and hook.retry_of(8, 3) is None
    log.record(WebhookCursorMoved(generation=7, version=3, reason="delivered"))
    assert list(hook.retries) == [4] and hook.cursor == 3
    log.record(WebhookCursorMoved(generation=7, version=0, reason="set"))
    assert hook.retries == {} and hook.epoch == log.versions["webhook:hook"]
    assert hook.cursor_in(7) == 0 and hook.cursor_in(9) == -1


def test_fold_leases() -> None:
    log = Log()
    log.create()
    hook = log.projection.model.webhooks["hook"]
    log.record(WebhookClaimed(lease=Lease("a", NOW + 100)))
    log.record(WebhookCursorMoved(generation=7, version=3, reason="delivered", lease=Lease("a", NOW + 50)))
    assert hook.lease == Lease("a", NOW + 100)  # the holder's lease never shrinks
    log.record(WebhookReleased(node="b"))
    assert hook.lease == Lease("a", NOW + 100)  # only the holder releases
    log.record(WebhookClaimed(lease=Lease("b", NOW + 10)))
    assert hook.lease == Lease("b", NOW + 10)  # a takeover replaces it
    log.record(WebhookReleased(node="b"))
    assert hook.lease is None


def test_fold_delete_and_create_again() -> None:
    log = Log()
    log.create()
    log.record(WebhookDeliveryFailed(generation=7, version=3, attempt=1, reason="500", retry_at=NOW))
    log.record(WebhookDeleted(name="hook"))
    assert "hook" not in log.projection.model.webhooks
    log.record(WebhookCursorMoved(generation=7, version=3, reason="delivered"))  # a stray record is ignored
    log.commit(decide_put(None, log.versions["webhook:hook"], _config(), (7, 2)))
    hook = log.projection.model.webhooks["hook"]
    assert hook.errors == [] and hook.retries == {} and (hook.config_version, hook.cursor) == (5, 2)


def test_snapshot_restore_and_view() -> None:
    log = Log()
    log.create(paused=True)
    log.record(WebhookDeliveryFailed(generation=7, version=3, attempt=1, reason="500", retry_at=NOW, lease=Lease("a", NOW)))
    copy = Webhooks()
    copy.restore(log.projection.snapshot())
    assert copy.model == log.projection.model
    assert msgspec.json.decode(msgspec.json.encode(copy.view()))["webhooks"]["hook"]["config"]["paused"] is True
