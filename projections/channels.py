"""Channels (the Data Hub API): the events a channel records, its read model, its decisions.

Streams. `channel:<name>` holds a channel's life: `ChannelCreated`, `ChannelUpdated`,
`ChannelDeleted` and `ItemsPurged`. Each incarnation of a name keeps its items in its own
stream, `channel:<name>:<generation>`, where the generation is the log position of the
`ChannelCreated` that began it; so the items of a deleted channel can never leak into a
new channel of the same name, and an item's number in its generation is its stream version.
An item is an `ItemInserted` event whose data is the body exactly as posted and whose meta
holds its `content-type`, `content-encoding` and `content-language`.

Item ids are 16 characters of base32hex (0-9, A-V): the generation and the item's version,
40 bits each. Fixed width, so ids sort in insertion order, and the previous and next ids
are known without reading the log.

The read model holds metadata only (names, TTLs, dates, item counts); item bodies are read
from the log by stream and version. Decisions are pure: a request and the model in, a
`StreamAppend` or a `ChannelError` out.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

import msgspec

from eventhub.events import ANY, NO_STREAM, Event, FactCodec, NewEvent, StreamAppend, fact_event
from eventhub.projection import Projection

PREFIX = "channel:"
ITEM = "ItemInserted"
MAX_N = 10_000
"""Most item URIs one listing returns (`/latest/{n}`, `/next/{n}`, time queries)."""

NAME = re.compile(r"[A-Za-z0-9_-]{1,48}")
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUV"
_ID = re.compile(r"[0-9A-V]{16}")
_HALF = 1 << 40

ErrorKind = Literal["invalid", "not_found", "conflict", "too_large", "unsupported"]


class ChannelError(Exception):
    """The one error of the channels facet; `kind` says which HTTP status it becomes."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message


# -- events ------------------------------------------------------------------------------


class ChannelCreated(msgspec.Struct, frozen=True):
    name: str
    ttl_millis: int | None


class ChannelUpdated(msgspec.Struct, frozen=True):
    name: str
    ttl_millis: int | None


class ChannelDeleted(msgspec.Struct, frozen=True):
    name: str
    generation: int


class ItemsPurged(msgspec.Struct, frozen=True):
    """Payloads of items `0..through_version` of a generation were erased from the log."""

    name: str
    generation: int
    through_version: int
    reason: Literal["ttl", "deleted"]


FACTS = FactCodec(ChannelCreated, ChannelUpdated, ChannelDeleted, ItemsPurged)


# -- read model --------------------------------------------------------------------------


class Channel(msgspec.Struct):
    """One incarnation of a channel: its settings, dates (UTC micros) and item counts."""

    name: str
    generation: int
    ttl_millis: int | None
    created_at: int
    items: int = 0
    """How many items this generation holds; the newest has version `items - 1`."""
    latest_at: int = 0
    purged_through: int = -1
    """Items with a version up to this one have had their payloads purged."""

    @property
    def stream(self) -> str:
        return lifecycle_stream(self.name)

    @property
    def items_stream(self) -> str:
        return f"{PREFIX}{self.name}:{self.generation}"

    @property
    def updated_at(self) -> int:
        """`lastUpdateDate`: the newest insert, or the creation before any insert."""
        return self.latest_at if self.items else self.created_at

    def cutoff(self, now: int) -> int | None:
        """Items recorded before this (UTC micros) have outlived the TTL; None: no TTL."""
        return None if self.ttl_millis is None else now - self.ttl_millis * 1000


class Model(msgspec.Struct):
    channels: dict[str, Channel] = {}
    """Live channels by name, in creation order."""
    versions: dict[str, int] = {}
    """The version of every name's `channel:<name>` stream, live or deleted."""
    deleted: dict[str, Channel] = {}
    """Deleted generations whose payloads are not all purged yet, by items stream."""


class Channels(Projection):
    """Channel metadata folded from `channel:` streams."""

    name: ClassVar[str] = "channels"
    version: ClassVar[int] = 1
    prefixes: ClassVar[tuple[str, ...]] = (PREFIX,)

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()

    def apply(self, event: Event) -> None:
        m = self.model
        if event.type == ITEM:
            self._inserted(event)
            return
        name = event.stream[len(PREFIX) :]
        if ":" not in name:  # the channel's own stream: its version guards the next decision
            m.versions[name] = event.version
        fact = FACTS.decode(event)
        if isinstance(fact, ChannelCreated):
            m.channels[fact.name] = Channel(fact.name, event.position, fact.ttl_millis, event.recorded_at)
        elif isinstance(fact, ChannelUpdated):
            if (live := m.channels.get(fact.name)) is not None:
                live.ttl_millis = fact.ttl_millis
        elif isinstance(fact, ChannelDeleted):
            gone = m.channels.pop(fact.name, None)
            if gone is not None and gone.purged_through < gone.items - 1:
                m.deleted[gone.items_stream] = gone
        elif isinstance(fact, ItemsPurged):
            target = self._generation(fact.name, fact.generation)
            if target is not None:
                target.purged_through = max(target.purged_through, fact.through_version)
                if target.purged_through >= target.items - 1:
                    m.deleted.pop(target.items_stream, None)

    def _generation(self, name: str, generation: int) -> Channel | None:
        live = self.model.channels.get(name)
        if live is not None and live.generation == generation:
            return live
        return self.model.deleted.get(f"{PREFIX}{name}:{generation}")

    def _inserted(self, event: Event) -> None:
        name, generation = parse_items_stream(event.stream)
        target = self._generation(name, generation)
        if target is None:
            # an insert that raced a DELETE: its generation is gone, its payload must go too
            target = self.model.deleted[event.stream] = Channel(name, generation, None, 0)
        target.items = event.version + 1
        target.latest_at = event.recorded_at

    def snapshot(self) -> bytes:
        return msgspec.msgpack.encode(self.model)

    def restore(self, state: bytes) -> None:
        self.model = msgspec.msgpack.decode(state, type=Model)

    def get(self, name: str) -> Channel:
        """The live channel of that name, or a not-found `ChannelError`."""
        return _live(self.model, name)


def lifecycle_stream(name: str) -> str:
    return PREFIX + name


def parse_items_stream(stream: str) -> tuple[str, int]:
    """(name, generation) of a `channel:<name>:<generation>` stream."""
    name, _, generation = stream[len(PREFIX) :].rpartition(":")
    return name, int(generation)


# -- item ids ----------------------------------------------------------------------------


_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]  # 10 bits -> two characters


def item_id(generation: int, version: int) -> str:
    n = generation * _HALF + version
    p = _PAIRS  # unrolled: this runs for every insert and every link
    return (
        p[n >> 70 & 1023] + p[n >> 60 & 1023] + p[n >> 50 & 1023] + p[n >> 40 & 1023]
        + p[n >> 30 & 1023] + p[n >> 20 & 1023] + p[n >> 10 & 1023] + p[n & 1023]
    )


def parse_item_id(text: str) -> tuple[int, int] | None:
    """(generation, version) of an id, or None when it is not one."""
    if not _ID.fullmatch(text):
        return None
    number = int(text, 32)
    return number >> 40, number & (_HALF - 1)


# -- decisions ---------------------------------------------------------------------------


class ChannelRequest(msgspec.Struct):
    """The body of `POST /channel` and `PATCH /channel/{name}`; unknown fields are ignored."""

    name: str | msgspec.UnsetType = msgspec.UNSET
    ttlMillis: Any = msgspec.UNSET  # noqa: N815 (the contract's spelling)


def parse_ttl(value: Any) -> int | None:
    """`ttlMillis` as a number or a numeric string; null means no TTL."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is not int or value <= 0:
        raise ChannelError("invalid", f"ttlMillis must be a positive whole number of milliseconds or null, "
                           f"not {value!r}")
    return value


def decide_create(model: Model, request: ChannelRequest, default_ttl_millis: int) -> StreamAppend:
    name = request.name
    if isinstance(name, msgspec.UnsetType):
        raise ChannelError("invalid", "name is required")
    if not NAME.fullmatch(name):
        raise ChannelError("invalid", "name must be 1 to 48 characters of a-z, A-Z, 0-9, _ and -")
    if name in model.channels:
        raise ChannelError("conflict", f"channel {name!r} already exists")
    ttl = default_ttl_millis if request.ttlMillis is msgspec.UNSET else parse_ttl(request.ttlMillis)
    return StreamAppend(lifecycle_stream(name), [fact_event(ChannelCreated(name, ttl))], model.versions.get(name, NO_STREAM))


def decide_update(model: Model, name: str, request: ChannelRequest) -> StreamAppend | None:
    """The update, or None when the request changes nothing."""
    channel = _live(model, name)
    if request.ttlMillis is msgspec.UNSET:
        return None
    ttl = parse_ttl(request.ttlMillis)
    if ttl == channel.ttl_millis:
        return None
    return StreamAppend(channel.stream, [fact_event(ChannelUpdated(name, ttl))], model.versions[name])


def decide_delete(model: Model, name: str) -> StreamAppend:
    channel = _live(model, name)
    return StreamAppend(channel.stream, [fact_event(ChannelDeleted(name, channel.generation))], model.versions[name])


def decide_insert(model: Model, name: str, items: list[tuple[bytes, dict[str, str]]]) -> StreamAppend:
    """Items (body, meta) appended in one go; any version, so inserts never conflict."""
    channel = _live(model, name)
    if not items:
        raise ChannelError("invalid", "nothing to insert")
    return StreamAppend(channel.items_stream, [NewEvent(ITEM, data, meta) for data, meta in items], ANY)


def decide_purged(channel: Channel, through_version: int, reason: Literal["ttl", "deleted"]) -> StreamAppend:
    """Record that payloads were purged. Idempotent facts, so any version will do."""
    fact = ItemsPurged(channel.name, channel.generation, through_version, reason)
    return StreamAppend(channel.stream, [fact_event(fact)], ANY)


def _live(model: Model, name: str) -> Channel:
    channel = model.channels.get(name)
    if channel is None:
        raise ChannelError("not_found", f"channel {name!r} does not exist")
    return channel


def item_meta(content_type: str | None, encoding: str | None, language: str | None) -> dict[str, str]:
    meta = {"content-type": content_type or "application/octet-stream"}
    if encoding:
        meta["content-encoding"] = encoding
    if language:
        meta["content-language"] = language
    return meta
