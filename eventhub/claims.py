"""Work claims: how a worker takes one work item so that no two nodes run it at once.

A work item is a stream (`export:<id>`, `build:<id>`, …). A worker that wants to run it
appends a claim event (its facet's own type, e.g. `ExportClaimed`) to that stream with
the **expected version it saw** in its read model. The log lets exactly one of several
racing appends with the same expected version win; the losers get
`WrongExpectedVersion`, which here means "another node has it", not an error.

Every claim carries a lease: the node id of the claimer and a deadline (`until`, clock
micros). While the lease runs, other nodes leave the item alone. When it has passed (the
node crashed, hung or lost its disk), any node may take the item over the same way: by
appending its own claim with the version it saw. Whoever holds an item extends its
lease simply by appending further events that carry a new deadline.

The rules, as the facets use them:

1. Read the item's state and stream version from the projection.
2. `claimable(lease, node, now)`: free, held by this node, or expired.
3. `await claim(log, stream, version, events)`; `None` means someone else won, and the
   hub has been caught up with the store so the projection now shows the winner.
4. Do the work; record the outcome with the version the claim returned as expected
   version, so a node whose lease was taken over cannot overwrite the new holder.

This module knows nothing about any facet.
"""

from __future__ import annotations

import os
import secrets
import socket
import msgspec

from eventhub.errors import WrongExpectedVersion
from eventhub.events import Event, NewEvent, StreamAppend
from eventhub.log import EventLog



def new_node_id() -> str:
    """A fresh node id: `host:pid:random`.

    A worker takes one when it starts and keeps it while it runs; in production that is
    one per process. Two workers in one process (two apps in a test) are two nodes, and
    a restarted process is a new node, so it never mistakes an old claim for its own.
    """
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Lease(msgspec.Struct, frozen=True):
    """Who holds a work item, and until when (UTC micros of the log's clock)."""

    node: str
    until: int

    def active(self, now: int) -> bool:
        return now < self.until


def lease_until(now: int, seconds: float) -> int:
    """The deadline `seconds` after `now` (both in the clock's micros)."""
    return now + int(seconds * 1_000_000)


def claimable(lease: Lease | None, node: str, now: int) -> bool:
    """May `node` claim an item whose current lease is `lease`?

    Yes when nobody holds it, when `node` itself does, or when the holder's lease has
    expired (the holder is presumed dead and the item may be taken over).
    """
    return lease is None or lease.node == node or not lease.active(now)


async def claim(log: EventLog, stream: str, expected_version: int, events: list[NewEvent]) -> list[Event] | None:
    """Append `events` (the claim) to `stream` if it is still at `expected_version`.

    Returns the committed events, or None when another node appended first. On a loss
    the hub reads what this node has not seen yet, so the caller's projection shows the
    winner's claim before the caller looks again.
    """
    try:
        return await log.append(StreamAppend(stream, events, expected_version))
    except WrongExpectedVersion:
        await log.hub.advance(await log.store.head())
        return None
