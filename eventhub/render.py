"""Events as JSON for people and tools: `/events`, `eventhub tail`, `eventhub export`."""

from __future__ import annotations

import base64
from typing import Any

import msgspec

from eventhub.events import Event, iso_millis

JSON_TYPES = ("application/json",)


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
    if event.meta.get("content-type", "application/json") in JSON_TYPES:
        try:
            out["data"] = msgspec.json.decode(event.data)
            return out
        except msgspec.DecodeError:
            pass
    return out


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


def record_event(record: dict[str, Any]) -> Event:
    """The inverse of `event_record`."""
    data = record["data"]
    return Event(
        position=int(record["position"]),
        stream=str(record["stream"]),
        version=int(record["version"]),
        type=str(record["type"]),
        data=None if data is None else base64.b64decode(data),
        meta={str(k): str(v) for k, v in record["meta"].items()},
        recorded_at=int(record["recorded_at"]),
        digest=bytes.fromhex(record["digest"]),
        prev_hash=bytes.fromhex(record["prev_hash"]),
        hash=bytes.fromhex(record["hash"]),
    )
