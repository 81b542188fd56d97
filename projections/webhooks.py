"""Webhooks (the Data Hub's push API): the events a webhook records, its read model, its decisions.

A webhook follows one channel and POSTs each new item's URL to a callback, in order, at
least once. Everything about it is an event in its stream, `webhook:<name>`:

    WebhookConfigured      the whole configuration, as a PUT left it
    WebhookCursorMoved     the last item done (delivered, given up on or skipped): at
                           creation (`start`), by a request (`set`), or by the worker
                           (`delivered`); delivery goes on with the item after it
    WebhookDeliveryFailed  one failed attempt at an item, and when to retry (or not: given up)
    WebhookClaimed         a node took the webhook, with a lease (`eventhub.claims`)
    WebhookReleased        that node let go of it (a clean shutdown)
    WebhookDeleted         gone; the name may be configured again as a new webhook

So a restart resumes at the cursor, the errors survive it, and a retry's attempt count
and backoff too. The cursor is (channel generation, item version): an item's place in its
channel (see `projections.channels`). When the channel is deleted and created again, the
cursor's generation is no longer the channel's and delivery starts at the new channel's
first item.

The read model keeps per webhook its configuration, cursor, lease, the items being
retried and the last `ERRORS_KEPT` errors. Decisions are pure: a request (with the
channels read model and the outbound guard) in, a `StreamAppend` or a `WebhookError` out.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar, Final, Literal, NamedTuple
from urllib.parse import urlsplit

import msgspec

from eventhub.claims import Lease
from eventhub.events import NO_STREAM, Event, NewEvent, StreamAppend, datetime_to_micros, iso_millis
from eventhub.netguard import OutboundGuard, RefusedDestination
from eventhub.projection import Projection
from projections.channels import NAME, Channel, item_id, parse_item_id
from projections.channels import Model as ChannelsModel

PREFIX: Final = "webhook:"
ERRORS_KEPT: Final = 10
"""Errors a webhook remembers (the newest); older ones stay in the log."""
MAX_PARALLEL: Final = 100
MAX_TIMEOUT_SECONDS: Final = 1800
MAX_WAIT_MINUTES: Final = 1440

ErrorKind = Literal["invalid", "not_found", "conflict", "too_large"]
CursorReason = Literal["start", "set", "delivered"]
_META: Final = {"content-type": "application/json"}


class WebhookError(Exception):
    """The one error of the webhooks facet; `kind` says which HTTP status it becomes."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message


# -- events ------------------------------------------------------------------------------


class WebhookConfigured(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    channel: str
    channel_url: str
    """As the client gave it (no trailing slash): item URLs sent are built on it."""
    callback_url: str
    parallel_calls: int = 1
    paused: bool = False
    max_attempts: int = 0
    """0: retry without end."""
    max_wait_minutes: int = 1
    """The cap of the backoff between attempts."""
    ttl_minutes: int = 0
    """0: no limit; otherwise items older than this are skipped, not sent."""
    callback_timeout_seconds: int = 30
    start_item: str | None = None


class WebhookCursorMoved(msgspec.Struct, frozen=True, kw_only=True):
    generation: int
    version: int
    """The last item done; -1: none yet, the first item is next."""
    reason: CursorReason
    lease: Lease | None = None


class WebhookDeliveryFailed(msgspec.Struct, frozen=True, kw_only=True):
    generation: int
    version: int
    attempt: int
    reason: str
    retry_at: int | None
    """Clock micros of the next attempt; None: maxAttempts reached, the item is given up."""
    lease: Lease | None = None


class WebhookClaimed(msgspec.Struct, frozen=True, kw_only=True):
    lease: Lease


class WebhookReleased(msgspec.Struct, frozen=True, kw_only=True):
    node: str


class WebhookDeleted(msgspec.Struct, frozen=True, kw_only=True):
    name: str


WebhookEvent = (
    WebhookConfigured | WebhookCursorMoved | WebhookDeliveryFailed | WebhookClaimed | WebhookReleased | WebhookDeleted
)
_TYPES: Final[dict[str, type[Any]]] = {
    t.__name__: t
    for t in (WebhookConfigured, WebhookCursorMoved, WebhookDeliveryFailed, WebhookClaimed, WebhookReleased, WebhookDeleted)
}
_encode = msgspec.json.Encoder().encode


def to_event(fact: WebhookEvent) -> NewEvent:
    return NewEvent(type(fact).__name__, _encode(fact), _META)


def stream_of(name: str) -> str:
    return PREFIX + name


# -- read model --------------------------------------------------------------------------


class Retry(msgspec.Struct):
    """An item that failed and is not done yet (or was given up on)."""

    generation: int
    attempts: int
    retry_at: int
    gave_up: bool = False


class Failure(msgspec.Struct):
    """One failed attempt, for `errors`."""

    at: int
    generation: int
    version: int
    attempt: int
    reason: str
    gave_up: bool


class Webhook(msgspec.Struct):
    config: WebhookConfigured
    created_at: int
    config_version: int
    """The stream version of the last `WebhookConfigured`: a worker's round ends when it moves."""
    generation: int = -1
    cursor: int = -1
    epoch: int = -1
    """The stream version of the last cursor set by a request (or the start)."""
    lease: Lease | None = None
    retries: dict[int, Retry] = {}
    errors: list[Failure] = []

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def stream(self) -> str:
        return stream_of(self.config.name)

    def cursor_in(self, generation: int) -> int:
        """The last item done in that channel generation (-1: none, a new channel)."""
        return self.cursor if self.generation == generation else -1

    def retry_of(self, generation: int, version: int) -> Retry | None:
        retry = self.retries.get(version)
        return retry if retry is not None and retry.generation == generation else None

    def item_url(self, generation: int, version: int) -> str:
        return f"{self.config.channel_url}/{item_id(generation, version)}"

    def error_lines(self) -> list[str]:
        """The errors as the real hub lists them: one line each, oldest first."""
        lines = []
        for f in self.errors:
            line = f"{iso_millis(f.at)} {self.item_url(f.generation, f.version)} attempt {f.attempt}: {f.reason}"
            lines.append(line + (" (gave up)" if f.gave_up else ""))
        return lines

    def in_flight(self) -> list[str]:
        """URLs of items being retried, in order."""
        return [
            self.item_url(r.generation, v)
            for v, r in sorted(self.retries.items())
            if not r.gave_up and r.generation == self.generation and v > self.cursor
        ]


class Model(msgspec.Struct):
    webhooks: dict[str, Webhook] = {}
    """Live webhooks by name."""
    versions: dict[str, int] = {}
    """The version of every name's `webhook:<name>` stream, live or deleted."""


class Webhooks(Projection):
    """Webhook configurations, cursors, leases and errors folded from `webhook:` streams."""

    name: ClassVar[str] = "webhooks"
    version: ClassVar[int] = 1
    prefixes: ClassVar[tuple[str, ...]] = (PREFIX,)

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()

    def apply(self, event: Event) -> None:
        m = self.model
        name = event.stream[len(PREFIX) :]
        m.versions[name] = event.version
        kind = _TYPES.get(event.type)
        if kind is None or event.data is None:
            return
        fact = msgspec.json.decode(event.data, type=kind)
        if isinstance(fact, WebhookConfigured):
            live = m.webhooks.get(name)
            if live is None:
                m.webhooks[name] = Webhook(fact, event.recorded_at, event.version)
            else:
                live.config, live.config_version = fact, event.version
            return
        if isinstance(fact, WebhookDeleted):
            m.webhooks.pop(name, None)
            return
        hook = m.webhooks.get(name)
        if hook is None:
            return
        if isinstance(fact, WebhookCursorMoved):
            hook.generation, hook.cursor = fact.generation, fact.version
            if fact.reason == "delivered":
                hook.retries = {v: r for v, r in hook.retries.items() if r.generation == fact.generation and v > fact.version}
            else:
                hook.epoch, hook.retries = event.version, {}
            _extend(hook, fact.lease)
        elif isinstance(fact, WebhookDeliveryFailed):
            gave_up = fact.retry_at is None
            hook.retries[fact.version] = Retry(fact.generation, fact.attempt, fact.retry_at or event.recorded_at, gave_up)
            hook.errors.append(Failure(event.recorded_at, fact.generation, fact.version, fact.attempt, fact.reason, gave_up))
            del hook.errors[:-ERRORS_KEPT]
            _extend(hook, fact.lease)
        elif isinstance(fact, WebhookClaimed):
            _extend(hook, fact.lease)
        elif isinstance(fact, WebhookReleased):
            if hook.lease is not None and hook.lease.node == fact.node:
                hook.lease = None

    def snapshot(self) -> bytes:
        return msgspec.msgpack.encode(self.model)

    def restore(self, state: bytes) -> None:
        self.model = msgspec.msgpack.decode(state, type=Model)

    def view(self) -> object:
        return msgspec.to_builtins(self.model)

    def get(self, name: str) -> Webhook:
        """The live webhook of that name, or a not-found `WebhookError`."""
        hook = self.model.webhooks.get(name)
        if hook is None:
            raise WebhookError("not_found", f"webhook {name!r} does not exist")
        return hook


def _extend(hook: Webhook, lease: Lease | None) -> None:
    """The holder's events move its lease on; a lease never shrinks for the same node."""
    if lease is None:
        return
    if hook.lease is not None and hook.lease.node == lease.node and hook.lease.until > lease.until:
        return
    hook.lease = lease


# -- locations: channel, item and time URLs ------------------------------------------------


class ChannelAt(NamedTuple):
    channel: str


class ItemAt(NamedTuple):
    channel: str
    generation: int
    version: int


class TimeAt(NamedTuple):
    channel: str
    start: int
    """UTC micros of the start of the period the URL names."""


def parse_location(url: str) -> ChannelAt | ItemAt | TimeAt:
    """`http(s)://host/channel/<name>[/<id> | /<Y>/<M>/<D>[/<h>[/<m>[/<s>]]]]`."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        raise WebhookError("invalid", f"not a URL: {url!r}") from None
    segments = [s for s in parts.path.split("/") if s]
    if parts.scheme not in ("http", "https") or not parts.netloc or len(segments) < 2 or segments[0] != "channel":
        raise WebhookError("invalid", f"{url!r} is not a channel URL (http://host/channel/<name>…)")
    name, rest = segments[1], segments[2:]
    if not NAME.fullmatch(name):
        raise WebhookError("invalid", f"{name!r} is not a channel name")
    if not rest:
        return ChannelAt(name)
    if len(rest) == 1 and (parsed := parse_item_id(rest[0])) is not None:
        return ItemAt(name, *parsed)
    if 3 <= len(rest) <= 6 and all(s.isdigit() for s in rest):
        try:
            start = dt.datetime(*(int(s) for s in rest), tzinfo=dt.timezone.utc)  # type: ignore[arg-type, misc]
        except ValueError as exc:
            raise WebhookError("invalid", f"{url!r} names no time: {exc}") from None
        return TimeAt(name, datetime_to_micros(start))
    raise WebhookError("invalid", f"{url!r} is neither an item nor a time of channel {name!r}")


def item_cursor(location: ChannelAt | ItemAt | TimeAt, channel: Channel) -> int | None:
    """The cursor (the last item done) that makes delivery go on after `location`.

    None for a time, which needs the store (`first_at_or_after`) to find its item.
    """
    if location.channel != channel.name:
        raise WebhookError("invalid", f"that is a location in channel {location.channel!r}, not {channel.name!r}")
    if isinstance(location, ChannelAt):
        raise WebhookError("invalid", "an item URL or a time URL is needed, not the channel's URL")
    if isinstance(location, TimeAt):
        return None
    if location.generation != channel.generation or not 0 <= location.version < channel.items:
        raise WebhookError("invalid", f"channel {channel.name!r} has no item {item_id(location.generation, location.version)}")
    return location.version


def previous_cursor(channel: Channel) -> int:
    """`startItem: "previous"`: the latest item is the first one sent."""
    return max(channel.items - 2, -1)


# -- decisions -----------------------------------------------------------------------------


class WebhookRequest(msgspec.Struct):
    """The body of `PUT /webhook/{name}`; absent fields keep their value, unknown ones are ignored."""

    name: str | msgspec.UnsetType = msgspec.UNSET
    callbackUrl: str | msgspec.UnsetType = msgspec.UNSET  # noqa: N815 (the hub's spelling)
    channelUrl: str | msgspec.UnsetType = msgspec.UNSET  # noqa: N815
    parallelCalls: int | msgspec.UnsetType = msgspec.UNSET  # noqa: N815
    startItem: str | None | msgspec.UnsetType = msgspec.UNSET  # noqa: N815
    paused: bool | msgspec.UnsetType = msgspec.UNSET
    maxAttempts: int | msgspec.UnsetType = msgspec.UNSET  # noqa: N815
    maxWaitMinutes: int | msgspec.UnsetType = msgspec.UNSET  # noqa: N815
    ttlMinutes: int | msgspec.UnsetType = msgspec.UNSET  # noqa: N815
    callbackTimeoutSeconds: int | msgspec.UnsetType = msgspec.UNSET  # noqa: N815
    batch: str | msgspec.UnsetType = msgspec.UNSET
    heartbeat: bool | msgspec.UnsetType = msgspec.UNSET


def configure(
    existing: Webhook | None,
    name: str,
    request: WebhookRequest,
    channels: ChannelsModel,
    guard: OutboundGuard,
    default_timeout_seconds: int,
) -> WebhookConfigured:
    """The configuration a PUT asks for: the request merged over the existing one, checked."""
    if not NAME.fullmatch(name):
        raise WebhookError("invalid", "a webhook name is 1 to 48 characters of a-z, A-Z, 0-9, _ and -")
    r = request
    if not isinstance(r.name, msgspec.UnsetType) and r.name != name:
        raise WebhookError("invalid", f"the body names webhook {r.name!r}, the URL {name!r}")
    old = existing.config if existing is not None else None

    def value(given: Any, field: str, default: Any) -> Any:
        if not isinstance(given, msgspec.UnsetType):
            return given
        return getattr(old, field) if old is not None else default

    callback_url = value(r.callbackUrl, "callback_url", None)
    channel_url = value(r.channelUrl, "channel_url", None)
    if callback_url is None:
        raise WebhookError("invalid", "callbackUrl is required")
    if channel_url is None:
        raise WebhookError("invalid", "channelUrl is required")
    try:
        guard.check_url(callback_url)
    except RefusedDestination as exc:
        raise WebhookError("invalid", f"callbackUrl refused: {exc}") from None
    location = parse_location(channel_url)
    if not isinstance(location, ChannelAt):
        raise WebhookError("invalid", f"channelUrl must be a channel's URL (http://host/channel/<name>), not {channel_url!r}")
    if old is not None and location.channel != old.channel:
        raise WebhookError("conflict", f"webhook {name!r} follows channel {old.channel!r}; its channel cannot change "
                           "(delete the webhook and create it again)")
    if old is None and location.channel not in channels.channels:
        raise WebhookError("invalid", f"channelUrl: channel {location.channel!r} does not exist")
    config = WebhookConfigured(
        name=name,
        channel=location.channel,
        channel_url=channel_url.strip().rstrip("/"),
        callback_url=callback_url,
        parallel_calls=value(r.parallelCalls, "parallel_calls", 1),
        paused=value(r.paused, "paused", False),
        max_attempts=value(r.maxAttempts, "max_attempts", 0),
        max_wait_minutes=value(r.maxWaitMinutes, "max_wait_minutes", 1),
        ttl_minutes=value(r.ttlMinutes, "ttl_minutes", 0),
        callback_timeout_seconds=value(r.callbackTimeoutSeconds, "callback_timeout_seconds", default_timeout_seconds),
        start_item=r.startItem if isinstance(r.startItem, str) else (old.start_item if old is not None else None),
    )
    _check_ranges(config)
    if not isinstance(r.batch, msgspec.UnsetType) and r.batch.upper() != "SINGLE":
        raise WebhookError("invalid", "batch: only SINGLE (one item per call) is supported")
    if r.heartbeat is True:
        raise WebhookError("invalid", "heartbeat: heartbeats belong to MINUTE and SECOND batches, which are not supported")
    return config


def _check_ranges(c: WebhookConfigured) -> None:
    checks = [
        ("parallelCalls", c.parallel_calls, 1, MAX_PARALLEL),
        ("maxAttempts", c.max_attempts, 0, None),
        ("maxWaitMinutes", c.max_wait_minutes, 1, MAX_WAIT_MINUTES),
        ("ttlMinutes", c.ttl_minutes, 0, None),
        ("callbackTimeoutSeconds", c.callback_timeout_seconds, 1, MAX_TIMEOUT_SECONDS),
    ]
    for field, value, low, high in checks:
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"{low} or more"
            raise WebhookError("invalid", f"{field} must be {bounds}, not {value}")


def start_changed(existing: Webhook | None, config: WebhookConfigured) -> bool:
    """Does this PUT place the cursor? On creation always; later when startItem changes."""
    return existing is None or (config.start_item is not None and config.start_item != existing.config.start_item)


def decide_put(
    existing: Webhook | None, expected: int, config: WebhookConfigured, start: tuple[int, int] | None
) -> StreamAppend | None:
    """Configure (and place the cursor at `start`, (generation, version)); None: nothing changes."""
    events = []
    if existing is None or existing.config != config:
        events.append(to_event(config))
    if start is not None:
        reason: CursorReason = "start" if existing is None else "set"
        events.append(to_event(WebhookCursorMoved(generation=start[0], version=start[1], reason=reason)))
    if not events:
        return None
    return StreamAppend(stream_of(config.name), events, expected)


def decide_cursor(model: Model, name: str, generation: int, version: int) -> StreamAppend:
    """`updateCursor`: delivery goes on after item `version` (-1: from the first item)."""
    hook = _live(model, name)
    fact = WebhookCursorMoved(generation=generation, version=version, reason="set")
    return StreamAppend(hook.stream, [to_event(fact)], model.versions[name])


def decide_delete(model: Model, name: str) -> StreamAppend:
    hook = _live(model, name)
    return StreamAppend(hook.stream, [to_event(WebhookDeleted(name=name))], model.versions[name])


def expected_version(model: Model, name: str) -> int:
    return model.versions.get(name, NO_STREAM)


def _live(model: Model, name: str) -> Webhook:
    hook = model.webhooks.get(name)
    if hook is None:
        raise WebhookError("not_found", f"webhook {name!r} does not exist")
    return hook


# -- delivery decisions (the worker's) ---------------------------------------------------


def backoff_seconds(attempt: int, base_seconds: float, max_wait_minutes: int) -> float:
    """The wait after failed attempt `attempt` (1, 2, …): doubling from the base, capped."""
    return min(base_seconds * (1 << min(attempt - 1, 40)), max_wait_minutes * 60.0)


def decide_failure(
    config: WebhookConfigured,
    generation: int,
    version: int,
    attempt: int,
    reason: str,
    now: int,
    base_seconds: float,
    lease: Lease,
) -> WebhookDeliveryFailed:
    """Attempt `attempt` failed: retry after the backoff, or give up once maxAttempts are spent.

    `lease` is the holder's lease from now; it is moved on by the wait, so that no other
    node takes the webhook over while its holder waits to retry.
    """
    if config.max_attempts and attempt >= config.max_attempts:
        retry_at = None
    else:
        retry_at = now + int(backoff_seconds(attempt, base_seconds, config.max_wait_minutes) * 1_000_000)
    lease = Lease(lease.node, lease.until + ((retry_at or now) - now))
    return WebhookDeliveryFailed(
        generation=generation, version=version, attempt=attempt, reason=reason, retry_at=retry_at, lease=lease
    )


def payload(config: WebhookConfigured, uri: str) -> bytes:
    """What the callback receives, as the real hub sends a SINGLE webhook's item."""
    return _encode({"name": config.name, "uris": [uri], "type": "item"})
