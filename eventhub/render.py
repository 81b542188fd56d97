"""Events as JSON for people and tools: `/events`, `eventhub tail`, `eventhub export`.

`event_summary` is for reading: facet events' data decoded, raw content as digest and
size. `event_record` / `record_event` (and the line forms `record_line` / `line_event`)
are the exact form: every field, bytes in base64 or hex, so an exported log imports
back bit for bit — same positions, hashes and payloads, purged payloads still purged.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import msgspec

from eventhub.events import FACT_CONTENT_TYPE, Event, iso_millis


def event_summary(event: Event) -> dict[str, Any]:
    """Fields for display: facet events' data decoded, raw content as digest and size."""
    out: dict[str, Any] = {
        "position": event.position,
        "stream": event.stream,
        "version": event.version,
        "type": event.type,
        "recorded_at": iso_millis(event.recorded_at),
        "meta": event.meta,
        "digest": event.digest.hex(),
        "hash": event.hash.hex(),
    }
    if event.data is None:
        out["purged"] = True
        return out
    out["size"] = len(event.data)
    if event.meta.get("content-type") == FACT_CONTENT_TYPE:
        try:
            out["data"] = msgspec.json.decode(event.data)
        except msgspec.DecodeError:
            pass  # not what its content type says; digest and size still describe it
    return out


class EventRecord(msgspec.Struct, forbid_unknown_fields=True):
    """One line of an export: an event with its bytes in base64 (data) and hex (hashes)."""

    position: int
    stream: str
    version: int
    type: str
    data: str | None
    meta: dict[str, str]
    recorded_at: int
    digest: str
    prev_hash: str
    hash: str


class RecordError(ValueError):
    """A line of an export that is not an event record."""


def event_record(event: Event) -> dict[str, Any]:
    """Every field, bytes in base64: a record that round-trips exactly."""
    return {
        "position": event.position,
        "stream": event.stream,
        "version": event.version,
        "type": event.type,
        "data": None if event.data is None else base64.b64encode(event.data).decode(),
        "meta": event.meta,
        "recorded_at": event.recorded_at,
        "digest": event.digest.hex(),
        "prev_hash": event.prev_hash.hex(),
        "hash": event.hash.hex(),
    }


def record_event(record: dict[str, Any] | EventRecord) -> Event:
    """The inverse of `event_record`; raises `RecordError` for a malformed record."""
    try:
        r = record if isinstance(record, EventRecord) else msgspec.convert(record, EventRecord)
        return Event(
            position=r.position,
            stream=r.stream,
            version=r.version,
            type=r.type,
            data=None if r.data is None else base64.b64decode(r.data, validate=True),
            meta=r.meta,
            recorded_at=r.recorded_at,
            digest=_hash_bytes(r.digest, "digest"),
            prev_hash=_hash_bytes(r.prev_hash, "prev_hash"),
            hash=_hash_bytes(r.hash, "hash"),
        )
    except (msgspec.ValidationError, binascii.Error, ValueError) as exc:
        raise RecordError(str(exc)) from None


_line_encoder = msgspec.json.Encoder()
_line_decoder = msgspec.json.Decoder(EventRecord)


def record_line(event: Event) -> bytes:
    """The event as one JSON line (newline included)."""
    return _line_encoder.encode(event_record(event)) + b"\n"


def line_event(line: bytes | str) -> Event:
    """The event of one export line; raises `RecordError` when it is not one."""
    try:
        return record_event(_line_decoder.decode(line))
    except msgspec.DecodeError as exc:
        raise RecordError(str(exc)) from None


def _hash_bytes(text: str, field: str) -> bytes:
    value = bytes.fromhex(text)
    if len(value) != 32:
        raise ValueError(f"{field} must be 32 bytes of hex")
    return value
