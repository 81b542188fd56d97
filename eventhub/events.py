"""The event: the one record type of the log, and what callers hand to `append`."""

from __future__ import annotations

import datetime as _dt
from typing import Final

import msgspec

# Expected-version markers for `StreamAppend.expected`. A stream that does not exist
# has version -1, so `NO_STREAM` is also the exact version of a missing stream.
ANY: Final = -2
NO_STREAM: Final = -1
STREAM_EXISTS: Final = -3

Meta = dict[str, str]
"""Event metadata: content type, actor, request id, correlation id, encodings…"""


class Event(msgspec.Struct, frozen=True, gc=False):
    """One committed event.

    `position` is global and gap-free from 1; `version` counts from 0 within `stream`.
    `recorded_at` is UTC microseconds since the epoch and never decreases along positions.
    `data` is None once the payload has been purged; `digest` (SHA-256 of the data as
    written) stays, so the hash chain still verifies. `prev_hash` is the hash of the
    event at `position - 1` (32 zero bytes for the first event).
    """

    position: int
    stream: str
    version: int
    type: str
    data: bytes | None
    meta: Meta
    recorded_at: int
    digest: bytes
    prev_hash: bytes
    hash: bytes

    @property
    def purged(self) -> bool:
        return self.data is None

    @property
    def recorded_datetime(self) -> _dt.datetime:
        return micros_to_datetime(self.recorded_at)


class NewEvent(msgspec.Struct, frozen=True, gc=False):
    """An event to append: its type, payload bytes and metadata."""

    type: str
    data: bytes = b""
    meta: Meta = {}


class StreamAppend(msgspec.Struct, frozen=True):
    """Events for one stream in an `append` call, with the version the caller expects.

    `expected` is `ANY`, `NO_STREAM`, `STREAM_EXISTS`, or the exact current version
    (the version of the stream's last event).
    """

    stream: str
    events: list[NewEvent]
    expected: int = ANY


def micros_to_datetime(micros: int) -> _dt.datetime:
    return _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc) + _dt.timedelta(microseconds=micros)


def datetime_to_micros(value: _dt.datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.timezone.utc)
    delta = value - _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


_second_cache: tuple[int, str] = (-1, "")


def iso_millis(micros: int) -> str:
    """`2013-04-23T20:25:33.434Z`: the timestamp format the HTTP contracts use."""
    global _second_cache
    second, rest = divmod(micros, 1_000_000)
    cached_second, prefix = _second_cache
    if second != cached_second:  # most calls fall in the same second as the one before
        prefix = micros_to_datetime(second * 1_000_000).strftime("%Y-%m-%dT%H:%M:%S.")
        _second_cache = (second, prefix)
    return f"{prefix}{rest // 1000:03d}Z"


# -- facet events ---------------------------------------------------------------------

FACT_CONTENT_TYPE: Final = "application/vnd.eventhub.fact+json"
"""The content type of facet events: their data is a msgspec struct as JSON. Any other
content type marks raw content (a channel item's body), shown only as digest and size."""

_fact_encode = msgspec.json.Encoder().encode


def fact_event(fact: msgspec.Struct, actor: str | None = None) -> NewEvent:
    """A facet event: its type is the struct's class name, its data the struct as JSON."""
    meta = {"content-type": FACT_CONTENT_TYPE}
    if actor:
        meta["actor"] = actor
    return NewEvent(type(fact).__name__, _fact_encode(fact), meta)


class FactCodec:
    """Turns a facet's events back into its structs, by event type."""

    def __init__(self, *kinds: type[msgspec.Struct]) -> None:
        self.kinds = {k.__name__: k for k in kinds}
        self._decoders = {k.__name__: msgspec.json.Decoder(k) for k in kinds}

    def decode(self, event: Event) -> msgspec.Struct | None:
        """The struct, or None for a type this facet does not know or a purged event."""
        decoder = self._decoders.get(event.type)
        if decoder is None or event.data is None:
            return None
        return decoder.decode(event.data)
