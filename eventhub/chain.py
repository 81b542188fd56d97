"""The hash chain: each event's hash covers the previous hash and the event's fields.

The payload enters the chain only through its SHA-256 digest, so erasing a payload
(TTL, erasure requests) leaves the chain verifiable.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import msgspec

from eventhub.events import Event, Meta

GENESIS = bytes(32)

hash_encode = msgspec.msgpack.Encoder().encode
"""Encodes the tuple an event hash covers; backends that inline `event_hash` use it."""
_meta_encode = msgspec.json.Encoder(order="sorted").encode


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def encode_meta(meta: Meta) -> bytes:
    """Meta as stored and hashed: JSON with sorted keys, so equal dicts hash equally."""
    return _meta_encode(meta) if meta else b"{}"


def event_hash(
    prev_hash: bytes,
    position: int,
    stream: str,
    version: int,
    type: str,
    meta_bytes: bytes,
    recorded_at: int,
    data_digest: bytes,
) -> bytes:
    return hashlib.sha256(
        hash_encode((prev_hash, position, stream, version, type, meta_bytes, recorded_at, data_digest))
    ).digest()


def check_event(event: Event) -> str | None:
    """Why this event fails its own check, or None when it is intact.

    Needs nothing but the event: rows keep the previous hash beside their own.
    """
    if event.data is not None and digest(event.data) != event.digest:
        return "data does not match its digest"
    expected = event_hash(
        event.prev_hash,
        event.position,
        event.stream,
        event.version,
        event.type,
        encode_meta(event.meta),
        event.recorded_at,
        event.digest,
    )
    if expected != event.hash:
        return "hash does not cover the event's fields"
    return None


@dataclass
class VerifyResult:
    """What `verify` found: `broken_at` is the first bad position, or None."""

    events: int
    head: int
    chain: bytes
    broken_at: int | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.broken_at is None


class ChainVerifier:
    """Folds events in position order and stops at the first break."""

    def __init__(self, prev_position: int = 0, prev_hash: bytes = GENESIS) -> None:
        self.result = VerifyResult(events=0, head=prev_position, chain=prev_hash)

    def feed(self, events: Iterable[Event]) -> bool:
        """Check a run of events; False once the chain is broken."""
        r = self.result
        if r.broken_at is not None:
            return False
        head = first = r.head
        chain = r.chain
        # encode_meta without its call: the sorted encoder writes an empty meta as b"{}" too
        sha256, encode, meta_encode = hashlib.sha256, hash_encode, _meta_encode
        try:
            for e in events:  # check_event, inlined: this loop is all of `eventhub verify`
                position = e.position
                if position != head + 1:
                    r.broken_at, r.reason = head + 1, f"position {head + 1} is missing (next is {position})"
                    return False
                if e.prev_hash != chain:
                    r.broken_at, r.reason = position, "previous hash does not match the event before it"
                    return False
                data, dg = e.data, e.digest
                if data is not None and sha256(data).digest() != dg:
                    r.broken_at, r.reason = position, "data does not match its digest"
                    return False
                fields = (chain, position, e.stream, e.version, e.type, meta_encode(e.meta), e.recorded_at, dg)
                h = e.hash
                if sha256(encode(fields)).digest() != h:
                    r.broken_at, r.reason = position, "hash does not cover the event's fields"
                    return False
                head, chain = position, h
        finally:
            # positions are consecutive, so the events checked are the head's advance
            r.head, r.chain, r.events = head, chain, r.events + head - first
        return True


async def verify(events: AsyncIterator[Event], prev_position: int = 0, prev_hash: bytes = GENESIS) -> VerifyResult:
    """Walk events (in position order, unchecked) and report the first broken position."""
    verifier = ChainVerifier(prev_position, prev_hash)
    async for event in events:
        if not verifier.feed((event,)):
            break
    return verifier.result
